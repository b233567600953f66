//! A trigger over any embedded-hal input pin, polled with software debounce. Boards whose
//! GPIO driver has no edge events (or MCUs) use it; Linux uses kernel edge events instead.

use std::time::Duration;

use embedded_hal::digital::InputPin;

use crate::{monotonic_now, Debouncer, Trigger, TriggerConfig, TriggerEvent};

/// Polls `pin` every `period`; an edge counts once the new level has held for the debounce time.
#[derive(Debug)]
pub struct PolledTrigger<P: InputPin> {
    pin: P,
    config: TriggerConfig,
    period: Duration,
    /// The last sampled (not debounced) level.
    last: Option<bool>,
    debouncer: Debouncer,
}

/// Errors of a polled trigger: the pin could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the trigger pin failed: {0:?}")]
pub struct PinReadError(pub embedded_hal::digital::ErrorKind);

impl<P: InputPin> PolledTrigger<P> {
    /// A trigger on `pin`, sampled every `period`.
    pub fn new(pin: P, config: TriggerConfig, period: Duration) -> Self {
        PolledTrigger {
            pin,
            config,
            period,
            last: None,
            debouncer: Debouncer::new(config, None),
        }
    }

    /// Takes one sample at time `now`; returns an event when a debounced edge completes.
    /// Separate from `wait` so the debounce logic is testable without sleeping.
    pub fn sample(&mut self, now: Duration) -> Result<Option<TriggerEvent>, PinReadError> {
        use embedded_hal::digital::Error;
        let level = self.pin.is_high().map_err(|e| PinReadError(e.kind()))?;
        match self.last.replace(level) {
            // The first sample sets the resting level; it is not an edge.
            None => {
                self.debouncer = Debouncer::new(self.config, Some(level));
                Ok(None)
            }
            Some(previous) if previous != level => Ok(self.debouncer.change(level, now)),
            Some(_) => Ok(self.debouncer.poll(now)),
        }
    }
}

impl<P: InputPin> Trigger for PolledTrigger<P> {
    type Error = PinReadError;

    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, PinReadError> {
        let deadline = monotonic_now().saturating_add(timeout);
        loop {
            if let Some(event) = self.sample(monotonic_now())? {
                return Ok(Some(event));
            }
            if monotonic_now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(self.period);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Edge;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds `levels` one per millisecond and returns the event times in ms.
    fn run(levels: &[u8], edge: Edge, debounce_ms: u64) -> Vec<u64> {
        let tx: Vec<Transaction> = levels
            .iter()
            .map(|l| Transaction::get(if *l == 1 { State::High } else { State::Low }))
            .collect();
        let mut pin = Mock::new(&tx);
        let mut t = PolledTrigger::new(
            pin.clone(),
            TriggerConfig {
                edge,
                debounce: ms(debounce_ms),
            },
            ms(1),
        );
        let events: Vec<u64> = (0..levels.len())
            .filter_map(|i| t.sample(ms(i as u64)).unwrap())
            .map(|e| e.timestamp.as_millis() as u64)
            .collect();
        pin.done();
        events
    }

    #[test]
    fn rising_edges_with_bounce_count_once() {
        // Bouncy press at 2..5, held; release at 10; clean press at 14.
        let levels = [0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];
        assert_eq!(run(&levels, Edge::Rising, 2), vec![4, 14]);
        assert_eq!(run(&levels, Edge::Falling, 2), vec![10]);
        assert_eq!(run(&levels, Edge::Both, 2), vec![4, 10, 14]);
        // Without debounce every bounce is an edge.
        assert_eq!(run(&levels, Edge::Rising, 0), vec![2, 4, 14]);
    }

    #[test]
    fn glitch_shorter_than_debounce_is_ignored_and_start_level_is_not_an_edge() {
        assert_eq!(run(&[1, 1, 0, 1, 1, 1], Edge::Both, 2), Vec::<u64>::new());
        assert_eq!(run(&[0, 1, 1, 0, 0, 0], Edge::Rising, 3), Vec::<u64>::new());
    }
}
