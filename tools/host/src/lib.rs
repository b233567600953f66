//! The host side of edgevlm: talk to board agents over SSH, a serial line or a local process,
//! push model packages, run benchmarks on the board, keep the results in SQLite and compare them.
//!
//! - [`inventory`]: the boards file and board URLs (`ssh://`, `serial://`, `local`).
//! - [`transport`]: links to an agent (ssh client process, serial port, local agent process).
//! - [`client`]: the protocol client: handshake, push with resume, models, benchmarks.
//! - [`package`]: a local model package as the host pushes it (files, sizes, digests).
//! - [`record`]: one benchmark run as the host keeps it.
//! - [`db`]: the results database.
//! - [`report`]: comparison tables (Markdown, CSV, JSON).
//! - [`plot`]: comparison plots (SVG and PNG).

pub mod client;
pub mod db;
pub mod inventory;
pub mod package;
pub mod plot;
pub mod record;
pub mod report;
pub mod transport;

pub use record::BenchRecord;
