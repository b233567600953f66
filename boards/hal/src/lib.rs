//! edgevlm board layer: what an inspection station is made of, as traits.
//!
//! A [`Camera`] delivers frames taken after a trigger, a [`Trigger`] reports part-present
//! edges, and [`VerdictOutputs`] drives OK / NG / ERROR pins through any embedded-hal 1.0
//! [`OutputPin`]. Implementations live in other crates: `edgevlm-board-sim` (image folders,
//! scripted triggers, recorded pins) and, later, the Linux GPIO character device and V4L2.
#![warn(missing_docs)]

use std::time::Duration;

pub use embedded_hal::delay::DelayNs;
pub use embedded_hal::digital::{InputPin, OutputPin};

mod debounce;
mod polled;
pub use debounce::Debouncer;
pub use polled::{PinReadError, PolledTrigger};

/// Now on `CLOCK_MONOTONIC`, the clock of every timestamp in this crate: GPIO edge events
/// (kernel timestamps), V4L2 buffers and the simulator all use it, so "was this frame taken
/// after the trigger?" is a plain comparison.
pub fn monotonic_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Pixel format of a captured frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Packed 8-bit R G B.
    Rgb8,
    /// 8-bit luma.
    Gray8,
    /// Packed 4:2:2 Y U Y V.
    Yuyv,
    /// Planar Y + interleaved UV at half resolution.
    Nv12,
    /// One JPEG per frame.
    Mjpeg,
    /// One PNG per frame (image-folder cameras).
    Png,
}

/// One captured frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Pixel format of `data`.
    pub format: PixelFormat,
    /// Width in pixels (0 when only the encoded stream knows it).
    pub width: u32,
    /// Height in pixels (0 when only the encoded stream knows it).
    pub height: u32,
    /// Frame bytes.
    pub data: Vec<u8>,
    /// Frame counter of the camera, starting at 0.
    pub sequence: u64,
    /// Capture time on `CLOCK_MONOTONIC` (see [`monotonic_now`]).
    pub timestamp: Duration,
    /// Where the frame came from (device path, file name), for logs and NG image names.
    pub source: String,
}

/// Why a camera operation failed, so callers can decide to retry or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraErrorKind {
    /// The device is gone (unplugged, folder removed); retry later.
    Disconnected,
    /// No frame arrived in time.
    Timeout,
    /// A frame arrived but is unusable.
    BadFrame,
    /// Anything else.
    Other,
}

/// Errors of a [`Camera`].
pub trait CameraError: std::error::Error + Send + Sync + 'static {
    /// The kind of failure.
    fn kind(&self) -> CameraErrorKind;
}

/// A source of frames.
pub trait Camera {
    /// The camera's error type.
    type Error: CameraError;
    /// Captures a frame taken after this call started (stale buffered frames are dropped).
    fn capture(&mut self) -> Result<Frame, Self::Error>;

    /// Tries to bring a failed camera back (reopen the device). Called by the agent between
    /// capture retries after a `Disconnected` error; the default does nothing.
    fn recover(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A part-present event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerEvent {
    /// Event counter, starting at 0.
    pub sequence: u64,
    /// Edge time on `CLOCK_MONOTONIC` (see [`monotonic_now`]).
    pub timestamp: Duration,
}

/// A delay that sleeps the calling thread (boards with an OS).
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadDelay;

impl DelayNs for ThreadDelay {
    fn delay_ns(&mut self, ns: u32) {
        std::thread::sleep(Duration::from_nanos(ns as u64));
    }
}

/// Which input edge means "part present".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// Low to high.
    Rising,
    /// High to low.
    Falling,
    /// Either.
    Both,
}

/// Trigger input settings shared by every trigger implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerConfig {
    /// The edge that fires.
    pub edge: Edge,
    /// The new level must hold this long to count (contact bounce of switches and relays).
    pub debounce: Duration,
}

/// A source of trigger events (a GPIO edge, a schedule, stdin).
pub trait Trigger {
    /// The trigger's error type.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Waits up to `timeout` for the next event; `Ok(None)` on timeout, and at the end of a
    /// finite script.
    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, Self::Error>;

    /// True when no event will ever come again (the end of a script); hardware never ends.
    fn is_exhausted(&self) -> bool {
        false
    }
}

/// What the outputs should signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Part is good.
    Ok,
    /// Part is rejected.
    Ng,
    /// The station could not judge the part (camera or model failure).
    Error,
}

/// How result pins are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMode {
    /// The signalled pin stays high until the next result; the others go low.
    Level,
    /// The signalled pin goes high for this long, then low (PLC input pulse).
    Pulse(Duration),
}

/// OK / NG / ERROR result pins and an optional BUSY pin, generic over embedded-hal output
/// pins and delay.
#[derive(Debug)]
pub struct VerdictOutputs<P: OutputPin, D: DelayNs> {
    ok: P,
    ng: P,
    error: Option<P>,
    busy: Option<P>,
    mode: PinMode,
    /// The pin of a running pulse and when it ends.
    pulse: Option<(Signal, Duration)>,
    delay: D,
}

impl<P: OutputPin, D: DelayNs> VerdictOutputs<P, D> {
    /// Result pins; all are driven low first.
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
        Ok(VerdictOutputs {
            ok,
            ng,
            error,
            busy: None,
            pulse: None,
            mode,
            delay,
        })
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

    /// Drives the pins for one result and, in pulse mode, waits out the pulse (using the
    /// delay). Without an ERROR pin, errors are signalled on NG, so a part the station could
    /// not judge is never passed as good.
    pub fn signal(&mut self, signal: Signal) -> Result<(), P::Error> {
        if let Some(width) = self.set(signal, monotonic_now())? {
            self.delay
                .delay_us(width.as_micros().min(u32::MAX as u128) as u32);
            self.end_pulse()?;
        }
        Ok(())
    }

    /// Starts a result without blocking: in pulse mode the pin goes high and `poll` lowers it
    /// once the width has passed; returns the pulse width. A pulse still running is finished
    /// first (a PLC cannot tell two merged pulses apart), so call `poll` often enough.
    pub fn set(&mut self, signal: Signal, now: Duration) -> Result<Option<Duration>, P::Error> {
        if self.pulse.is_some() {
            self.end_pulse()?;
        }
        let target = match (signal, self.error.is_some()) {
            (Signal::Ok, _) => Signal::Ok,
            (Signal::Ng, _) | (Signal::Error, false) => Signal::Ng,
            (Signal::Error, true) => Signal::Error,
        };
        if self.mode == PinMode::Level {
            for s in [Signal::Ok, Signal::Ng, Signal::Error] {
                if s != target {
                    if let Some(pin) = self.pin(s) {
                        pin.set_low()?;
                    }
                }
            }
        }
        self.pin(target).expect("target pin exists").set_high()?;
        match self.mode {
            PinMode::Pulse(width) => {
                self.pulse = Some((target, now + width));
                Ok(Some(width))
            }
            PinMode::Level => Ok(None),
        }
    }

    /// Ends a pulse whose width has passed at `now`; returns when the running pulse ends, if any.
    pub fn poll(&mut self, now: Duration) -> Result<Option<Duration>, P::Error> {
        match self.pulse {
            Some((_, until)) if now >= until => {
                self.end_pulse()?;
                Ok(None)
            }
            Some((_, until)) => Ok(Some(until)),
            None => Ok(None),
        }
    }

    fn end_pulse(&mut self) -> Result<(), P::Error> {
        if let Some((target, until)) = self.pulse.take() {
            let now = monotonic_now();
            if until > now {
                self.delay
                    .delay_us((until - now).as_micros().min(u32::MAX as u128) as u32);
            }
            self.pin(target).expect("target pin exists").set_low()?;
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
