//! Envelopes, requests, responses and events.

use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::crc::Crc32;
use crate::error::Error;
use crate::hello::{AgentHello, HostHello};
use crate::names::{FilePath, ModelName, VersionString};
use crate::trace::{BenchSummary, TraceBatch};
use crate::{MAX_CHUNK, MAX_MODELS};

/// SHA-256 digest of a file.
pub type Sha256 = [u8; 32];

/// Chosen by the host, unique among its requests in flight; the agent tags every event and the
/// final response of a request with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RequestId(pub u32);

/// Chosen by the agent for a staged upload of one file ([`Response::Upload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UploadId(pub u32);

/// Chosen by the agent for a benchmark run; names its traces in [`Request::FetchTraces`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RunId(pub u32);

/// Host → agent. The field order is frozen (see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct HostMessage {
    /// Tags everything the agent sends back about this request.
    pub id: RequestId,
    /// What to do.
    pub request: Request,
}

/// Agent → host. Variant 0 and the field order are frozen (see the crate docs).
#[allow(
    clippy::large_enum_variant,
    reason = "no_std without alloc: a message is a fixed-capacity value, as large as its largest variant"
)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AgentMessage {
    /// The final answer to request `id`: nothing more comes for it.
    Response {
        /// The request answered.
        id: RequestId,
        /// Its outcome.
        result: Result<Response, Error>,
    },
    /// Progress of request `id`, which is still running.
    Event {
        /// The request this belongs to.
        id: RequestId,
        /// What happened.
        event: Event,
    },
}

impl AgentMessage {
    /// The request this message is about.
    pub fn id(&self) -> RequestId {
        match self {
            AgentMessage::Response { id, .. } | AgentMessage::Event { id, .. } => *id,
        }
    }

    /// Whether this ends its request (a response, as opposed to an event).
    pub fn is_final(&self) -> bool {
        matches!(self, AgentMessage::Response { .. })
    }
}

/// What the host asks of the agent. Each comment names the `Ok` answer.
#[allow(
    clippy::large_enum_variant,
    reason = "no_std without alloc: a message is a fixed-capacity value, as large as its largest variant"
)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Request {
    /// Handshake, first on every link (frozen as variant 0). → [`Response::Hello`], always.
    Hello(HostHello),
    /// Installed models. → [`Response::Models`]
    ListModels,
    /// Stage one file of a package for upload, or find the staged upload of the same file, size
    /// and digest and resume it. → [`Response::Upload`]
    BeginUpload(UploadSpec),
    /// Progress of a staged upload, e.g. after a broken link. → [`Response::Upload`]
    UploadStatus {
        /// The package.
        model: ModelName,
        /// The file inside it.
        file: FilePath,
    },
    /// Data for a staged upload, in order. → [`Response::Upload`]
    PushChunk(Chunk),
    /// Verify every staged file of the package (size, SHA-256, manifest) and install it
    /// atomically, replacing an installed package of that name. → [`Response::Committed`]
    Commit {
        /// The package.
        model: ModelName,
    },
    /// Make an installed model the one the inspection loop runs. → [`Response::Done`]
    Activate {
        /// The model.
        model: ModelName,
    },
    /// Delete an installed model and anything staged for it. → [`Response::Done`]
    Remove {
        /// The model.
        model: ModelName,
    },
    /// Benchmark a model: streams [`Event::Trace`] batches, then → [`Response::BenchDone`]
    RunBenchmark(BenchSpec),
    /// Replay the traces the agent kept of a run (the latest if `None`): streams
    /// [`Event::Trace`] batches, then → [`Response::TracesDone`]
    FetchTraces {
        /// The run.
        run: Option<RunId>,
    },
    /// Stop request `id`, which then ends with [`Error::Cancelled`]. → [`Response::Done`], or
    /// [`Error::NotFound`] if `id` is not running.
    Cancel {
        /// The request to stop.
        id: RequestId,
    },
}

/// The `Ok` outcome of a request.
#[allow(
    clippy::large_enum_variant,
    reason = "no_std without alloc: a message is a fixed-capacity value, as large as its largest variant"
)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Response {
    /// The agent's handshake (frozen as variant 0).
    Hello(AgentHello),
    /// Done, nothing to report.
    Done,
    /// Installed models.
    Models(Vec<ModelInfo, MAX_MODELS>),
    /// State of a staged upload.
    Upload(UploadProgress),
    /// The package is installed.
    Committed(ModelInfo),
    /// The benchmark finished.
    BenchDone(BenchSummary),
    /// All kept traces of the run were sent.
    TracesDone {
        /// The run replayed.
        run: RunId,
        /// Batches sent.
        batches: u32,
    },
}

/// Something that happened while a request runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Event {
    /// Trace events of a benchmark run.
    Trace(TraceBatch),
}

/// An installed model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ModelInfo {
    /// Its name.
    pub name: ModelName,
    /// The version its manifest declares.
    pub version: VersionString,
    /// Files in the package.
    pub files: u16,
    /// Bytes of all files.
    pub bytes: u64,
    /// SHA-256 of its `model.toml`: the host skips a push of an identical package.
    pub manifest_sha256: Sha256,
    /// Whether the inspection loop runs it.
    pub active: bool,
}

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UploadSpec {
    /// The package.
    pub model: ModelName,
    /// The file inside it.
    pub file: FilePath,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, checked on [`Request::Commit`].
    pub sha256: Sha256,
}

/// How far a staged upload got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UploadProgress {
    /// The upload, for [`Chunk::upload`].
    pub upload: UploadId,
    /// The file's size.
    pub size: u64,
    /// Bytes `0..verified` are staged with good checksums: the next chunk starts here.
    pub verified: u64,
}

impl UploadProgress {
    /// Whether every byte is staged.
    pub fn is_complete(&self) -> bool {
        self.verified >= self.size
    }
}

/// Part of a staged upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Chunk {
    /// The upload.
    pub upload: UploadId,
    /// Where `data` goes in the file; must equal the upload's `verified` bytes.
    pub offset: u64,
    /// [`chunk_checksum`] of upload, offset and data.
    #[serde(with = "postcard::fixint::le")]
    pub crc32: u32,
    /// At most [`MAX_CHUNK`] bytes (less if the agent's hello says so).
    pub data: Vec<u8, MAX_CHUNK>,
}

impl Chunk {
    /// A chunk of `data` with its checksum; [`Error::TooLarge`] beyond [`MAX_CHUNK`] bytes.
    pub fn new(upload: UploadId, offset: u64, data: &[u8]) -> Result<Self, Error> {
        let data = Vec::from_slice(data).map_err(|_| Error::TooLarge {
            max: MAX_CHUNK as u64,
        })?;
        Ok(Chunk {
            upload,
            offset,
            crc32: chunk_checksum(upload, offset, &data),
            data,
        })
    }

    /// [`Error::ChecksumMismatch`] unless the checksum matches.
    pub fn verify(&self) -> Result<(), Error> {
        if chunk_checksum(self.upload, self.offset, &self.data) == self.crc32 {
            Ok(())
        } else {
            Err(Error::ChecksumMismatch {
                offset: self.offset,
            })
        }
    }

    /// The offset just past this chunk's data.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.data.len() as u64)
    }
}

/// CRC-32 of the little-endian upload id, the little-endian offset and the data: a chunk
/// delivered to the wrong upload or offset fails like a corrupted one.
pub fn chunk_checksum(upload: UploadId, offset: u64, data: &[u8]) -> u32 {
    let mut crc = Crc32::new();
    crc.update(&upload.0.to_le_bytes());
    crc.update(&offset.to_le_bytes());
    crc.update(data);
    crc.finish()
}

/// What to benchmark and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BenchSpec {
    /// An installed model.
    pub model: ModelName,
    /// Untimed iterations first.
    pub warmup: u32,
    /// Timed iterations.
    pub iterations: u32,
    /// What to feed it.
    pub input: BenchInput,
    /// Tokens to generate per iteration for language models; 0 for the model's default.
    pub max_new_tokens: u32,
    /// What to trace.
    pub trace: TraceOptions,
}

/// Input of a benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BenchInput {
    /// Deterministic synthetic input of the model's shape.
    Synthetic {
        /// Generator seed.
        seed: u64,
    },
    /// A file shipped in the model package (an image, a prompt).
    PackageFile(FilePath),
}

/// Which trace events a benchmark streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TraceOptions {
    /// Stage spans.
    pub spans: bool,
    /// Per-token timings (language models).
    pub tokens: bool,
    /// Period of [`MemorySample`](crate::MemorySample)s in ms, 0 for none (default 10).
    pub memory_interval_ms: u16,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            spans: true,
            tokens: true,
            memory_interval_ms: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_checksum_detects_corruption() {
        let data = [7u8; 100];
        let chunk = Chunk::new(UploadId(3), 4096, &data).unwrap();
        assert_eq!(chunk.verify(), Ok(()));
        assert_eq!(chunk.end(), 4196);

        let mut flipped = chunk.clone();
        flipped.data[50] ^= 0x10;
        assert_eq!(
            flipped.verify(),
            Err(Error::ChecksumMismatch { offset: 4096 })
        );

        let mut moved = chunk.clone();
        moved.offset = 8192;
        assert_eq!(
            moved.verify(),
            Err(Error::ChecksumMismatch { offset: 8192 })
        );

        let mut other_upload = chunk;
        other_upload.upload = UploadId(4);
        assert!(other_upload.verify().is_err());
    }

    #[test]
    fn chunk_checksum_is_crc32_of_header_and_data() {
        let mut bytes = std::vec::Vec::new();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(b"123456789");
        assert_eq!(
            chunk_checksum(UploadId(1), 2, b"123456789"),
            crate::crc32(&bytes)
        );
    }

    #[test]
    fn oversized_chunk_is_refused() {
        let data = std::vec![0u8; MAX_CHUNK + 1];
        assert_eq!(
            Chunk::new(UploadId(1), 0, &data),
            Err(Error::TooLarge {
                max: MAX_CHUNK as u64
            })
        );
        assert!(Chunk::new(UploadId(1), 0, &data[..MAX_CHUNK]).is_ok());
    }
}
