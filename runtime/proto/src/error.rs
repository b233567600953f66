//! Errors: the wire [`Error`] an agent answers with, and the local framing errors.

use core::fmt;

use heapless::String;
use serde::{Deserialize, Serialize};

use crate::names::{bounded, FilePath};
use crate::MAX_ERROR_MESSAGE;

/// Short human-readable detail carried by some [`Error`]s (truncated to [`MAX_ERROR_MESSAGE`]).
pub type ErrorMessage = String<MAX_ERROR_MESSAGE>;

/// Why a request failed, as it crosses the wire (the `Err` of a final response).
///
/// Variant 0 (`VersionMismatch`) is frozen across protocol versions; see the crate docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Error {
    /// Host and agent speak different protocol versions.
    VersionMismatch {
        /// The host's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
        host: u16,
        /// The agent's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
        agent: u16,
    },
    /// The peer's hello did not start with [`MAGIC`](crate::MAGIC): not an edgevlm endpoint.
    BadMagic,
    /// The model, upload, run or request named does not exist.
    NotFound,
    /// A model name or package file path is not acceptable (see
    /// [`validate_model_name`](crate::validate_model_name),
    /// [`validate_file_path`](crate::validate_file_path)).
    InvalidName,
    /// A chunk's CRC-32 did not match its data; resend it.
    ChecksumMismatch {
        /// Offset of the rejected chunk.
        offset: u64,
    },
    /// A staged file's SHA-256 differs from the one announced at upload start.
    DigestMismatch {
        /// The file inside the package.
        file: FilePath,
    },
    /// A chunk did not start where the verified data ends; resume from `expected`.
    OutOfOrder {
        /// The first byte the agent has not verified yet.
        expected: u64,
    },
    /// Commit of a package with a file not fully uploaded.
    Incomplete {
        /// The file inside the package.
        file: FilePath,
        /// Bytes verified so far.
        verified: u64,
        /// The file's announced size.
        size: u64,
    },
    /// Not enough storage on the board.
    NoSpace {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// A value exceeds what the agent accepts (chunk size, file size, model count).
    TooLarge {
        /// The agent's limit.
        max: u64,
    },
    /// The agent is busy with work that excludes this request (e.g. a benchmark holds the model).
    Busy,
    /// The request was cancelled by [`Request::Cancel`](crate::Request::Cancel).
    Cancelled,
    /// This agent does not support the request (e.g. a model kind it cannot run).
    Unsupported,
    /// The package is malformed (bad `model.toml`, missing file, ...).
    InvalidPackage(ErrorMessage),
    /// An I/O error on the board.
    Io(ErrorMessage),
    /// A bug or unexpected state in the agent.
    Internal(ErrorMessage),
}

impl Error {
    /// [`Error::Io`] with `msg` truncated to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn io(msg: &str) -> Self {
        Error::Io(bounded(msg))
    }

    /// [`Error::Internal`] with `msg` truncated to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn internal(msg: &str) -> Self {
        Error::Internal(bounded(msg))
    }

    /// [`Error::InvalidPackage`] with `msg` truncated to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn invalid_package(msg: &str) -> Self {
        Error::InvalidPackage(bounded(msg))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::VersionMismatch { host, agent } => write!(
                f,
                "protocol version mismatch: host speaks v{host}, agent speaks v{agent}; \
                 install the same edgevlm release on both sides"
            ),
            Error::BadMagic => f.write_str("peer is not an edgevlm endpoint (bad handshake magic)"),
            Error::NotFound => f.write_str("not found"),
            Error::InvalidName => f.write_str("invalid model name or package path"),
            Error::ChecksumMismatch { offset } => {
                write!(f, "chunk checksum mismatch at offset {offset}")
            }
            Error::DigestMismatch { file } => write!(f, "sha256 mismatch for {file}"),
            Error::OutOfOrder { expected } => {
                write!(f, "chunk out of order: agent expects offset {expected}")
            }
            Error::Incomplete {
                file,
                verified,
                size,
            } => write!(f, "{file} incomplete: {verified} of {size} bytes uploaded"),
            Error::NoSpace { needed, available } => write!(
                f,
                "no space on the board: {needed} bytes needed, {available} available"
            ),
            Error::TooLarge { max } => write!(f, "too large: the agent accepts at most {max}"),
            Error::Busy => f.write_str("agent busy"),
            Error::Cancelled => f.write_str("cancelled"),
            Error::Unsupported => f.write_str("not supported by this agent"),
            Error::InvalidPackage(msg) => write!(f, "invalid model package: {msg}"),
            Error::Io(msg) => write!(f, "I/O error on the board: {msg}"),
            Error::Internal(msg) => write!(f, "agent internal error: {msg}"),
        }
    }
}

impl core::error::Error for Error {}

#[cfg(feature = "std")]
impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        use std::string::ToString;
        Error::io(&err.to_string())
    }
}

/// A frame that could not be turned into a message. The decoder has already resynchronized:
/// keep feeding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// The frame outgrew the decoder's buffer; its bytes were dropped up to the next delimiter.
    Oversize {
        /// The decoder's buffer size (largest frame, delimiter included).
        limit: usize,
    },
    /// The frame is not valid COBS or not a valid message: corrupted, truncated, garbage
    /// between frames, or a peer speaking another protocol version.
    Decode,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Oversize { limit } => {
                write!(f, "frame larger than {limit} bytes dropped")
            }
            FrameError::Decode => f.write_str("undecodable frame dropped"),
        }
    }
}

impl core::error::Error for FrameError {}

/// A message that could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError {
    /// The caller's buffer is too small; [`MAX_FRAME`](crate::MAX_FRAME) bytes always suffice.
    BufferTooSmall,
    /// The frame would exceed [`MAX_FRAME`](crate::MAX_FRAME), so the peer would drop it.
    TooLarge {
        /// Encoded length, delimiter included.
        len: usize,
    },
    /// postcard refused the value (not expected for the types of this crate).
    Serialize,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall => f.write_str("frame buffer too small"),
            EncodeError::TooLarge { len } => write!(
                f,
                "frame of {len} bytes exceeds the {} byte limit",
                crate::MAX_FRAME
            ),
            EncodeError::Serialize => f.write_str("message could not be serialized"),
        }
    }
}

impl core::error::Error for EncodeError {}
