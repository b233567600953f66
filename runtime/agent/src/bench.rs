//! The benchmark runner behind [`Request::RunBenchmark`](edgevlm_proto::Request::RunBenchmark).
//!
//! One run: resolve the installed package, load it (timed: `load_us`), run warmup iterations,
//! then timed iterations until both the iteration count and the minimum duration are reached,
//! then — only if the spec asks for a per-node profile — extra profiled passes, so that the
//! latency figures carry no profiling overhead.
//!
//! - [`BenchInput::Synthetic`] feeds every graph input a deterministic random tensor
//!   ([`edgevlm_runtime::synth::random_input`], symbolic dims 1) and times one `infer` span.
//! - [`BenchInput::PackageFile`] and [`BenchInput::Image`] run the whole classification
//!   pipeline (`decode`, `preprocess`, `infer`, `postprocess` spans from the runtime's trace).
//! - Generation packages (`vision-language`, `text-generation`) run one whole generation per
//!   iteration: the spec's prompt (default: the package's inspection question, else a short
//!   request) through the chat template, with the image for VLMs (`Synthetic` means no image),
//!   greedy, `max_new_tokens` (default: the package's). Spans `preprocess`, `vision`,
//!   `prefill`, `decode`; a [`TokenTiming`] per generated token; the summary's
//!   [`TokenStats`] over the timed iterations. No per-node profile yet for these.
//!
//! Trace events leave the benchmark thread through a bounded queue: a full queue drops the
//! event (counted, and reported in the next [`TraceBatch::dropped`] and in
//! [`BenchSummary::dropped_events`]) rather than stall the measurement on a slow link. A batcher
//! thread packs them into batches of at most [`MAX_TRACE_BATCH`] events and hands each batch to
//! the caller at least every [`FLUSH_INTERVAL`]. A sampler thread adds a
//! [`MemorySample`] (VmRSS, and PSS where the kernel reports it)
//! every `memory_interval_ms`.
//!
//! Runtime errors map onto wire errors: unreadable files -> `Io`; a package that does not load
//! (manifest, checksum, graph) -> `InvalidPackage`; graphs or images the runtime cannot handle ->
//! `Unsupported`; a failure while running a loaded graph -> `Internal`. Every message is the
//! full cause chain, truncated to the wire's limit.

#![allow(
    clippy::result_large_err,
    reason = "the wire Error is a fixed-capacity no_std value (its message inline): handlers return what the protocol carries"
)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use edgevlm_proto::{
    bounded, BenchInput, BenchSpec, BenchSummary, Error, IterationDone, LatencyStats, LoadSource,
    MemorySample, NodeTiming, RunId, StageSpan, TokenStats, TokenTiming, TraceBatch, TraceEvent,
    MAX_TRACE_BATCH,
};
use edgevlm_runtime::manifest::{Manifest, Task};
use edgevlm_runtime::preprocess::{self, Preprocessor};
use edgevlm_runtime::synth::{random_input, SplitMix64};
use edgevlm_runtime::trace::NodeProfile;
use edgevlm_runtime::{
    error_chain, Classifier, GenerateOptions, Generator, LoadOptions, Memory, OnnxModel, RgbImage,
    Stage, Tensor,
};

use crate::server::store_error;
use crate::store::ModelStore;

/// Longest time an event waits in the batcher before its batch is sent.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Events the benchmark thread may run ahead of the link before it starts dropping them.
pub const EVENT_QUEUE: usize = 4096;

/// Most events of one run kept for [`Request::FetchTraces`](edgevlm_proto::Request::FetchTraces)
/// (a few MiB); later events are still streamed live, and a replay reports them as dropped.
pub const MAX_KEPT_EVENTS: usize = 50_000;

/// Most profiled passes for the per-node profile (fewer if the spec asks for fewer iterations).
pub const MAX_PROFILE_PASSES: u32 = 10;

/// Profiling stops after this much time once one pass is done, however many were planned.
pub const PROFILE_BUDGET: Duration = Duration::from_secs(5);

/// The graph role the per-node profile names (single-graph packages).
const MAIN_GRAPH: &str = "main";

/// The trace of one run as it was streamed, kept compactly (one event list, batch boundaries
/// beside it) for replays.
#[derive(Debug, Clone)]
pub struct RunTrace {
    /// The run.
    pub run: RunId,
    /// `(seq, dropped, events in the batch)` of every batch sent, in order.
    batches: Vec<(u32, u32, usize)>,
    /// The events of all batches, up to [`MAX_KEPT_EVENTS`].
    events: Vec<TraceEvent>,
    /// Events streamed but not kept.
    not_kept: u32,
}

impl RunTrace {
    fn new(run: RunId) -> RunTrace {
        RunTrace {
            run,
            batches: Vec::new(),
            events: Vec::new(),
            not_kept: 0,
        }
    }

    fn keep(&mut self, batch: &TraceBatch) {
        let room = MAX_KEPT_EVENTS - self.events.len();
        let kept = batch.events.len().min(room);
        self.events.extend_from_slice(&batch.events[..kept]);
        let lost = (batch.events.len() - kept) as u32;
        self.not_kept = self.not_kept.saturating_add(lost);
        // A batch whose events were all left out is still replayed, for its `dropped` count.
        self.batches
            .push((batch.seq, batch.dropped.saturating_add(lost), kept));
    }

    /// Batches as they were sent, rebuilt in order; events beyond [`MAX_KEPT_EVENTS`] are left
    /// out and counted in the `dropped` of the batch they were in.
    pub fn replay(&self) -> impl Iterator<Item = TraceBatch> + '_ {
        let mut at = 0;
        self.batches.iter().map(move |&(seq, dropped, len)| {
            let events = heapless::Vec::from_slice(&self.events[at..at + len])
                .expect("a kept batch holds at most MAX_TRACE_BATCH events");
            at += len;
            TraceBatch {
                run: self.run,
                seq,
                dropped,
                events,
            }
        })
    }

    /// Batches kept.
    pub fn batches(&self) -> usize {
        self.batches.len()
    }
}

/// What a benchmark request produced: its final result, and its trace for later replays (also
/// when it failed or was cancelled part-way).
#[derive(Debug)]
pub struct BenchOutcome {
    /// The summary, or why the run failed.
    pub result: Result<BenchSummary, Error>,
    /// What was streamed.
    pub trace: RunTrace,
}

/// Runs the benchmark `spec` on the package installed in `store`, as run `run`.
///
/// With a `cache_dir` (the load cache, see `edgevlm_runtime::cache`), the timed load is the
/// one the station's next start does: from the cache, which a first, untimed load writes
/// when it has no entry for the package yet; the peak memory figures start after that first
/// load (the memory samples streamed show both). Without, the load parses the ONNX files.
///
/// `emit` gets every trace batch, in order, on a batcher thread (it may block on the link: the
/// benchmark does not wait for it). `cancel` is checked between iterations and passes; once set,
/// the run ends with [`Error::Cancelled`]. Returns after the last batch was emitted.
pub fn run(
    store: &ModelStore,
    spec: &BenchSpec,
    run: RunId,
    cache_dir: Option<&Path>,
    cancel: &AtomicBool,
    emit: impl FnMut(&TraceBatch) + Send,
) -> BenchOutcome {
    let start = Instant::now();
    let package = match resolve(store, spec) {
        Ok(p) => p,
        Err(e) => {
            return BenchOutcome {
                result: Err(e),
                trace: RunTrace::new(run),
            }
        }
    };
    // Peak RSS from the kernel's high-water mark covers spikes between samples; it only means
    // "during this run" once reset.
    let hwm_reset = Memory::reset_peak();
    // Set when the load that wrote the load cache is done with: the peaks start again.
    let reset_peaks = AtomicBool::new(false);
    let dropped = Dropped::default();
    let (result, trace, sampled) = std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        let batcher = s.spawn(|| batch_events(rx, run, &dropped, emit));
        let sink = Sink {
            tx,
            dropped: &dropped,
        };
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let interval = u64::from(spec.trace.memory_interval_ms);
        let reset_peaks = &reset_peaks;
        let sampler = (interval > 0).then(|| {
            let sink = sink.clone();
            s.spawn(move || {
                let interval = Duration::from_millis(interval);
                sample_memory(&sink, start, interval, stop_rx, reset_peaks)
            })
        });
        let result = measure(&package, spec, cache_dir, &sink, start, cancel, reset_peaks);
        drop(stop_tx);
        let sampled = sampler
            .map(|h| h.join().expect("memory sampler panicked"))
            .unwrap_or_default();
        drop(sink);
        let trace = batcher.join().expect("trace batcher panicked");
        (result, trace, sampled)
    });
    let result = result.map(|m| {
        let end = Memory::sample();
        let pss_end = Memory::pss_kb().unwrap_or(0);
        let mut peak_rss = sampled.rss_kib.max(end.rss_kb);
        if hwm_reset {
            peak_rss = peak_rss.max(end.peak_rss_kb);
        }
        BenchSummary {
            run,
            model: spec.model.name.clone(),
            version: spec.model.version.clone(),
            model_bytes: package.bytes,
            threads: spec.threads.max(1),
            warmup: m.warmup,
            iterations: m.timed.len() as u32,
            load_us: m.load_us,
            first_run_us: m.first_run_us,
            latency: latency_stats(&m.timed),
            tokens: m.tokens,
            peak_rss_kib: peak_rss,
            peak_pss_kib: sampled.pss_kib.max(pss_end),
            dropped_events: dropped.total.load(Ordering::Relaxed),
            load_source: m.load_source,
        }
    });
    BenchOutcome { result, trace }
}

/// Nearest-rank statistics of `samples` (µs); all zero for none.
pub fn latency_stats(samples: &[u64]) -> LatencyStats {
    if samples.is_empty() {
        return LatencyStats::default();
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let rank = |p: u64| {
        // Nearest rank: the smallest value with at least p% of the samples at or below it.
        let r = (p as usize * n).div_ceil(100).max(1);
        sorted[r - 1]
    };
    LatencyStats {
        min_us: sorted[0],
        mean_us: (sorted.iter().map(|&v| u128::from(v)).sum::<u128>() / n as u128) as u64,
        p50_us: rank(50),
        p90_us: rank(90),
        p99_us: rank(99),
        max_us: sorted[n - 1],
    }
}

/// The installed package a spec names, checked before anything is loaded.
struct Package {
    dir: PathBuf,
    manifest: Manifest,
    bytes: u64,
}

fn resolve(store: &ModelStore, spec: &BenchSpec) -> Result<Package, Error> {
    let (name, version) = (spec.model.name.as_str(), spec.model.version.as_str());
    let dir = store.package_dir(name, version).map_err(store_error)?;
    let entry = store.entry(name, version).map_err(store_error)?;
    let manifest =
        Manifest::load(&dir.join(edgevlm_runtime::package::MANIFEST)).map_err(runtime_error)?;
    let runnable = match spec.input {
        _ if manifest.model.task == Task::TextGeneration => {
            matches!(spec.input, BenchInput::Synthetic { .. })
        }
        _ if manifest.model.task == Task::VisionLanguage => true,
        BenchInput::Synthetic { .. } => manifest.graph(MAIN_GRAPH).is_some(),
        BenchInput::PackageFile(_) | BenchInput::Image(_) => {
            manifest.model.task == Task::Classification
        }
    };
    if !runnable {
        return Err(Error::Unsupported);
    }
    Ok(Package {
        dir,
        manifest,
        bytes: entry.size_bytes,
    })
}

/// Maps a runtime error onto the wire (see the module docs).
pub fn runtime_error(e: edgevlm_runtime::Error) -> Error {
    use edgevlm_runtime::Error as E;
    let chain = error_chain(&e);
    match e {
        E::Io { .. } => Error::io(&chain),
        E::Model { .. } | E::Manifest { .. } | E::Checksum { .. } | E::Text { .. } => {
            Error::invalid_package(&chain)
        }
        // The prompt the spec chose does not fit the model: the request's fault, said in full.
        E::ContextLength { .. } | E::Import { .. } => Error::invalid_package(&chain),
        E::Unsupported { .. } | E::Image { .. } => Error::Unsupported,
        E::Input { .. } | E::Npy { .. } | E::Inference(_) => Error::internal(&chain),
    }
}

/// Events dropped because the queue was full.
#[derive(Default)]
struct Dropped {
    /// Since the last batch.
    since_batch: AtomicU32,
    /// Over the run.
    total: AtomicU32,
}

/// The benchmark's end of the event queue.
#[derive(Clone)]
struct Sink<'a> {
    tx: Sender<TraceEvent>,
    dropped: &'a Dropped,
}

impl Sink<'_> {
    /// Queues `event` unless the queue is full, in which case it is counted as dropped.
    fn offer(&self, event: TraceEvent) {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.since_batch.fetch_add(1, Ordering::Relaxed);
                self.dropped.total.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Queues `event`, waiting for room: only for events after the measurement.
    fn send(&self, event: TraceEvent) {
        let _ = self.tx.send(event);
    }
}

/// Packs events into batches and emits them; returns what was emitted.
fn batch_events(
    rx: Receiver<TraceEvent>,
    run: RunId,
    dropped: &Dropped,
    mut emit: impl FnMut(&TraceBatch),
) -> RunTrace {
    let mut kept = RunTrace::new(run);
    let mut pending: heapless::Vec<TraceEvent, MAX_TRACE_BATCH> = heapless::Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut seq = 0u32;
    let mut flush = |pending: &mut heapless::Vec<TraceEvent, MAX_TRACE_BATCH>| {
        let dropped = dropped.since_batch.swap(0, Ordering::Relaxed);
        if pending.is_empty() && dropped == 0 {
            return;
        }
        let batch = TraceBatch {
            run,
            seq,
            dropped,
            events: std::mem::take(pending),
        };
        seq += 1;
        emit(&batch);
        kept.keep(&batch);
    };
    loop {
        let wait = oldest.map_or(FLUSH_INTERVAL, |t| {
            (t + FLUSH_INTERVAL).saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(event) => {
                if pending.is_empty() {
                    oldest = Some(Instant::now());
                }
                // Cannot fail: the batch is flushed as soon as it is full.
                let _ = pending.push(event);
                if pending.is_full() {
                    flush(&mut pending);
                    oldest = None;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                flush(&mut pending);
                oldest = None;
            }
            Err(RecvTimeoutError::Disconnected) => {
                flush(&mut pending);
                break;
            }
        }
    }
    kept
}

/// Peaks seen by the memory sampler, KiB.
#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    rss_kib: u64,
    pss_kib: u64,
}

fn sample_memory(
    sink: &Sink,
    start: Instant,
    interval: Duration,
    stop: Receiver<()>,
    reset: &AtomicBool,
) -> Peaks {
    let mut peaks = Peaks::default();
    let mut next = Instant::now();
    loop {
        if reset.swap(false, Ordering::Relaxed) {
            peaks = Peaks::default();
        }
        let rss = Memory::sample().rss_kb;
        let pss = Memory::pss_kb().unwrap_or(0);
        peaks.rss_kib = peaks.rss_kib.max(rss);
        peaks.pss_kib = peaks.pss_kib.max(pss);
        sink.offer(TraceEvent::Memory(MemorySample {
            t_us: micros(start.elapsed()),
            rss_kib: rss,
            pss_kib: pss,
        }));
        next += interval;
        let now = Instant::now();
        if next < now {
            next = now; // Fell behind (a slow /proc read): skip the missed ticks.
        }
        match stop.recv_timeout(next - now) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return peaks,
        }
    }
}

/// What the measurement loop found.
struct Measured {
    load_us: u64,
    /// Where the timed load read its graphs from.
    load_source: LoadSource,
    warmup: u32,
    first_run_us: u64,
    /// Durations of the timed iterations, µs.
    timed: Vec<u64>,
    /// Token statistics of generation workloads.
    tokens: Option<TokenStats>,
}

/// Per-iteration token timings of a generation workload.
#[derive(Debug, Default)]
struct TokenTally {
    prompt_tokens: u32,
    /// (iteration, time to first token µs, later token durations µs).
    runs: Vec<(u32, u64, Vec<u64>)>,
}

impl TokenTally {
    /// Statistics over the iterations from `first_timed` on.
    fn stats(&self, first_timed: u32) -> TokenStats {
        let timed: Vec<_> = self.runs.iter().filter(|r| r.0 >= first_timed).collect();
        let mut ttft: Vec<u64> = timed.iter().map(|r| r.1).collect();
        let mut inter: Vec<u64> = timed.iter().flat_map(|r| r.2.iter().copied()).collect();
        let median = |v: &mut Vec<u64>| {
            v.sort_unstable();
            v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
        };
        TokenStats {
            prompt_tokens: self.prompt_tokens,
            generated_tokens: timed.iter().map(|r| 1 + r.2.len() as u64).sum(),
            ttft_p50_us: median(&mut ttft),
            inter_token_p50_us: median(&mut inter),
        }
    }
}

/// The loaded model and its input, ready to iterate.
enum Workload {
    /// Graph inputs fed straight to the plan.
    Synthetic {
        model: OnnxModel,
        inputs: Vec<Tensor>,
    },
    /// The classification pipeline on one encoded image.
    Pipeline {
        classifier: Box<Classifier>,
        image: Vec<u8>,
        name: String,
    },
    /// One generation per iteration.
    Generate {
        generator: Box<Generator>,
        prompt: String,
        image: Option<RgbImage>,
        options: GenerateOptions,
        tally: TokenTally,
    },
}

fn measure(
    package: &Package,
    spec: &BenchSpec,
    cache_dir: Option<&Path>,
    sink: &Sink,
    start: Instant,
    cancel: &AtomicBool,
    reset_peaks: &AtomicBool,
) -> Result<Measured, Error> {
    let options = LoadOptions {
        threads: usize::from(spec.threads.max(1)),
        cache_dir: cache_dir.map(Path::to_path_buf),
        ..LoadOptions::default()
    };
    // Read the input first: a bad path fails fast and file I/O stays out of load_us.
    let image = match &spec.input {
        BenchInput::Synthetic { .. } => None,
        BenchInput::PackageFile(path) => Some((
            read_package_file(&package.dir, path)?,
            path.as_str().to_owned(),
        )),
        BenchInput::Image(bytes) => Some((bytes.to_vec(), "request image".to_owned())),
    };
    let cancelled = || cancel.load(Ordering::Relaxed);
    let second = options.cache_dir.is_some().then(|| image.clone());
    let load_start = Instant::now();
    let mut work = load(package, spec, &options, image)?;
    let mut load_us = micros(load_start.elapsed());
    // A first load with the cache writes it (and times the writing, and peaks at the ONNX
    // parse): load again, from the cache, as the station's next start will, and measure
    // memory from there.
    let wrote = work
        .graphs()
        .iter()
        .any(|g| edgevlm_runtime::cache::wrote_entry(g.notes()));
    if let (true, Some(image)) = (wrote, second) {
        if cancelled() {
            return Err(Error::Cancelled);
        }
        drop(work);
        Memory::reset_peak();
        reset_peaks.store(true, Ordering::Relaxed);
        let again = Instant::now();
        work = load(package, spec, &options, image)?;
        load_us = micros(again.elapsed());
    }
    // From the cache only if every graph came from it.
    let from_cache = work.graphs().iter().all(|g| {
        g.notes()
            .iter()
            .any(|n| n.contains(edgevlm_runtime::cache::READ_NOTE))
    });
    let load_source = match (&options.cache_dir, from_cache) {
        (None, _) => LoadSource::Onnx,
        (Some(_), true) => LoadSource::Cache,
        (Some(_), false) => LoadSource::OnnxDespiteCache,
    };

    if cancelled() {
        return Err(Error::Cancelled);
    }

    let mut iteration = 0u32;
    let mut first_run_us = None;
    // Reserve for the common case only: `iterations` may be huge when `min_duration_ms` rules.
    let mut timed = Vec::with_capacity((spec.iterations as usize).min(4096));
    let min_duration = Duration::from_millis(u64::from(spec.min_duration_ms));
    let mut timed_start = None;
    loop {
        let warmup = iteration < spec.warmup;
        if !warmup {
            let since = *timed_start.get_or_insert_with(Instant::now);
            if timed.len() >= spec.iterations as usize && since.elapsed() >= min_duration {
                break;
            }
        }
        if cancelled() {
            return Err(Error::Cancelled);
        }
        let duration_us = work.iterate(
            iteration,
            start,
            spec.trace.spans.then_some(sink),
            spec.trace.tokens.then_some(sink),
        )?;
        first_run_us.get_or_insert(duration_us);
        if !warmup {
            timed.push(duration_us);
        }
        if spec.trace.spans {
            sink.offer(TraceEvent::Iteration(IterationDone {
                iteration,
                warmup,
                duration_us,
            }));
        }
        iteration = iteration.saturating_add(1);
    }

    if spec.trace.top_nodes > 0 {
        let passes = spec.iterations.clamp(1, MAX_PROFILE_PASSES);
        let profile = work.profile(passes, cancel)?;
        let total = profile.total().as_micros().max(1);
        for (rank, node) in profile
            .ranked()
            .into_iter()
            .take(usize::from(spec.trace.top_nodes))
            .enumerate()
        {
            let node_us = node.total.as_micros();
            sink.send(TraceEvent::Node(NodeTiming {
                rank: rank as u16,
                graph: bounded(MAIN_GRAPH),
                node: bounded(&node.name),
                op: bounded(&node.op),
                total_us: node_us as u64,
                iterations: profile.runs(),
                share_permille: (node_us * 1000 / total) as u16,
            }));
        }
    }
    let warmup = spec.warmup.min(iteration);
    let tokens = match &work {
        Workload::Generate { tally, .. } => Some(tally.stats(warmup)),
        _ => None,
    };
    Ok(Measured {
        load_us,
        load_source,
        warmup,
        first_run_us: first_run_us.unwrap_or(0),
        timed,
        tokens,
    })
}

/// Loads the package for `spec` (the image, read before, goes with it).
fn load(
    package: &Package,
    spec: &BenchSpec,
    options: &LoadOptions,
    image: Option<(Vec<u8>, String)>,
) -> Result<Workload, Error> {
    let work = match (&spec.input, image) {
        (_, image) if package.manifest.model.task.generates() => {
            let (pkg, generator) = Generator::open(&package.dir, options).map_err(runtime_error)?;
            let m = pkg.manifest();
            let image = match image {
                Some((bytes, name)) => {
                    Some(preprocess::decode_image(&bytes, &name).map_err(runtime_error)?)
                }
                None => None,
            };
            let question = if !spec.prompt.is_empty() {
                spec.prompt.as_str().to_owned()
            } else if let Some(inspection) = &m.inspection {
                inspection.question.clone()
            } else if image.is_some() {
                "Describe this image.".to_owned()
            } else {
                "Write a short sentence about quality inspection.".to_owned()
            };
            let prompt = generator
                .chat_prompt(&question, image.is_some())
                .map_err(runtime_error)?;
            let generation = m.generation.clone().expect("validated: [generation]");
            let max_new_tokens = match spec.max_new_tokens {
                0 => generation.max_new_tokens,
                n => n as usize,
            };
            Workload::Generate {
                generator: Box::new(generator),
                prompt,
                image,
                options: GenerateOptions {
                    max_new_tokens,
                    stop_strings: generation.stop,
                    ..GenerateOptions::default()
                },
                tally: TokenTally::default(),
            }
        }
        (BenchInput::Synthetic { seed }, _) => {
            let graph = package
                .manifest
                .graph(MAIN_GRAPH)
                .expect("resolve() checked the main graph");
            // Opening the package verifies the graph's sha256, as a board restart does.
            edgevlm_runtime::ModelPackage::open(&package.dir).map_err(runtime_error)?;
            let model =
                OnnxModel::load(&package.dir.join(&graph.file), options).map_err(runtime_error)?;
            let mut rng = SplitMix64::new(*seed);
            let inputs = model
                .inputs()
                .iter()
                .map(|spec| random_input(spec, &mut rng))
                .collect::<Result<Vec<_>, _>>()
                .map_err(runtime_error)?;
            Workload::Synthetic { model, inputs }
        }
        (_, Some((image, name))) => Workload::Pipeline {
            classifier: Box::new(Classifier::load(&package.dir, options).map_err(runtime_error)?),
            image,
            name,
        },
        (_, None) => unreachable!("image inputs were read above"),
    };
    Ok(work)
}

impl Workload {
    /// Its graphs.
    fn graphs(&self) -> Vec<&OnnxModel> {
        match self {
            Workload::Synthetic { model, .. } => vec![model],
            Workload::Pipeline { classifier, .. } => vec![classifier.model()],
            Workload::Generate { generator, .. } => generator.graphs(),
        }
    }

    /// Runs one iteration and returns its duration, µs; streams its spans to `spans` and, for
    /// generation, one timing per token to `tokens`.
    fn iterate(
        &mut self,
        iteration: u32,
        start: Instant,
        spans: Option<&Sink>,
        tokens: Option<&Sink>,
    ) -> Result<u64, Error> {
        match self {
            Workload::Synthetic { model, inputs } => {
                // Copy the inputs before the clock starts: tract consumes them.
                let inputs = inputs.clone();
                let t0 = Instant::now();
                model.run(inputs).map_err(runtime_error)?;
                let duration_us = micros(t0.elapsed());
                if let Some(sink) = spans {
                    sink.offer(TraceEvent::Span(StageSpan {
                        iteration,
                        stage: bounded("infer"),
                        start_us: micros(t0 - start),
                        duration_us,
                    }));
                }
                Ok(duration_us)
            }
            Workload::Pipeline {
                classifier,
                image,
                name,
            } => {
                let t0 = Instant::now();
                let mut trace = edgevlm_runtime::Trace::default();
                let img = trace
                    .time(Stage::Decode, || preprocess::decode_image(image, name))
                    .map_err(runtime_error)?;
                let inspection = classifier.inspect_rgb(&img, trace).map_err(runtime_error)?;
                let duration_us = micros(t0.elapsed());
                if let Some(sink) = spans {
                    // The runtime's trace holds durations in order; stages run back to back.
                    let mut offset = micros(t0 - start);
                    for span in &inspection.trace.spans {
                        sink.offer(TraceEvent::Span(StageSpan {
                            iteration,
                            stage: bounded(stage_name(span.stage)),
                            start_us: offset,
                            duration_us: span.us,
                        }));
                        offset += span.us;
                    }
                }
                Ok(duration_us)
            }
            Workload::Generate {
                generator,
                prompt,
                image,
                options,
                tally,
            } => {
                let t0 = Instant::now();
                let mut token_times = vec![];
                let result = generator
                    .generate(prompt, image.as_ref(), options, &mut |_, _| {
                        token_times.push(Instant::now())
                    })
                    .map_err(runtime_error)?;
                let end = Instant::now();
                let duration_us = micros(end - t0);
                let s = &result.stats;
                let mut starts = vec![t0];
                starts.extend(token_times.iter().copied());
                let durations: Vec<u64> = starts.windows(2).map(|w| micros(w[1] - w[0])).collect();
                tally.prompt_tokens = s.prompt_tokens as u32;
                if let Some((first, rest)) = durations.split_first() {
                    tally.runs.push((iteration, *first, rest.to_vec()));
                }
                if let Some(sink) = spans {
                    let mut offset = micros(t0 - start);
                    for (stage, ms) in [
                        ("preprocess", s.preprocess_ms),
                        ("vision", s.vision_encode_ms),
                        ("prefill", s.prefill_ms),
                        ("decode", s.decode_ms),
                    ] {
                        let us = (ms * 1e3) as u64;
                        sink.offer(TraceEvent::Span(StageSpan {
                            iteration,
                            stage: bounded(stage),
                            start_us: offset,
                            duration_us: us,
                        }));
                        offset += us;
                    }
                }
                if let Some(sink) = tokens {
                    for (index, (at, d)) in starts.iter().zip(&durations).enumerate() {
                        sink.offer(TraceEvent::Token(TokenTiming {
                            iteration,
                            index: index as u32,
                            start_us: micros(*at - start),
                            duration_us: *d,
                        }));
                    }
                }
                Ok(duration_us)
            }
        }
    }

    /// Profiles the graph over `passes` extra runs (fewer if [`PROFILE_BUDGET`] runs out).
    fn profile(&mut self, passes: u32, cancel: &AtomicBool) -> Result<NodeProfile, Error> {
        let (model, input) = match self {
            // Three graphs and a loop: not profiled per node yet (an empty profile).
            Workload::Generate { .. } => return Ok(NodeProfile::new()),
            Workload::Synthetic { model, inputs } => (&*model, inputs.clone()),
            Workload::Pipeline {
                classifier,
                image,
                name,
            } => {
                // The graph sees what the pipeline feeds it: this image, preprocessed.
                let img = preprocess::decode_image(image, name).map_err(runtime_error)?;
                let spec = classifier
                    .package()
                    .manifest()
                    .input
                    .clone()
                    .expect("classification manifests have [input]");
                let tensor = Preprocessor::new(spec)
                    .tensor(&img)
                    .map_err(runtime_error)?;
                (classifier.model(), vec![tensor])
            }
        };
        let mut profile = NodeProfile::new();
        let begun = Instant::now();
        for _ in 0..passes {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            if profile.runs() > 0 && begun.elapsed() >= PROFILE_BUDGET {
                break;
            }
            model
                .run_profiled(input.clone(), &mut profile)
                .map_err(runtime_error)?;
        }
        Ok(profile)
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Decode => "decode",
        Stage::Preprocess => "preprocess",
        Stage::Infer => "infer",
        Stage::Postprocess => "postprocess",
    }
}

/// Reads `path` of the package in `dir`: a valid package path, no symlink on the way, a
/// regular file.
fn read_package_file(dir: &Path, path: &str) -> Result<Vec<u8>, Error> {
    edgevlm_proto::validate_file_path(path)?;
    let mut at = dir.to_owned();
    for component in path.split('/') {
        at.push(component);
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotFound),
            Err(e) => return Err(Error::io(&format!("{}: {e}", at.display()))),
        };
        if meta.file_type().is_symlink() {
            return Err(Error::InvalidName);
        }
    }
    if !std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_file()) {
        return Err(Error::InvalidName);
    }
    std::fs::read(&at).map_err(|e| Error::io(&format!("{}: {e}", at.display())))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).rev().collect();
        let s = latency_stats(&samples);
        assert_eq!(
            (s.min_us, s.p50_us, s.p90_us, s.p99_us, s.max_us),
            (1, 50, 90, 99, 100)
        );
        assert_eq!(s.mean_us, 50);
        let s = latency_stats(&[7]);
        assert_eq!(
            (s.min_us, s.p50_us, s.p99_us, s.max_us, s.mean_us),
            (7, 7, 7, 7, 7)
        );
        let s = latency_stats(&[10, 30, 20]);
        assert_eq!((s.p50_us, s.p90_us, s.mean_us), (20, 30, 20));
        assert_eq!(latency_stats(&[]), LatencyStats::default());
    }

    fn events(n: usize) -> Vec<TraceEvent> {
        (0..n)
            .map(|i| {
                TraceEvent::Iteration(IterationDone {
                    iteration: i as u32,
                    warmup: false,
                    duration_us: 1,
                })
            })
            .collect()
    }

    #[test]
    fn batcher_fills_batches_and_flushes_stragglers() {
        let dropped = Dropped::default();
        let (tx, rx) = crossbeam_channel::bounded(1000);
        for e in events(130) {
            tx.send(e).unwrap();
        }
        dropped.since_batch.store(3, Ordering::Relaxed);
        let sent = std::sync::Mutex::new(Vec::new());
        let trace = std::thread::scope(|s| {
            let h = s.spawn(|| {
                batch_events(rx, RunId(9), &dropped, |b| {
                    sent.lock().unwrap().push(b.clone())
                })
            });
            // The two full batches go out at once; the last two events within the interval.
            std::thread::sleep(FLUSH_INTERVAL * 3);
            let early: Vec<usize> = sent
                .lock()
                .unwrap()
                .iter()
                .map(|b| b.events.len())
                .collect();
            assert_eq!(early, vec![64, 64, 2]);
            drop(tx);
            h.join().unwrap()
        });
        let sent = sent.into_inner().unwrap();
        assert_eq!(
            sent.iter().map(|b| b.seq).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(sent[0].dropped, 3);
        assert_eq!(sent[1].dropped, 0);
        assert!(sent.iter().all(|b| b.run == RunId(9)));
        let replayed: Vec<TraceBatch> = trace.replay().collect();
        assert_eq!(replayed, sent);
    }

    #[test]
    fn replay_keeps_a_bounded_number_of_events() {
        let mut trace = RunTrace::new(RunId(1));
        let mut seq = 0;
        let mut sent = 0;
        while sent < MAX_KEPT_EVENTS + 100 {
            let batch = TraceBatch {
                run: RunId(1),
                seq,
                dropped: 0,
                events: heapless::Vec::from_slice(&events(64)).unwrap(),
            };
            trace.keep(&batch);
            seq += 1;
            sent += 64;
        }
        let replayed: Vec<TraceBatch> = trace.replay().collect();
        assert_eq!(replayed.len(), seq as usize);
        let events: usize = replayed.iter().map(|b| b.events.len()).sum();
        let lost: u32 = replayed.iter().map(|b| b.dropped).sum();
        assert_eq!(events, MAX_KEPT_EVENTS);
        assert_eq!(events + lost as usize, sent);
    }
}
