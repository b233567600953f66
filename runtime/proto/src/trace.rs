//! Trace events streamed during a benchmark, and its summary.
//!
//! Times are microseconds since the run started, on the agent's monotonic clock.

use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::message::RunId;
use crate::names::{ModelName, NodeName, StageName, VersionString};
use crate::MAX_TRACE_BATCH;

/// Consecutive trace events of one run; batching keeps the per-event framing cost low.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TraceBatch {
    /// The run.
    pub run: RunId,
    /// 0, 1, 2, ... within the run: a gap means batches were lost.
    pub seq: u32,
    /// Events the agent dropped since the previous batch because the link was too slow.
    pub dropped: u32,
    /// The events, in time order.
    pub events: Vec<TraceEvent, MAX_TRACE_BATCH>,
}

/// One trace event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TraceEvent {
    /// A pipeline stage ran.
    Span(StageSpan),
    /// A language model produced a token.
    Token(TokenTiming),
    /// Memory use of the agent process.
    Memory(MemorySample),
    /// An iteration finished.
    Iteration(IterationDone),
    /// Time spent in one graph node over the timed iterations (sent after the run, slowest
    /// first, when [`TraceOptions::top_nodes`](crate::TraceOptions::top_nodes) asks for them).
    Node(NodeTiming),
}

/// Profile of one graph node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct NodeTiming {
    /// Rank, 0 for the slowest node.
    pub rank: u16,
    /// The graph (`model`, `vision_encoder`, `decoder`).
    pub graph: StageName,
    /// Node name in the optimized plan (truncated to [`MAX_NODE_NAME`](crate::MAX_NODE_NAME)).
    pub node: NodeName,
    /// Operator (`MatMatMulPack`, `Conv`).
    pub op: StageName,
    /// Total time over the profiled iterations, µs.
    pub total_us: u64,
    /// Profiled iterations.
    pub iterations: u32,
    /// Share of the graph's total node time, per mille.
    pub share_permille: u16,
}

/// A pipeline stage of one iteration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StageSpan {
    /// Iteration index, warmup iterations first.
    pub iteration: u32,
    /// The stage (`preprocess`, `vision_encoder`, `decode`).
    pub stage: StageName,
    /// Start, µs since the run started.
    pub start_us: u64,
    /// Duration, µs.
    pub duration_us: u64,
}

/// One generated token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TokenTiming {
    /// Iteration index.
    pub iteration: u32,
    /// Position among the generated tokens; index 0 includes the prefill (time to first token).
    pub index: u32,
    /// Start, µs since the run started.
    pub start_us: u64,
    /// Time to produce it, µs.
    pub duration_us: u64,
}

/// Memory use sampled during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MemorySample {
    /// When, µs since the run started.
    pub t_us: u64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Proportional set size, KiB (0 where the kernel does not report it).
    pub pss_kib: u64,
}

/// An iteration finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IterationDone {
    /// Iteration index.
    pub iteration: u32,
    /// Whether it was a warmup iteration (excluded from the summary).
    pub warmup: bool,
    /// End-to-end duration, µs.
    pub duration_us: u64,
}

/// Latency distribution of the timed iterations, µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LatencyStats {
    /// Fastest.
    pub min_us: u64,
    /// Mean.
    pub mean_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
}

/// Token throughput of a language model benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TokenStats {
    /// Prompt tokens per iteration.
    pub prompt_tokens: u32,
    /// Tokens generated over all timed iterations.
    pub generated_tokens: u64,
    /// Median time to first token, µs.
    pub ttft_p50_us: u64,
    /// Median time per later token, µs.
    pub inter_token_p50_us: u64,
}

/// The final result of a benchmark ([`Response::BenchDone`](crate::Response::BenchDone)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BenchSummary {
    /// The run, for [`Request::FetchTraces`](crate::Request::FetchTraces).
    pub run: RunId,
    /// The model.
    pub model: ModelName,
    /// Its version.
    pub version: VersionString,
    /// Bytes of the installed package on the board's disk.
    pub model_bytes: u64,
    /// Intra-op threads used.
    pub threads: u16,
    /// Warmup iterations run.
    pub warmup: u32,
    /// Timed iterations run.
    pub iterations: u32,
    /// Time to load and optimize the model, µs.
    pub load_us: u64,
    /// The first iteration (warmup or not), µs: what the first part after a restart costs.
    pub first_run_us: u64,
    /// Latency of the timed iterations.
    pub latency: LatencyStats,
    /// Token statistics, for language models.
    pub tokens: Option<TokenStats>,
    /// Peak resident set size, KiB.
    pub peak_rss_kib: u64,
    /// Peak proportional set size, KiB.
    pub peak_pss_kib: u64,
    /// Trace events dropped over the whole run.
    pub dropped_events: u32,
    /// Where the timed load (`load_us`) read the model from.
    pub load_source: LoadSource,
}

/// Where a benchmark's timed load read its graphs from: a cold start from the board's load
/// cache skips parsing and optimizing the ONNX files, so the two are not comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LoadSource {
    /// Every graph from its ONNX file: the agent has no load cache.
    Onnx,
    /// Every graph from the load cache.
    Cache,
    /// At least one graph from its ONNX file although the agent has a load cache (an entry
    /// that was stale or unreadable, or a graph the cache cannot hold).
    OnnxDespiteCache,
}

impl LoadSource {
    /// A short name for logs, tables and the results database: `onnx`, `cache`,
    /// `onnx-uncached`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadSource::Onnx => "onnx",
            LoadSource::Cache => "cache",
            LoadSource::OnnxDespiteCache => "onnx-uncached",
        }
    }
}
