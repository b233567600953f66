//! The boards file and board URLs: what `--board` names.
//!
//! ```toml
//! # ~/.config/edgevlm/boards.toml (or $EDGEVLM_BOARDS, or $XDG_CONFIG_HOME/edgevlm/boards.toml)
//! [[board]]
//! name = "line3-pi5"
//! url = "ssh://pi@10.0.0.7:22"
//! tags = ["pi5", "line3"]
//! agent = "/usr/bin/edgevlm"            # remote command (default `edgevlm`)
//! store = "/var/lib/edgevlm/models"     # agent --store (default: the agent's own)
//! profile = "rpi5"                      # agent --board: the board profile it reports
//! identity = "~/.ssh/id_ed25519"        # ssh -i
//! known_hosts = "~/.ssh/known_hosts"    # ssh -o UserKnownHostsFile=
//!
//! [[board]]
//! name = "bench-uart"
//! url = "serial:///dev/ttyUSB0?baud=921600"
//! ```
//!
//! A `--board` value is an inventory name, a literal URL (`ssh://[user@]host[:port]`,
//! `serial:///dev/ttyUSB0[?baud=N]`, default 115200 baud) or `local`: an agent started from
//! this same executable with its store under the data directory ([`data_dir`]) at
//! `local-board/`.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Baud rate of a `serial://` URL without `?baud=`.
pub const DEFAULT_BAUD: u32 = 115_200;

/// Port of an `ssh://` URL without one.
pub const DEFAULT_SSH_PORT: u16 = 22;

/// Remote command of an ssh board without `agent = ...`.
pub const DEFAULT_AGENT: &str = "edgevlm";

/// Name of the embedded board.
pub const LOCAL: &str = "local";

/// Why a boards file or a `--board` value is not usable.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The boards file could not be read.
    #[error("reading boards file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A field of the boards file is missing, unknown or mistyped.
    #[error("{path}: field `{field}`: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// Dotted path of the field (`board[1].url`).
        field: String,
        /// What was expected.
        message: String,
    },
    /// A board URL is malformed.
    #[error("bad board URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong, and what a good one looks like.
        why: String,
    },
    /// `--board` names no board.
    #[error("unknown board {name:?}: {known}; or give ssh://[user@]host[:port], serial:///dev/ttyUSB0?baud=921600 or `local`")]
    Unknown {
        /// The name given.
        name: String,
        /// The names the inventory knows, as a sentence.
        known: String,
    },
    /// Neither `$HOME` nor the variable overriding it is set.
    #[error("cannot tell where {what} is: set ${var} or $HOME")]
    NoHome {
        /// What was looked for.
        what: &'static str,
        /// The variable that overrides it.
        var: &'static str,
    },
}

/// How a board is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The system OpenSSH client runs the agent on the board.
    Ssh {
        /// Login user (ssh's default if `None`).
        user: Option<String>,
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// The agent serves a serial line.
    Serial {
        /// The tty on this machine.
        device: PathBuf,
        /// Line speed.
        baud: u32,
    },
    /// An agent process on this machine.
    Local,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Ssh { user, host, port } => {
                f.write_str("ssh://")?;
                if let Some(user) = user {
                    write!(f, "{user}@")?;
                }
                if host.contains(':') {
                    write!(f, "[{host}]:{port}")
                } else {
                    write!(f, "{host}:{port}")
                }
            }
            Endpoint::Serial { device, baud } => {
                write!(f, "serial://{}?baud={baud}", device.display())
            }
            Endpoint::Local => f.write_str(LOCAL),
        }
    }
}

/// A board, resolved and ready to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    /// Inventory name, or the URL given literally, or `local`.
    pub name: String,
    /// How to reach it.
    pub endpoint: Endpoint,
    /// Free labels from the inventory.
    pub tags: Vec<String>,
    /// ssh: the remote command that runs edgevlm (a shell command prefix, e.g.
    /// `sudo -n /usr/bin/edgevlm`); `agent --stdio ...` is appended.
    pub agent: String,
    /// The agent's `--store` (its default when `None`).
    pub store: Option<String>,
    /// The agent's `--board`: the board profile it reports (its default when `None`).
    pub profile: Option<String>,
    /// ssh: private key (`ssh -i`).
    pub identity: Option<PathBuf>,
    /// ssh: known hosts file (`-o UserKnownHostsFile=`).
    pub known_hosts: Option<PathBuf>,
    /// ssh: the client program (`ssh` from `$PATH` by default).
    pub ssh_program: OsString,
    /// local: program and arguments that serve the protocol on stdin/stdout. Empty: this
    /// executable with `agent --stdio --store <data dir>/local-board`.
    pub agent_command: Vec<OsString>,
}

impl Board {
    /// A board reached at `endpoint`, with every option at its default.
    pub fn new(name: &str, endpoint: Endpoint) -> Board {
        Board {
            name: name.to_owned(),
            endpoint,
            tags: Vec::new(),
            agent: DEFAULT_AGENT.to_owned(),
            store: None,
            profile: None,
            identity: None,
            known_hosts: None,
            ssh_program: "ssh".into(),
            agent_command: Vec::new(),
        }
    }

    /// The embedded board: this executable as a local agent, its store in the data directory.
    pub fn local() -> Result<Board, InventoryError> {
        let mut board = Board::new(LOCAL, Endpoint::Local);
        board.store = Some(data_dir()?.join("local-board").display().to_string());
        Ok(board)
    }

    /// The URL it is reached at (`ssh://pi@10.0.0.7:22`, `local`).
    pub fn url(&self) -> String {
        self.endpoint.to_string()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoardsFile {
    #[serde(default)]
    board: Vec<BoardEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoardEntry {
    name: String,
    url: String,
    #[serde(default)]
    tags: Vec<String>,
    agent: Option<String>,
    store: Option<String>,
    profile: Option<String>,
    identity: Option<String>,
    known_hosts: Option<String>,
}

/// The boards of a boards file.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// The file they came from, or the default location that was looked at.
    pub path: Option<PathBuf>,
    /// Whether `path` exists (a missing default boards file is an empty inventory).
    pub found: bool,
    /// The boards, in file order.
    pub boards: Vec<Board>,
}

impl Inventory {
    /// Reads the boards file at `path` (it must exist).
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Inventory::parse(&text, path)
    }

    /// Reads the boards file at [`default_boards_path`]; a missing file is an empty inventory
    /// unless `$EDGEVLM_BOARDS` names it.
    pub fn load_default() -> Result<Inventory, InventoryError> {
        if let Some(path) = env_path("EDGEVLM_BOARDS") {
            return Inventory::load(&path);
        }
        let path = default_boards_path()?;
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Inventory {
                path: Some(path),
                found: false,
                boards: Vec::new(),
            }),
            _ => Inventory::load(&path),
        }
    }

    /// [`Inventory::load`] of `path` if given, else [`Inventory::load_default`].
    pub fn load_or_default(path: Option<&Path>) -> Result<Inventory, InventoryError> {
        match path {
            Some(path) => Inventory::load(path),
            None => Inventory::load_default(),
        }
    }

    /// Parses boards file text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Inventory, InventoryError> {
        let field_error = |field: String, message: String| InventoryError::Field {
            path: path.to_owned(),
            field,
            message,
        };
        let file: BoardsFile =
            edgevlm_config::parse_toml(text).map_err(|e| field_error(e.field, e.message))?;
        let mut boards: Vec<Board> = Vec::new();
        for (i, entry) in file.board.into_iter().enumerate() {
            let at = |field: &str| format!("board[{i}].{field}");
            if entry.name.is_empty()
                || entry.name.contains("://")
                || entry.name.chars().any(char::is_whitespace)
            {
                return Err(field_error(
                    at("name"),
                    format!(
                        "{:?}: expected a short name without spaces or \"://\"",
                        entry.name
                    ),
                ));
            }
            if boards.iter().any(|b| b.name == entry.name) {
                return Err(field_error(
                    at("name"),
                    format!("{:?} is listed twice", entry.name),
                ));
            }
            let endpoint = parse_url(&entry.url).map_err(|e| match e {
                InventoryError::Url { why, .. } => {
                    field_error(at("url"), format!("{:?}: {why}", entry.url))
                }
                other => other,
            })?;
            let mut board = Board::new(&entry.name, endpoint);
            board.tags = entry.tags;
            if let Some(agent) = entry.agent {
                if agent.trim().is_empty() {
                    return Err(field_error(at("agent"), "must not be empty".into()));
                }
                board.agent = agent;
            }
            board.store = entry.store;
            board.profile = entry.profile;
            board.identity = entry.identity.as_deref().map(expand_tilde).transpose()?;
            board.known_hosts = entry.known_hosts.as_deref().map(expand_tilde).transpose()?;
            if board.endpoint == Endpoint::Local && board.store.is_none() {
                board.store = Some(data_dir()?.join("local-board").display().to_string());
            }
            boards.push(board);
        }
        Ok(Inventory {
            path: Some(path.to_owned()),
            found: true,
            boards,
        })
    }

    /// What `--board spec` means: an inventory name, a literal URL, or `local`.
    pub fn resolve(&self, spec: &str) -> Result<Board, InventoryError> {
        if let Some(board) = self.boards.iter().find(|b| b.name == spec) {
            return Ok(board.clone());
        }
        if spec == LOCAL {
            return Board::local();
        }
        if spec.contains("://") {
            let endpoint = parse_url(spec)?;
            if endpoint == Endpoint::Local {
                return Board::local();
            }
            return Ok(Board::new(spec, endpoint));
        }
        let names: Vec<&str> = self.boards.iter().map(|b| b.name.as_str()).collect();
        let known = match (&self.path, self.found) {
            (None, _) => "no boards file was read".to_owned(),
            (Some(path), false) => format!("there is no boards file at {}", path.display()),
            (Some(path), true) if names.is_empty() => format!("{} lists no boards", path.display()),
            (Some(path), true) => format!("{} lists {}", path.display(), names.join(", ")),
        };
        Err(InventoryError::Unknown {
            name: spec.to_owned(),
            known,
        })
    }
}

/// Parses a board URL: `ssh://[user@]host[:port]`, `serial:///dev/tty...[?baud=N]` or `local`.
pub fn parse_url(url: &str) -> Result<Endpoint, InventoryError> {
    let bad = |why: &str| InventoryError::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    if url == LOCAL || url == "local://" {
        return Ok(Endpoint::Local);
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad(
            "expected ssh://[user@]host[:port], serial:///dev/ttyUSB0?baud=921600 or local",
        ));
    };
    match scheme {
        "ssh" => parse_ssh(rest).map_err(|why| bad(&why)),
        "serial" => parse_serial(rest).map_err(|why| bad(&why)),
        _ => Err(bad(&format!(
            "unknown scheme {scheme:?}: expected ssh://, serial:// or local"
        ))),
    }
}

fn parse_ssh(rest: &str) -> Result<Endpoint, String> {
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err("an ssh URL is ssh://[user@]host[:port], without a path or query".into());
    }
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((user, hostport)) => {
            if user.is_empty() || user.contains([':', '@']) || user.chars().any(char::is_whitespace)
            {
                return Err(format!(
                    "bad user {user:?} (passwords in URLs are not supported: use a key)"
                ));
            }
            (Some(user.to_owned()), hostport)
        }
        None => (None, authority),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or("unclosed '[' in an IPv6 address")?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("unexpected {after:?} after the IPv6 address")),
            },
        }
    } else {
        match hostport.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("bad host {host:?}"));
    }
    let port = match port {
        None => DEFAULT_SSH_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("bad port {p:?}: expected 1-65535"))?,
    };
    Ok(Endpoint::Ssh {
        user,
        host: host.to_owned(),
        port,
    })
}

fn parse_serial(rest: &str) -> Result<Endpoint, String> {
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    if !path.starts_with('/') || path.len() < 2 {
        return Err(
            "a serial URL names an absolute device path: serial:///dev/ttyUSB0?baud=921600".into(),
        );
    }
    let mut baud = DEFAULT_BAUD;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "baud" => {
                baud = value
                    .parse()
                    .ok()
                    .filter(|b| edgevlm_board_linux::serial::BAUD_RATES.contains(b))
                    .ok_or_else(|| {
                        format!(
                            "unsupported baud rate {value:?}: use one of {}",
                            edgevlm_board_linux::serial::BAUD_RATES
                                .iter()
                                .map(u32::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
            }
            _ => return Err(format!("unknown query key {key:?} (only `baud` is known)")),
        }
    }
    Ok(Endpoint::Serial {
        device: PathBuf::from(path),
        baud,
    })
}

/// Where the host keeps its data (the local board's store, the results database):
/// `$EDGEVLM_HOME`, else `$XDG_DATA_HOME/edgevlm`, else `~/.local/share/edgevlm`.
pub fn data_dir() -> Result<PathBuf, InventoryError> {
    if let Some(dir) = env_path("EDGEVLM_HOME") {
        return Ok(dir);
    }
    if let Some(data) = env_path("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return Ok(data.join("edgevlm"));
    }
    Ok(home("the data directory", "EDGEVLM_HOME")?.join(".local/share/edgevlm"))
}

/// Where the boards file is when no `--boards` is given: `$EDGEVLM_BOARDS`, else
/// `$XDG_CONFIG_HOME/edgevlm/boards.toml`, else `~/.config/edgevlm/boards.toml`.
pub fn default_boards_path() -> Result<PathBuf, InventoryError> {
    if let Some(path) = env_path("EDGEVLM_BOARDS") {
        return Ok(path);
    }
    if let Some(config) = env_path("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        return Ok(config.join("edgevlm/boards.toml"));
    }
    Ok(home("the boards file", "EDGEVLM_BOARDS")?.join(".config/edgevlm/boards.toml"))
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home(what: &'static str, var: &'static str) -> Result<PathBuf, InventoryError> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or(InventoryError::NoHome { what, var })
}

fn expand_tilde(path: &str) -> Result<PathBuf, InventoryError> {
    match path.strip_prefix("~/") {
        Some(rest) => Ok(home("`~`", "HOME")?.join(rest)),
        None => Ok(PathBuf::from(path)),
    }
}

/// Quotes `word` for a POSIX shell (ssh hands the remote command to the login shell).
pub(crate) fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(user: Option<&str>, host: &str, port: u16) -> Endpoint {
        Endpoint::Ssh {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn parses_ssh_urls() {
        let cases = [
            ("ssh://pi@10.0.0.7:22", ssh(Some("pi"), "10.0.0.7", 22)),
            ("ssh://pi@10.0.0.7", ssh(Some("pi"), "10.0.0.7", 22)),
            ("ssh://board.local:2222/", ssh(None, "board.local", 2222)),
            (
                "ssh://root@[fe80::1]:2200",
                ssh(Some("root"), "fe80::1", 2200),
            ),
            ("ssh://[::1]", ssh(None, "::1", 22)),
        ];
        for (url, expected) in cases {
            assert_eq!(parse_url(url).unwrap(), expected, "{url}");
        }
        assert_eq!(
            parse_url("ssh://pi@10.0.0.7").unwrap().to_string(),
            "ssh://pi@10.0.0.7:22"
        );
        assert_eq!(
            parse_url("ssh://[::1]:23").unwrap().to_string(),
            "ssh://[::1]:23"
        );
    }

    #[test]
    fn parses_serial_urls_and_local() {
        assert_eq!(
            parse_url("serial:///dev/ttyUSB0?baud=921600").unwrap(),
            Endpoint::Serial {
                device: "/dev/ttyUSB0".into(),
                baud: 921_600
            }
        );
        assert_eq!(
            parse_url("serial:///dev/ttyAMA0").unwrap(),
            Endpoint::Serial {
                device: "/dev/ttyAMA0".into(),
                baud: DEFAULT_BAUD
            }
        );
        assert_eq!(parse_url("local").unwrap(), Endpoint::Local);
    }

    #[test]
    fn malformed_urls_say_what_is_wrong() {
        let cases = [
            ("ssh://", "no host"),
            ("ssh://pi@", "no host"),
            ("ssh://pi@host:0", "bad port"),
            ("ssh://pi@host:99999", "bad port"),
            ("ssh://pi@host:22x", "bad port"),
            ("ssh://pi:secret@host", "passwords"),
            ("ssh://host/path", "without a path"),
            ("ssh://[::1", "unclosed"),
            ("ssh://-oProxyCommand=x", "bad host"),
            ("serial://dev/ttyUSB0", "absolute device path"),
            (
                "serial:///dev/ttyUSB0?baud=12345",
                "unsupported baud rate \"12345\"",
            ),
            (
                "serial:///dev/ttyUSB0?speed=9600",
                "unknown query key \"speed\"",
            ),
            ("http://x", "unknown scheme \"http\""),
            ("10.0.0.7", "expected ssh://"),
        ];
        for (url, expected) in cases {
            let err = parse_url(url).unwrap_err().to_string();
            assert!(
                err.contains(expected) && err.contains(url),
                "{url}: expected {expected:?} in {err:?}"
            );
        }
    }

    const FILE: &str = r#"
[[board]]
name = "line3-pi5"
url = "ssh://pi@10.0.0.7:22"
tags = ["pi5", "line3"]
agent = "sudo -n /usr/bin/edgevlm"
store = "/var/lib/edgevlm/models"
profile = "rpi5"
identity = "/keys/id_ed25519"
known_hosts = "/keys/known_hosts"

[[board]]
name = "uart"
url = "serial:///dev/ttyUSB1?baud=921600"
"#;

    #[test]
    fn inventory_parses_and_resolves() {
        let inv = Inventory::parse(FILE, Path::new("boards.toml")).unwrap();
        let pi = inv.resolve("line3-pi5").unwrap();
        assert_eq!(pi.endpoint, ssh(Some("pi"), "10.0.0.7", 22));
        assert_eq!(pi.tags, ["pi5", "line3"]);
        assert_eq!(pi.agent, "sudo -n /usr/bin/edgevlm");
        assert_eq!(pi.store.as_deref(), Some("/var/lib/edgevlm/models"));
        assert_eq!(pi.profile.as_deref(), Some("rpi5"));
        assert_eq!(pi.identity.as_deref(), Some(Path::new("/keys/id_ed25519")));
        let uart = inv.resolve("uart").unwrap();
        assert_eq!(uart.url(), "serial:///dev/ttyUSB1?baud=921600");
        assert_eq!(uart.agent, DEFAULT_AGENT);

        // Literal URLs need no inventory entry.
        let literal = inv.resolve("ssh://me@example.org:2022").unwrap();
        assert_eq!(literal.name, "ssh://me@example.org:2022");
        assert_eq!(literal.endpoint, ssh(Some("me"), "example.org", 2022));
    }

    #[test]
    fn unknown_board_lists_known_ones() {
        let inv = Inventory::parse(FILE, Path::new("/etc/boards.toml")).unwrap();
        let err = inv.resolve("line4").unwrap_err().to_string();
        assert!(
            err.contains("\"line4\"")
                && err.contains("/etc/boards.toml lists line3-pi5, uart")
                && err.contains("ssh://"),
            "{err}"
        );
        let err = Inventory::default().resolve("pi").unwrap_err().to_string();
        assert!(err.contains("no boards file was read"), "{err}");
        let empty = Inventory::parse("", Path::new("b.toml")).unwrap();
        let err = empty.resolve("pi").unwrap_err().to_string();
        assert!(err.contains("b.toml lists no boards"), "{err}");
    }

    #[test]
    fn boards_file_errors_name_file_field_and_line() {
        let cases = [
            (
                FILE.replace("url = \"serial:///dev/ttyUSB1?baud=921600\"", ""),
                "field `board[1].url`: required field is missing",
            ),
            (
                FILE.replace("tags = [", "colour = \"red\"\ntags = ["),
                "field `board[0].colour`: unknown field (line 5)",
            ),
            (
                FILE.replace("ssh://pi@10.0.0.7:22", "ssh://pi@10.0.0.7:x"),
                "field `board[0].url`: \"ssh://pi@10.0.0.7:x\": bad port",
            ),
            (
                FILE.replace("name = \"uart\"", "name = \"line3-pi5\""),
                "field `board[1].name`: \"line3-pi5\" is listed twice",
            ),
            (
                FILE.replace("tags = [\"pi5\", \"line3\"]", "tags = \"pi5\""),
                "field `board[0].tags`: invalid type",
            ),
            ("[[board]\nname=".to_owned(), "field `.`"),
        ];
        for (text, expected) in cases {
            let err = Inventory::parse(&text, Path::new("my/boards.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("my/boards.toml: ") && err.contains(expected),
                "expected {expected:?} in {err:?}"
            );
        }
    }

    #[test]
    fn explicit_boards_file_must_exist() {
        let err = Inventory::load(Path::new("/nonexistent/boards.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/boards.toml"), "{err}");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/usr/bin/edgevlm"), "/usr/bin/edgevlm");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }
}
