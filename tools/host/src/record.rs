//! One benchmark run as the host keeps it: who ran what where, the agent's summary, and the full
//! trace. The client builds it from the streamed events ([`BenchRecord::from_run`]), the results
//! database stores it (one row per run, the trace as JSON), and `compare` reads it back.

use std::collections::BTreeMap;

use edgevlm_proto as proto;
use serde::{Deserialize, Serialize};

/// The board a run happened on, from the inventory and the agent's hello.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BoardFacts {
    /// Inventory name (`line3-pi5`, `local`).
    pub name: String,
    /// How it was reached (`ssh://pi@10.0.0.7:22`, `serial:///dev/ttyUSB0?baud=921600`).
    pub url: String,
    /// The agent's board profile (`rpi5`, `sim`).
    pub profile: String,
    /// CPU architecture (`aarch64`).
    pub arch: String,
    /// CPU model, empty if unknown.
    pub cpu_model: String,
    /// Online cores.
    pub cores: u16,
    /// Total RAM, KiB.
    pub ram_total_kib: u64,
    /// The agent's release.
    pub agent_version: String,
    /// The tract release on the board.
    pub tract_version: String,
}

/// The model a run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    /// `[model] name`.
    pub name: String,
    /// `[model] version`.
    pub version: String,
    /// `[model] variant` (`fp32`, `int8`, `q4`), empty if the manifest has none.
    pub variant: String,
    /// `[model] task`.
    pub task: String,
    /// Bytes of the installed package on the board.
    pub bytes: u64,
}

/// How the run was asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// Untimed iterations.
    pub warmup: u32,
    /// Timed iterations asked for (at least).
    pub iterations: u32,
    /// Minimum timed duration, ms.
    pub min_duration_ms: u32,
    /// Intra-op threads.
    pub threads: u16,
    /// The input (`synthetic seed=1`, `image samples/ok_01.png`, `image part.jpg (18 KiB)`).
    pub input: String,
    /// Whether spans, memory samples and node profiles were collected.
    pub traced: bool,
}

/// Latency distribution, µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
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

/// Token throughput of a generation run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tokens {
    /// Prompt tokens per iteration.
    pub prompt_tokens: u32,
    /// Tokens generated over the timed iterations.
    pub generated_tokens: u64,
    /// Median time to first token, µs.
    pub ttft_p50_us: u64,
    /// Prefill throughput, prompt tokens per second (prompt tokens / TTFT).
    pub prefill_tok_s: f64,
    /// Decode throughput, tokens per second after the first.
    pub decode_tok_s: f64,
}

/// Time of one pipeline stage over the timed iterations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    /// Stage name (`decode`, `preprocess`, `infer`, `postprocess`).
    pub stage: String,
    /// Mean per iteration, µs.
    pub mean_us: f64,
    /// Median per iteration, µs.
    pub p50_us: u64,
    /// Share of the summed stage time, 0..1.
    pub share: f64,
}

/// One memory sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryPoint {
    /// µs since the run started.
    pub t_us: u64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Proportional set size, KiB (0 if the board does not report it).
    pub pss_kib: u64,
}

/// One of the slowest graph nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStat {
    /// The graph.
    pub graph: String,
    /// Node name.
    pub node: String,
    /// Operator.
    pub op: String,
    /// Mean per iteration, µs.
    pub mean_us: f64,
    /// Share of the graph's node time, 0..1.
    pub share: f64,
}

/// One benchmark run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchRecord {
    /// Row id in the results database (0 before it is stored).
    pub id: i64,
    /// Start, seconds since the Unix epoch (host clock).
    pub started_at: i64,
    /// The host tool's release.
    pub host_version: String,
    /// Where it ran.
    pub board: BoardFacts,
    /// What ran.
    pub model: ModelFacts,
    /// How.
    pub settings: RunSettings,
    /// The agent's run id.
    pub run: u32,
    /// Model load and optimization, µs.
    pub load_us: u64,
    /// First iteration after load, µs.
    pub first_run_us: u64,
    /// Where the timed load read the model from ([`proto::LoadSource::as_str`]: `onnx`,
    /// `cache`, `onnx-uncached`); empty for runs recorded before agents said.
    #[serde(default)]
    pub load_source: String,
    /// Timed iterations run.
    pub iterations: u32,
    /// Latency of the timed iterations.
    pub latency: Latency,
    /// Generation figures, for language models.
    pub tokens: Option<Tokens>,
    /// Peak RSS, KiB.
    pub peak_rss_kib: u64,
    /// Peak PSS, KiB (0 if not reported).
    pub peak_pss_kib: u64,
    /// Trace events the agent dropped because the link was slow.
    pub dropped_events: u32,
    /// End-to-end latency of every timed iteration, µs, in run order.
    pub latencies_us: Vec<u64>,
    /// Per-stage breakdown, in pipeline order.
    pub stages: Vec<StageStats>,
    /// Memory over time.
    pub memory: Vec<MemoryPoint>,
    /// Slowest nodes, slowest first.
    pub nodes: Vec<NodeStat>,
    /// Per-token timings of the timed iterations: (iteration, index, duration µs).
    pub token_timings: Vec<(u32, u32, u64)>,
}

impl BenchRecord {
    /// Builds the record of a finished run from the agent's summary and every trace event it
    /// streamed (in order). `board`, `model` and `settings` come from the caller; the model's
    /// size on disk is taken from the summary.
    pub fn from_run(
        board: BoardFacts,
        mut model: ModelFacts,
        settings: RunSettings,
        summary: &proto::BenchSummary,
        events: &[proto::TraceEvent],
    ) -> BenchRecord {
        model.bytes = summary.model_bytes;
        let mut latencies_us = Vec::new();
        let mut warmup_iterations = std::collections::BTreeSet::new();
        let mut memory = Vec::new();
        let mut nodes = Vec::new();
        for event in events {
            match event {
                proto::TraceEvent::Iteration(it) => {
                    if it.warmup {
                        warmup_iterations.insert(it.iteration);
                    } else {
                        latencies_us.push(it.duration_us);
                    }
                }
                proto::TraceEvent::Memory(m) => memory.push(MemoryPoint {
                    t_us: m.t_us,
                    rss_kib: m.rss_kib,
                    pss_kib: m.pss_kib,
                }),
                proto::TraceEvent::Node(n) => nodes.push(NodeStat {
                    graph: n.graph.to_string(),
                    node: n.node.to_string(),
                    op: n.op.to_string(),
                    mean_us: n.total_us as f64 / f64::from(n.iterations.max(1)),
                    share: f64::from(n.share_permille) / 1000.0,
                }),
                proto::TraceEvent::Token(_) | proto::TraceEvent::Span(_) => {}
            }
        }
        // Spans and tokens may precede their iteration's end event: filter them afterwards.
        let token_timings: Vec<(u32, u32, u64)> = events
            .iter()
            .filter_map(|e| match e {
                proto::TraceEvent::Token(t) if !warmup_iterations.contains(&t.iteration) => {
                    Some((t.iteration, t.index, t.duration_us))
                }
                _ => None,
            })
            .collect();
        // Spans of timed iterations only, grouped by stage in first-seen order.
        let mut order: Vec<String> = Vec::new();
        let mut per_stage: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for event in events {
            if let proto::TraceEvent::Span(s) = event {
                if warmup_iterations.contains(&s.iteration) {
                    continue;
                }
                let stage = s.stage.to_string();
                if !per_stage.contains_key(&stage) {
                    order.push(stage.clone());
                }
                per_stage.entry(stage).or_default().push(s.duration_us);
            }
        }
        let total: u64 = per_stage.values().flatten().sum();
        let stages = order
            .into_iter()
            .map(|stage| {
                let mut d = per_stage.remove(&stage).unwrap_or_default();
                d.sort_unstable();
                let sum: u64 = d.iter().sum();
                StageStats {
                    mean_us: sum as f64 / d.len().max(1) as f64,
                    p50_us: percentile(&d, 50.0),
                    share: if total == 0 {
                        0.0
                    } else {
                        sum as f64 / total as f64
                    },
                    stage,
                }
            })
            .collect();
        let tokens = summary.tokens.map(|t| {
            let ttft_s = t.ttft_p50_us as f64 / 1e6;
            Tokens {
                prompt_tokens: t.prompt_tokens,
                generated_tokens: t.generated_tokens,
                ttft_p50_us: t.ttft_p50_us,
                prefill_tok_s: if ttft_s > 0.0 {
                    f64::from(t.prompt_tokens) / ttft_s
                } else {
                    0.0
                },
                decode_tok_s: if t.inter_token_p50_us > 0 {
                    1e6 / t.inter_token_p50_us as f64
                } else {
                    0.0
                },
            }
        });
        let l = summary.latency;
        BenchRecord {
            id: 0,
            started_at: 0,
            host_version: env!("CARGO_PKG_VERSION").to_owned(),
            board,
            model,
            settings,
            run: summary.run.0,
            load_us: summary.load_us,
            first_run_us: summary.first_run_us,
            load_source: summary.load_source.as_str().to_owned(),
            iterations: summary.iterations,
            latency: Latency {
                min_us: l.min_us,
                mean_us: l.mean_us,
                p50_us: l.p50_us,
                p90_us: l.p90_us,
                p99_us: l.p99_us,
                max_us: l.max_us,
            },
            tokens,
            peak_rss_kib: summary.peak_rss_kib,
            peak_pss_kib: summary.peak_pss_kib,
            dropped_events: summary.dropped_events,
            latencies_us,
            stages,
            memory,
            nodes,
            token_timings,
        }
    }

    /// `name variant` or `name` when the variant is empty: how tables and plots label a run.
    pub fn label(&self) -> String {
        if self.model.variant.is_empty() {
            format!("{} {}", self.model.name, self.model.version)
        } else {
            format!("{} {}", self.model.name, self.model.variant)
        }
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{bounded, IterationDone, StageSpan, TraceEvent};

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn record_skips_warmup_spans_and_shares_stages() {
        let span = |iteration, stage: &str, d| {
            TraceEvent::Span(StageSpan {
                iteration,
                stage: bounded(stage),
                start_us: 0,
                duration_us: d,
            })
        };
        let done = |iteration, warmup, d| {
            TraceEvent::Iteration(IterationDone {
                iteration,
                warmup,
                duration_us: d,
            })
        };
        let events = vec![
            span(0, "infer", 1000),
            done(0, true, 1000),
            span(1, "preprocess", 100),
            span(1, "infer", 300),
            done(1, false, 400),
            span(2, "preprocess", 100),
            span(2, "infer", 300),
            done(2, false, 410),
        ];
        let summary = proto::BenchSummary {
            run: proto::RunId(3),
            model: bounded("m"),
            version: bounded("1"),
            model_bytes: 1234,
            threads: 1,
            warmup: 1,
            iterations: 2,
            load_us: 5,
            first_run_us: 1000,
            latency: proto::LatencyStats::default(),
            tokens: None,
            peak_rss_kib: 10,
            peak_pss_kib: 9,
            dropped_events: 0,
            load_source: proto::LoadSource::Cache,
        };
        let r = BenchRecord::from_run(
            BoardFacts::default(),
            ModelFacts::default(),
            RunSettings::default(),
            &summary,
            &events,
        );
        assert_eq!(r.latencies_us, vec![400, 410]);
        assert_eq!(r.model.bytes, 1234);
        assert_eq!(r.load_source, "cache");
        let names: Vec<_> = r.stages.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(names, ["preprocess", "infer"]);
        assert!((r.stages[1].share - 0.75).abs() < 1e-9);
        assert_eq!(r.stages[1].p50_us, 300);
    }
}
