//! `edgevlm inspect`: images or folders through a classification package, one verdict per image.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use edgevlm_agent::config::{BoardKind, BoardSection, ModelSection, OutputsSection, SimSection};
use edgevlm_agent::{sim, AgentConfig, Event, Report};
use edgevlm_board::Signal;
use edgevlm_runtime::preprocess::decode_image;
use edgevlm_runtime::{
    Classifier, Inspection, LoadOptions, Manifest, Memory, Stage, Verdict, VlmInspector,
};
use serde_json::json;

use super::{EXIT_CHECK_FAILED, EXIT_ERROR};

/// Inspect images with a model package: one line per image (verdict, top class or the VLM's
/// answer, timings), then a summary. Vision-language packages ask their `[inspection]` question
/// about each image and turn the answer into the verdict by the package's rule. Folders are read one level deep (*.jpg, *.jpeg, *.png, sorted by name). An image
/// that cannot be read is reported on its own line and the rest still run (exit code 2 at the end).
#[derive(Debug, clap::Args)]
pub struct Cmd {
    /// The model package directory (holding model.toml).
    #[arg(long, value_name = "PKG")]
    model: PathBuf,
    /// Image files or folders.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// One JSON object per line (per image, then {"summary": ...}) instead of text.
    #[arg(long)]
    json: bool,
    /// Threads for matrix products.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    #[command(flatten)]
    cache: super::CacheArgs,
    /// Exit with code 1 when any part is NG.
    #[arg(long)]
    fail_on_ng: bool,
    /// Run the whole station loop on a simulated board instead: PATH is the camera's image
    /// folder, scripted triggers fire every --period-ms, verdicts go to recorded pins, and
    /// trigger-to-output latency is reported.
    #[arg(long, value_name = "BOARD", value_parser = ["sim"])]
    board: Option<String>,
    /// With --board sim: number of triggers (default: one per image).
    #[arg(long, value_name = "N", requires = "board")]
    triggers: Option<usize>,
    /// With --board sim: milliseconds between triggers.
    #[arg(long, value_name = "MS", default_value_t = 50, requires = "board")]
    period_ms: u64,
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

fn collect_images(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut images = vec![];
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading folder {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                        })
                })
                .collect();
            if found.is_empty() {
                anyhow::bail!(
                    "{}: folder holds no .jpg, .jpeg or .png files",
                    path.display()
                );
            }
            found.sort();
            images.extend(found);
        } else {
            images.push(path.clone());
        }
    }
    Ok(images)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    ms(sorted[rank])
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        if self.board.is_some() {
            return self.run_station();
        }
        let images = collect_images(&self.paths)?;
        let options = LoadOptions {
            threads: self.threads as usize,
            cache_dir: self.cache.dir(),
            ..Default::default()
        };
        let manifest = Manifest::load(&self.model.join(edgevlm_runtime::package::MANIFEST))
            .with_context(|| format!("loading model package {}", self.model.display()))?;
        if manifest.model.task.generates() {
            return self.run_vlm(&images, &options);
        }
        let mut classifier = Classifier::load(&self.model, &options)
            .with_context(|| format!("loading model package {}", self.model.display()))?;
        let mut out = std::io::stdout().lock();
        if !self.json {
            let m = &classifier.package().manifest().model;
            writeln!(
                out,
                "model {} {} (load {:.1} ms, tract {})",
                m.name,
                m.version,
                classifier.model().load_ms(),
                edgevlm_runtime::TRACT_VERSION
            )?;
            for note in classifier.model().notes() {
                writeln!(out, "note: {note}")?;
            }
        }
        let (mut ok, mut ng, mut errors) = (0usize, 0usize, 0usize);
        let (mut infer, mut total) = (vec![], vec![]);
        for image in &images {
            match classifier.inspect_file(image) {
                Ok(r) => {
                    match r.verdict {
                        Verdict::Ok => ok += 1,
                        Verdict::Ng => ng += 1,
                    }
                    infer.push(r.trace.stage_us(Stage::Infer));
                    total.push(r.trace.total_us());
                    self.print_result(&mut out, image, &r)?;
                }
                Err(e) => {
                    errors += 1;
                    self.print_error(&mut out, image, &anyhow::Error::from(e))?;
                }
            }
        }
        infer.sort_unstable();
        total.sort_unstable();
        let memory = Memory::sample();
        if self.json {
            let summary = json!({ "summary": {
                "model": classifier.package().manifest().model.name,
                "images": images.len(), "ok": ok, "ng": ng, "errors": errors,
                "load_ms": classifier.model().load_ms(),
                "infer_ms": { "p50": percentile(&infer, 50.0), "p99": percentile(&infer, 99.0), "max": percentile(&infer, 100.0) },
                "total_ms": { "p50": percentile(&total, 50.0), "p99": percentile(&total, 99.0), "max": percentile(&total, 100.0) },
                "rss_kb": memory.rss_kb, "peak_rss_kb": memory.peak_rss_kb,
            }});
            writeln!(out, "{summary}")?;
        } else {
            writeln!(
                out,
                "{} images: {ok} OK, {ng} NG, {errors} errors | infer p50 {:.2} ms max {:.2} ms | per image p50 {:.2} ms | peak RSS {:.1} MiB",
                images.len(),
                percentile(&infer, 50.0),
                percentile(&infer, 100.0),
                percentile(&total, 50.0),
                memory.peak_rss_kb as f64 / 1024.0
            )?;
        }
        out.flush()?;
        Ok(self.exit_code(errors as u64, ng as u64))
    }

    fn run_vlm(&self, images: &[PathBuf], options: &LoadOptions) -> anyhow::Result<ExitCode> {
        let mut inspector = VlmInspector::load(&self.model, options)
            .with_context(|| format!("loading model package {}", self.model.display()))?;
        let manifest = inspector.package().manifest().clone();
        let rule = inspector.rule().clone();
        let load_ms = inspector.generator().load_ms();
        let mut out = std::io::stdout().lock();
        if !self.json {
            writeln!(
                out,
                "model {} {} {} (load {:.1} ms, tract {}) asks: {}",
                manifest.model.name,
                manifest.model.version,
                manifest.model.variant,
                load_ms,
                edgevlm_runtime::TRACT_VERSION,
                rule.question
            )?;
        }
        let (mut ok, mut ng, mut errors) = (0usize, 0usize, 0usize);
        let mut totals = vec![];
        for image in images {
            let started = std::time::Instant::now();
            let result = std::fs::read(image)
                .map_err(|e| anyhow::Error::new(e).context(format!("reading {}", image.display())))
                .and_then(|bytes| Ok(decode_image(&bytes, &image.display().to_string())?))
                .and_then(|img| Ok(inspector.ask(&img)?));
            match result {
                Ok((verdict, g)) => {
                    match verdict {
                        Verdict::Ok => ok += 1,
                        Verdict::Ng => ng += 1,
                    }
                    let total_us = started.elapsed().as_micros() as u64;
                    totals.push(total_us);
                    if self.json {
                        writeln!(
                            out,
                            "{}",
                            json!({ "file": image, "verdict": verdict, "answer": g.text,
                                    "token_ids": g.token_ids, "stop_reason": g.stop_reason,
                                    "stats": g.stats, "total_ms": ms(total_us) })
                        )?;
                    } else {
                        let s = &g.stats;
                        writeln!(
                            out,
                            "{:<3} {:<28} {:<24} vision {:.1} ms  TTFT {:.1} ms  decode {:.1} tok/s  total {:.1} ms",
                            verdict.to_string(),
                            image.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
                            format!("{:?}", g.text.trim()),
                            s.vision_encode_ms,
                            s.ttft_ms,
                            s.decode_tok_s,
                            ms(total_us)
                        )?;
                    }
                }
                Err(e) => {
                    errors += 1;
                    self.print_error(&mut out, image, &e)?;
                }
            }
        }
        totals.sort_unstable();
        let memory = Memory::sample();
        if self.json {
            writeln!(
                out,
                "{}",
                json!({ "summary": {
                    "model": manifest.model.name, "images": images.len(), "ok": ok, "ng": ng,
                    "errors": errors, "load_ms": load_ms,
                    "total_ms": { "p50": percentile(&totals, 50.0), "max": percentile(&totals, 100.0) },
                    "rss_kb": memory.rss_kb, "peak_rss_kb": memory.peak_rss_kb,
                }})
            )?;
        } else {
            writeln!(
                out,
                "{} images: {ok} OK, {ng} NG, {errors} errors | per image p50 {:.1} ms max {:.1} ms | peak RSS {:.1} MiB",
                images.len(),
                percentile(&totals, 50.0),
                percentile(&totals, 100.0),
                memory.peak_rss_kb as f64 / 1024.0
            )?;
        }
        out.flush()?;
        Ok(self.exit_code(errors as u64, ng as u64))
    }

    /// The line for an image that could not be judged (the whole cause chain).
    fn print_error(
        &self,
        out: &mut impl Write,
        image: &Path,
        e: &anyhow::Error,
    ) -> std::io::Result<()> {
        let cause = format!("{e:#}");
        if self.json {
            writeln!(
                out,
                "{}",
                json!({ "file": image, "verdict": "ERROR", "error": cause })
            )
        } else {
            writeln!(out, "ERROR {}  {cause}", image.display())
        }
    }

    /// 2 when a part could not be judged, 1 for an NG part under --fail-on-ng, else 0.
    fn exit_code(&self, errors: u64, ng: u64) -> ExitCode {
        if errors > 0 {
            ExitCode::from(EXIT_ERROR)
        } else if self.fail_on_ng && ng > 0 {
            ExitCode::from(EXIT_CHECK_FAILED)
        } else {
            ExitCode::SUCCESS
        }
    }

    fn run_station(&self) -> anyhow::Result<ExitCode> {
        let [folder] = self.paths.as_slice() else {
            anyhow::bail!(
                "--board sim takes one image folder (the simulated camera), got {} paths",
                self.paths.len()
            );
        };
        let triggers = match self.triggers {
            Some(n) => n,
            None => collect_images(std::slice::from_ref(folder))?.len(),
        };
        let config = AgentConfig {
            board: BoardSection {
                kind: BoardKind::Sim,
                profile: None,
            },
            model: ModelSection {
                package: self.model.clone(),
                threads: self.threads as usize,
                cache_dir: self.cache.dir(),
            },
            sim: Some(SimSection {
                images: folder.clone(),
                triggers,
                period_ms: self.period_ms.max(1),
                script: None,
                stdin: false,
            }),
            outputs: OutputsSection {
                pulse_ms: 10,
                ..Default::default()
            },
            queue: Default::default(),
            camera: Default::default(),
            ng_images: None,
        };
        let (station, trigger, pins) = sim::build(&config).with_context(|| {
            format!(
                "setting up the simulated board with {}",
                self.model.display()
            )
        })?;
        let mut out = std::io::stdout().lock();
        let mut failed = Ok(());
        let report = station.run(trigger, |e| {
            let line = match e {
                Event::Part(p) if self.json => serde_json::to_string(p).unwrap_or_default(),
                Event::Part(p) => {
                    let signal = match p.signal {
                        Signal::Ok => "OK",
                        Signal::Ng => "NG",
                        Signal::Error => "ERR",
                    };
                    let top = match (&p.label, p.probability) {
                        (Some(l), Some(prob)) => format!("{l} {prob:.3}"),
                        _ => p.error.clone().unwrap_or_default(),
                    };
                    format!(
                        "#{:04} {signal:<3} {:<24} {top:<22} trigger->pin {:.2} ms (queued {:.2} ms)",
                        p.sequence,
                        p.source,
                        p.latency_us as f64 / 1000.0,
                        p.queue_us as f64 / 1000.0
                    )
                }
                Event::Dropped { new, total } => format!("dropped {new} triggers (queue full, {total} in all)"),
                other => format!("{other:?}"),
            };
            if failed.is_ok() {
                failed = writeln!(out, "{line}");
            }
        });
        failed?;
        let pulses = |pin: &str| pins.pulses(pin).len();
        if self.json {
            writeln!(
                out,
                "{}",
                json!({ "summary": report_json(&report), "pulses": {
                    "ok": pulses("ok"), "ng": pulses("ng"), "error": pulses("error") } })
            )?;
        } else {
            writeln!(
                out,
                "{} triggers: {} judged ({} OK, {} NG, {} ERROR), {} dropped | trigger->pin p50 {:.2} ms p99 {:.2} ms | pulses ok {} ng {} error {}",
                report.triggers,
                report.processed,
                report.ok,
                report.ng,
                report.errors,
                report.dropped,
                report.latency_ms(50.0),
                report.latency_ms(99.0),
                pulses("ok"),
                pulses("ng"),
                pulses("error")
            )?;
        }
        Ok(self.exit_code(report.errors, report.ng))
    }

    fn print_result(
        &self,
        out: &mut impl Write,
        image: &Path,
        r: &Inspection,
    ) -> std::io::Result<()> {
        if self.json {
            return writeln!(
                out,
                "{}",
                json!({ "file": image, "verdict": r.verdict, "reason": r.reason, "top": r.classes[0], "classes": r.classes, "trace": r.trace })
            );
        }
        let t = &r.trace;
        writeln!(
            out,
            "{:<3} {:<28} {:<14} {:.3}  decode {:.2} ms  pre {:.2} ms  infer {:.2} ms  post {:.2} ms{}",
            r.verdict.to_string(),
            image.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
            r.classes[0].label,
            r.classes[0].probability,
            ms(t.stage_us(Stage::Decode)),
            ms(t.stage_us(Stage::Preprocess)),
            ms(t.stage_us(Stage::Infer)),
            ms(t.stage_us(Stage::Postprocess)),
            r.reason.as_ref().map(|w| format!("  ({w})")).unwrap_or_default()
        )
    }
}

fn report_json(r: &Report) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("latencies_us");
        m.insert("latency_p50_ms".into(), r.latency_ms(50.0).into());
        m.insert("latency_p99_ms".into(), r.latency_ms(99.0).into());
    }
    v
}
