//! Model packages: a directory with `model.toml` and the graph files it lists, hash-checked.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// The manifest file name inside a package.
pub const MANIFEST: &str = "model.toml";

/// An opened, validated and checksum-verified model package.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    dir: PathBuf,
    manifest: Manifest,
}

impl ModelPackage {
    /// Opens the package in `dir`: parses `model.toml` and verifies every graph file's sha256.
    pub fn open(dir: &Path) -> Result<ModelPackage> {
        let manifest_path = dir.join(MANIFEST);
        if !dir.is_dir() {
            return Err(Error::io(
                "opening package directory",
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a directory (a package is a folder with model.toml)",
                ),
            ));
        }
        let manifest = Manifest::load(&manifest_path)?;
        let package = ModelPackage {
            dir: dir.to_owned(),
            manifest,
        };
        let m = &package.manifest;
        let files: Vec<(&String, &String)> = m
            .graph
            .iter()
            .map(|g| (&g.file, &g.sha256))
            .chain(m.file.iter().map(|f| (&f.path, &f.sha256)))
            .collect();
        // Hashed side by side (a cold start reads every graph twice: here and to load it);
        // the first failure in manifest order is the one reported.
        crate::par::map(&files, |(file, sha)| package.verify(file, sha))
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        Ok(package)
    }

    /// The package directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Path of the graph with role `role`.
    pub fn graph_path(&self, role: &str) -> Option<PathBuf> {
        self.manifest.graph(role).map(|g| self.dir.join(&g.file))
    }

    fn verify(&self, file: &str, sha256: &str) -> Result<()> {
        let path = self.dir.join(file);
        // Never follow a symlink out of the package: what was hashed must be what is loaded.
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| Error::io("opening graph file", &path, e))?;
        if !meta.is_file() {
            return Err(Error::manifest(
                self.dir.join(MANIFEST),
                "graph.file",
                format!("{file}: not a regular file"),
            ));
        }
        let actual = sha256_file(&path)?;
        if actual != sha256 {
            return Err(Error::Checksum {
                path,
                expected: sha256.to_owned(),
                actual,
            });
        }
        Ok(())
    }
}

/// Lowercase hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    sha256_reader(&mut file).map_err(|e| Error::io("reading", path, e))
}

/// Lowercase hex sha256 of everything `reader` yields, streamed in 64 KiB blocks.
pub fn sha256_reader(reader: &mut impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of `bytes`, as manifests write digests.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
