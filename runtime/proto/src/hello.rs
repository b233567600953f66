//! The versioned handshake.

use heapless::String;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::names::{bounded, BoardName, CpuModel, VersionString};
use crate::{MAGIC, MAX_CHUNK, PROTOCOL_VERSION};

/// What the host says first ([`Request::Hello`](crate::Request::Hello)).
///
/// `magic` and `protocol` lead and are frozen; fields may only be added at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct HostHello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// The host's [`PROTOCOL_VERSION`].
    pub protocol: u16,
    /// The host tool's release.
    pub host_version: VersionString,
}

impl HostHello {
    /// This build's hello.
    pub fn new(host_version: &str) -> Self {
        HostHello {
            magic: MAGIC,
            protocol: PROTOCOL_VERSION,
            host_version: bounded(host_version),
        }
    }

    /// Called by the agent: can it talk to this host?
    pub fn check_compatible(&self) -> Result<(), Error> {
        check(self.magic, self.protocol, PROTOCOL_VERSION)
    }
}

/// What the CPU of the board is.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CpuInfo {
    /// Architecture (`aarch64`, `armv7`).
    pub arch: String<16>,
    /// Core model (`Cortex-A76`), empty if unknown.
    pub model: CpuModel,
    /// Online cores.
    pub cores: u16,
}

/// The agent's answer to [`Request::Hello`](crate::Request::Hello), sent even when the versions
/// differ so that the host can say which side to update.
///
/// `magic` and `protocol` lead and are frozen; fields may only be added at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AgentHello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// The agent's [`PROTOCOL_VERSION`].
    pub protocol: u16,
    /// The agent's release.
    pub agent_version: VersionString,
    /// The board profile the agent runs with (`rpi5`).
    pub board: BoardName,
    /// The board's CPU.
    pub cpu: CpuInfo,
    /// Total RAM, KiB.
    pub ram_total_kib: u64,
    /// RAM available at handshake time, KiB.
    pub ram_available_kib: u64,
    /// The tract release the agent runs models with (NNEF loads only in the same or a newer patch).
    pub tract_version: VersionString,
    /// Largest chunk payload the agent accepts, at most [`MAX_CHUNK`].
    pub max_chunk: u32,
}

impl AgentHello {
    /// This build's hello with empty CPU and RAM facts, for the agent to fill in.
    pub fn new(agent_version: &str, board: &str, tract_version: &str) -> Self {
        AgentHello {
            magic: MAGIC,
            protocol: PROTOCOL_VERSION,
            agent_version: bounded(agent_version),
            board: bounded(board),
            cpu: CpuInfo::default(),
            ram_total_kib: 0,
            ram_available_kib: 0,
            tract_version: bounded(tract_version),
            max_chunk: MAX_CHUNK as u32,
        }
    }

    /// Called by the host: can it talk to this agent?
    pub fn check_compatible(&self) -> Result<(), Error> {
        check(self.magic, PROTOCOL_VERSION, self.protocol)
    }

    /// The chunk payload size the host should use: the agent's limit, within `1..=MAX_CHUNK`.
    pub fn chunk_limit(&self) -> usize {
        (self.max_chunk as usize).clamp(1, MAX_CHUNK)
    }
}

fn check(magic: [u8; 4], host: u16, agent: u16) -> Result<(), Error> {
    if magic != MAGIC {
        Err(Error::BadMagic)
    } else if host != agent {
        Err(Error::VersionMismatch { host, agent })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_version_is_compatible() {
        assert_eq!(HostHello::new("0.1.0").check_compatible(), Ok(()));
        assert_eq!(
            AgentHello::new("0.1.0", "rpi5", "0.23.9").check_compatible(),
            Ok(())
        );
    }

    #[test]
    fn mismatch_names_both_sides() {
        let mut agent = AgentHello::new("0.2.0", "rpi5", "0.23.9");
        agent.protocol = PROTOCOL_VERSION + 1;
        let err = agent.check_compatible().unwrap_err();
        assert_eq!(
            err,
            Error::VersionMismatch {
                host: PROTOCOL_VERSION,
                agent: PROTOCOL_VERSION + 1
            }
        );
        let text = std::format!("{err}");
        let both = std::format!(
            "host speaks v{PROTOCOL_VERSION}, agent speaks v{}",
            PROTOCOL_VERSION + 1
        );
        assert!(text.contains(&both), "{text}");

        let mut host = HostHello::new("0.0.9");
        host.protocol = 0;
        assert_eq!(
            host.check_compatible(),
            Err(Error::VersionMismatch {
                host: 0,
                agent: PROTOCOL_VERSION
            })
        );
    }

    #[test]
    fn bad_magic() {
        let mut host = HostHello::new("0.1.0");
        host.magic = *b"SSH-";
        assert_eq!(host.check_compatible(), Err(Error::BadMagic));
    }

    #[test]
    fn chunk_limit_is_clamped() {
        let mut agent = AgentHello::new("0.1.0", "rpi4", "0.23.9");
        assert_eq!(agent.chunk_limit(), MAX_CHUNK);
        agent.max_chunk = 4096;
        assert_eq!(agent.chunk_limit(), 4096);
        agent.max_chunk = 0;
        assert_eq!(agent.chunk_limit(), 1);
        agent.max_chunk = u32::MAX;
        assert_eq!(agent.chunk_limit(), MAX_CHUNK);
    }
}
