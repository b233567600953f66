//! edgevlm board agent: the inspection loop (trigger -> fresh frame -> verdict -> output pins),
//! its configuration, NG image storage and systemd integration; and the protocol server the
//! host tool talks to (model store, benchmarks) over stdio or a serial port.
//!
//! The loop is generic over the `edgevlm-board` traits; concrete devices (simulator, Linux
//! GPIO + V4L2) are chosen where the agent is started.
#![warn(missing_docs)]

pub mod bench;
pub mod config;
pub mod linux;
pub mod ngstore;
pub mod notify;
mod outputs;
pub mod server;
pub mod sim;
pub mod station;
pub mod store;
pub mod sysinfo;

pub use config::AgentConfig;
pub use server::{ServeStats, Server, ServerConfig};
pub use station::{Event, PartRecord, Report, Station, StationHandle, StationSettings};
