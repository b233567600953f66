//! Bounded strings and the name rules both sides enforce.
//!
//! Names arrive as plain strings so that a bad one gets a typed [`Error::InvalidName`] answer
//! rather than an undecodable frame; the agent must call the `validate_*` functions before it
//! touches the filesystem with them.

use heapless::String;

use crate::error::Error;
use crate::{
    MAX_BOARD_NAME, MAX_CPU_MODEL, MAX_FILE_PATH, MAX_MODEL_NAME, MAX_NODE_NAME, MAX_STAGE_NAME,
    MAX_VERSION,
};

/// A model name: `[A-Za-z0-9._-]`, not starting with `.` or `-`, at most [`MAX_MODEL_NAME`] bytes.
pub type ModelName = String<MAX_MODEL_NAME>;
/// A file inside a model package: `/`-separated components that are each valid model names, at
/// most [`MAX_FILE_PATH`] bytes (`model.toml`, `vision/encoder.onnx`).
pub type FilePath = String<MAX_FILE_PATH>;
/// A pipeline stage name in a trace (`preprocess`, `vision_encoder`, `decode`).
pub type StageName = String<MAX_STAGE_NAME>;
/// A graph node name in a trace.
pub type NodeName = String<MAX_NODE_NAME>;
/// A version string (`0.1.0`, `0.23.9`).
pub type VersionString = String<MAX_VERSION>;
/// A board profile name (`rpi5`, `jetson-orin-nano`).
pub type BoardName = String<MAX_BOARD_NAME>;
/// A CPU model string (`Cortex-A76`).
pub type CpuModel = String<MAX_CPU_MODEL>;

/// `s` as a bounded string, truncated at a character boundary if longer than `N` bytes.
pub fn bounded<const N: usize>(s: &str) -> String<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::new();
    // Cannot fail: `end <= N`.
    let _ = out.push_str(&s[..end]);
    out
}

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && !c.starts_with(['.', '-'])
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a model name (see [`ModelName`]).
pub fn validate_model_name(s: &str) -> Result<(), Error> {
    if s.len() <= MAX_MODEL_NAME && valid_component(s) {
        Ok(())
    } else {
        Err(Error::InvalidName)
    }
}

/// Checks a package file path (see [`FilePath`]): relative, no empty, `.` or `..` components.
pub fn validate_file_path(s: &str) -> Result<(), Error> {
    if s.len() <= MAX_FILE_PATH && s.split('/').all(valid_component) {
        Ok(())
    } else {
        Err(Error::InvalidName)
    }
}

/// A validated [`ModelName`].
pub fn model_name(s: &str) -> Result<ModelName, Error> {
    validate_model_name(s)?;
    Ok(bounded(s))
}

/// A validated [`FilePath`].
pub fn file_path(s: &str) -> Result<FilePath, Error> {
    validate_file_path(s)?;
    Ok(bounded(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        for ok in ["yolov8n", "smolvlm-256m.int8", "a", "A_b-c.d", "9"] {
            assert_eq!(validate_model_name(ok), Ok(()), "{ok}");
        }
        let long = "x".repeat(MAX_MODEL_NAME + 1);
        for bad in [
            "", ".", "..", ".hidden", "-rf", "a/b", "a b", "é", "a\0", &long,
        ] {
            assert_eq!(validate_model_name(bad), Err(Error::InvalidName), "{bad:?}");
        }
        assert_eq!(model_name("yolo").unwrap().as_str(), "yolo");
    }

    #[test]
    fn file_paths() {
        for ok in ["model.toml", "vision/encoder.onnx", "a/b/c"] {
            assert_eq!(validate_file_path(ok), Ok(()), "{ok}");
        }
        let long = "x".repeat(MAX_FILE_PATH + 1);
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "a/",
            "../x",
            "a/../b",
            "./a",
            "a/.",
            "a\\b",
            &long,
        ] {
            assert_eq!(validate_file_path(bad), Err(Error::InvalidName), "{bad:?}");
        }
    }

    #[test]
    fn bounded_truncates_on_char_boundary() {
        let s: String<4> = bounded("abcdef");
        assert_eq!(s.as_str(), "abcd");
        // "é" is two bytes: three bytes of "aéé" end inside the second one.
        let s: String<4> = bounded("aéé");
        assert_eq!(s.as_str(), "aé");
        let s: String<4> = bounded("");
        assert_eq!(s.as_str(), "");
    }
}
