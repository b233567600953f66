//! `edgevlm push`: install a model package on a board (resumable, verified, skipped when the
//! board has it already).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use edgevlm_host::client::{Client, ClientOptions, PushOptions, PushPhase, PushReport};
use edgevlm_host::inventory::Inventory;
use edgevlm_host::package::LocalPackage;
use indicatif::{ProgressBar, ProgressStyle};

/// Which board, shared by `push`, `models` and `bench`.
#[derive(Debug, clap::Args)]
pub struct BoardArgs {
    /// The board: a name from the boards file, ssh://USER@HOST:PORT,
    /// serial:///dev/ttyUSB0?baud=921600, or `local` (an agent run from this executable, its
    /// store in $EDGEVLM_HOME/local-board).
    #[arg(long, value_name = "BOARD")]
    pub board: String,
    /// The boards file (default: $EDGEVLM_BOARDS, else ~/.config/edgevlm/boards.toml).
    #[arg(long, value_name = "FILE")]
    pub boards: Option<PathBuf>,
}

impl BoardArgs {
    /// Resolves the board and connects to its agent.
    pub fn connect(&self) -> anyhow::Result<Client> {
        let inventory = Inventory::load_or_default(self.boards.as_deref())?;
        let board = inventory.resolve(&self.board)?;
        Ok(Client::open(&board, ClientOptions::default())?)
    }
}

pub const FAILURES: &str = "\
Exit codes:
  0  installed, or already installed (nothing sent)
  2  error: invalid package (a file does not match model.toml, a symlink or a file name a board
     cannot store; refused before anything is sent), unknown board or bad URL, ssh failure (host
     key not in known_hosts, key refused), link lost (push again: it resumes), protocol version
     mismatch (install the same edgevlm release on both sides), no space on the board, the same
     version installed with a different model.toml (bump [model] version)

ssh boards must be in known_hosts already (host keys are always checked) and accept a key
without a password prompt (BatchMode). Errors are printed once on stderr as `edgevlm: <cause>`;
the summary goes to stdout.";

/// Push a model package to a board. It is validated first (model.toml, graph digests, file
/// names), then every file is sent in checksummed chunks; an interrupted push resumes where the
/// board's verified data ends. The board checks every file's SHA-256 before installing the
/// version atomically. A package the board has already (same name, version and model.toml) is
/// not sent again.
#[derive(Debug, clap::Args)]
#[command(after_help = FAILURES)]
pub struct Cmd {
    #[command(flatten)]
    target: BoardArgs,
    /// The model package directory (holding model.toml).
    #[arg(value_name = "PKG")]
    package: PathBuf,
    /// Make it the active model once installed.
    #[arg(long)]
    activate: bool,
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let package = scan(&self.package)?;
        let mut client = self.target.connect()?;
        let report = push_with_progress(&mut client, &package, self.activate)?;
        println!("{}", summary(&report, client.board()));
        Ok(ExitCode::SUCCESS)
    }
}

/// Validates the package in `dir` (before any connection is made).
pub fn scan(dir: &Path) -> anyhow::Result<LocalPackage> {
    LocalPackage::scan(dir).with_context(|| format!("checking model package {}", dir.display()))
}

/// Pushes with a progress bar on stderr (hidden when stderr is not a terminal).
pub fn push_with_progress(
    client: &mut Client,
    package: &LocalPackage,
    activate: bool,
) -> anyhow::Result<PushReport> {
    let bar = ProgressBar::new(package.total_bytes());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("push {}", package.label()));
    let result = client.push(package, &PushOptions { activate }, |p| {
        bar.set_position(p.verified);
        let msg = match p.phase {
            PushPhase::Checking => "checking".to_owned(),
            PushPhase::Uploading if p.retransmits > 0 => {
                format!("{} ({} resent)", p.file, p.retransmits)
            }
            PushPhase::Uploading => p.file.clone(),
            PushPhase::Committing => "verifying on the board".to_owned(),
            PushPhase::Activating => "activating".to_owned(),
            PushPhase::Done => String::new(),
        };
        bar.set_message(msg);
    });
    bar.finish_and_clear();
    result.with_context(|| format!("pushing {}", package.dir.display()))
}

/// The one-line summary of a push.
pub fn summary(r: &PushReport, board: &str) -> String {
    let activated = if r.activated { ", activated" } else { "" };
    if r.skipped {
        return format!(
            "{} {} already installed on {board}: nothing sent{activated}",
            r.name, r.version
        );
    }
    format!(
        "pushed {} {} to {board}: {} sent of {} in {:.2} s ({:.2} MB/s), resumed from {}, {} retransmits{activated}",
        r.name,
        r.version,
        bytes(r.bytes_sent),
        bytes(r.bytes_total),
        r.elapsed.as_secs_f64(),
        r.mb_per_s(),
        bytes(r.resumed_from),
        r.retransmits
    )
}

/// `1.2 MiB`, `340 KiB`, `12 B`.
pub fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let x = n as f64;
    if x >= KIB * KIB * KIB {
        format!("{:.2} GiB", x / (KIB * KIB * KIB))
    } else if x >= KIB * KIB {
        format!("{:.1} MiB", x / (KIB * KIB))
    } else if x >= KIB {
        format!("{:.1} KiB", x / KIB)
    } else {
        format!("{n} B")
    }
}
