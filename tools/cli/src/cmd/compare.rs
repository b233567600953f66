//! `edgevlm compare` (in progress).

use std::process::ExitCode;

/// (in progress)
#[derive(Debug, clap::Args)]
pub struct Cmd {}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        anyhow::bail!("edgevlm compare is not built yet")
    }
}
