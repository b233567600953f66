//! Links to an agent: a byte stream each way, whatever carries it.
//!
//! - ssh: the system OpenSSH client (`ssh -T -o BatchMode=yes -o StrictHostKeyChecking=yes ...`)
//!   runs `<agent> agent --stdio` on the board. Host keys are always checked: a board must be in
//!   `known_hosts` (or the file the inventory names) first. Its stderr is kept, so "Host key
//!   verification failed." or "Permission denied" ends up in the error when the link dies.
//! - serial: the tty in raw mode at the URL's baud rate.
//! - local: an agent process on this machine (by default this executable, `agent --stdio`).
//!
//! Child processes run in their own process group, so a Ctrl-C in the terminal reaches only the
//! host tool, which then decides what to cancel; closing a link kills and reaps its process.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::inventory::{shell_quote, Board, Endpoint};
use edgevlm_board_linux::serial::StoppableReader;

/// How much of a child's stderr is kept (the end of it).
const STDERR_KEEP: usize = 8 * 1024;

/// How many of its last stderr lines an error message quotes.
pub const STDERR_LINES: usize = 3;

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The ssh client or the local agent could not be started.
    #[error("starting {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The serial port could not be opened or configured.
    #[error("opening serial port")]
    Serial(#[from] edgevlm_board_linux::serial::SerialError),
    /// Duplicating the serial port handle failed.
    #[error("duplicating the serial port handle")]
    Clone(#[source] std::io::Error),
    /// The path of this executable (the default local agent) is unknown.
    #[error("finding this executable to start the local agent")]
    CurrentExe(#[source] std::io::Error),
}

/// A byte stream to an agent and back.
pub struct Link {
    /// Bytes from the agent.
    pub reader: Box<dyn Read + Send>,
    /// Bytes to the agent.
    pub writer: Box<dyn Write + Send>,
    /// The process behind the link, if any, and what closes it.
    pub guard: LinkGuard,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Opens a link to `board`.
    pub fn open(board: &Board) -> Result<Link, TransportError> {
        match &board.endpoint {
            Endpoint::Ssh { user, host, port } => {
                let mut cmd = Command::new(&board.ssh_program);
                cmd.args(ssh_args(board, user.as_deref(), host, *port));
                Link::spawn(cmd, &board.ssh_program.to_string_lossy())
            }
            Endpoint::Serial { device, baud } => {
                let port = edgevlm_board_linux::serial::open(device, *baud)?;
                let writer = port.try_clone().map_err(TransportError::Clone)?;
                let stop = Arc::new(AtomicBool::new(false));
                let reader = StoppableReader::new(port, stop.clone());
                Ok(Link::from_streams(reader, writer)
                    .on_close(move || stop.store(true, Ordering::SeqCst)))
            }
            Endpoint::Local => {
                let argv = local_command(board)?;
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]);
                Link::spawn(cmd, &argv[0].to_string_lossy())
            }
        }
    }

    /// Runs `cmd` with its stdin and stdout as the link and its stderr kept for error messages.
    pub fn spawn(mut cmd: Command, program: &str) -> Result<Link, TransportError> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| TransportError::Spawn {
            program: program.to_owned(),
            source,
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            unreachable!("all three pipes were requested");
        };
        let captured = Arc::new(Mutex::new(Vec::new()));
        let stderr_thread = Some(spawn_stderr_reader(stderr, captured.clone()));
        Ok(Link {
            reader: Box::new(stdout),
            writer: Box::new(stdin),
            guard: LinkGuard {
                program: program.to_owned(),
                child: Some(child),
                stderr: captured,
                stderr_thread,
                on_close: None,
            },
        })
    }

    /// A link over streams the caller opened (a socket pair to an in-process agent in tests).
    pub fn from_streams(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
    ) -> Link {
        Link {
            reader: Box::new(reader),
            writer: Box::new(writer),
            guard: LinkGuard {
                program: String::new(),
                child: None,
                stderr: Arc::default(),
                stderr_thread: None,
                on_close: None,
            },
        }
    }

    /// Runs `close` when the link is closed (e.g. shuts a socket down so that a reader blocked
    /// on it returns).
    pub fn on_close(mut self, close: impl FnOnce() + Send + 'static) -> Link {
        self.guard.on_close = Some(Box::new(close));
        self
    }
}

/// What closes a link: kills and reaps its process, runs its close hook. Dropping it closes.
pub struct LinkGuard {
    program: String,
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
    on_close: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for LinkGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkGuard")
            .field("program", &self.program)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish_non_exhaustive()
    }
}

impl LinkGuard {
    /// Why the far end went away, once the stream has ended or failed: the process's exit status
    /// and the end of its stderr (`ssh exited with status 255: Host key verification failed.`).
    /// Waits up to `wait` for the process to exit; `None` for links without a process, or if it
    /// is still running and said nothing.
    pub fn failure_detail(&mut self, wait: Duration) -> Option<String> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + wait;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break None,
            }
        };
        if status.is_some() {
            // The process is gone: its stderr ends as soon as any children of it are gone too.
            if let Some(thread) = self.stderr_thread.take() {
                while !thread.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if thread.is_finished() {
                    let _ = thread.join();
                }
            }
        }
        let stderr = self.stderr_text();
        let exited = status.map(|status| match (status.code(), status.signal()) {
            (Some(code), _) => format!("{} exited with status {code}", self.program),
            (None, Some(signal)) => format!("{} was killed by signal {signal}", self.program),
            (None, None) => format!("{} exited", self.program),
        });
        match (exited, stderr.is_empty()) {
            (Some(exited), true) => Some(exited),
            (Some(exited), false) => Some(format!("{exited}: {stderr}")),
            (None, false) => Some(format!("{} said: {stderr}", self.program)),
            (None, true) => None,
        }
    }

    /// The last lines the process wrote on stderr (at most [`STDERR_LINES`], joined with `; `):
    /// ssh's own complaint, or the last words of an agent that crashed (agents log every
    /// request there, so the whole of it would drown the cause).
    pub fn stderr_text(&self) -> String {
        let bytes = self.stderr.lock().map(|b| b.clone()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text
            .split('\n')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        lines[lines.len().saturating_sub(STDERR_LINES)..]
            .iter()
            .map(|l| {
                let mut end = l.len().min(300);
                while !l.is_char_boundary(end) {
                    end -= 1;
                }
                &l[..end]
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Closes the link: runs the close hook, gives the process up to `grace` to exit on its
    /// own (it sees end of input once the writer is dropped), then kills and reaps it.
    pub fn close_within(&mut self, grace: Duration) {
        if let Some(close) = self.on_close.take() {
            close();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + grace;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Closes the link at once: runs the close hook, kills the process and reaps it.
    pub fn close(&mut self) {
        self.close_within(Duration::ZERO);
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        self.close();
    }
}

fn spawn_stderr_reader(mut stderr: ChildStderr, keep: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let Ok(mut kept) = keep.lock() else { break };
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > STDERR_KEEP {
                        let cut = kept.len() - STDERR_KEEP;
                        kept.drain(..cut);
                    }
                }
            }
        }
    })
}

/// The ssh client's arguments for `board` (the program is [`Board::ssh_program`]).
pub fn ssh_args(board: &Board, user: Option<&str>, host: &str, port: u16) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-T".into()];
    for option in [
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "ServerAliveInterval=5",
        "ConnectTimeout=15",
    ] {
        args.push("-o".into());
        args.push(option.into());
    }
    if let Some(known_hosts) = &board.known_hosts {
        let mut option = OsString::from("UserKnownHostsFile=");
        option.push(known_hosts);
        args.push("-o".into());
        args.push(option);
    }
    if let Some(identity) = &board.identity {
        args.push("-i".into());
        args.push(identity.into());
        // Only this key: an agent full of keys can exhaust the server's MaxAuthTries first.
        args.push("-o".into());
        args.push("IdentitiesOnly=yes".into());
    }
    args.push("-p".into());
    args.push(port.to_string().into());
    args.push(match user {
        Some(user) => format!("{user}@{host}").into(),
        None => host.into(),
    });
    args.push("--".into());
    args.push(remote_command(board).into());
    args
}

/// The command ssh runs on the board: `<agent> agent --stdio [--store S] [--board P]`, as one
/// shell command line (the agent prefix verbatim, the values quoted).
pub fn remote_command(board: &Board) -> String {
    let mut line = format!("{} agent --stdio", board.agent.trim());
    if let Some(store) = &board.store {
        line.push_str(" --store ");
        line.push_str(&shell_quote(store));
    }
    if let Some(profile) = &board.profile {
        line.push_str(" --board ");
        line.push_str(&shell_quote(profile));
    }
    line
}

/// The local agent's program and arguments: [`Board::agent_command`], else this executable
/// with `agent --stdio [--store S] [--board P]`.
pub fn local_command(board: &Board) -> Result<Vec<OsString>, TransportError> {
    if !board.agent_command.is_empty() {
        return Ok(board.agent_command.clone());
    }
    let exe = std::env::current_exe().map_err(TransportError::CurrentExe)?;
    let mut argv: Vec<OsString> = vec![exe.into(), "agent".into(), "--stdio".into()];
    if let Some(store) = &board.store {
        argv.push("--store".into());
        argv.push(store.into());
    }
    if let Some(profile) = &board.profile {
        argv.push("--board".into());
        argv.push(profile.into());
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::parse_url;

    #[test]
    fn ssh_command_checks_host_keys() {
        let mut board = Board::new("pi", parse_url("ssh://pi@10.0.0.7:2222").unwrap());
        board.agent = "/usr/bin/edgevlm".into();
        board.store = Some("/var/lib/edge vlm".into());
        board.profile = Some("rpi5".into());
        board.identity = Some("/k/id".into());
        board.known_hosts = Some("/k/known_hosts".into());
        let args: Vec<String> = ssh_args(&board, Some("pi"), "10.0.0.7", 2222)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        assert!(
            line.starts_with(
                "-T -o BatchMode=yes -o StrictHostKeyChecking=yes -o ServerAliveInterval=5"
            ),
            "{line}"
        );
        assert!(
            line.contains("-o UserKnownHostsFile=/k/known_hosts -i /k/id"),
            "{line}"
        );
        assert!(
            line.ends_with(
                "-p 2222 pi@10.0.0.7 -- /usr/bin/edgevlm agent --stdio --store '/var/lib/edge vlm' --board rpi5"
            ),
            "{line}"
        );
    }

    #[test]
    fn spawn_failure_names_the_program() {
        let mut board = Board::new("x", Endpoint::Local);
        board.agent_command = vec!["/nonexistent/edgevlm".into()];
        let err = Link::open(&board).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/edgevlm"), "{err}");
    }

    #[test]
    fn a_dead_process_reports_status_and_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'Permission denied (publickey).' >&2; exit 255"]);
        let mut link = Link::spawn(cmd, "ssh").unwrap();
        let mut out = Vec::new();
        link.reader.read_to_end(&mut out).unwrap();
        let detail = link.guard.failure_detail(Duration::from_secs(5)).unwrap();
        assert_eq!(
            detail,
            "ssh exited with status 255: Permission denied (publickey)."
        );
    }

    #[test]
    fn closing_kills_the_process() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let link = Link::spawn(cmd, "sleep").unwrap();
        let start = Instant::now();
        drop(link);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn serial_open_failure_names_the_device() {
        let board = Board::new(
            "uart",
            parse_url("serial:///nonexistent/ttyUSB9?baud=921600").unwrap(),
        );
        let err = Link::open(&board).unwrap_err();
        let text = edgevlm_runtime::error_chain(&err);
        assert!(text.contains("/nonexistent/ttyUSB9"), "{text}");
    }
}
