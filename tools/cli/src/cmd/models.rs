//! `edgevlm models`: list the models installed on a board; activate, roll back or remove one.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use edgevlm_proto::ModelInfo;
use serde_json::json;

use super::push::{bytes, BoardArgs};

const FAILURES: &str = "\
Exit codes:
  0  success
  2  error: unknown board or bad URL, ssh failure, link lost, protocol version mismatch, no such
     model version (--activate, --remove), nothing to roll back to, removing the active model
     (activate another one first)

Errors are printed once on stderr as `edgevlm: <cause>`; the list goes to stdout.";

/// List the model versions installed on a board (name, version, files, size, which one is
/// active and which one --rollback would bring back). With --activate, --rollback or --remove,
/// change that first, then list.
#[derive(Debug, clap::Args)]
#[command(
    after_help = FAILURES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cmd {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    target: Option<BoardArgs>,
    /// A JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Make an installed model version the active one.
    #[arg(long, value_name = "NAME@VERSION", value_parser = parse_model, group = "action")]
    activate: Option<(String, String)>,
    /// Re-activate the previously active model version.
    #[arg(long, group = "action")]
    rollback: bool,
    /// Delete an installed model version (not the active one).
    #[arg(long, value_name = "NAME@VERSION", value_parser = parse_model, group = "action")]
    remove: Option<(String, String)>,
}

fn parse_model(s: &str) -> Result<(String, String), String> {
    match s.rsplit_once('@') {
        Some((name, version)) if !name.is_empty() && !version.is_empty() => {
            Ok((name.to_owned(), version.to_owned()))
        }
        _ => Err(format!(
            "{s:?}: expected NAME@VERSION, e.g. demo-parts@1.0.0"
        )),
    }
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    Import(super::import::Cmd),
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        if let Some(Action::Import(cmd)) = self.action {
            return cmd.run();
        }
        let Some(target) = &self.target else {
            anyhow::bail!("--board is required (or use `edgevlm models import`)");
        };
        let mut client = target.connect()?;
        let board = client.board().to_owned();
        let mut done = None;
        if let Some((name, version)) = &self.activate {
            client.activate(name, version)?;
            done = Some(format!("activated {name} {version} on {board}"));
        } else if self.rollback {
            client.rollback()?;
            done = Some(format!("rolled back on {board}"));
        } else if let Some((name, version)) = &self.remove {
            client.remove(name, version)?;
            done = Some(format!("removed {name} {version} from {board}"));
        }
        let models = client.models().context("listing models")?;
        let mut out = std::io::stdout().lock();
        if self.json {
            let list: Vec<_> = models.iter().map(model_json).collect();
            writeln!(out, "{}", serde_json::Value::Array(list))?;
        } else {
            if let Some(done) = done {
                writeln!(out, "{done}")?;
            }
            write_table(&mut out, &board, &models)?;
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn model_json(m: &ModelInfo) -> serde_json::Value {
    let sha = edgevlm_runtime::package::hex(&m.manifest_sha256);
    json!({
        "name": m.name.as_str(),
        "version": m.version.as_str(),
        "files": m.files,
        "bytes": m.bytes,
        "manifest_sha256": sha,
        "active": m.active,
        "previous": m.previous,
    })
}

fn write_table(out: &mut impl Write, board: &str, models: &[ModelInfo]) -> std::io::Result<()> {
    if models.is_empty() {
        return writeln!(out, "no models installed on {board}");
    }
    let name_w = models
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let version_w = models
        .iter()
        .map(|m| m.version.len())
        .max()
        .unwrap_or(0)
        .max(7);
    writeln!(
        out,
        "{:<name_w$}  {:<version_w$}  {:>5}  {:>10}  STATE",
        "NAME", "VERSION", "FILES", "SIZE"
    )?;
    for m in models {
        let state = match (m.active, m.previous) {
            (true, _) => "active",
            (false, true) => "previous",
            _ => "",
        };
        writeln!(
            out,
            "{:<name_w$}  {:<version_w$}  {:>5}  {:>10}  {state}",
            m.name.as_str(),
            m.version.as_str(),
            m.files,
            bytes(m.bytes)
        )?;
    }
    Ok(())
}
