//! edgevlm board agent: the inspection loop (trigger -> fresh frame -> verdict -> output pins),
//! its configuration, NG image storage and systemd integration.
//!
//! The loop is generic over the `edgevlm-board` traits; concrete devices (simulator, Linux
//! GPIO + V4L2) are chosen where the agent is started.
#![warn(missing_docs)]

pub mod config;
pub mod linux;
pub mod ngstore;
pub mod notify;
pub mod sim;
pub mod station;
pub mod store;

pub use config::AgentConfig;
pub use station::{Event, PartRecord, Report, Station, StationHandle, StationSettings};
