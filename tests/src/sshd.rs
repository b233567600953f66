//! A real OpenSSH server on 127.0.0.1 for end-to-end tests over ssh.
//!
//! [`Sshd::start`] runs `/usr/sbin/sshd -D -e` as the current user's server in a temporary
//! directory of its own: a fresh ed25519 host key, a client key pair authorized for the current
//! user, a `known_hosts` file holding the host key (host-key checking stays on in every command),
//! public-key login only, no PAM, no environment passing. Dropping it stops the server and every
//! session it started, then removes the directory.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The OpenSSH server binary (Debian's `openssh-server`).
pub const SSHD: &str = "/usr/sbin/sshd";
/// How long the server gets to accept connections.
const START_LIMIT: Duration = Duration::from_secs(10);
/// Fresh ports that lose the race against another process before the server binds them.
const BIND_ATTEMPTS: usize = 5;

/// A running OpenSSH server; see the module documentation.
#[derive(Debug)]
pub struct Sshd {
    child: Child,
    port: u16,
    user: String,
    dir: tempfile::TempDir,
}

impl Sshd {
    /// Starts a server on a free port of 127.0.0.1 and waits until it answers with its SSH
    /// banner. Fails with a message naming `apt-get install openssh-server` (or
    /// `openssh-client`) when OpenSSH is not installed, and with the server's log when it dies.
    pub fn start() -> io::Result<Sshd> {
        if !Path::new(SSHD).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{SSHD} not found: apt-get install openssh-server"),
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("edgevlm-sshd-")
            .tempdir()
            .map_err(context("creating the sshd temp dir"))?;
        let host_key = dir.path().join("host_ed25519");
        let identity = dir.path().join("id_ed25519");
        keygen(&host_key, "edgevlm-test-host")?;
        keygen(&identity, "edgevlm-test-client")?;
        let host_public = read(&host_key.with_extension("pub"))?;
        fs::copy(
            identity.with_extension("pub"),
            dir.path().join("authorized_keys"),
        )
        .map_err(context("writing authorized_keys"))?;
        let user = current_user()?;
        if rustix::process::geteuid().is_root() {
            // sshd running as root refuses to start without its privilege separation dir,
            // which only the package's service unit normally creates.
            match fs::create_dir("/run/sshd") {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(context("creating /run/sshd")(e))
                }
                _ => {}
            }
        }

        let mut attempt = 0;
        let (child, port) = loop {
            attempt += 1;
            let port = free_port()?;
            match spawn_and_wait(dir.path(), port) {
                Ok(child) => break (child, port),
                // Another process took the port between our probe and sshd's bind.
                Err(Failure::Bind(_)) if attempt < BIND_ATTEMPTS => continue,
                Err(Failure::Bind(e) | Failure::Other(e)) => return Err(e),
            }
        };
        let sshd = Sshd {
            child,
            port,
            user,
            dir,
        };
        // Only the key type and key: the file's comment is not part of a known_hosts line.
        let key: Vec<&str> = host_public.split_whitespace().take(2).collect();
        fs::write(
            sshd.known_hosts_file(),
            format!("[127.0.0.1]:{port} {}\n", key.join(" ")),
        )
        .map_err(context("writing known_hosts"))?;
        Ok(sshd)
    }

    /// Starts a server for a test. Returns `None` after printing a notice when OpenSSH is not
    /// installed and the `CI` environment variable is not `true`; panics on any other failure,
    /// and in CI always, so a CI machine without OpenSSH fails the tests instead of skipping them.
    pub fn for_test() -> Option<Sshd> {
        match Sshd::start() {
            Ok(sshd) => Some(sshd),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && std::env::var("CI").as_deref() != Ok("true") =>
            {
                eprintln!("SKIPPED (not CI): {e}");
                None
            }
            Err(e) => panic!("starting sshd: {e}"),
        }
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user the client logs in as: the current user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The client's private key, authorized on this server.
    pub fn identity_file(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    /// A known_hosts file holding this server's host key for `[127.0.0.1]:PORT`.
    pub fn known_hosts_file(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// `ssh://USER@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ssh://{}@127.0.0.1:{}", self.user, self.port)
    }

    /// The server's log so far (sshd's stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The `ssh` options that reach this server, without the destination: no config files, no
    /// agent keys, batch mode, strict host-key checking against [`Sshd::known_hosts_file`] only,
    /// the test identity and the port.
    pub fn ssh_options(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["-F", "none", "-p"].map(OsString::from).into();
        args.push(self.port.to_string().into());
        args.push("-i".into());
        args.push(self.identity_file().into());
        for option in [
            "BatchMode=yes".into(),
            "StrictHostKeyChecking=yes".into(),
            format!("UserKnownHostsFile={}", self.known_hosts_file().display()),
            "GlobalKnownHostsFile=/dev/null".into(),
            "IdentitiesOnly=yes".into(),
            "ConnectTimeout=10".into(),
        ] {
            args.push("-o".into());
            args.push(option.into());
        }
        args
    }

    /// `ssh [options] -T USER@127.0.0.1 REMOTE_CMD`: runs `remote_cmd` through the user's shell
    /// on this server without a terminal, so stdin and stdout carry bytes unchanged. Programs
    /// are best named by absolute path: the session's `PATH` is sshd's default.
    pub fn ssh_command(&self, remote_cmd: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_options())
            .arg("-T")
            .arg(format!("{}@127.0.0.1", self.user))
            .arg(remote_cmd);
        cmd
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Each session runs in processes forked from the listener, in a session of their own
        // (setsid), so no process-group kill reaches them, and once the listener is gone they
        // are orphans: find them first.
        let pid = self.child.id() as i32;
        let tree = process_tree(pid);
        for (p, _) in &tree {
            signal(*p, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Kill what is still there, as long as the pid still names the same process.
        for (p, start) in tree.into_iter().filter(|(p, _)| *p != pid) {
            if proc_stat(p).is_some_and(|(_, s)| s == start) {
                signal(p, rustix::process::Signal::KILL);
            }
        }
    }
}

enum Failure {
    /// The port was taken.
    Bind(io::Error),
    Other(io::Error),
}

fn spawn_and_wait(dir: &Path, port: u16) -> Result<Child, Failure> {
    let config = dir.join("sshd_config");
    let log_path = dir.join("sshd.log");
    let abs = |name: &str| dir.join(name).display().to_string();
    let text = format!(
        "ListenAddress 127.0.0.1\n\
         Port {port}\n\
         HostKey {host_key}\n\
         AuthorizedKeysFile {authorized}\n\
         PidFile {pid}\n\
         PubkeyAuthentication yes\n\
         AuthenticationMethods publickey\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         PermitRootLogin prohibit-password\n\
         PermitUserEnvironment no\n\
         PermitUserRC no\n\
         X11Forwarding no\n\
         Subsystem sftp internal-sftp\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         UseDNS no\n\
         MaxStartups 64\n\
         MaxSessions 64\n\
         LoginGraceTime 30\n\
         LogLevel INFO\n",
        host_key = abs("host_ed25519"),
        authorized = abs("authorized_keys"),
        pid = abs("sshd.pid"),
    );
    fs::write(&config, text)
        .map_err(context("writing sshd_config"))
        .map_err(Failure::Other)?;
    let log = fs::File::create(&log_path)
        .map_err(context("creating sshd.log"))
        .map_err(Failure::Other)?;
    let mut child = Command::new(SSHD)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(context(&format!("running {SSHD}")))
        .map_err(Failure::Other)?;
    let log_text = || fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = log_text();
            let e = io::Error::other(format!(
                "{SSHD} -f {} exited ({status}) before accepting connections: {}",
                config.display(),
                log.trim()
            ));
            return Err(if log.contains("Address already in use") {
                Failure::Bind(e)
            } else {
                Failure::Other(e)
            });
        }
        if banner(port).is_ok_and(|b| b.starts_with(b"SSH-2.0-")) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Failure::Other(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{SSHD} did not answer on 127.0.0.1:{port} within {START_LIMIT:?}: {}",
                    log_text().trim()
                ),
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The first bytes a server on `port` sends: sshd's banner, unless someone else has the port.
fn banner(port: u16) -> io::Result<Vec<u8>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 8];
    stream.read_exact(&mut buf)?;
    Ok(buf.to_vec())
}

fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(context("finding a free port on 127.0.0.1"))?;
    Ok(listener.local_addr()?.port())
}

fn keygen(path: &Path, comment: &str) -> io::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::NotFound {
                ": apt-get install openssh-client"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("running ssh-keygen: {e}{hint}"))
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ssh-keygen -f {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn current_user() -> io::Result<String> {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .map_err(context("running id -un"))?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || name.is_empty() {
        return Err(io::Error::other(format!(
            "id -un: no user name for the current user ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(name)
}

fn read(path: &Path) -> io::Result<String> {
    fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

fn context(what: &str) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        // The process may be gone already.
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// (parent pid, start time) of a process, from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(i32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces and parentheses: fields follow the last ')'.
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// `root` and all its descendants, with their start times.
fn process_tree(root: i32) -> Vec<(i32, u64)> {
    let all: Vec<(i32, i32, u64)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| proc_stat(pid).map(|(ppid, start)| (pid, ppid, start)))
        .collect();
    let mut tree: Vec<(i32, u64)> = all
        .iter()
        .filter(|(pid, ..)| *pid == root)
        .map(|(pid, _, start)| (*pid, *start))
        .collect();
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i].0;
        tree.extend(
            all.iter()
                .filter(|(_, ppid, _)| *ppid == parent)
                .map(|(pid, _, start)| (*pid, *start)),
        );
        i += 1;
    }
    tree
}
