//! Per-run traces: how long each stage took and how much memory the process holds.
//!
//! Every pipeline run returns a [`Trace`]; the agent later streams them to the host.

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

    fn parse_status(status: &str) -> Memory {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss_kb: field("VmRSS:"),
            peak_rss_kb: field("VmHWM:"),
        }
    }
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
    fn sums_stages() {
        let mut t = Trace::default();
        t.record(Stage::Infer, Duration::from_micros(5));
        t.record(Stage::Decode, Duration::from_micros(2));
        t.record(Stage::Infer, Duration::from_micros(3));
        assert_eq!(t.stage_us(Stage::Infer), 8);
        assert_eq!(t.total_us(), 10);
    }
}
