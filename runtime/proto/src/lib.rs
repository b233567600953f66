//! The edgevlm wire protocol, shared by the host tool and the board agent.
//!
//! `#![no_std]`, no allocation: every wire type is bounded (heapless 0.9) and every limit is a
//! constant below. Messages are postcard, framed with COBS and a `0x00` delimiter
//! ([`frame::encode`], [`frame::Decoder`]).
//!
//! # Conversation
//! The host sends [`HostMessage`]s (a [`Request`] tagged with a host-chosen [`RequestId`]); the
//! agent answers with [`AgentMessage`]s: zero or more [`Event`]s for that id, then exactly one
//! final `Response` (`Ok(`[`Response`]`)` or a typed wire [`Error`]). Requests may overlap (a
//! benchmark streams while chunks are pushed); [`Request::Cancel`] names the id to stop, and the
//! cancelled request then ends with [`Error::Cancelled`].
//!
//! The first request is [`Request::Hello`]; the agent always answers with its [`AgentHello`], and
//! each side calls `check_compatible()` on the other's hello, which turns a version mismatch into
//! [`Error::VersionMismatch`] instead of misreading later frames.
//!
//! # Compatibility rules
//! Frozen across protocol versions so that the handshake itself never breaks: variant 0 of
//! [`Request`] (`Hello`), of [`AgentMessage`] (`Response`), of [`Response`] (`Hello`) and of
//! [`Error`] (`VersionMismatch`), the field order of the [`HostMessage`] / [`AgentMessage`]
//! envelopes, and the leading `magic`, `protocol` fields of both hellos. Hellos may only grow at
//! the end (postcard ignores trailing bytes). Any other change bumps [`PROTOCOL_VERSION`].
//!
//! # Features
//! - `std` (default): `std` conveniences ([`frame::encode_to_vec`], `From<std::io::Error>`).
//! - `defmt`: `defmt::Format` on every wire type.
#![no_std]
#![warn(missing_docs)]
#![allow(
    clippy::result_large_err,
    reason = "no_std without alloc: the wire Error carries its message inline and cannot be boxed"
)]

#[cfg(any(feature = "std", test))]
extern crate std;

mod bytes;
mod crc;
mod error;
pub mod frame;
mod hello;
mod message;
mod names;
mod trace;

pub use crc::{crc32, Crc32};
pub use error::{EncodeError, Error, ErrorMessage, FrameError};
pub use frame::{encode, Decoder, Message};
pub use hello::{AgentHello, CpuInfo, HostHello};
pub use message::{
    chunk_checksum, AgentMessage, BenchInput, BenchSpec, Chunk, Event, FileSpec, HostMessage,
    ModelInfo, ModelRef, Request, RequestId, Response, RunId, Sha256, TraceOptions, UploadId,
    UploadSpec, UploadState,
};
pub use names::{
    bounded, file_path, model_name, validate_file_path, validate_model_name, BoardName, CpuModel,
    FilePath, ModelName, NodeName, StageName, VersionString,
};
pub use trace::{
    BenchSummary, IterationDone, LatencyStats, LoadSource, MemorySample, NodeTiming, StageSpan,
    TokenStats, TokenTiming, TraceBatch, TraceEvent,
};

/// Version of this protocol. Both sides must speak the same one (see the crate docs).
/// 2: [`BenchSummary::load_source`].
pub const PROTOCOL_VERSION: u16 = 2;

/// First four bytes of both hellos: tells an edgevlm peer from anything else on the link.
pub const MAGIC: [u8; 4] = *b"EVLM";

/// Largest payload of one [`Chunk`] (32 KiB). An agent may ask for less in
/// [`AgentHello::max_chunk`].
pub const MAX_CHUNK: usize = 32 * 1024;

/// Largest postcard encoding of any message: a full chunk plus room for its header. Every wire
/// type is bounded so that its worst case fits (checked by the tests).
pub const MAX_MESSAGE: usize = MAX_CHUNK + 1024;

/// Largest frame on the wire: [`MAX_MESSAGE`] after COBS, with its `0x00` delimiter. Also the
/// default buffer size of [`Decoder`] and the buffer size [`frame::encode`] callers should use.
pub const MAX_FRAME: usize = frame::max_frame_len(MAX_MESSAGE);

/// Longest model name, in bytes.
pub const MAX_MODEL_NAME: usize = 48;

/// Longest path of a file inside a model package (`/`-separated), in bytes.
pub const MAX_FILE_PATH: usize = 96;

/// Most models one [`Response::Models`] lists; the agent's store holds at most this many.
pub const MAX_MODELS: usize = 64;

/// Most trace events in one [`TraceBatch`].
pub const MAX_TRACE_BATCH: usize = 64;

/// Longest pipeline stage name in a [`StageSpan`], in bytes.
pub const MAX_STAGE_NAME: usize = 24;

/// Longest version string (agent, host, tract, model), in bytes.
pub const MAX_VERSION: usize = 24;

/// Longest board profile name, in bytes.
pub const MAX_BOARD_NAME: usize = 32;

/// Longest CPU model string, in bytes.
pub const MAX_CPU_MODEL: usize = 48;

/// Longest message carried by [`Error::Io`], [`Error::Internal`] and [`Error::InvalidPackage`],
/// in bytes; longer ones are truncated.
pub const MAX_ERROR_MESSAGE: usize = 200;

/// Most files in one package upload.
pub const MAX_PACKAGE_FILES: usize = 32;

/// Longest benchmark prompt, bytes.
pub const MAX_PROMPT: usize = 512;

/// Largest encoded image sent inline with a benchmark request ([`BenchInput::Image`]).
pub const MAX_INLINE_INPUT: usize = 24 * 1024;

/// Longest graph node name in a [`NodeTiming`].
pub const MAX_NODE_NAME: usize = 48;
