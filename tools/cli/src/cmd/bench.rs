//! `edgevlm bench`: benchmark model packages on a board and keep the runs in the results
//! database.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use edgevlm_host::client::{BenchRun, Canceller, Client};
use edgevlm_host::db::{default_db_path, ResultsDb};
use edgevlm_host::package::LocalPackage;
use edgevlm_host::record::{BenchRecord, RunSettings};
use edgevlm_proto::{self as proto, BenchInput, BenchSpec, TraceOptions};
use indicatif::{ProgressBar, ProgressStyle};

use super::push::{bytes, push_with_progress, scan, summary, BoardArgs};

const FAILURES: &str = "\
Exit codes:
  0  every model was benchmarked and stored
  2  error: invalid package, unknown board or bad URL, ssh failure, link lost, protocol version
     mismatch, --image larger than 24 KiB (put it in the package and use --package-image),
     --package-image not in a package, prompt longer than 512 bytes, the model failed to load or
     run on the board, results database not writable, cancelled with Ctrl-C

Models run one after the other; the first failure stops the command (runs finished before it
are stored). Ctrl-C cancels the running benchmark on the board; a second Ctrl-C quits at once.
Errors are printed once on stderr as `edgevlm: <cause>`; results go to stdout.";

/// Benchmark model packages on a board: each package is pushed (skipped when installed), run
/// for --warmup untimed and --iterations timed iterations on the board, and reported: load time,
/// first run, latency percentiles, per-stage breakdown, slowest graph nodes, peak memory. Every
/// run is stored in the results database (see `edgevlm compare`).
#[derive(Debug, clap::Args)]
#[command(after_help = FAILURES)]
pub struct Cmd {
    #[command(flatten)]
    target: BoardArgs,
    /// Model package directories, benchmarked in order.
    #[arg(long = "model", value_name = "PKG", required = true, num_args = 1..)]
    models: Vec<PathBuf>,
    /// Untimed iterations first.
    #[arg(long, value_name = "N", default_value_t = 3)]
    warmup: u32,
    /// Timed iterations (at least).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,
    /// Keep running timed iterations until this many seconds have passed.
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    min_seconds: f64,
    /// Intra-op threads on the board.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// An image (JPEG / PNG, at most 24 KiB) sent with the request and run through the whole
    /// pipeline. Default: synthetic tensors (seed 0) fed straight to the graph.
    #[arg(long, value_name = "FILE", conflicts_with = "package_image")]
    image: Option<PathBuf>,
    /// An image inside the package (e.g. samples/ok_01.png), for images over 24 KiB.
    #[arg(long, value_name = "PATH")]
    package_image: Option<String>,
    /// Prompt for language models (at most 512 bytes; default: the package's inspection
    /// question, else a short request).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// Tokens each generation produces, for language models (default: the package's
    /// `[generation]` max_new_tokens).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_new_tokens: Option<u32>,
    /// Profile graph nodes and report the N slowest (0: no per-node profile).
    #[arg(long, value_name = "N", default_value_t = 10)]
    top_nodes: u16,
    /// No stage spans, memory samples or node profile: only the summary (no tracing overhead).
    #[arg(long)]
    no_trace: bool,
    /// The results database (default: $EDGEVLM_DB, else DATA_DIR/results.sqlite).
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// One JSON object per model (the stored record) instead of text.
    #[arg(long)]
    json: bool,
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let (input, input_label) = self.input()?;
        let prompt = match &self.prompt {
            Some(p) if p.len() > proto::MAX_PROMPT => bail!(
                "--prompt is {} bytes, at most {} are sent to the board",
                p.len(),
                proto::MAX_PROMPT
            ),
            Some(p) => proto::bounded(p),
            None => Default::default(),
        };
        if !(self.min_seconds.is_finite() && (0.0..=86_400.0).contains(&self.min_seconds)) {
            bail!("--min-seconds {}: expected 0 to 86400", self.min_seconds);
        }
        // Every package is checked before the board is contacted.
        let packages = self
            .models
            .iter()
            .map(|dir| scan(dir))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(path) = &self.package_image {
            for p in &packages {
                if !p.files.iter().any(|f| &f.path == path) {
                    bail!(
                        "--package-image {path}: no such file in package {} (paths are relative to it, e.g. samples/ok_01.png)",
                        p.dir.display()
                    );
                }
            }
        }
        let db_path = self.db.clone().unwrap_or_else(default_db_path);
        let mut db = ResultsDb::open(&db_path)
            .with_context(|| format!("opening results database {}", db_path.display()))?;

        let mut client = self.target.connect()?;
        watch_ctrl_c(client.canceller())?;
        let trace = if self.no_trace {
            TraceOptions::NONE
        } else {
            TraceOptions {
                top_nodes: self.top_nodes,
                ..TraceOptions::default()
            }
        };
        let settings = RunSettings {
            warmup: self.warmup,
            iterations: self.iterations,
            min_duration_ms: (self.min_seconds * 1000.0).round() as u32,
            threads: self.threads,
            input: input_label,
            traced: !self.no_trace,
        };
        for package in &packages {
            let pushed = push_with_progress(&mut client, package, false)?;
            if !pushed.skipped {
                eprintln!("{}", summary(&pushed, client.board()));
            }
            let spec = BenchSpec {
                model: package.model_ref(),
                warmup: self.warmup,
                iterations: self.iterations,
                min_duration_ms: settings.min_duration_ms,
                threads: self.threads,
                input: input.clone(),
                prompt: prompt.clone(),
                max_new_tokens: self.max_new_tokens.unwrap_or(0),
                trace,
            };
            let run = bench_with_progress(&mut client, package, &spec)?;
            let mut record = run.record(client.facts(), package.facts(), settings.clone());
            let id = db.insert(&mut record).with_context(|| {
                format!("storing the run in results database {}", db_path.display())
            })?;
            let mut out = std::io::stdout().lock();
            if self.json {
                writeln!(out, "{}", serde_json::to_string(&record)?)?;
            } else {
                write_summary(&mut out, &record, &run)?;
                writeln!(out, "  stored as run {id} in {}", db_path.display())?;
            }
            out.flush()?;
        }
        Ok(ExitCode::SUCCESS)
    }

    fn input(&self) -> anyhow::Result<(BenchInput, String)> {
        if let Some(path) = &self.package_image {
            let file = proto::file_path(path).map_err(|_| {
                anyhow::anyhow!(
                    "--package-image {path:?}: expected a path inside the package like samples/ok_01.png"
                )
            })?;
            return Ok((BenchInput::PackageFile(file), format!("image {path}")));
        }
        let Some(path) = &self.image else {
            // For text models the synthetic input means "the prompt only".
            let label = match &self.prompt {
                Some(_) => "prompt only (synthetic seed=0 for graphs without one)",
                None => "synthetic seed=0",
            };
            return Ok((BenchInput::Synthetic { seed: 0 }, label.into()));
        };
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if data.len() > proto::MAX_INLINE_INPUT {
            bail!(
                "{}: {} is too large to send with the request (at most {} KiB): put the image in \
                 the package and name it with --package-image PATH",
                path.display(),
                bytes(data.len() as u64),
                proto::MAX_INLINE_INPUT / 1024
            );
        }
        let label = format!(
            "image {} ({})",
            path.file_name().unwrap_or_default().to_string_lossy(),
            bytes(data.len() as u64)
        );
        let data = data
            .as_slice()
            .try_into()
            .expect("size checked against MAX_INLINE_INPUT");
        Ok((BenchInput::Image(data), label))
    }
}

/// First Ctrl-C: cancel the running benchmark (or quit if none runs); second: quit at once.
fn watch_ctrl_c(canceller: Canceller) -> anyhow::Result<()> {
    use signal_hook::consts::SIGINT;
    let pressed = Arc::new(AtomicBool::new(false));
    let armed = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, armed.clone())
        .context("installing the Ctrl-C handler")?;
    signal_hook::flag::register(SIGINT, pressed.clone())
        .context("installing the Ctrl-C handler")?;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(50));
        if !pressed.swap(false, Ordering::SeqCst) {
            continue;
        }
        armed.store(true, Ordering::SeqCst);
        match canceller.cancel() {
            Ok(true) => eprintln!("edgevlm: cancelling the benchmark (Ctrl-C again to quit)"),
            _ => std::process::exit(130),
        }
    });
    Ok(())
}

fn bench_with_progress(
    client: &mut Client,
    package: &LocalPackage,
    spec: &BenchSpec,
) -> anyhow::Result<BenchRun> {
    let planned = u64::from(spec.warmup) + u64::from(spec.iterations);
    let bar = ProgressBar::new(planned);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} iterations {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("bench {}", package.label()));
    bar.set_message("loading");
    bar.enable_steady_tick(Duration::from_millis(200));
    let result = client.bench(spec, |event| {
        if let proto::TraceEvent::Iteration(it) = event {
            let done = u64::from(it.iteration) + 1;
            if done > bar.length().unwrap_or(0) {
                bar.set_length(done);
            }
            bar.set_position(done);
            bar.set_message(format!("{:.2} ms", it.duration_us as f64 / 1000.0));
        }
    });
    bar.finish_and_clear();
    // The client's error names the board and the model already.
    Ok(result?)
}

fn ms(us: impl Into<f64>) -> f64 {
    us.into() / 1000.0
}

fn write_summary(out: &mut impl Write, r: &BenchRecord, run: &BenchRun) -> std::io::Result<()> {
    let b = &r.board;
    let variant = if r.model.variant.is_empty() {
        String::new()
    } else {
        format!(" ({})", r.model.variant)
    };
    let cpu = if b.cpu_model.is_empty() {
        b.arch.clone()
    } else {
        format!("{} {}", b.arch, b.cpu_model)
    };
    let profile = match b.profile.as_str() {
        "" | "unknown" => String::new(),
        p => format!("{p}, "),
    };
    writeln!(
        out,
        "{} {}{variant} on {} ({profile}{cpu} x{}, agent {}, tract {}), {} thread(s), {}",
        r.model.name,
        r.model.version,
        b.name,
        b.cores,
        b.agent_version,
        b.tract_version,
        r.settings.threads,
        r.settings.input
    )?;
    let l = &r.latency;
    writeln!(
        out,
        "  load {:.1} ms{} | first run {:.2} ms | {} iterations: mean {:.2} p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms",
        ms(r.load_us as f64),
        if r.load_source.is_empty() {
            String::new()
        } else {
            format!(" (from {})", r.load_source)
        },
        ms(r.first_run_us as f64),
        r.iterations,
        ms(l.mean_us as f64),
        ms(l.p50_us as f64),
        ms(l.p90_us as f64),
        ms(l.p99_us as f64),
        ms(l.max_us as f64)
    )?;
    if let Some(t) = &r.tokens {
        writeln!(
            out,
            "  tokens: {} prompt, {} generated | TTFT p50 {:.1} ms | prefill {:.1} tok/s | decode {:.1} tok/s",
            t.prompt_tokens,
            t.generated_tokens,
            ms(t.ttft_p50_us as f64),
            t.prefill_tok_s,
            t.decode_tok_s
        )?;
    }
    if !r.stages.is_empty() {
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|s| {
                format!(
                    "{} {:.2} ms ({:.0}%)",
                    s.stage,
                    ms(s.mean_us),
                    s.share * 100.0
                )
            })
            .collect();
        writeln!(out, "  stages (mean): {}", stages.join(", "))?;
    }
    for (i, n) in r.nodes.iter().enumerate() {
        writeln!(
            out,
            "  {:>2}. {:<32} {:<20} {:>8.3} ms {:>5.1}%  {}",
            i + 1,
            n.node,
            n.op,
            ms(n.mean_us),
            n.share * 100.0,
            n.graph
        )?;
    }
    let pss = if r.peak_pss_kib > 0 {
        format!(", peak PSS {}", bytes(r.peak_pss_kib * 1024))
    } else {
        String::new()
    };
    writeln!(
        out,
        "  memory: peak RSS {}{pss} | model {} on the board",
        bytes(r.peak_rss_kib * 1024),
        bytes(r.model.bytes)
    )?;
    if r.dropped_events > 0 || run.missing_batches > 0 {
        writeln!(
            out,
            "  note: {} trace events dropped by the board, {} trace batches lost: the link was too slow for full tracing (try --no-trace or fewer --top-nodes)",
            r.dropped_events, run.missing_batches
        )?;
    }
    Ok(())
}
