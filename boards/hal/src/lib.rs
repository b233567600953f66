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
mod outputs;
mod polled;
mod pulse;
pub use debounce::Debouncer;
pub use outputs::VerdictOutputs;
pub use polled::{PinReadError, PolledTrigger};
pub use pulse::{PulseEdge, PulseQueueFull, PulseScheduler, DEFAULT_MAX_PENDING};

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
    /// One pulse per result on the signalled pin (PLC counter inputs): high for `width`,
    /// then low for at least `gap` before that pin's next pulse. See [`PulseScheduler`].
    Pulse {
        /// How long the pin is high.
        width: Duration,
        /// Least low time between two pulses on one pin.
        gap: Duration,
    },
}
