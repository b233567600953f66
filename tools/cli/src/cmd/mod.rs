//! Subcommands, one file each.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod bench;
mod compare;
mod generate;
mod image;
mod import;
mod inspect;
mod models;
mod push;
mod run;

/// Where loads keep their cache of decluttered graphs (`edgevlm_runtime::cache`).
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    /// Keep each graph's decluttered model in DIR (tract's NNEF form) and start from it next
    /// time: later cold starts skip parsing and decluttering the ONNX file. A stale or
    /// unreadable entry is rebuilt. Default: $EDGEVLM_CACHE_DIR, else no cache.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// Load from the ONNX files only, even with $EDGEVLM_CACHE_DIR set.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
}

impl CacheArgs {
    /// The cache directory to use, if any.
    pub fn dir(&self) -> Option<std::path::PathBuf> {
        if self.no_cache {
            return None;
        }
        self.cache_dir.clone().or_else(|| {
            std::env::var_os("EDGEVLM_CACHE_DIR")
                .filter(|d| !d.is_empty())
                .map(Into::into)
        })
    }
}

/// Exit code: something failed (bad input, unreadable model, I/O).
pub const EXIT_ERROR: u8 = 2;
/// Exit code: the command worked but a check failed (`inspect --fail-on-ng` saw an NG part).
pub const EXIT_CHECK_FAILED: u8 = 1;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a check failed (inspect --fail-on-ng saw an NG part)
  2  error: bad arguments, unreadable or invalid model, image or input (the message names it)

Errors are printed once on stderr as `edgevlm: <cause chain>`; results go to stdout.";

/// Offline runtime for quantized vision(-language) models on ARM boards.
#[derive(Debug, Parser)]
#[command(name = "edgevlm", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::Cmd),
    Inspect(inspect::Cmd),
    Agent(agent::Cmd),
    Push(push::Cmd),
    Models(models::Cmd),
    Bench(bench::Cmd),
    Compare(compare::Cmd),
    Image(image::Cmd),
    Generate(generate::Cmd),
}

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(cmd) => cmd.run(),
        Command::Inspect(cmd) => cmd.run(),
        Command::Agent(cmd) => cmd.run(),
        Command::Push(cmd) => cmd.run(),
        Command::Models(cmd) => cmd.run(),
        Command::Bench(cmd) => cmd.run(),
        Command::Compare(cmd) => cmd.run(),
        Command::Image(cmd) => cmd.run(),
        Command::Generate(cmd) => cmd.run(),
    }
}

/// True when the error is a closed stdout (`edgevlm ... | head`), which is not a failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
