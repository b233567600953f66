//! The runtime's typed error: every variant names the file, field or tensor it is about.

use std::path::PathBuf;

/// A boxed cause, so tract's error chain survives into `{:#}` printing.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors from loading, validating and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{action} {path}")]
    Io {
        /// What was being done (`reading`, `writing`, ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An ONNX file could not be decoded, parsed or optimized by tract.
    #[error("{path}: {stage}")]
    Model {
        /// The graph file.
        path: PathBuf,
        /// Which load stage failed, e.g. `not a valid ONNX protobuf`.
        stage: String,
        /// tract's cause chain.
        #[source]
        source: Cause,
    },
    /// The graph uses something the runtime refuses to run (it would give wrong results).
    #[error("{path}: {message}")]
    Unsupported {
        /// The graph file.
        path: PathBuf,
        /// What is unsupported and what to do about it.
        message: String,
    },
    /// A field of a TOML or JSON file (`model.toml`, the agent config, a snapshot's
    /// `config.json`) is missing, unknown, mistyped or has an invalid value.
    #[error("{path}: field `{field}`: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Dotted path of the field, e.g. `input.mean`.
        field: String,
        /// What was expected.
        message: String,
    },
    /// A package file does not have the sha256 its manifest declares.
    #[error("{path}: sha256 mismatch: manifest says {expected}, file has {actual}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Hash from the manifest.
        expected: String,
        /// Hash of the bytes on disk.
        actual: String,
    },
    /// An image or camera frame could not be decoded.
    #[error("{source_name}: {message}")]
    Image {
        /// File name or frame description.
        source_name: String,
        /// What is wrong with it.
        message: String,
    },
    /// An input tensor does not fit the model.
    #[error("input `{name}`: {message}")]
    Input {
        /// Model input name.
        name: String,
        /// Expected vs. given.
        message: String,
    },
    /// A `.npy` file is malformed or of an unsupported dtype.
    #[error("{path}: {message}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tokenizer or chat template cannot be loaded or used, or does not fit the model.
    #[error("{path}: {message}")]
    Text {
        /// `tokenizer.json`, the chat template's file, or the package directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A snapshot folder cannot be imported as it is (no such variant, output exists, ...).
    #[error("{path}: {message}")]
    Import {
        /// The snapshot or output folder.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// A prompt does not fit the model's context.
    #[error("prompt of {prompt_tokens} tokens{image_note} plus {new_tokens} new tokens exceeds the context limit of {limit} tokens ({limit_source})")]
    ContextLength {
        /// Tokens in the rendered prompt, image tokens included.
        prompt_tokens: usize,
        /// Text that says how many of them are image tokens, or empty.
        image_note: String,
        /// Tokens requested to generate.
        new_tokens: usize,
        /// The limit.
        limit: usize,
        /// Where the limit comes from.
        limit_source: String,
    },
    /// tract failed while running a loaded model.
    #[error("inference failed")]
    Inference(#[source] Cause),
}

/// An error and its sources joined with ": ", as `edgevlm: {err:#}` prints an anyhow chain;
/// for log lines and wire messages that carry an error as text.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn text(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Text {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn model(
        path: impl Into<PathBuf>,
        stage: impl Into<String>,
        e: impl Into<Cause>,
    ) -> Self {
        Error::Model {
            path: path.into(),
            stage: stage.into(),
            source: e.into(),
        }
    }

    /// A [`Error::Manifest`] error for `field` of the TOML or JSON file at `path`.
    pub fn manifest(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Manifest {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
