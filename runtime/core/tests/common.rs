//! Shared helpers for the runtime's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository's `models/` folder.
pub fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// Copies a directory tree (no symlinks) so a test can damage its copy.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `models/fixtures/fixtures.toml`: the committed fixture graphs and their ONNX Runtime
/// references (models/gen/generate.py).
#[derive(serde::Deserialize)]
pub struct Index {
    /// The fixtures, in file order.
    pub fixture: Vec<Fixture>,
}

/// One fixture graph: its inputs and ORT's outputs as `.npy` files, and the tolerance.
#[derive(serde::Deserialize)]
pub struct Fixture {
    /// Short name, used in messages.
    pub name: String,
    /// The graph, relative to `models/fixtures`.
    pub model: String,
    /// What the graph exercises.
    pub description: String,
    /// Largest absolute difference from ONNX Runtime's outputs allowed.
    pub atol: f32,
    /// Input name to `.npy` file, relative to `models/fixtures`.
    pub inputs: std::collections::BTreeMap<String, String>,
    /// Output name to ONNX Runtime's `.npy` file, relative to `models/fixtures`.
    pub outputs: std::collections::BTreeMap<String, String>,
}

/// The fixture index.
pub fn index() -> Index {
    let text = std::fs::read_to_string(models().join("fixtures/fixtures.toml")).unwrap();
    toml::from_str(&text).unwrap()
}
