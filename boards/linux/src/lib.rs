//! The Linux board layer of edgevlm: the trigger input and result outputs on the GPIO
//! character device (`gpiocdev`, kernel edge events with `CLOCK_MONOTONIC` timestamps), a V4L2
//! camera (`v4l`, mmap streaming), and the board profiles that say which chip, lines and camera
//! a board has.
//!
//! ```no_run
//! use edgevlm_board::{Camera, PinMode, Trigger, VerdictOutputs};
//! use edgevlm_board_linux::{BoardProfile, CdevTrigger, OutputPins, V4l2Camera};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let profile = BoardProfile::builtin("rpi5")?;
//! let mut trigger = CdevTrigger::from_profile(&profile.gpio)?;
//! let mut camera = V4l2Camera::from_profile(&profile.camera)?;
//! let pins = OutputPins::from_profile(&profile.gpio)?;
//! # struct Delay; impl edgevlm_board::DelayNs for Delay { fn delay_ns(&mut self, _: u32) {} }
//! let mut outputs = VerdictOutputs::new(pins.ok, pins.ng, pins.error, PinMode::Level, Delay)?;
//! if let Some(event) = trigger.wait(std::time::Duration::from_secs(1))? {
//!     let frame = camera.capture()?;
//!     assert!(frame.timestamp >= event.timestamp);
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod gpio;
pub mod profile;
pub mod serial;
pub mod v4l2;

pub use gpio::{CdevOutput, CdevTrigger, DebounceMode, Debouncer, GpioError, OutputPins};
pub use profile::{Bias, BoardProfile, CameraFormat, ProfileError};
pub use v4l2::{V4l2Camera, V4l2Error};
