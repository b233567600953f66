//! Pulse timing for result lines that a PLC counts: one pulse per verdict, each exactly the
//! pulse width, separated from the next pulse on the same line by a low gap, in verdict order.
//!
//! Pure and driven by the caller's clock, so it is tested without sleeping; [`crate::VerdictOutputs`]
//! applies its edges to pins.

use std::collections::VecDeque;
use std::time::Duration;

use crate::Signal;

/// How many verdicts may wait for their pulse when nothing else is said
/// ([`crate::VerdictOutputs::with_max_pending`]).
pub const DEFAULT_MAX_PENDING: usize = 16;

/// One level change the scheduler wants on a result line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PulseEdge {
    /// The line (`Signal::Error` is the ERROR pin).
    pub line: Signal,
    /// True for the rising edge.
    pub high: bool,
}

/// [`PulseScheduler::push`] on a full queue: the verdict was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{pending} pulses are already waiting")]
pub struct PulseQueueFull {
    /// Pulses waiting.
    pub pending: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct LineTimer {
    /// When the running pulse ends, if the line is high.
    high_until: Option<Duration>,
    /// The earliest next rise (the end of the low gap after the last pulse).
    low_until: Duration,
}

const LINES: [Signal; 3] = [Signal::Ok, Signal::Ng, Signal::Error];

fn index(line: Signal) -> usize {
    match line {
        Signal::Ok => 0,
        Signal::Ng => 1,
        Signal::Error => 2,
    }
}

/// Queued pulses on the OK / NG / ERROR lines.
///
/// Rules: a pulse is `width` long, measured from the time its rise was applied; the next
/// pulse on the same line rises no earlier than `gap` after the fall was applied; rises
/// happen in the order verdicts were pushed (a reject gate that tracks parts on a conveyor
/// needs the order), but a line does not wait for another line's gap or pulse otherwise.
/// Timing is only as good as the caller's polling: a late poll makes a pulse or gap longer,
/// never shorter, and never merges two pulses.
#[derive(Debug, Clone)]
pub struct PulseScheduler {
    width: Duration,
    gap: Duration,
    max_pending: usize,
    pending: VecDeque<Signal>,
    lines: [LineTimer; 3],
}

impl PulseScheduler {
    /// Pulses of `width` with at least `gap` low between two on one line; at most
    /// `max_pending` (at least 1) verdicts wait for their pulse.
    pub fn new(width: Duration, gap: Duration, max_pending: usize) -> Self {
        let max_pending = max_pending.max(1);
        PulseScheduler {
            width,
            gap,
            max_pending,
            pending: VecDeque::with_capacity(max_pending),
            lines: Default::default(),
        }
    }

    /// Queues one pulse on `line`; call [`PulseScheduler::poll`] to start it.
    pub fn push(&mut self, line: Signal) -> Result<(), PulseQueueFull> {
        if self.is_full() {
            return Err(PulseQueueFull {
                pending: self.pending.len(),
            });
        }
        self.pending.push_back(line);
        Ok(())
    }

    /// The next edge due at `now`, if any; call until `None`. Falls come first, so a pulse
    /// ends on time whatever is queued.
    pub fn poll(&mut self, now: Duration) -> Option<PulseEdge> {
        for (timer, line) in self.lines.iter_mut().zip(LINES) {
            if timer.high_until.is_some_and(|end| now >= end) {
                timer.high_until = None;
                timer.low_until = now + self.gap;
                return Some(PulseEdge { line, high: false });
            }
        }
        let line = *self.pending.front()?;
        let timer = &mut self.lines[index(line)];
        if timer.high_until.is_none() && now >= timer.low_until {
            self.pending.pop_front();
            timer.high_until = Some(now + self.width);
            return Some(PulseEdge { line, high: true });
        }
        None
    }

    /// When [`PulseScheduler::poll`] will next have an edge: a running pulse's end, or the end
    /// of the gap the oldest waiting pulse needs. `None` when idle.
    pub fn next_deadline(&self) -> Option<Duration> {
        let head = self.pending.front().and_then(|&line| {
            let timer = &self.lines[index(line)];
            // A high line's fall is already among the deadlines; its gap starts after it.
            timer.high_until.is_none().then_some(timer.low_until)
        });
        self.lines
            .iter()
            .filter_map(|t| t.high_until)
            .chain(head)
            .min()
    }

    /// The pulse width.
    pub fn width(&self) -> Duration {
        self.width
    }

    /// The least low time between two pulses on one line.
    pub fn gap(&self) -> Duration {
        self.gap
    }

    /// Verdicts waiting for their pulse to start.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// True when [`PulseScheduler::push`] would fail.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.max_pending
    }

    /// True when no pulse runs and none waits (a gap may still be running).
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.lines.iter().all(|t| t.high_until.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs the scheduler on a simulated clock that jumps from deadline to deadline, pushing
    /// each `(at_ms, line)` verdict when its time comes (verdicts in time order). Returns every
    /// edge as (ms, line, high).
    fn run(sched: &mut PulseScheduler, verdicts: &[(u64, Signal)]) -> Vec<(u64, Signal, bool)> {
        let mut edges = vec![];
        let mut next = 0;
        let mut now = Duration::ZERO;
        loop {
            while next < verdicts.len() && ms(verdicts[next].0) <= now {
                sched.push(verdicts[next].1).unwrap();
                next += 1;
            }
            while let Some(e) = sched.poll(now) {
                edges.push((now.as_millis() as u64, e.line, e.high));
            }
            let arrival = verdicts.get(next).map(|v| ms(v.0));
            now = match (sched.next_deadline(), arrival) {
                (Some(d), Some(a)) => d.min(a),
                (Some(d), None) => d,
                (None, Some(a)) => a,
                (None, None) => return edges,
            };
        }
    }

    /// (rise, width) of each pulse on `line`.
    fn pulses(edges: &[(u64, Signal, bool)], line: Signal) -> Vec<(u64, u64)> {
        let mut out = vec![];
        let mut rise = None;
        for &(t, _, high) in edges.iter().filter(|e| e.1 == line) {
            match (high, rise.take()) {
                (true, None) => rise = Some(t),
                (false, Some(r)) => out.push((r, t - r)),
                other => panic!("{line:?}: edge {high} at {t} after {other:?}"),
            }
        }
        assert_eq!(rise, None, "{line:?} left high");
        out
    }

    #[test]
    fn back_to_back_verdicts_of_one_kind_are_separate_pulses_with_a_gap() {
        let mut s = PulseScheduler::new(ms(200), ms(200), 16);
        // Four NG verdicts 5 ms apart (queued parts): the bug made one 1 s pulse of them.
        let ng = [0, 5, 10, 15].map(|t| (t, Signal::Ng));
        let edges = run(&mut s, &ng);
        assert_eq!(
            pulses(&edges, Signal::Ng),
            [(0, 200), (400, 200), (800, 200), (1200, 200)]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn a_pulse_ends_on_time_while_the_next_part_is_judged() {
        let mut s = PulseScheduler::new(ms(50), ms(50), 16);
        s.push(Signal::Ok).unwrap();
        assert_eq!(
            s.poll(ms(1000)),
            Some(PulseEdge {
                line: Signal::Ok,
                high: true
            })
        );
        assert_eq!(s.poll(ms(1000)), None);
        // The worker is busy with a 700 ms inference; whoever drives the pins only needs the
        // deadline, and it is the pulse's end, not the next verdict.
        assert_eq!(s.next_deadline(), Some(ms(1050)));
        assert_eq!(s.poll(ms(1049)), None);
        assert_eq!(
            s.poll(ms(1050)),
            Some(PulseEdge {
                line: Signal::Ok,
                high: false
            })
        );
        assert!(s.is_idle());
        // No deadline while idle: the gap only matters to the next pulse.
        assert_eq!(s.next_deadline(), None);
        s.push(Signal::Ok).unwrap();
        assert_eq!(s.next_deadline(), Some(ms(1100)));
        assert_eq!(s.poll(ms(1099)), None);
        assert_eq!(s.poll(ms(1100)).map(|e| e.high), Some(true));
    }

    #[test]
    fn lines_are_independent_but_rise_in_verdict_order() {
        let mut s = PulseScheduler::new(ms(100), ms(100), 16);
        // OK right after NG: no wait for the NG line (its own gap is its own business).
        let edges = run(
            &mut s,
            &[(0, Signal::Ng), (10, Signal::Ok), (20, Signal::Error)],
        );
        assert_eq!(pulses(&edges, Signal::Ng), [(0, 100)]);
        assert_eq!(pulses(&edges, Signal::Ok), [(10, 100)]);
        assert_eq!(pulses(&edges, Signal::Error), [(20, 100)]);

        // NG, NG, OK: the second NG waits for the gap, and the OK, though its line is free,
        // does not overtake it: the PLC sees rises in the order the parts were judged.
        let mut s = PulseScheduler::new(ms(100), ms(100), 16);
        let verdicts = [
            (0, Signal::Ng),
            (1, Signal::Ng),
            (2, Signal::Ok),
            (3, Signal::Ok),
        ];
        let edges = run(&mut s, &verdicts);
        assert_eq!(pulses(&edges, Signal::Ng), [(0, 100), (200, 100)]);
        assert_eq!(pulses(&edges, Signal::Ok), [(200, 100), (400, 100)]);
        let rises: Vec<Signal> = edges.iter().filter(|e| e.2).map(|e| e.1).collect();
        assert_eq!(rises, verdicts.map(|v| v.1));
    }

    #[test]
    fn a_late_poll_stretches_nothing_but_the_late_edge_and_keeps_the_gap() {
        let mut s = PulseScheduler::new(ms(10), ms(10), 16);
        s.push(Signal::Ng).unwrap();
        s.push(Signal::Ng).unwrap();
        assert_eq!(s.poll(ms(0)).map(|e| e.high), Some(true));
        // Polled 5 ms late: the fall is late, and the gap counts from when it happened.
        assert_eq!(s.poll(ms(15)).map(|e| e.high), Some(false));
        assert_eq!(s.poll(ms(15)), None);
        assert_eq!(s.next_deadline(), Some(ms(25)));
        assert_eq!(s.poll(ms(25)).map(|e| e.high), Some(true));
        // The new pulse's width counts from its rise.
        assert_eq!(s.next_deadline(), Some(ms(35)));
    }

    #[test]
    fn a_full_queue_refuses_instead_of_merging_and_frees_as_pulses_start() {
        let mut s = PulseScheduler::new(ms(10), ms(10), 2);
        s.push(Signal::Ng).unwrap();
        s.push(Signal::Ng).unwrap();
        assert!(s.is_full());
        assert_eq!(s.push(Signal::Ok), Err(PulseQueueFull { pending: 2 }));
        let first = s.poll(ms(0)).unwrap();
        assert!(first.high);
        assert_eq!(s.pending(), 1);
        s.push(Signal::Ok).unwrap();
        let mut edges = vec![(0, first.line, first.high)];
        let mut now = ms(0);
        while let Some(d) = s.next_deadline() {
            now = d.max(now);
            while let Some(e) = s.poll(now) {
                edges.push((now.as_millis() as u64, e.line, e.high));
            }
        }
        assert_eq!(pulses(&edges, Signal::Ng), [(0, 10), (20, 10)]);
        assert_eq!(pulses(&edges, Signal::Ok), [(20, 10)]);
    }
}
