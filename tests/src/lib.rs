//! Shared fixtures for edgevlm's end-to-end tests: a real OpenSSH server ([`sshd::Sshd`]) and
//! a serial agent process ([`agent::SerialAgent`]). The
//! simulated serial cable lives with the simulated board
//! (`edgevlm_board_sim::serial_line::SerialLine`).
#![warn(missing_docs)]

pub mod agent;
pub mod sshd;
