//! Envelopes, requests, responses and events.

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

use crate::crc::Crc32;
use crate::error::Error;
use crate::hello::{AgentHello, HostHello};
use crate::names::{FilePath, ModelName, VersionString};
use crate::trace::{BenchSummary, TraceBatch};
use crate::{MAX_CHUNK, MAX_INLINE_INPUT, MAX_MODELS, MAX_PACKAGE_FILES, MAX_PROMPT};

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
    /// Stage a package version for upload, or find the staged upload of the same package (same
    /// name, version and files) and report how far each file got, so the host resumes there.
    /// → [`Response::Upload`]
    BeginUpload(UploadSpec),
    /// Data for one file of a staged upload, in order. → [`Response::ChunkAccepted`]
    PushChunk(Chunk),
    /// Verify every staged file (size, SHA-256, manifest) and install the package version
    /// atomically. → [`Response::Committed`]
    Commit {
        /// The upload.
        upload: UploadId,
    },
    /// Make an installed model version the one the inspection loop runs; the previously active
    /// one is kept for [`Request::Rollback`]. → [`Response::Done`]
    Activate(ModelRef),
    /// Re-activate the previously active model version. → [`Response::Done`]
    Rollback,
    /// Delete an installed model version ([`Error::Busy`] for the active one). → [`Response::Done`]
    Remove(ModelRef),
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

/// A model version on the board.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ModelRef {
    /// The model name (`[model] name` of its manifest).
    pub name: ModelName,
    /// Its version (`[model] version`).
    pub version: VersionString,
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
    Upload(UploadState),
    /// A chunk is staged and verified.
    ChunkAccepted {
        /// Index of the file in the upload's [`UploadSpec::files`].
        file: u16,
        /// Bytes of that file verified so far: the next chunk starts here.
        verified: u64,
    },
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
    /// Whether it is the version [`Request::Rollback`] would re-activate.
    pub previous: bool,
}

/// One file of a package upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FileSpec {
    /// Path inside the package (`model.toml`, `vision/encoder.onnx`).
    pub path: FilePath,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, checked on [`Request::Commit`].
    pub sha256: Sha256,
}

/// A package version to upload: every file is announced up front, so the agent can check free
/// space once and resume each file where its verified data ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UploadSpec {
    /// The package's model name and version (must match its `model.toml`).
    pub model: ModelRef,
    /// Its files, `model.toml` among them.
    pub files: Vec<FileSpec, MAX_PACKAGE_FILES>,
}

/// How far a staged upload got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UploadState {
    /// The upload, for [`Chunk::upload`] and [`Request::Commit`].
    pub upload: UploadId,
    /// Per file of the [`UploadSpec`], in its order: bytes `0..verified` are staged and
    /// verified, so the next chunk of that file starts there.
    pub verified: Vec<u64, MAX_PACKAGE_FILES>,
}

/// Part of one file of a staged upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Chunk {
    /// The upload.
    pub upload: UploadId,
    /// Index of the file in the upload's [`UploadSpec::files`].
    pub file: u16,
    /// Where `data` goes in the file; must equal that file's verified bytes.
    pub offset: u64,
    /// [`chunk_checksum`] of upload, file, offset and data.
    #[serde(with = "postcard::fixint::le")]
    pub crc32: u32,
    /// At most [`MAX_CHUNK`] bytes (less if the agent's hello says so).
    #[serde(with = "crate::bytes")]
    pub data: Vec<u8, MAX_CHUNK>,
}

impl Chunk {
    /// A chunk of `data` with its checksum; [`Error::TooLarge`] beyond [`MAX_CHUNK`] bytes.
    pub fn new(upload: UploadId, file: u16, offset: u64, data: &[u8]) -> Result<Self, Error> {
        let data = Vec::from_slice(data).map_err(|_| Error::TooLarge {
            max: MAX_CHUNK as u64,
        })?;
        Ok(Chunk {
            upload,
            file,
            offset,
            crc32: chunk_checksum(upload, file, offset, &data),
            data,
        })
    }

    /// [`Error::ChecksumMismatch`] unless the checksum matches.
    pub fn verify(&self) -> Result<(), Error> {
        if chunk_checksum(self.upload, self.file, self.offset, &self.data) == self.crc32 {
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

/// CRC-32 of the little-endian upload id, file index and offset, then the data: a chunk
/// delivered to the wrong upload, file or offset fails like a corrupted one.
pub fn chunk_checksum(upload: UploadId, file: u16, offset: u64, data: &[u8]) -> u32 {
    let mut crc = Crc32::new();
    crc.update(&upload.0.to_le_bytes());
    crc.update(&file.to_le_bytes());
    crc.update(&offset.to_le_bytes());
    crc.update(data);
    crc.finish()
}

/// What to benchmark and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BenchSpec {
    /// An installed model version.
    pub model: ModelRef,
    /// Untimed iterations first.
    pub warmup: u32,
    /// Timed iterations (at least this many).
    pub iterations: u32,
    /// Keep running timed iterations until this much time has passed, ms (0: no minimum).
    pub min_duration_ms: u32,
    /// Intra-op threads for the model (0 or 1: one thread).
    pub threads: u16,
    /// What to feed it.
    pub input: BenchInput,
    /// A prompt for language models (empty: the package's default).
    pub prompt: String<MAX_PROMPT>,
    /// Tokens to generate per iteration for language models; 0 for the model's default.
    pub max_new_tokens: u32,
    /// What to trace.
    pub trace: TraceOptions,
}

/// Input of a benchmark.
#[allow(
    clippy::large_enum_variant,
    reason = "no_std without alloc: a message is a fixed-capacity value, as large as its largest variant"
)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BenchInput {
    /// Deterministic synthetic tensors of the model's input shapes, fed straight to the graph.
    Synthetic {
        /// Generator seed.
        seed: u64,
    },
    /// An image file shipped in the model package, run through the whole pipeline
    /// (decode, preprocess, infer, postprocess).
    PackageFile(FilePath),
    /// An encoded image (JPEG / PNG) sent with the request, run through the whole pipeline.
    Image(#[serde(with = "crate::bytes")] Vec<u8, MAX_INLINE_INPUT>),
}

/// Which trace events a benchmark streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TraceOptions {
    /// Stage spans and per-iteration events.
    pub spans: bool,
    /// Per-token timings (language models).
    pub tokens: bool,
    /// Period of [`MemorySample`](crate::MemorySample)s in ms, 0 for none (default 10).
    pub memory_interval_ms: u16,
    /// Profile graph nodes and report the `N` slowest as [`NodeTiming`](crate::NodeTiming)
    /// events after the run (0: no per-node profile, which also keeps its overhead out).
    pub top_nodes: u16,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            spans: true,
            tokens: true,
            memory_interval_ms: 10,
            top_nodes: 10,
        }
    }
}

impl TraceOptions {
    /// Nothing traced: only the final [`BenchSummary`](crate::BenchSummary).
    pub const NONE: TraceOptions = TraceOptions {
        spans: false,
        tokens: false,
        memory_interval_ms: 0,
        top_nodes: 0,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_checksum_detects_corruption() {
        let data = [7u8; 100];
        let chunk = Chunk::new(UploadId(3), 0, 4096, &data).unwrap();
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

        let mut other_file = chunk.clone();
        other_file.file = 1;
        assert!(other_file.verify().is_err());

        let mut other_upload = chunk;
        other_upload.upload = UploadId(4);
        assert!(other_upload.verify().is_err());
    }

    #[test]
    fn chunk_checksum_is_crc32_of_header_and_data() {
        let mut bytes = std::vec::Vec::new();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&5u16.to_le_bytes());
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(b"123456789");
        assert_eq!(
            chunk_checksum(UploadId(1), 5, 2, b"123456789"),
            crate::crc32(&bytes)
        );
    }

    #[test]
    fn oversized_chunk_is_refused() {
        let data = std::vec![0u8; MAX_CHUNK + 1];
        assert_eq!(
            Chunk::new(UploadId(1), 0, 0, &data),
            Err(Error::TooLarge {
                max: MAX_CHUNK as u64
            })
        );
        assert!(Chunk::new(UploadId(1), 0, 0, &data[..MAX_CHUNK]).is_ok());
    }
}
