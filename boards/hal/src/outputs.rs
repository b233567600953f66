//! OK / NG / ERROR result pins (and BUSY) over embedded-hal output pins.

use std::time::Duration;

use embedded_hal::delay::DelayNs;
use embedded_hal::digital::OutputPin;

use crate::{monotonic_now, PinMode, PulseScheduler, Signal, DEFAULT_MAX_PENDING};

/// OK / NG / ERROR result pins and an optional BUSY pin, generic over embedded-hal output
/// pins and delay.
///
/// In pulse mode every result is its own pulse, queued by a [`PulseScheduler`]: [`set`]
/// never blocks on a running pulse, and whoever owns the outputs calls [`poll`] at
/// [`next_deadline`] to end pulses and start queued ones (the agent does it on a thread of
/// its own, so a long inference does not stretch a pulse).
///
/// [`set`]: VerdictOutputs::set
/// [`poll`]: VerdictOutputs::poll
/// [`next_deadline`]: VerdictOutputs::next_deadline
#[derive(Debug)]
pub struct VerdictOutputs<P: OutputPin, D: DelayNs> {
    ok: P,
    ng: P,
    error: Option<P>,
    busy: Option<P>,
    /// Pulse mode only.
    pulses: Option<PulseScheduler>,
    delay: D,
}

impl<P: OutputPin, D: DelayNs> VerdictOutputs<P, D> {
    /// Result pins; all are driven low first. In pulse mode up to [`DEFAULT_MAX_PENDING`]
    /// results wait for their pulse.
    pub fn new(
        mut ok: P,
        mut ng: P,
        mut error: Option<P>,
        mode: PinMode,
        delay: D,
    ) -> Result<Self, P::Error> {
        ok.set_low()?;
        ng.set_low()?;
        if let Some(e) = error.as_mut() {
            e.set_low()?;
        }
        let pulses = match mode {
            PinMode::Level => None,
            PinMode::Pulse { width, gap } => {
                Some(PulseScheduler::new(width, gap, DEFAULT_MAX_PENDING))
            }
        };
        Ok(VerdictOutputs {
            ok,
            ng,
            error,
            busy: None,
            pulses,
            delay,
        })
    }

    /// Lets up to `max_pending` (at least 1) results wait for their pulse (pulse mode).
    pub fn with_max_pending(mut self, max_pending: usize) -> Self {
        if let Some(p) = self.pulses.as_mut() {
            assert!(p.is_idle(), "with_max_pending on running outputs");
            *p = PulseScheduler::new(p.width(), p.gap(), max_pending);
        }
        self
    }

    /// Adds a BUSY pin (high while a part is being judged; READY is its inverse in the PLC).
    pub fn with_busy(mut self, mut busy: P) -> Result<Self, P::Error> {
        busy.set_low()?;
        self.busy = Some(busy);
        Ok(self)
    }

    /// Drives the BUSY pin, if there is one.
    pub fn set_busy(&mut self, busy: bool) -> Result<(), P::Error> {
        match self.busy.as_mut() {
            Some(pin) if busy => pin.set_high(),
            Some(pin) => pin.set_low(),
            None => Ok(()),
        }
    }

    /// Drives the pins for one result and waits (with the delay) until its pulse, and any
    /// queued before it, has ended. For simple loops with nothing else to do meanwhile.
    pub fn signal(&mut self, signal: Signal) -> Result<(), P::Error> {
        self.set(signal, monotonic_now())?;
        self.flush()
    }

    /// Signals one result at `now` (on `CLOCK_MONOTONIC`, see [`monotonic_now`]). Level mode:
    /// the pin goes high at once and the others low. Pulse mode: the pulse is queued and
    /// starts now if its pin is free, else when [`poll`](Self::poll) finds the pin's previous
    /// pulse and gap over. Without an ERROR pin, errors are signalled on NG, so a part the
    /// station could not judge is never passed as good.
    ///
    /// Never merges or drops a result: only when [`is_full`](Self::is_full) does it block,
    /// running the queue in real time until there is room.
    pub fn set(&mut self, signal: Signal, now: Duration) -> Result<(), P::Error> {
        let target = match (signal, self.error.is_some()) {
            (Signal::Ok, _) => Signal::Ok,
            (Signal::Ng, _) | (Signal::Error, false) => Signal::Ng,
            (Signal::Error, true) => Signal::Error,
        };
        if self.pulses.is_none() {
            for s in [Signal::Ok, Signal::Ng, Signal::Error] {
                if s != target {
                    if let Some(pin) = self.pin(s) {
                        pin.set_low()?;
                    }
                }
            }
            return self.pin(target).expect("target pin exists").set_high();
        }
        let mut now = now;
        while self.is_full() {
            self.wait_for_deadline(now)?;
            now = monotonic_now();
        }
        let pulses = self.pulses.as_mut().expect("pulse mode");
        pulses.push(target).expect("room was made above");
        self.poll(now).map(|_| ())
    }

    /// Applies the pulse edges due at `now`: ends pulses whose width has passed and starts
    /// queued ones whose pin is free. Returns [`next_deadline`](Self::next_deadline).
    pub fn poll(&mut self, now: Duration) -> Result<Option<Duration>, P::Error> {
        while let Some(edge) = self.pulses.as_mut().and_then(|p| p.poll(now)) {
            let pin = self
                .pin(edge.line)
                .expect("pulses only go to existing pins");
            if edge.high {
                pin.set_high()?;
            } else {
                pin.set_low()?;
            }
        }
        Ok(self.next_deadline())
    }

    /// When [`poll`](Self::poll) next has work: a pulse to end or a queued one to start.
    /// `None` when idle and in level mode.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.pulses.as_ref().and_then(|p| p.next_deadline())
    }

    /// True when no pulse runs or waits.
    pub fn is_idle(&self) -> bool {
        self.pulses.as_ref().is_none_or(|p| p.is_idle())
    }

    /// True when the next [`set`](Self::set) would have to wait for a queued pulse to start.
    pub fn is_full(&self) -> bool {
        self.pulses.as_ref().is_some_and(|p| p.is_full())
    }

    /// Results waiting for their pulse to start.
    pub fn pending(&self) -> usize {
        self.pulses.as_ref().map_or(0, |p| p.pending())
    }

    /// Runs every queued pulse to its end in real time (with the delay).
    pub fn flush(&mut self) -> Result<(), P::Error> {
        let mut now = monotonic_now();
        while !self.is_idle() {
            self.wait_for_deadline(now)?;
            now = monotonic_now();
        }
        Ok(())
    }

    /// Applies what is due at `now`, then sleeps until the next deadline.
    fn wait_for_deadline(&mut self, now: Duration) -> Result<(), P::Error> {
        if let Some(at) = self.poll(now)? {
            let wait = at.saturating_sub(now);
            if !wait.is_zero() {
                self.delay
                    .delay_us(wait.as_micros().min(u32::MAX as u128) as u32);
            }
        }
        Ok(())
    }

    fn pin(&mut self, s: Signal) -> Option<&mut P> {
        match s {
            Signal::Ok => Some(&mut self.ok),
            Signal::Ng => Some(&mut self.ng),
            Signal::Error => self.error.as_mut(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    type Log = Rc<RefCell<Vec<(&'static str, bool, u64)>>>;

    /// A pin that logs its changes at the test's simulated time.
    struct FakePin {
        name: &'static str,
        log: Log,
        clock: Rc<RefCell<u64>>,
    }

    impl embedded_hal::digital::ErrorType for FakePin {
        type Error = std::convert::Infallible;
    }

    impl OutputPin for FakePin {
        fn set_low(&mut self) -> Result<(), Self::Error> {
            let t = *self.clock.borrow();
            self.log.borrow_mut().push((self.name, false, t));
            Ok(())
        }
        fn set_high(&mut self) -> Result<(), Self::Error> {
            let t = *self.clock.borrow();
            self.log.borrow_mut().push((self.name, true, t));
            Ok(())
        }
    }

    struct NoDelay;
    impl DelayNs for NoDelay {
        fn delay_ns(&mut self, _: u32) {}
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn outputs(
        mode: PinMode,
        error_pin: bool,
    ) -> (VerdictOutputs<FakePin, NoDelay>, Log, Rc<RefCell<u64>>) {
        let log: Log = Default::default();
        let clock = Rc::new(RefCell::new(0));
        let pin = |name| FakePin {
            name,
            log: log.clone(),
            clock: clock.clone(),
        };
        let error = error_pin.then(|| pin("error"));
        let out = VerdictOutputs::new(pin("ok"), pin("ng"), error, mode, NoDelay).unwrap();
        log.borrow_mut().clear();
        (out, log, clock)
    }

    #[test]
    fn queued_verdicts_become_separate_pulses_while_the_loop_is_busy() {
        let (mut out, log, clock) = outputs(
            PinMode::Pulse {
                width: ms(200),
                gap: ms(100),
            },
            false,
        );
        // Four NG results 5 ms apart, the last an ERROR (on NG: no ERROR pin).
        for (i, s) in [Signal::Ng, Signal::Ng, Signal::Ng, Signal::Error]
            .into_iter()
            .enumerate()
        {
            let t = 5 * i as u64;
            *clock.borrow_mut() = t;
            out.set(s, ms(t)).unwrap();
        }
        // The pin driver's thread: wakes at each deadline.
        while let Some(at) = out.next_deadline() {
            *clock.borrow_mut() = at.as_millis() as u64;
            out.poll(at).unwrap();
        }
        assert!(out.is_idle());
        let ng: Vec<(bool, u64)> = log
            .borrow()
            .iter()
            .map(|&(pin, high, t)| {
                assert_eq!(pin, "ng");
                (high, t)
            })
            .collect();
        assert_eq!(
            ng,
            [
                (true, 0),
                (false, 200),
                (true, 300),
                (false, 500),
                (true, 600),
                (false, 800),
                (true, 900),
                (false, 1100)
            ]
        );
    }

    #[test]
    fn level_mode_holds_the_pin_until_the_next_result() {
        let (mut out, log, _) = outputs(PinMode::Level, true);
        out.set(Signal::Ng, ms(0)).unwrap();
        out.set(Signal::Error, ms(1)).unwrap();
        assert_eq!(out.next_deadline(), None);
        assert!(out.is_idle());
        let highs: Vec<&str> = log.borrow().iter().filter(|e| e.1).map(|e| e.0).collect();
        assert_eq!(highs, ["ng", "error"]);
    }
}
