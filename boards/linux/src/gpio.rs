//! GPIO through the Linux GPIO character device (`/dev/gpiochipN`, never sysfs), with
//! `gpiocdev`: a [`CdevTrigger`] on kernel edge events and [`CdevOutput`] embedded-hal pins.
//!
//! Edge events carry a kernel timestamp taken in the interrupt handler, on `CLOCK_MONOTONIC`
//! like every timestamp of `edgevlm-board`, so the trigger time does not depend on how fast
//! this process wakes up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgevlm_board::{monotonic_now, Trigger, TriggerConfig, TriggerEvent};
use embedded_hal::digital::{ErrorKind, ErrorType, OutputPin};
use gpiocdev::line::{EdgeDetection, EdgeKind, Value};
use gpiocdev::Request;

use crate::profile::{Bias, GpioProfile};

/// The consumer name shown by `gpioinfo` for lines edgevlm holds.
const CONSUMER: &str = "edgevlm";
/// Longest single sleep in [`CdevTrigger::wait`]; long timeouts are waited in slices.
const MAX_SLICE: Duration = Duration::from_secs(60);

/// Errors of the GPIO character device.
#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    /// No chip matches the profile's `gpio.chip`.
    #[error("no GPIO chip `{spec}`; chips here: {available}")]
    ChipNotFound {
        /// The label, name or path asked for.
        spec: String,
        /// The chips found, as `name [label]`, or `none`.
        available: String,
    },
    /// The kernel refused to hand out the lines (in use, out of range, no permission).
    #[error("requesting GPIO line(s) {lines:?} of {chip}: {source}")]
    Request {
        /// The chip.
        chip: PathBuf,
        /// The line offsets.
        lines: Vec<u32>,
        /// What gpiocdev reported.
        #[source]
        source: gpiocdev::Error,
    },
    /// Reading, waiting on or setting a requested line failed.
    #[error("{action} GPIO line {line} of {chip}: {source}")]
    Line {
        /// What was being done.
        action: &'static str,
        /// The chip.
        chip: PathBuf,
        /// The line offset.
        line: u32,
        /// What gpiocdev reported.
        #[source]
        source: gpiocdev::Error,
    },
}

impl embedded_hal::digital::Error for GpioError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Other
    }
}

/// Finds a chip by path (`/dev/gpiochip0`), device name (`gpiochip0`) or label
/// (`pinctrl-rp1`). Labels survive kernels that renumber chips (the Pi 5's moved from
/// gpiochip4 to gpiochip0 in 6.6.45), so the built-in profiles use them.
pub fn resolve_chip(spec: &str) -> Result<PathBuf, GpioError> {
    if spec.contains('/') {
        return Ok(PathBuf::from(spec));
    }
    if looks_like_chip_name(spec) {
        return Ok(Path::new("/dev").join(spec));
    }
    let chips = gpiocdev::chip::chips().unwrap_or_default();
    let mut seen = vec![];
    for path in chips {
        let Ok(info) = gpiocdev::Chip::from_path(&path).and_then(|c| c.info()) else {
            continue;
        };
        if info.label == spec {
            return Ok(path);
        }
        seen.push(format!("{} [{}]", info.name, info.label));
    }
    Err(GpioError::ChipNotFound {
        spec: spec.into(),
        available: if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        },
    })
}

/// `gpiochip` followed by digits.
fn looks_like_chip_name(spec: &str) -> bool {
    spec.strip_prefix("gpiochip")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn cdev_bias(bias: Bias) -> Option<gpiocdev::line::Bias> {
    match bias {
        Bias::PullUp => Some(gpiocdev::line::Bias::PullUp),
        Bias::PullDown => Some(gpiocdev::line::Bias::PullDown),
        Bias::Disabled => Some(gpiocdev::line::Bias::Disabled),
        Bias::AsIs => None,
    }
}

/// Converts an edge event's kernel timestamp to `CLOCK_MONOTONIC`.
///
/// uAPI v2 and uAPI v1 from Linux 5.7 stamp events on `CLOCK_MONOTONIC`; uAPI v1 before 5.7
/// used `CLOCK_REALTIME`. A monotonic stamp of a past event is at most "now" on the monotonic
/// clock (uptime), while a realtime stamp is decades past it, so the two are told apart by
/// size and a realtime stamp is shifted by the current realtime-monotonic offset.
pub fn event_time_to_monotonic(
    timestamp_ns: u64,
    monotonic_now: Duration,
    realtime_now: Duration,
) -> Duration {
    let ts = Duration::from_nanos(timestamp_ns);
    // Slack for an event stamped between reading the two clocks.
    if ts <= monotonic_now + Duration::from_secs(1) {
        return ts;
    }
    monotonic_now.saturating_sub(realtime_now.saturating_sub(ts))
}

fn realtime_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The shared debounce state machine (also used by [`edgevlm_board::PolledTrigger`]).
pub use edgevlm_board::Debouncer;

/// Who debounces the trigger line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebounceMode {
    /// No debounce configured: every edge counts.
    Off,
    /// The kernel (GPIO uAPI v2, Linux 5.10+): in the GPIO controller where it can, else in
    /// gpiolib's own timer. Only settled edges reach this process.
    Kernel,
    /// This process, on every raw edge (uAPI v1 kernels, which have no debounce).
    Software,
}

/// A [`Trigger`] on one input line, woken by kernel edge events.
///
/// Both edges are requested whatever the configured edge, so the debouncer always knows the
/// line's level; [`Debouncer`] then picks the configured edge. With kernel debounce an event is
/// stamped when the kernel's debounce timer expired, one period after the last bounce; the
/// period is subtracted so timestamps mean "when the level last changed", as with software
/// debounce and [`edgevlm_board::PolledTrigger`], and are never earlier than the real edge.
#[derive(Debug)]
pub struct CdevTrigger {
    request: Request,
    chip: PathBuf,
    line: u32,
    debouncer: Debouncer,
    mode: DebounceMode,
    /// Kernel debounce period, subtracted from event timestamps.
    kernel_debounce: Duration,
}

impl CdevTrigger {
    /// Requests `line` of `chip` as an edge-detecting input. Kernel debounce is used when the
    /// kernel has it, software debounce otherwise.
    pub fn new(
        chip: &Path,
        line: u32,
        config: TriggerConfig,
        active_low: bool,
        bias: Bias,
    ) -> Result<CdevTrigger, GpioError> {
        let request_with = |debounce: Option<Duration>| {
            let mut b = Request::builder();
            b.on_chip(chip)
                .with_consumer(CONSUMER)
                .with_line(line)
                .as_input()
                .with_edge_detection(EdgeDetection::BothEdges)
                .with_bias(cdev_bias(bias));
            if active_low {
                b.as_active_low();
            }
            if let Some(period) = debounce {
                b.with_debounce_period(period);
            }
            b.request()
        };
        let request_error = |source| GpioError::Request {
            chip: chip.to_owned(),
            lines: vec![line],
            source,
        };
        let (request, mode) = if config.debounce.is_zero() {
            (
                request_with(None).map_err(request_error)?,
                DebounceMode::Off,
            )
        } else {
            match request_with(Some(config.debounce)) {
                Ok(r) => (r, DebounceMode::Kernel),
                // uAPI v1 has no debounce attribute: debounce here instead.
                Err(gpiocdev::Error::AbiLimitation(..)) => (
                    request_with(None).map_err(request_error)?,
                    DebounceMode::Software,
                ),
                Err(e) => return Err(request_error(e)),
            }
        };
        let level = request.value(line).ok().map(|v| v == Value::Active);
        let (software_debounce, kernel_debounce) = match mode {
            DebounceMode::Software => (config.debounce, Duration::ZERO),
            DebounceMode::Kernel => (Duration::ZERO, config.debounce),
            DebounceMode::Off => (Duration::ZERO, Duration::ZERO),
        };
        Ok(CdevTrigger {
            request,
            chip: chip.to_owned(),
            line,
            debouncer: Debouncer::new(
                TriggerConfig {
                    edge: config.edge,
                    debounce: software_debounce,
                },
                level,
            ),
            mode,
            kernel_debounce,
        })
    }

    /// The trigger line of a profile's `[gpio]`.
    pub fn from_profile(gpio: &GpioProfile) -> Result<CdevTrigger, GpioError> {
        let t = &gpio.trigger;
        CdevTrigger::new(
            &resolve_chip(&gpio.chip)?,
            t.line,
            TriggerConfig {
                edge: t.edge.into(),
                debounce: Duration::from_millis(t.debounce_ms.into()),
            },
            t.active_low,
            t.bias,
        )
    }

    /// Who debounces this line.
    pub fn debounce_mode(&self) -> DebounceMode {
        self.mode
    }

    /// The line's current logical level (true = active).
    pub fn is_active(&self) -> Result<bool, GpioError> {
        self.request
            .value(self.line)
            .map(|v| v == Value::Active)
            .map_err(|e| self.line_error("reading", e))
    }

    fn line_error(&self, action: &'static str, source: gpiocdev::Error) -> GpioError {
        GpioError::Line {
            action,
            chip: self.chip.clone(),
            line: self.line,
            source,
        }
    }

    /// Feeds every queued kernel event to the debouncer; stops at the first completed edge.
    fn drain(&mut self) -> Result<Option<TriggerEvent>, GpioError> {
        while self
            .request
            .has_edge_event()
            .map_err(|e| self.line_error("polling", e))?
        {
            let event = self
                .request
                .read_edge_event()
                .map_err(|e| self.line_error("reading an edge event of", e))?;
            let at = event_time_to_monotonic(event.timestamp_ns, monotonic_now(), realtime_now())
                .saturating_sub(self.kernel_debounce);
            if let Some(e) = self.debouncer.change(event.kind == EdgeKind::Rising, at) {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }
}

impl Trigger for CdevTrigger {
    type Error = GpioError;

    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, GpioError> {
        let deadline = monotonic_now().saturating_add(timeout);
        loop {
            // Read the clock before draining, so an edge queued before `now` is seen before a
            // pending level is confirmed at `now`.
            let now = monotonic_now();
            if let Some(event) = self.drain()? {
                return Ok(Some(event));
            }
            if let Some(event) = self.debouncer.poll(now) {
                return Ok(Some(event));
            }
            if now >= deadline {
                return Ok(None);
            }
            let wake = self
                .debouncer
                .deadline()
                .map_or(deadline, |d| d.min(deadline));
            let sleep = wake.saturating_sub(now).min(MAX_SLICE);
            self.request
                .wait_edge_event(sleep)
                .map_err(|e| self.line_error("waiting on", e))?;
        }
    }
}

/// One output line as an embedded-hal [`OutputPin`]. Lines requested together share one
/// kernel request (one file descriptor); each pin drives only its own line.
///
/// Dropping a pin drives its line inactive: when the kernel frees a line it keeps its last
/// level, and a PLC must not read a stale OK from a station that has stopped.
#[derive(Debug)]
pub struct CdevOutput {
    request: Arc<Request>,
    chip: PathBuf,
    line: u32,
}

impl CdevOutput {
    /// Requests `lines` of `chip` as outputs, all driven inactive; pins are returned in the
    /// order of `lines`.
    pub fn request(
        chip: &Path,
        lines: &[u32],
        active_low: bool,
    ) -> Result<Vec<CdevOutput>, GpioError> {
        let mut b = Request::builder();
        b.on_chip(chip)
            .with_consumer(CONSUMER)
            .with_lines(lines)
            .as_output(Value::Inactive);
        if active_low {
            b.as_active_low();
        }
        let request = Arc::new(b.request().map_err(|source| GpioError::Request {
            chip: chip.to_owned(),
            lines: lines.to_vec(),
            source,
        })?);
        Ok(lines
            .iter()
            .map(|&line| CdevOutput {
                request: request.clone(),
                chip: chip.to_owned(),
                line,
            })
            .collect())
    }

    /// The line offset.
    pub fn line(&self) -> u32 {
        self.line
    }

    fn set(&mut self, value: Value) -> Result<(), GpioError> {
        self.request
            .set_value(self.line, value)
            .map_err(|source| GpioError::Line {
                action: "setting",
                chip: self.chip.clone(),
                line: self.line,
                source,
            })
    }
}

impl Drop for CdevOutput {
    fn drop(&mut self) {
        let _ = self.request.set_value(self.line, Value::Inactive);
    }
}

impl ErrorType for CdevOutput {
    type Error = GpioError;
}

impl OutputPin for CdevOutput {
    fn set_low(&mut self) -> Result<(), GpioError> {
        self.set(Value::Inactive)
    }

    fn set_high(&mut self) -> Result<(), GpioError> {
        self.set(Value::Active)
    }
}

/// The result pins of a profile, ready for [`edgevlm_board::VerdictOutputs`].
#[derive(Debug)]
pub struct OutputPins {
    /// OK pin.
    pub ok: CdevOutput,
    /// NG pin.
    pub ng: CdevOutput,
    /// ERROR pin, if the profile has one.
    pub error: Option<CdevOutput>,
    /// BUSY pin, if the profile has one.
    pub busy: Option<CdevOutput>,
}

impl OutputPins {
    /// Requests a profile's `[gpio.outputs]` lines in one kernel request, all inactive.
    pub fn from_profile(gpio: &GpioProfile) -> Result<OutputPins, GpioError> {
        let o = &gpio.outputs;
        let mut lines = vec![o.ok, o.ng];
        lines.extend(o.error);
        lines.extend(o.busy);
        let mut pins =
            CdevOutput::request(&resolve_chip(&gpio.chip)?, &lines, o.active_low)?.into_iter();
        let mut next = || pins.next().expect("one pin per requested line");
        let (ok, ng) = (next(), next());
        let error = o.error.map(|_| next());
        let busy = o.busy.map(|_| next());
        Ok(OutputPins {
            ok,
            ng,
            error,
            busy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgevlm_board::Edge;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Turns one level per millisecond into change events, as the kernel would report them,
    /// polls the debouncer every millisecond, and returns the event times in ms. The first
    /// level is the resting level, known at request time.
    fn run(levels: &[u8], edge: Edge, debounce_ms: u64) -> Vec<u64> {
        let mut d = Debouncer::new(
            TriggerConfig {
                edge,
                debounce: ms(debounce_ms),
            },
            Some(levels[0] == 1),
        );
        let mut events = vec![];
        for (i, pair) in levels.windows(2).enumerate() {
            let t = ms(i as u64 + 1);
            events.extend(d.poll(t));
            if pair[0] != pair[1] {
                events.extend(d.change(pair[1] == 1, t));
            }
        }
        for t in levels.len()..levels.len() + 10 {
            events.extend(d.poll(ms(t as u64)));
        }
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.sequence, i as u64);
        }
        events
            .iter()
            .map(|e| e.timestamp.as_millis() as u64)
            .collect()
    }

    #[test]
    fn debounces_like_the_polled_trigger() {
        // The cases of edgevlm_board::PolledTrigger's tests, with the same expected events.
        let levels = [0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];
        assert_eq!(run(&levels, Edge::Rising, 2), vec![4, 14]);
        assert_eq!(run(&levels, Edge::Falling, 2), vec![10]);
        assert_eq!(run(&levels, Edge::Both, 2), vec![4, 10, 14]);
        assert_eq!(run(&levels, Edge::Rising, 0), vec![2, 4, 14]);
        assert_eq!(run(&[1, 1, 0, 1, 1, 1], Edge::Both, 2), Vec::<u64>::new());
        // Held 2 ms of a 3 ms debounce, then released: nothing.
        assert_eq!(run(&[0, 1, 1, 0, 0, 0], Edge::Rising, 3), Vec::<u64>::new());
    }

    #[test]
    fn a_queued_bounce_cancels_before_a_late_poll_confirms() {
        // The bounce back at 3 ms is read only at 50 ms, long after the debounce time: it
        // still cancels, because changes are applied at their own timestamps.
        let config = TriggerConfig {
            edge: Edge::Rising,
            debounce: ms(5),
        };
        let mut d = Debouncer::new(config, Some(false));
        assert_eq!(d.change(true, ms(1)), None);
        assert_eq!(d.deadline(), Some(ms(6)));
        assert_eq!(d.change(false, ms(3)), None);
        assert_eq!(d.deadline(), None);
        assert_eq!(d.poll(ms(50)), None);

        // A level that had held long enough is confirmed by the next change's timestamp.
        assert_eq!(d.change(true, ms(60)), None);
        let e = d
            .change(false, ms(70))
            .expect("rising edge at 60 confirmed");
        assert_eq!((e.sequence, e.timestamp), (0, ms(60)));
        // ... and the fall itself is pending, then completes without firing (rising only).
        assert_eq!(d.poll(ms(80)), None);
        assert_eq!(d.deadline(), None);
    }

    #[test]
    fn unknown_start_level_and_missed_edges() {
        let both = TriggerConfig {
            edge: Edge::Both,
            debounce: Duration::ZERO,
        };
        // Unknown resting level: a rising edge implies it was low, so it counts.
        let mut d = Debouncer::new(both, None);
        assert_eq!(d.change(true, ms(5)).map(|e| e.timestamp), Some(ms(5)));
        // A duplicate rising edge (the fall in between was lost) is not a new edge.
        assert_eq!(d.change(true, ms(6)), None);

        // With debounce, a duplicate edge restarts the hold time.
        let mut d = Debouncer::new(
            TriggerConfig {
                edge: Edge::Rising,
                debounce: ms(4),
            },
            Some(false),
        );
        assert_eq!(d.change(true, ms(10)), None);
        assert_eq!(d.change(true, ms(12)), None);
        assert_eq!(d.poll(ms(15)), None);
        assert_eq!(d.poll(ms(16)).map(|e| e.timestamp), Some(ms(12)));
    }

    #[test]
    fn kernel_timestamps_become_monotonic() {
        let mono = Duration::from_secs(1000);
        let real = Duration::from_secs(1_700_000_000);
        // Monotonic stamps pass through, including a few ns "in the future" of our reading.
        assert_eq!(
            event_time_to_monotonic(999_500_000_000, mono, real),
            Duration::from_millis(999_500)
        );
        assert_eq!(
            event_time_to_monotonic(1_000_000_000_100, mono, real),
            Duration::from_nanos(1_000_000_000_100)
        );
        // A realtime stamp 250 ms ago is 250 ms before monotonic now.
        let ts = (real - Duration::from_millis(250)).as_nanos() as u64;
        assert_eq!(
            event_time_to_monotonic(ts, mono, real),
            mono - Duration::from_millis(250)
        );
        // A realtime stamp after the realtime clock (stepped back) is "now", never later.
        let ts = (real + Duration::from_secs(5)).as_nanos() as u64;
        assert_eq!(event_time_to_monotonic(ts, mono, real), mono);
    }

    #[test]
    fn chip_specs_and_bias() {
        assert_eq!(
            resolve_chip("/dev/gpiochip3").unwrap(),
            Path::new("/dev/gpiochip3")
        );
        assert_eq!(
            resolve_chip("gpiochip12").unwrap(),
            Path::new("/dev/gpiochip12")
        );
        assert!(!looks_like_chip_name("gpiochip"));
        assert!(!looks_like_chip_name("gpiochip0a"));
        // A label nobody has: the error says what there is (nothing on this machine).
        let e = resolve_chip("no-such-label-xyz").unwrap_err().to_string();
        assert!(
            e.starts_with("no GPIO chip `no-such-label-xyz`; chips here: "),
            "{e}"
        );
        assert_eq!(cdev_bias(Bias::AsIs), None);
        assert_eq!(cdev_bias(Bias::PullUp), Some(gpiocdev::line::Bias::PullUp));
    }

    #[test]
    fn devices_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<CdevTrigger>();
        send::<CdevOutput>();
        send::<crate::V4l2Camera>();
    }

    #[test]
    fn missing_chip_is_a_request_error_naming_chip_and_line() {
        let config = TriggerConfig {
            edge: Edge::Rising,
            debounce: ms(10),
        };
        let e = CdevTrigger::new(
            Path::new("/nonexistent/gpiochip9"),
            17,
            config,
            false,
            Bias::AsIs,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("requesting GPIO line(s) [17] of /nonexistent/gpiochip9: "),
            "{msg}"
        );
        use embedded_hal::digital::Error;
        assert_eq!(e.kind(), ErrorKind::Other);
        let e = CdevOutput::request(Path::new("/nonexistent/gpiochip9"), &[22, 27], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[22, 27]"), "{e}");
    }
}
