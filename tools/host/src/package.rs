//! A local model package as the host pushes it: every file with its size and SHA-256, and the
//! manifest facts the board and the results database need.
//!
//! [`LocalPackage::scan`] validates the package the way the board will (`ModelPackage::open`:
//! `model.toml` and the graph digests), so a broken package is refused before a byte is sent,
//! then lists every regular file under the directory. Nothing is skipped silently: a symlink,
//! a device, a name the wire protocol cannot carry or too many files is an error naming the file.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use edgevlm_proto as proto;
use sha2::{Digest, Sha256};

use crate::record::ModelFacts;

/// Why a package cannot be pushed.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// `model.toml` is missing or invalid, or a graph file does not match its digest.
    #[error("invalid model package {dir}")]
    Invalid {
        /// The package directory.
        dir: PathBuf,
        /// What `ModelPackage::open` found.
        #[source]
        source: edgevlm_runtime::Error,
    },
    /// A file under the package is a symlink (the board never follows them).
    #[error("{path}: symlinks are not allowed in a package (copy the file instead)")]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// A file under the package is neither a regular file nor a directory.
    #[error("{path}: not a regular file (sockets, devices and pipes cannot be pushed)")]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// A path the wire protocol cannot carry.
    #[error("{path}: file name not allowed in a package: {why}")]
    BadPath {
        /// The file.
        path: PathBuf,
        /// Which rule it breaks.
        why: String,
    },
    /// The manifest's name or version breaks the protocol's name rules.
    #[error("{path}: field `{field}`: {value:?} cannot be sent to a board (letters, digits, '.', '_', '-', at most {max} bytes)")]
    BadName {
        /// The manifest.
        path: PathBuf,
        /// `model.name` or `model.version`.
        field: &'static str,
        /// The value.
        value: String,
        /// The byte limit.
        max: usize,
    },
    /// More files than one upload may hold.
    #[error("{dir}: {count} files, but a package upload holds at most {max}")]
    TooManyFiles {
        /// The package directory.
        dir: PathBuf,
        /// Files found.
        count: usize,
        /// [`proto::MAX_PACKAGE_FILES`].
        max: usize,
    },
    /// Reading the directory or a file failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One file of a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageFile {
    /// Path inside the package, `/`-separated (`model.toml`, `samples/ok_01.png`).
    pub path: String,
    /// Where it is on this machine.
    pub local: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256.
    pub sha256: [u8; 32],
}

/// A validated local model package.
#[derive(Debug, Clone)]
pub struct LocalPackage {
    /// The package directory.
    pub dir: PathBuf,
    /// `[model] name`.
    pub name: String,
    /// `[model] version`.
    pub version: String,
    /// `[model] variant`, empty if none.
    pub variant: String,
    /// `[model] task` (`classification`, `raw`).
    pub task: String,
    /// Every file, sorted by path.
    pub files: Vec<PackageFile>,
    /// SHA-256 of `model.toml`: equal on the board means the same package is installed.
    pub manifest_sha256: [u8; 32],
}

impl LocalPackage {
    /// Validates the package in `dir` and lists its files with their digests.
    pub fn scan(dir: &Path) -> Result<LocalPackage, PackageError> {
        let package =
            edgevlm_runtime::ModelPackage::open(dir).map_err(|source| PackageError::Invalid {
                dir: dir.to_owned(),
                source,
            })?;
        let manifest_path = dir.join(edgevlm_runtime::package::MANIFEST);
        let model = &package.manifest().model;
        for (field, value, max) in [
            ("model.name", &model.name, proto::MAX_MODEL_NAME),
            ("model.version", &model.version, proto::MAX_VERSION),
        ] {
            if proto::validate_model_name(value).is_err() || value.len() > max {
                return Err(PackageError::BadName {
                    path: manifest_path,
                    field,
                    value: value.clone(),
                    max,
                });
            }
        }
        let mut files = Vec::new();
        walk(dir, "", &mut files)?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if files.len() > proto::MAX_PACKAGE_FILES {
            return Err(PackageError::TooManyFiles {
                dir: dir.to_owned(),
                count: files.len(),
                max: proto::MAX_PACKAGE_FILES,
            });
        }
        let manifest_sha256 = files
            .iter()
            .find(|f| f.path == edgevlm_runtime::package::MANIFEST)
            .map(|f| f.sha256)
            // ModelPackage::open read it a moment ago; it can only be gone if removed since.
            .ok_or_else(|| PackageError::Io {
                action: "reading",
                path: manifest_path.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        let task = serde_json::to_value(model.task)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        Ok(LocalPackage {
            dir: dir.to_owned(),
            name: model.name.clone(),
            version: model.version.clone(),
            variant: model.variant.clone(),
            task,
            files,
            manifest_sha256,
        })
    }

    /// Bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// `name` and `version` as the wire names the model.
    pub fn model_ref(&self) -> proto::ModelRef {
        proto::ModelRef {
            name: proto::bounded(&self.name),
            version: proto::bounded(&self.version),
        }
    }

    /// The `BeginUpload` request announcing every file.
    pub fn upload_spec(&self) -> proto::UploadSpec {
        let mut files = heapless::Vec::new();
        for f in &self.files {
            // Cannot overflow: scan() checked the count against MAX_PACKAGE_FILES.
            let _ = files.push(proto::FileSpec {
                path: proto::bounded(&f.path),
                size: f.size,
                sha256: f.sha256,
            });
        }
        proto::UploadSpec {
            model: self.model_ref(),
            files,
        }
    }

    /// The model facts a benchmark record keeps (the size on the board comes from the agent).
    pub fn facts(&self) -> ModelFacts {
        ModelFacts {
            name: self.name.clone(),
            version: self.version.clone(),
            variant: self.variant.clone(),
            task: self.task.clone(),
            bytes: self.total_bytes(),
        }
    }

    /// `name version` for messages.
    pub fn label(&self) -> String {
        format!("{} {}", self.name, self.version)
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<PackageFile>) -> Result<(), PackageError> {
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| PackageError::Io {
            action,
            path,
            source,
        }
    };
    let mut entries = fs::read_dir(dir)
        .map_err(io("listing", dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io("listing", dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(PackageError::BadPath {
                path,
                why: "not valid UTF-8".into(),
            });
        };
        let rel = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        };
        let meta = fs::symlink_metadata(&path).map_err(io("reading", &path))?;
        if meta.file_type().is_symlink() {
            return Err(PackageError::Symlink { path });
        }
        if let Err(why) = check_path(&rel) {
            return Err(PackageError::BadPath { path, why });
        }
        if meta.is_dir() {
            walk(&path, &rel, out)?;
        } else if meta.is_file() {
            let (size, sha256) = digest(&path)?;
            out.push(PackageFile {
                path: rel,
                local: path,
                size,
                sha256,
            });
        } else {
            return Err(PackageError::NotRegular { path });
        }
    }
    Ok(())
}

fn check_path(rel: &str) -> Result<(), String> {
    if rel.len() > proto::MAX_FILE_PATH {
        return Err(format!(
            "path inside the package is {} bytes, at most {} are allowed",
            rel.len(),
            proto::MAX_FILE_PATH
        ));
    }
    if proto::validate_file_path(rel).is_err() {
        return Err(
            "use letters, digits, '.', '_' and '-' only, not starting with '.' or '-'".into(),
        );
    }
    Ok(())
}

/// Size and SHA-256 of a file, read once (the size is what was hashed, even if the file grows).
fn digest(path: &Path) -> Result<(u64, [u8; 32]), PackageError> {
    let err = |action| {
        let path = path.to_owned();
        move |source| PackageError::Io {
            action,
            path,
            source,
        }
    };
    let mut file = fs::File::open(path).map_err(err("opening"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(err("reading"))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
    }

    fn copy_demo(to: &Path) {
        for entry in fs::read_dir(demo()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    #[test]
    fn scans_the_demo_package() {
        let pkg = LocalPackage::scan(&demo()).unwrap();
        assert_eq!(pkg.name, "demo-parts");
        assert_eq!(pkg.variant, "fp32");
        assert_eq!(pkg.task, "classification");
        let paths: Vec<_> = pkg.files.iter().map(|f| f.path.as_str()).collect();
        assert!(paths.contains(&"model.toml"));
        assert!(paths.contains(&"samples/ok_01.png"), "{paths:?}");
        let onnx = pkg.files.iter().find(|f| f.path == "model.onnx").unwrap();
        assert_eq!(
            edgevlm_runtime::package::hex(&onnx.sha256),
            edgevlm_runtime::package::sha256_file(&onnx.local).unwrap()
        );
        assert_eq!(onnx.size, fs::metadata(&onnx.local).unwrap().len());
        assert_eq!(pkg.upload_spec().files.len(), pkg.files.len());
    }

    #[test]
    fn refuses_broken_packages_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        copy_demo(tmp.path());
        // A graph that no longer matches the manifest's digest.
        let onnx = tmp.path().join("model.onnx");
        let mut bytes = fs::read(&onnx).unwrap();
        bytes[100] ^= 1;
        fs::write(&onnx, bytes).unwrap();
        let err = LocalPackage::scan(tmp.path()).unwrap_err();
        let text = edgevlm_runtime::error_chain(&err);
        assert!(
            text.contains("model.onnx") && text.contains("sha256"),
            "{text}"
        );
    }

    #[test]
    fn refuses_symlinks_and_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        copy_demo(tmp.path());
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("link")).unwrap();
        let err = LocalPackage::scan(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("link") && err.contains("symlink"), "{err}");
        fs::remove_file(tmp.path().join("link")).unwrap();

        fs::write(tmp.path().join("has space.txt"), "x").unwrap();
        let err = LocalPackage::scan(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("has space.txt"), "{err}");
        fs::remove_file(tmp.path().join("has space.txt")).unwrap();

        fs::write(tmp.path().join(".hidden"), "x").unwrap();
        let err = LocalPackage::scan(tmp.path()).unwrap_err().to_string();
        assert!(err.contains(".hidden"), "{err}");
        fs::remove_file(tmp.path().join(".hidden")).unwrap();

        fs::create_dir(tmp.path().join("many")).unwrap();
        for i in 0..proto::MAX_PACKAGE_FILES {
            fs::write(tmp.path().join(format!("many/{i}.bin")), "x").unwrap();
        }
        let err = LocalPackage::scan(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("at most 32"), "{err}");
    }
}
