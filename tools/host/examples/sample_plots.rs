//! Three synthetic benchmark runs (fp32 and int8 classifiers, a small VLM) built from agent
//! trace events, stored in a results database, compared as Markdown and plotted.
//!
//! `cargo run -p edgevlm-host --example sample_plots [OUT_DIR]` (default: a folder under the
//! system temp dir); the database (`sample-results.sqlite`, replaced
//! each time) and the plots land in OUT_DIR.

use std::path::PathBuf;

use edgevlm_host::db::ResultsDb;
use edgevlm_host::record::{BoardFacts, ModelFacts, RunSettings};
use edgevlm_host::report::{compare, Format};
use edgevlm_host::{plot, BenchRecord};
use edgevlm_proto::{self as proto, bounded};

/// Deterministic pseudo-random jitter (xorshift), so the example needs no extra crate.
struct Jitter(u64);

impl Jitter {
    fn next(&mut self, spread: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % spread.max(1)
    }
}

/// A run whose stages take `stages_us` (plus jitter and a rare slow iteration), with memory
/// growing from `rss_kib` while the model warms up.
fn synthetic_run(
    name: &str,
    variant: &str,
    stages_us: &[(&str, u64)],
    rss_kib: u64,
    pss: bool,
    tokens: Option<proto::TokenStats>,
    seed: u64,
) -> BenchRecord {
    let mut jitter = Jitter(seed);
    let (warmup, iterations) = (3u32, 60u32);
    let mut events = Vec::new();
    let mut durations = Vec::new();
    let mut t = 0;
    for iteration in 0..warmup + iterations {
        let start = t;
        let slow = if jitter.next(25) == 0 { 3 } else { 1 };
        for &(stage, us) in stages_us {
            let d = us * slow + jitter.next(us / 10);
            events.push(proto::TraceEvent::Span(proto::StageSpan {
                iteration,
                stage: bounded(stage),
                start_us: t,
                duration_us: d,
            }));
            t += d;
        }
        let grow = (u64::from(iteration) * 600).min(6_000);
        events.push(proto::TraceEvent::Memory(proto::MemorySample {
            t_us: t,
            rss_kib: rss_kib + grow + jitter.next(300),
            pss_kib: if pss { rss_kib * 9 / 10 + grow } else { 0 },
        }));
        let is_warmup = iteration < warmup;
        events.push(proto::TraceEvent::Iteration(proto::IterationDone {
            iteration,
            warmup: is_warmup,
            duration_us: t - start,
        }));
        if !is_warmup {
            durations.push(t - start);
        }
    }
    durations.sort_unstable();
    let pct = |p| edgevlm_host::record::percentile(&durations, p);
    let summary = proto::BenchSummary {
        run: proto::RunId(seed as u32),
        model: bounded(name),
        version: bounded("1.0"),
        model_bytes: stages_us.iter().map(|s| s.1).sum::<u64>() * 400,
        threads: 4,
        warmup,
        iterations,
        load_us: 150_000 + jitter.next(50_000),
        first_run_us: durations[0] * 4,
        latency: proto::LatencyStats {
            min_us: durations[0],
            mean_us: durations.iter().sum::<u64>() / durations.len() as u64,
            p50_us: pct(50.0),
            p90_us: pct(90.0),
            p99_us: pct(99.0),
            max_us: pct(100.0),
        },
        tokens,
        peak_rss_kib: rss_kib + 6_300,
        peak_pss_kib: if pss { rss_kib * 9 / 10 + 6_000 } else { 0 },
        dropped_events: 0,
        load_source: proto::LoadSource::Cache,
    };
    let board = BoardFacts {
        name: "line3-pi5".into(),
        url: "ssh://pi@10.0.0.7:22".into(),
        profile: "rpi5".into(),
        arch: "aarch64".into(),
        cpu_model: "Cortex-A76".into(),
        cores: 4,
        ram_total_kib: 8 << 20,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        tract_version: "0.23.9".into(),
    };
    let model = ModelFacts {
        name: name.into(),
        version: "1.0".into(),
        variant: variant.into(),
        task: if tokens.is_some() { "vqa" } else { "classify" }.into(),
        bytes: 0,
    };
    let settings = RunSettings {
        warmup,
        iterations,
        min_duration_ms: 0,
        threads: 4,
        input: "synthetic seed=1".into(),
        traced: true,
    };
    BenchRecord::from_run(board, model, settings, &summary, &events)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("edgevlm-sample-plots"));
    let vision = |infer| {
        [
            ("decode", 2_100),
            ("preprocess", 1_400),
            ("infer", infer),
            ("postprocess", 150),
        ]
    };
    let mut runs = vec![
        synthetic_run(
            "mobilenet-v3",
            "fp32",
            &vision(9_800),
            98_000,
            true,
            None,
            11,
        ),
        synthetic_run(
            "mobilenet-v3",
            "int8",
            &vision(4_300),
            61_000,
            true,
            None,
            23,
        ),
        synthetic_run(
            "smolvlm",
            "q4",
            &[
                ("preprocess", 3_000),
                ("vision_encoder", 41_000),
                ("prefill", 22_000),
                ("decode", 60_000),
            ],
            240_000,
            false,
            Some(proto::TokenStats {
                prompt_tokens: 71,
                generated_tokens: 60 * 16,
                ttft_p50_us: 66_000,
                inter_token_p50_us: 3_750,
            }),
            37,
        ),
    ];
    // A fresh database each time, so the run ids are 1, 2, 3.
    let db_path = out.join("sample-results.sqlite");
    for suffix in ["", "-wal", "-shm"] {
        let mut file = db_path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    let mut db = ResultsDb::open(&db_path)?;
    for run in &mut runs {
        db.insert(run)?;
    }
    print!("{}", compare(&runs, Format::Markdown));
    for file in plot::write_plots(&runs, &out)? {
        eprintln!("wrote {}", file.display());
    }
    Ok(())
}
