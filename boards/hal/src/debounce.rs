//! The debounce state machine shared by every trigger implementation.

use std::time::Duration;

use crate::{Edge, TriggerConfig, TriggerEvent};

/// The debounce rule of every trigger, fed with level changes (kernel edge events, or the
/// changes [`crate::PolledTrigger`] sees in its samples): a new level counts once it has held for the debounce time without the line going
/// back, and the event is stamped with when that level began. Pure, so it is tested without
/// hardware.
#[derive(Debug, Clone)]
pub struct Debouncer {
    config: TriggerConfig,
    /// The debounced level.
    stable: Option<bool>,
    /// A level that differs from `stable`, and when it began.
    candidate: Option<(bool, Duration)>,
    sequence: u64,
}

impl Debouncer {
    /// A debouncer whose resting level is `level`, if known (else the first change sets it).
    pub fn new(config: TriggerConfig, level: Option<bool>) -> Self {
        Debouncer {
            config,
            stable: level,
            candidate: None,
            sequence: 0,
        }
    }

    /// The line changed to `level` at `at`. Returns an event when this completes an edge: at
    /// once without debounce, or a pending level that had already held long enough before
    /// this change.
    pub fn change(&mut self, level: bool, at: Duration) -> Option<TriggerEvent> {
        let confirmed = self.poll(at);
        // An edge to `level` means the line was at the other level before it.
        let stable = *self.stable.get_or_insert(!level);
        if level == stable {
            // Bounced back before the debounce time: the pending level never counted.
            self.candidate = None;
        } else {
            // A repeated edge to the same level means a short excursion back was missed (edges
            // closer together than the kernel could stamp): the level began again now.
            self.candidate = Some((level, at));
        }
        confirmed.or_else(|| self.poll(at))
    }

    /// Returns an event if the pending level has held for the debounce time at `now`.
    pub fn poll(&mut self, now: Duration) -> Option<TriggerEvent> {
        let (level, since) = self.candidate?;
        if now.saturating_sub(since) < self.config.debounce {
            return None;
        }
        self.stable = Some(level);
        self.candidate = None;
        let fires = match self.config.edge {
            Edge::Rising => level,
            Edge::Falling => !level,
            Edge::Both => true,
        };
        if !fires {
            return None;
        }
        let event = TriggerEvent {
            sequence: self.sequence,
            timestamp: since,
        };
        self.sequence += 1;
        Some(event)
    }

    /// When the pending level will have held long enough, if one is pending.
    pub fn deadline(&self) -> Option<Duration> {
        self.candidate
            .map(|(_, since)| since + self.config.debounce)
    }
}
