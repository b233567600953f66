//! `edgevlm compare`: benchmark runs from the results database side by side, as a table and
//! optionally as plots.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use edgevlm_host::db::{default_db_path, Filter, ResultsDb};
use edgevlm_host::report::{compare, Format};

/// Compare benchmark runs stored by `edgevlm bench`: one row per run (model size, load time,
/// first run, p50/p99 latency, time to first token and tokens/s for language models, peak
/// RSS/PSS), then ratios against the first run and the per-stage breakdown. The table goes to
/// stdout; with --plot, latency CDF, memory and stage plots (SVG and PNG) are written and their
/// paths printed on stderr.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  edgevlm compare 12 15            fp32 run 12 against int8 run 15 (12 is the baseline)
  edgevlm compare --last 3 --plot plots/
  edgevlm compare --last 5 --model mobilenet-v3 --format csv > runs.csv")]
pub struct Cmd {
    /// Run ids as `edgevlm bench` prints them (`12` or `#12`); the first is the baseline.
    #[arg(
        value_name = "RUN",
        value_parser = parse_run_id,
        required_unless_present = "last",
        conflicts_with = "last"
    )]
    runs: Vec<i64>,
    /// The N most recent runs instead, oldest first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    last: Option<u32>,
    /// With --last: only runs of this model (its manifest name).
    #[arg(long, value_name = "NAME", conflicts_with = "runs")]
    model: Option<String>,
    /// With --last: only runs on this board (its inventory name).
    #[arg(long, value_name = "NAME", conflicts_with = "runs")]
    board: Option<String>,
    /// Table format.
    #[arg(long, value_name = "FORMAT", default_value = "md", value_parser = ["md", "markdown", "csv", "json"])]
    format: String,
    /// Also write latency_cdf, memory and stages plots (.svg and .png) into DIR.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Results database [default: $EDGEVLM_DB, else $EDGEVLM_HOME/results.sqlite, else
    /// ~/.local/share/edgevlm/results.sqlite].
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
}

fn parse_run_id(s: &str) -> Result<i64, String> {
    match s.trim_start_matches('#').parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(format!(
            "{s:?} is not a run id (a positive number, as `edgevlm bench` prints it)"
        )),
    }
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        self.execute(&mut std::io::stdout().lock(), &mut std::io::stderr().lock())
    }

    fn execute(&self, out: &mut impl Write, err: &mut impl Write) -> anyhow::Result<ExitCode> {
        let path = self.db.clone().unwrap_or_else(default_db_path);
        let db = ResultsDb::open_existing(&path)?;
        let records = match self.last {
            Some(n) => {
                let filter = Filter {
                    model: self.model.clone(),
                    board: self.board.clone(),
                    last: Some(n as usize),
                    ..Filter::default()
                };
                let records = db.filter(&filter)?;
                if records.is_empty() {
                    let mut what = String::from("runs");
                    if let Some(m) = &filter.model {
                        what += &format!(" of model {m}");
                    }
                    if let Some(b) = &filter.board {
                        what += &format!(" on board {b}");
                    }
                    anyhow::bail!("results database {} holds no {what}", path.display());
                }
                records
            }
            None => db.get_many(&self.runs)?,
        };
        let format = self
            .format
            .parse::<Format>()
            .map_err(|e| anyhow::anyhow!(e))?;
        out.write_all(compare(&records, format).as_bytes())?;
        out.flush()?;
        if let Some(dir) = &self.plot {
            let files = edgevlm_host::plot::write_plots(&records, dir)
                .with_context(|| format!("plotting {} runs", records.len()))?;
            for file in files {
                writeln!(err, "wrote {}", file.display())?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use edgevlm_host::record::{Latency, ModelFacts};
    use edgevlm_host::BenchRecord;

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        cmd: Cmd,
    }

    fn cmd(args: &[&str]) -> Result<Cmd, clap::Error> {
        Args::try_parse_from(["compare"].iter().chain(args)).map(|a| a.cmd)
    }

    fn record(variant: &str, p50_us: u64) -> BenchRecord {
        BenchRecord {
            model: ModelFacts {
                name: "mobilenet-v3".into(),
                version: "1.2".into(),
                variant: variant.into(),
                ..Default::default()
            },
            latency: Latency {
                p50_us,
                p99_us: p50_us * 2,
                ..Default::default()
            },
            peak_rss_kib: 102_400,
            latencies_us: vec![p50_us; 5],
            ..Default::default()
        }
    }

    /// A database with three runs: fp32, int8 and a second fp32.
    fn database() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.sqlite");
        let mut db = ResultsDb::open(&path).unwrap();
        for (variant, p50) in [("fp32", 8_000), ("int8", 4_000), ("fp32", 8_100)] {
            db.insert(&mut record(variant, p50)).unwrap();
        }
        (dir, path)
    }

    fn execute(args: &[&str]) -> anyhow::Result<(String, String)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        cmd(args)?.execute(&mut out, &mut err)?;
        Ok((
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        ))
    }

    #[test]
    fn runs_by_id_in_the_order_asked() {
        let (_dir, db) = database();
        let db = db.to_str().unwrap();
        let (table, _) = execute(&["#2", "1", "--db", db]).unwrap();
        let rows: Vec<&str> = table
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .collect();
        assert_eq!(rows.len(), 2, "{table}");
        assert!(
            rows[0].contains("int8") && rows[1].contains("fp32"),
            "{table}"
        );
        assert!(
            table.contains("### Against run 2 (mobilenet-v3 int8, baseline)"),
            "{table}"
        );
        assert!(table.contains("2.00×"), "fp32 p50 is twice int8's: {table}");
    }

    #[test]
    fn last_with_filters_and_formats() {
        let (_dir, db) = database();
        let db = db.to_str().unwrap();
        let (csv, _) = execute(&["--last", "2", "--format", "csv", "--db", db]).unwrap();
        let ids: Vec<&str> = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect();
        assert_eq!(ids, ["2", "3"], "{csv}");
        let (json, _) = execute(&["--last", "9", "--format", "json", "--db", db]).unwrap();
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 3);
        let err = execute(&["--last", "2", "--model", "resnet", "--db", db]).unwrap_err();
        assert!(
            format!("{err:#}").contains("holds no runs of model resnet"),
            "{err:#}"
        );
    }

    #[test]
    fn unknown_runs_and_missing_databases_are_errors_naming_them() {
        let (dir, db) = database();
        let err = execute(&["1", "7", "--db", db.to_str().unwrap()]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("no run 7") && msg.contains("1 to 3") && msg.contains("results.sqlite"),
            "{msg}"
        );
        let missing = dir.path().join("other.sqlite");
        let err = execute(&["1", "--db", missing.to_str().unwrap()]).unwrap_err();
        assert!(format!("{err:#}").contains("other.sqlite"), "{err:#}");
        assert!(!missing.exists());
    }

    #[test]
    fn arguments_are_checked() {
        assert!(cmd(&[]).is_err(), "runs or --last are required");
        assert!(cmd(&["1", "--last", "2"]).is_err(), "not both");
        assert!(cmd(&["0"]).is_err());
        assert!(cmd(&["abc"]).is_err());
        assert!(cmd(&["1", "--model", "m"]).is_err(), "--model needs --last");
        assert!(cmd(&["--board", "b"]).is_err(), "--board needs --last");
        assert!(cmd(&["--last", "1", "--board", "b", "--model", "m"]).is_ok());
        assert!(cmd(&["--last", "0"]).is_err());
        assert!(cmd(&["1", "--format", "xml"]).is_err());
    }

    #[test]
    fn plots_are_written_and_listed_on_stderr() {
        let (dir, db) = database();
        let plots = dir.path().join("plots");
        let (_, err) = execute(&[
            "--last",
            "3",
            "--plot",
            plots.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .unwrap();
        let listed: Vec<&str> = err.lines().collect();
        assert_eq!(listed.len(), 6, "{err}");
        for line in listed {
            let file = line.strip_prefix("wrote ").unwrap();
            assert!(std::fs::metadata(file).unwrap().len() > 300, "{file}");
        }
    }
}
