//! Per-run traces: how long each stage took and how much memory the process holds.
//!
//! Every pipeline run returns a [`Trace`]; the agent later streams them to the host. A
//! [`NodeProfile`] adds up the time of each node of a tract plan over profiled runs
//! ([`OnnxModel::run_profiled`](crate::OnnxModel::run_profiled)).

use std::time::{Duration, Instant};

use serde::Serialize;

/// A pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Image or frame decoding (JPEG/PNG/YUYV/NV12 to RGB).
    Decode,
    /// Resize, colour conversion and normalization into the input tensor.
    Preprocess,
    /// The tract plan run.
    Infer,
    /// Softmax, top-k, verdict.
    Postprocess,
}

/// How long one stage took.
#[derive(Debug, Clone, Serialize)]
pub struct Span {
    /// The stage.
    pub stage: Stage,
    /// Duration in microseconds.
    pub us: u64,
}

/// Process memory from `/proc/self/status`, in KiB (0 where unavailable).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now (`VmRSS`).
    pub rss_kb: u64,
    /// Peak resident set size of the process (`VmHWM`).
    pub peak_rss_kb: u64,
}

impl Memory {
    /// Samples the current process.
    pub fn sample() -> Memory {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| Memory::parse_status(&s))
            .unwrap_or_default()
    }

    /// Proportional set size of the process in KiB (`Pss` of `/proc/self/smaps_rollup`), or
    /// `None` where the kernel does not report it (before Linux 4.14, or no permission).
    ///
    /// Costlier than [`Memory::sample`] (the kernel walks every mapping), so it is kept out of
    /// the per-run trace and left to samplers that run beside a benchmark.
    pub fn pss_kb() -> Option<u64> {
        std::fs::read_to_string("/proc/self/smaps_rollup")
            .ok()
            .and_then(|s| kb_field(&s, "Pss:"))
    }

    /// Resets the process's peak RSS (`VmHWM`) to its current RSS by writing `5` to
    /// `/proc/self/clear_refs`, so that a later [`Memory::sample`] reports the peak of what ran
    /// in between. Returns whether the kernel accepted it (Linux 4.0+); when it did not,
    /// `peak_rss_kb` keeps meaning the peak since the process started.
    pub fn reset_peak() -> bool {
        std::fs::write("/proc/self/clear_refs", b"5").is_ok()
    }

    fn parse_status(status: &str) -> Memory {
        let field = |name: &str| kb_field(status, name).unwrap_or(0);
        Memory {
            rss_kb: field("VmRSS:"),
            peak_rss_kb: field("VmHWM:"),
        }
    }
}

/// The value of a `Name:   1234 kB` line of a `/proc` file.
fn kb_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The trace of one run: stage spans in order, memory at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Trace {
    /// Stage durations in execution order.
    pub spans: Vec<Span>,
    /// Memory sampled when the run finished.
    pub memory: Memory,
}

impl Trace {
    /// Runs `f`, recording its duration as `stage`.
    pub fn time<T>(&mut self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.record(stage, start.elapsed());
        out
    }

    /// Records a duration measured elsewhere.
    pub fn record(&mut self, stage: Stage, d: Duration) {
        self.spans.push(Span {
            stage,
            us: d.as_micros() as u64,
        });
    }

    /// Total microseconds spent in `stage` (a stage may occur more than once).
    pub fn stage_us(&self, stage: Stage) -> u64 {
        self.spans
            .iter()
            .filter(|s| s.stage == stage)
            .map(|s| s.us)
            .sum()
    }

    /// Sum of all spans in microseconds.
    pub fn total_us(&self) -> u64 {
        self.spans.iter().map(|s| s.us).sum()
    }

    /// Samples memory into the trace; call when the run is done.
    pub fn finish(&mut self) {
        self.memory = Memory::sample();
    }
}

/// Time spent in one node of a plan, summed over the profiled runs of a [`NodeProfile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeTime {
    /// Node id in the optimized plan.
    pub id: usize,
    /// Node name.
    pub name: String,
    /// Operator name as tract reports it (`OptMatMul`, `Conv`, ...).
    pub op: String,
    /// Total time in the node's evaluation.
    pub total: Duration,
    /// Evaluations timed (one per run, more inside loops).
    pub calls: u64,
}

/// Per-node times of a plan accumulated over profiled runs.
///
/// Each node's evaluation is timed on its own (nothing is cloned or copied for the
/// measurement), so the sum of the node times is a little below the wall time of a run: the
/// remainder is tract's scheduling between nodes.
#[derive(Debug, Clone, Default)]
pub struct NodeProfile {
    /// Indexed by node id; `None` for nodes that never ran (constants).
    nodes: Vec<Option<NodeTime>>,
    runs: u32,
}

impl NodeProfile {
    /// An empty profile.
    pub fn new() -> NodeProfile {
        NodeProfile::default()
    }

    /// Adds one evaluation of node `id`; the names are copied on the node's first evaluation.
    pub fn record(&mut self, id: usize, name: &str, op: &str, elapsed: Duration) {
        if self.nodes.len() <= id {
            self.nodes.resize(id + 1, None);
        }
        let entry = self.nodes[id].get_or_insert_with(|| NodeTime {
            id,
            name: name.to_owned(),
            op: op.to_owned(),
            total: Duration::ZERO,
            calls: 0,
        });
        entry.total += elapsed;
        entry.calls += 1;
    }

    /// Counts one complete profiled run.
    pub fn finish_run(&mut self) {
        self.runs += 1;
    }

    /// Complete profiled runs.
    pub fn runs(&self) -> u32 {
        self.runs
    }

    /// Sum of all node times.
    pub fn total(&self) -> Duration {
        self.nodes.iter().flatten().map(|n| n.total).sum()
    }

    /// Every node that ran, slowest first (ties by node id, so the order is stable).
    pub fn ranked(&self) -> Vec<&NodeTime> {
        let mut nodes: Vec<&NodeTime> = self.nodes.iter().flatten().collect();
        nodes.sort_by(|a, b| b.total.cmp(&a.total).then(a.id.cmp(&b.id)));
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let m = Memory::parse_status("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n");
        assert_eq!(
            m,
            Memory {
                rss_kb: 1024,
                peak_rss_kb: 2048
            }
        );
    }

    #[test]
    fn samples_this_process() {
        let m = Memory::sample();
        assert!(m.rss_kb > 0 && m.peak_rss_kb >= m.rss_kb, "{m:?}");
    }

    #[test]
    fn reads_pss_of_this_process() {
        // smaps_rollup exists since Linux 4.14; every kernel this runs on has it.
        let pss = Memory::pss_kb().expect("/proc/self/smaps_rollup");
        assert!(pss > 0);
        assert_eq!(
            kb_field("Rss:  10 kB\nPss:   7 kB\nPss_Anon: 3 kB\n", "Pss:"),
            Some(7)
        );
        assert_eq!(kb_field("Rss: 10 kB\n", "Pss:"), None);
    }

    #[test]
    fn peak_reset_brings_hwm_down_to_rss() {
        // Touch 64 MiB so the high-water mark sits well above the RSS once it is freed.
        let mut big = vec![1u8; 64 << 20];
        big[12345] = 2;
        let touched = std::hint::black_box(&big).iter().step_by(4096).count();
        assert!(touched > 0);
        drop(big);
        let before = Memory::sample();
        if !Memory::reset_peak() {
            return; // No clear_refs on this kernel: nothing to check.
        }
        let after = Memory::sample();
        assert!(
            after.peak_rss_kb + 32 * 1024 < before.peak_rss_kb,
            "the 64 MiB peak survived the reset: {before:?} {after:?}"
        );
        assert!(after.peak_rss_kb >= after.rss_kb, "{after:?}");
    }

    #[test]
    fn node_profile_ranks_slowest_first() {
        let mut p = NodeProfile::new();
        for _ in 0..2 {
            p.record(3, "conv", "Conv", Duration::from_micros(50));
            p.record(1, "relu", "Max", Duration::from_micros(5));
            p.record(7, "fc", "OptMatMul", Duration::from_micros(80));
            p.finish_run();
        }
        assert_eq!(p.runs(), 2);
        assert_eq!(p.total(), Duration::from_micros(270));
        let ranked: Vec<_> = p
            .ranked()
            .iter()
            .map(|n| (n.name.as_str(), n.total.as_micros(), n.calls))
            .collect();
        assert_eq!(
            ranked,
            vec![("fc", 160, 2), ("conv", 100, 2), ("relu", 10, 2)]
        );
    }

    #[test]
    fn sums_stages() {
        let mut t = Trace::default();
        t.record(Stage::Infer, Duration::from_micros(5));
        t.record(Stage::Decode, Duration::from_micros(2));
        t.record(Stage::Infer, Duration::from_micros(3));
        assert_eq!(t.stage_us(Stage::Infer), 8);
        assert_eq!(t.total_us(), 10);
    }
}
