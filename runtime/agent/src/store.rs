//! The on-board model store: resumable staged uploads, atomic install, activation and rollback.
//!
//! Layout under the store root (e.g. `/var/lib/edgevlm/models`):
//!
//! ```text
//! staging/<upload-id>/upload.json          what is being uploaded (name, version, files)
//! staging/<upload-id>/pkg/<file>           the package as it arrives
//! staging/<upload-id>/progress/<file>.progress   durable length of <file> and the boot it was
//!                                                 recorded in, written atomically
//! models/<name>/<version>/...              installed packages
//! active.toml                              the active model and the previous one (rollback)
//! ```
//!
//! Every step is crash-safe. Chunks are written in order; every [`CHECKPOINT_BYTES`] and at the
//! end of a file the data is fsynced and then its progress sidecar renamed into place, so a
//! recorded length never runs ahead of the data on disk. Within the boot that wrote it, every
//! byte of the staged file counts (the page cache outlives a killed agent); after a reboot only
//! the recorded length does, and the host resends the rest. (The SHA-256 check at commit catches
//! anything else.) An fsync per 32 KiB chunk would cap a push on an SD card at a few MB/s.
//! A package becomes visible under
//! `models/` by a single `rename` of its staging `pkg` directory; `active.toml` is replaced by
//! rename. Symlinks are never followed or created.
//!
//! The store does not know the wire protocol: its [`Error`] variants map 1:1 onto the wire
//! errors of `edgevlm-proto` (see each variant).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use edgevlm_runtime::package::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest model name, equal to the wire protocol's `MAX_MODEL_NAME`.
pub const MAX_MODEL_NAME: usize = 48;
/// Longest package file path, equal to the wire protocol's `MAX_FILE_PATH`.
pub const MAX_FILE_PATH: usize = 96;
/// Longest version string, equal to the wire protocol's `MAX_VERSION`.
pub const MAX_VERSION: usize = 24;
/// Free space kept on top of an upload's remaining bytes, so a push never fills the disk the
/// agent also writes NG images and logs to.
pub const SPACE_MARGIN: u64 = 8 * 1024 * 1024;

const MANIFEST: &str = "model.toml";
const ACTIVE_FILE: &str = "active.toml";
const UPLOAD_FILE: &str = "upload.json";

/// Why a store operation failed. Each variant maps to the wire error of the same name, except
/// [`Error::InUse`], which maps to the wire `Busy`, and [`Error::Io`], which carries its path
/// into the wire `Io` message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model, version or upload named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A model name, version or package file path breaks the name rules, or names a symlink.
    #[error("invalid model name or package path: {0:?}")]
    InvalidName(String),
    /// A chunk was corrupted in transit (reserved for the wire layer, which checks CRCs).
    #[error("chunk checksum mismatch at offset {offset}")]
    ChecksumMismatch {
        /// Offset of the rejected chunk.
        offset: u64,
    },
    /// A staged file's SHA-256 differs from the one announced; it was removed from staging and
    /// must be sent again from offset 0.
    #[error("sha256 mismatch for {file}")]
    DigestMismatch {
        /// The file inside the package.
        file: String,
    },
    /// A chunk did not start where the verified data ends.
    #[error("chunk out of order: expected offset {expected}")]
    OutOfOrder {
        /// The first byte not verified yet: resume here.
        expected: u64,
    },
    /// Commit with a file not fully uploaded.
    #[error("{file} incomplete: {verified} of {size} bytes")]
    Incomplete {
        /// The file inside the package.
        file: String,
        /// Bytes verified so far.
        verified: u64,
        /// The announced size.
        size: u64,
    },
    /// Not enough free space for the rest of the upload plus [`SPACE_MARGIN`].
    #[error("not enough space: {needed} bytes needed, {available} available")]
    NoSpace {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// The package is malformed, or conflicts with an installed one.
    #[error("invalid package: {0}")]
    InvalidPackage(String),
    /// Refused because the model version is the active one (wire `Busy`).
    #[error("{name} {version} is the active model")]
    InUse {
        /// The model.
        name: String,
        /// Its version.
        version: String,
    },
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result of a store operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// A staged upload of one package version. Derived from name and version, so a re-sent
/// [`ModelStore::begin_upload`] finds the same staging directory; the number is what the wire
/// `UploadId` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UploadId(pub u32);

impl UploadId {
    /// The id of the upload of `name` at `version`.
    pub fn for_model(name: &str, version: &str) -> UploadId {
        let digest = Sha256::new()
            .chain_update(name.as_bytes())
            .chain_update([0u8])
            .chain_update(version.as_bytes())
            .finalize();
        UploadId(u32::from_le_bytes([
            digest[0], digest[1], digest[2], digest[3],
        ]))
    }

    fn dir_name(self) -> String {
        format!("{:08x}", self.0)
    }
}

/// One file announced by [`ModelStore::begin_upload`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Path inside the package (`model.toml`, `vision/encoder.onnx`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// An installed model version, as [`ModelStore::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// The model name.
    pub name: String,
    /// The version.
    pub version: String,
    /// Bytes of all its files.
    pub size_bytes: u64,
    /// Number of its files.
    pub files: u32,
    /// Lowercase hex SHA-256 of its `model.toml` (empty if it has none): the host compares it
    /// with its own package to skip identical pushes.
    pub manifest_sha256: String,
    /// Whether it is the active model.
    pub active: bool,
    /// Whether it is the model [`ModelStore::rollback`] would re-activate.
    pub previous: bool,
}

/// The active model: name, version and package directory.
pub type ActiveModel = (String, String, PathBuf);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Upload {
    name: String,
    version: String,
    files: Vec<FileSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ModelRef {
    name: String,
    version: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ActiveState {
    #[serde(skip_serializing_if = "Option::is_none")]
    active: Option<ModelRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<ModelRef>,
}

type FreeSpaceProbe = Box<dyn Fn(&Path) -> io::Result<u64> + Send + Sync>;

/// The model store under one root directory.
pub struct ModelStore {
    root: PathBuf,
    free_space: FreeSpaceProbe,
    /// Running SHA-256 of each staged file this process has written from offset 0 in order, so
    /// a commit need not read the package back (on an SD card that costs seconds).
    running: Mutex<HashMap<RunningKey, (u64, Sha256)>>,
}

/// Upload, file path and announced digest of a running hash.
type RunningKey = (UploadId, String, String);

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ModelStore {
    /// Opens (creating if needed) the store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ModelStore> {
        let root = root.into();
        for dir in [root.join("staging"), root.join("models")] {
            fs::create_dir_all(&dir).at(&dir)?;
            if !fs::symlink_metadata(&dir).at(&dir)?.is_dir() {
                return Err(Error::InvalidName(dir.display().to_string()));
            }
        }
        Ok(ModelStore {
            root,
            free_space: Box::new(statvfs_available),
            running: Mutex::default(),
        })
    }

    /// Replaces the free-space probe (bytes available on the filesystem holding the given
    /// path; `statvfs` by default), e.g. to test [`Error::NoSpace`] without filling a disk.
    pub fn with_free_space_probe(
        mut self,
        probe: impl Fn(&Path) -> io::Result<u64> + Send + Sync + 'static,
    ) -> ModelStore {
        self.free_space = Box::new(probe);
        self
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Starts, or resumes, the upload of package `name` `version` made of `files`
    /// (`(path, size, sha256 hex)`).
    ///
    /// A re-sent begin with the same files resumes where the staged data ends; a file whose size
    /// or digest changed starts over, and staged files no longer listed are dropped. Fails with
    /// [`Error::NoSpace`] unless the remaining bytes plus [`SPACE_MARGIN`] fit.
    pub fn begin_upload(
        &self,
        name: &str,
        version: &str,
        files: &[(&str, u64, &str)],
    ) -> Result<UploadId> {
        validate_model_name(name)?;
        validate_version(version)?;
        let specs: Vec<FileSpec> = files
            .iter()
            .map(|&(path, size, sha256)| FileSpec {
                path: path.to_owned(),
                size,
                sha256: sha256.to_ascii_lowercase(),
            })
            .collect();
        for (i, f) in specs.iter().enumerate() {
            validate_file_path(&f.path)?;
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::InvalidPackage(format!(
                    "{}: sha256 must be 64 hex digits",
                    f.path
                )));
            }
            // A path listed twice, or both as a file and as a directory, cannot be staged.
            for g in &specs[i + 1..] {
                if f.path == g.path
                    || g.path.starts_with(&format!("{}/", f.path))
                    || f.path.starts_with(&format!("{}/", g.path))
                {
                    return Err(Error::InvalidName(g.path.clone()));
                }
            }
        }
        let upload = Upload {
            name: name.to_owned(),
            version: version.to_owned(),
            files: specs,
        };
        let id = UploadId::for_model(name, version);
        let dir = self.staging_dir(id);
        let previous = match read_upload(&dir)? {
            Some(prev) if prev.name != name || prev.version != version => {
                // Two names hashing to one id: refuse rather than clobber the other upload.
                return Err(Error::Io {
                    path: dir,
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("staging slot used by {} {}", prev.name, prev.version),
                    ),
                });
            }
            other => other,
        };

        let mut remaining = 0u64;
        for f in &upload.files {
            let kept = previous
                .as_ref()
                .is_some_and(|p| p.files.iter().any(|g| g == f));
            let verified = if kept { self.verified(&dir, f)? } else { 0 };
            remaining = remaining.saturating_add(f.size - verified);
        }
        let needed = remaining.saturating_add(SPACE_MARGIN);
        let available = (self.free_space)(&self.root).at(&self.root)?;
        if available < needed {
            return Err(Error::NoSpace { needed, available });
        }

        create_real_dir(&dir.join("pkg"))?;
        create_real_dir(&dir.join("progress"))?;
        if let Some(prev) = &previous {
            for old in &prev.files {
                if !upload.files.contains(old) {
                    remove_staged(&dir, &old.path)?;
                }
            }
        }
        let json = serde_json::to_vec_pretty(&upload).expect("upload spec serializes");
        write_atomic(&dir.join(UPLOAD_FILE), &json)?;
        sync_dir(&dir)?;
        sync_dir(&self.root.join("staging"))?;
        Ok(id)
    }

    /// Writes `data` at `offset` of staged `file` and returns the new verified length.
    ///
    /// Offsets are strictly sequential: anything but the verified length, including a re-sent
    /// chunk that is already staged, is refused with [`Error::OutOfOrder`] naming the offset to
    /// resume from (a lost acknowledgement costs one round trip, and no staged byte is ever
    /// compared or rewritten). Each [`CHECKPOINT_BYTES`], at the end of the file and at the
    /// first write after a reboot, the data is fsynced and the progress recorded.
    pub fn write_chunk(&self, id: UploadId, file: &str, offset: u64, data: &[u8]) -> Result<u64> {
        let (dir, upload) = self.load(id)?;
        let spec = find_file(&upload, file)?;
        let progress = self.progress(&dir, spec)?;
        let verified = progress.verified(spec.size);
        if offset != verified {
            return Err(Error::OutOfOrder { expected: verified });
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= spec.size)
            .ok_or_else(|| {
                Error::InvalidPackage(format!(
                    "{file}: chunk at {offset} of {} bytes runs past its size {}",
                    data.len(),
                    spec.size
                ))
            })?;
        let path = staged_path(&dir, file)?;
        if let Some(parent) = path.parent() {
            create_real_dir(parent)?;
        }
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(nofollow())
            .open(&path)
            .map_err(|e| nofollow_error(&path, file, e))?;
        if !progress.this_boot && progress.staged > offset {
            // Bytes past the last record of an earlier boot may never have reached the disk.
            out.set_len(offset).at(&path)?;
        }
        out.write_all_at(data, offset).at(&path)?;
        self.extend_running_hash(id, spec, offset, data);
        let checkpoint = !progress.this_boot
            || end == spec.size
            || end / CHECKPOINT_BYTES != progress.recorded / CHECKPOINT_BYTES;
        if checkpoint {
            out.sync_data().at(&path)?;
            let sidecar = progress_path(&dir, file);
            if let Some(parent) = sidecar.parent() {
                create_real_dir(parent)?;
            }
            // No directory fsync: a progress rename lost in a crash only makes the host resend
            // data that is already on disk.
            write_atomic_no_dir_sync(&sidecar, format!("{end} {}", boot_id()).as_bytes())?;
        }
        Ok(end)
    }

    /// Installs the package in the local directory `dir` as a push would (staged, verified,
    /// committed), e.g. to preload a board image. Symlinks are refused.
    pub fn install_dir(&self, dir: &Path) -> Result<ModelEntry> {
        let package = edgevlm_runtime::ModelPackage::open(dir)
            .map_err(|e| Error::InvalidPackage(edgevlm_runtime::error_chain(&e)))?;
        let model = &package.manifest().model;
        let mut files = Vec::new();
        for (rel, sha256) in tree_digest(dir)? {
            if sha256.is_empty() {
                return Err(Error::InvalidName(rel));
            }
            let path = dir.join(&rel);
            let size = fs::symlink_metadata(&path).at(&path)?.len();
            files.push((rel, size, sha256));
        }
        let specs: Vec<(&str, u64, &str)> = files
            .iter()
            .map(|(p, size, sha)| (p.as_str(), *size, sha.as_str()))
            .collect();
        let id = self.begin_upload(&model.name, &model.version, &specs)?;
        let mut buf = vec![0u8; CHECKPOINT_BYTES as usize];
        for (rel, size, _) in &files {
            let path = dir.join(rel);
            let file = File::open(&path).at(&path)?;
            let mut offset = self.status(id, rel)?.0;
            while offset < *size {
                let n = ((*size - offset) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], offset).at(&path)?;
                offset = self.write_chunk(id, rel, offset, &buf[..n])?;
            }
        }
        self.commit(id)
    }

    /// `(verified, size)` of staged `file`, for resuming after a broken link or a restart.
    pub fn status(&self, id: UploadId, file: &str) -> Result<(u64, u64)> {
        let (dir, upload) = self.load(id)?;
        let spec = find_file(&upload, file)?;
        Ok((self.verified(&dir, spec)?, spec.size))
    }

    /// Verifies the staged package and installs it as `models/<name>/<version>` by one rename.
    ///
    /// Every file must be complete ([`Error::Incomplete`]) with its announced SHA-256
    /// ([`Error::DigestMismatch`]; the bad file is dropped from staging so it is sent again), the
    /// package must hold `model.toml`, open with `ModelPackage::open` and declare the same name
    /// and version ([`Error::InvalidPackage`]). Committing a version that is installed already
    /// succeeds only if the content is identical.
    pub fn commit(&self, id: UploadId) -> Result<ModelEntry> {
        let (dir, upload) = self.load(id)?;
        let pkg = dir.join("pkg");
        if !upload.files.iter().any(|f| f.path == MANIFEST) {
            return Err(Error::InvalidPackage(format!(
                "no {MANIFEST} in the upload"
            )));
        }
        for f in &upload.files {
            let verified = self.verified(&dir, f)?;
            if verified < f.size {
                return Err(Error::Incomplete {
                    file: f.path.clone(),
                    verified,
                    size: f.size,
                });
            }
            let path = staged_path(&dir, &f.path)?;
            let meta = fs::symlink_metadata(&path).at(&path)?;
            if !meta.is_file() {
                return Err(Error::InvalidName(f.path.clone()));
            }
            if meta.len() != f.size || self.staged_digest(id, f, &path)? != f.sha256 {
                remove_staged(&dir, &f.path)?;
                return Err(Error::DigestMismatch {
                    file: f.path.clone(),
                });
            }
        }
        let package = edgevlm_runtime::ModelPackage::open(&pkg)
            .map_err(|e| Error::InvalidPackage(edgevlm_runtime::error_chain(&e)))?;
        let declared = &package.manifest().model;
        if declared.name != upload.name || declared.version != upload.version {
            return Err(Error::InvalidPackage(format!(
                "{MANIFEST} declares {} {}, the upload is for {} {}",
                declared.name, declared.version, upload.name, upload.version
            )));
        }
        sync_tree(&pkg)?;

        let model_dir = self.root.join("models").join(&upload.name);
        let target = model_dir.join(&upload.version);
        create_real_dir(&model_dir)?;
        sync_dir(&self.root.join("models"))?;
        match fs::symlink_metadata(&target) {
            Ok(_) => {
                if tree_digest(&target)? != tree_digest(&pkg)? {
                    return Err(Error::InvalidPackage(format!(
                        "{} {} is installed with different content; remove it first",
                        upload.name, upload.version
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::rename(&pkg, &target).at(&target)?;
                sync_dir(&model_dir)?;
            }
            Err(e) => return Err(e).at(&target),
        }
        fs::remove_dir_all(&dir).at(&dir)?;
        sync_dir(&self.root.join("staging"))?;
        self.describe(
            &upload.name,
            &upload.version,
            &target,
            &self.active_state()?,
        )
    }

    /// The installed model `name` `version` ([`Error::NotFound`] if it is not installed).
    pub fn entry(&self, name: &str, version: &str) -> Result<ModelEntry> {
        let dir = self.package_dir(name, version)?;
        self.describe(name, version, &dir, &self.active_state()?)
    }

    /// The directory of installed model `name` `version` ([`Error::NotFound`] if it is not
    /// installed, [`Error::InvalidName`] for bad names or a symlink in its place).
    pub fn package_dir(&self, name: &str, version: &str) -> Result<PathBuf> {
        self.installed_dir(name, version)
    }

    /// The files announced for staged upload `id`, in the order of its
    /// [`ModelStore::begin_upload`] (the wire protocol names files by this index).
    pub fn upload_files(&self, id: UploadId) -> Result<Vec<FileSpec>> {
        Ok(self.load(id)?.1.files)
    }

    fn describe(
        &self,
        name: &str,
        version: &str,
        dir: &Path,
        state: &ActiveState,
    ) -> Result<ModelEntry> {
        let is = |m: &Option<ModelRef>| {
            m.as_ref()
                .is_some_and(|m| m.name == name && m.version == version)
        };
        let (files, size_bytes) = tree_stats(dir)?;
        let manifest = dir.join(MANIFEST);
        let manifest_sha256 = match fs::symlink_metadata(&manifest) {
            Ok(m) if m.is_file() => sha256_hex(&manifest)?,
            Ok(_) => String::new(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).at(&manifest),
        };
        Ok(ModelEntry {
            name: name.to_owned(),
            version: version.to_owned(),
            size_bytes,
            files: u32::try_from(files).unwrap_or(u32::MAX),
            manifest_sha256,
            active: is(&state.active),
            previous: is(&state.previous),
        })
    }

    /// Makes installed `name` `version` the active model, remembering the current one for
    /// [`ModelStore::rollback`].
    pub fn activate(&self, name: &str, version: &str) -> Result<()> {
        self.installed_dir(name, version)?;
        let state = self.active_state()?;
        let new = ModelRef {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        if state.active.as_ref() == Some(&new) {
            return Ok(());
        }
        self.write_active(&ActiveState {
            previous: state.active.or(state.previous),
            active: Some(new),
        })
    }

    /// Re-activates the previously active model (which becomes `previous` in turn, so a second
    /// rollback undoes the first). [`Error::NotFound`] if there is none or it was removed.
    pub fn rollback(&self) -> Result<()> {
        let state = self.active_state()?;
        let previous = state
            .previous
            .ok_or_else(|| Error::NotFound("no previous model to roll back to".into()))?;
        self.installed_dir(&previous.name, &previous.version)?;
        self.write_active(&ActiveState {
            active: Some(previous),
            previous: state.active,
        })
    }

    /// The active model, if any.
    pub fn active(&self) -> Result<Option<ActiveModel>> {
        match self.active_state()?.active {
            Some(m) => {
                let dir = self.root.join("models").join(&m.name).join(&m.version);
                Ok(Some((m.name, m.version, dir)))
            }
            None => Ok(None),
        }
    }

    /// Deletes installed `name` `version`; refused with [`Error::InUse`] for the active one.
    pub fn remove(&self, name: &str, version: &str) -> Result<()> {
        let dir = self.installed_dir(name, version)?;
        let mut state = self.active_state()?;
        if state
            .active
            .as_ref()
            .is_some_and(|a| a.name == name && a.version == version)
        {
            return Err(Error::InUse {
                name: name.to_owned(),
                version: version.to_owned(),
            });
        }
        if state
            .previous
            .as_ref()
            .is_some_and(|p| p.name == name && p.version == version)
        {
            state.previous = None;
            self.write_active(&state)?;
        }
        fs::remove_dir_all(&dir).at(&dir)?;
        let model_dir = self.root.join("models").join(name);
        // Drop the model's directory with its last version; a failure here leaves an empty dir.
        let _ = fs::remove_dir(&model_dir);
        sync_dir(&self.root.join("models"))?;
        Ok(())
    }

    /// Installed model versions, sorted by name and version.
    pub fn list(&self) -> Result<Vec<ModelEntry>> {
        let state = self.active_state()?;
        let mut out = Vec::new();
        let models = self.root.join("models");
        for name in read_dir_names(&models)? {
            if validate_model_name(&name).is_err() {
                continue;
            }
            let model_dir = models.join(&name);
            if !fs::symlink_metadata(&model_dir).at(&model_dir)?.is_dir() {
                continue;
            }
            for version in read_dir_names(&model_dir)? {
                let dir = model_dir.join(&version);
                if validate_version(&version).is_err()
                    || !fs::symlink_metadata(&dir).at(&dir)?.is_dir()
                {
                    continue;
                }
                out.push(self.describe(&name, &version, &dir, &state)?);
            }
        }
        out.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Ok(out)
    }

    fn staging_dir(&self, id: UploadId) -> PathBuf {
        self.root.join("staging").join(id.dir_name())
    }

    fn load(&self, id: UploadId) -> Result<(PathBuf, Upload)> {
        let dir = self.staging_dir(id);
        let upload =
            read_upload(&dir)?.ok_or_else(|| Error::NotFound(format!("upload {:08x}", id.0)))?;
        Ok((dir, upload))
    }

    /// Feeds `data`, just written at `offset` of `spec`, to the file's running hash; a write
    /// that does not continue it (a resume in another process, after a reboot) drops it.
    fn extend_running_hash(&self, id: UploadId, spec: &FileSpec, offset: u64, data: &[u8]) {
        let key = (id, spec.path.clone(), spec.sha256.clone());
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get_mut(&key) {
            Some((at, hasher)) if *at == offset => {
                hasher.update(data);
                *at += data.len() as u64;
            }
            _ if offset == 0 => {
                running.insert(key, (data.len() as u64, Sha256::new_with_prefix(data)));
            }
            _ => {
                running.remove(&key);
            }
        }
    }

    /// SHA-256 (hex) of staged file `f` at `path`: its running hash when this process wrote all
    /// of it in order, otherwise read back from disk.
    fn staged_digest(&self, id: UploadId, f: &FileSpec, path: &Path) -> Result<String> {
        let key = (id, f.path.clone(), f.sha256.clone());
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        match running {
            Some((at, hasher)) if at == f.size => Ok(hex(&hasher.finalize())),
            _ => sha256_hex(path),
        }
    }

    /// Bytes of `f` the board holds (see [`Progress::verified`]).
    fn verified(&self, dir: &Path, f: &FileSpec) -> Result<u64> {
        Ok(self.progress(dir, f)?.verified(f.size))
    }

    /// The staged length of `f` and its recorded progress.
    fn progress(&self, dir: &Path, f: &FileSpec) -> Result<Progress> {
        // The staged file first, so a planted symlink is reported even before any progress.
        let path = staged_path(dir, &f.path)?;
        let staged = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => return Err(Error::InvalidName(f.path.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).at(&path),
        };
        let sidecar = progress_path(dir, &f.path);
        let text = match fs::read_to_string(&sidecar) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).at(&sidecar),
        };
        let mut fields = text.split_whitespace();
        let recorded = fields.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let this_boot = fields
            .next()
            .is_some_and(|b| b == boot_id() && b != UNKNOWN_BOOT);
        Ok(Progress {
            staged,
            recorded: recorded.min(staged),
            this_boot,
        })
    }

    fn installed_dir(&self, name: &str, version: &str) -> Result<PathBuf> {
        validate_model_name(name)?;
        validate_version(version)?;
        let dir = self.root.join("models").join(name).join(version);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(Error::InvalidName(format!("{name}/{version}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::NotFound(format!("{name} {version}")))
            }
            Err(e) => Err(e).at(&dir),
        }
    }

    fn active_state(&self) -> Result<ActiveState> {
        let path = self.root.join(ACTIVE_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| Error::Io {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ActiveState::default()),
            Err(e) => Err(e).at(&path),
        }
    }

    fn write_active(&self, state: &ActiveState) -> Result<()> {
        let text = toml::to_string(state).expect("active state serializes");
        write_atomic(&self.root.join(ACTIVE_FILE), text.as_bytes())
    }
}

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && !c.starts_with(['.', '-'])
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a model name with the wire protocol's rules: `[A-Za-z0-9._-]`, not starting with `.`
/// or `-`, at most [`MAX_MODEL_NAME`] bytes.
pub fn validate_model_name(s: &str) -> Result<()> {
    if s.len() <= MAX_MODEL_NAME && valid_component(s) {
        Ok(())
    } else {
        Err(Error::InvalidName(s.to_owned()))
    }
}

/// Checks a version string: the model-name rules, at most [`MAX_VERSION`] bytes.
pub fn validate_version(s: &str) -> Result<()> {
    if s.len() <= MAX_VERSION && valid_component(s) {
        Ok(())
    } else {
        Err(Error::InvalidName(s.to_owned()))
    }
}

/// Checks a package file path with the wire protocol's rules: relative, `/`-separated, each
/// component a valid model name (so no empty, `.` or `..` components), at most
/// [`MAX_FILE_PATH`] bytes.
pub fn validate_file_path(s: &str) -> Result<()> {
    if s.len() <= MAX_FILE_PATH && s.split('/').all(valid_component) {
        Ok(())
    } else {
        Err(Error::InvalidName(s.to_owned()))
    }
}

fn statvfs_available(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn find_file<'a>(upload: &'a Upload, file: &str) -> Result<&'a FileSpec> {
    validate_file_path(file)?;
    upload
        .files
        .iter()
        .find(|f| f.path == file)
        .ok_or_else(|| Error::NotFound(file.to_owned()))
}

fn read_upload(dir: &Path) -> Result<Option<Upload>> {
    let path = dir.join(UPLOAD_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Io {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at(&path),
    }
}

/// Path of staged `file`, after checking that no existing component below `pkg/` is a symlink.
fn staged_path(dir: &Path, file: &str) -> Result<PathBuf> {
    let mut path = dir.join("pkg");
    for component in file.split('/') {
        path.push(component);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return Err(Error::InvalidName(file.to_owned())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e).at(&path),
        }
    }
    Ok(dir.join("pkg").join(file))
}

fn progress_path(dir: &Path, file: &str) -> PathBuf {
    dir.join("progress").join(format!("{file}.progress"))
}

fn remove_staged(dir: &Path, file: &str) -> Result<()> {
    for path in [dir.join("pkg").join(file), progress_path(dir, file)] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(&path),
        }
    }
    Ok(())
}

/// `create_dir_all` that refuses to walk through a symlink.
fn create_real_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).at(dir)?;
    if fs::symlink_metadata(dir).at(dir)?.is_dir() {
        Ok(())
    } else {
        Err(Error::InvalidName(dir.display().to_string()))
    }
}

fn nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// `O_NOFOLLOW` on a symlink fails with `ELOOP`: report it as the bad name it is.
fn nofollow_error(path: &Path, file: &str, e: io::Error) -> Error {
    if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        Error::InvalidName(file.to_owned())
    } else {
        Error::Io {
            path: path.to_owned(),
            source: e,
        }
    }
}

/// Bytes written between two fsynced progress records of a staged file.
pub const CHECKPOINT_BYTES: u64 = 1 << 20;

/// What is known about one staged file.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// Its length.
    staged: u64,
    /// The fsynced length recorded last, never more than `staged`.
    recorded: u64,
    /// That record was made in this boot.
    this_boot: bool,
}

impl Progress {
    /// Bytes of the file the board holds: all it has written in this boot (the page cache
    /// outlives a killed agent), otherwise only the recorded, fsynced length.
    fn verified(&self, size: u64) -> u64 {
        let held = if self.this_boot {
            self.staged
        } else {
            self.recorded
        };
        held.min(size)
    }
}

const UNKNOWN_BOOT: &str = "unknown";

/// This boot's id (`/proc/sys/kernel/random/boot_id`), or [`UNKNOWN_BOOT`], which never
/// matches a recorded one, when it cannot be read: progress then counts only what was fsynced.
fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
            .unwrap_or_else(|| UNKNOWN_BOOT.to_owned())
    })
}

fn write_atomic_no_dir_sync(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(nofollow())
        .open(&tmp)
        .at(&tmp)?;
    f.write_all(bytes).at(&tmp)?;
    f.sync_all().at(&tmp)?;
    fs::rename(&tmp, path).at(path)
}

/// Write to a temporary name, fsync, rename over `path`, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_no_dir_sync(path, bytes)?;
    sync_dir(path.parent().expect("store paths have a parent"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// fsyncs every file and directory below `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    for name in read_dir_names(dir)? {
        let path = dir.join(name);
        let meta = fs::symlink_metadata(&path).at(&path)?;
        if meta.is_dir() {
            sync_tree(&path)?;
        } else if meta.is_file() {
            File::open(&path).and_then(|f| f.sync_all()).at(&path)?;
        } else {
            return Err(Error::InvalidName(path.display().to_string()));
        }
    }
    sync_dir(dir)
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        // Names that are not UTF-8 were not written by the store: skip them.
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// `(count, bytes)` of the regular files below `dir`; symlinks are not followed.
fn tree_stats(dir: &Path) -> Result<(u64, u64)> {
    let (mut files, mut bytes) = (0u64, 0u64);
    for name in read_dir_names(dir)? {
        let path = dir.join(name);
        let meta = fs::symlink_metadata(&path).at(&path)?;
        if meta.is_dir() {
            let (f, b) = tree_stats(&path)?;
            files += f;
            bytes = bytes.saturating_add(b);
        } else if meta.is_file() {
            files += 1;
            bytes = bytes.saturating_add(meta.len());
        }
    }
    Ok((files, bytes))
}

/// `(relative path, sha256)` of every regular file below `dir`, sorted; anything else (a
/// symlink) is listed with an empty digest so it never compares equal to a real file.
fn tree_digest(dir: &Path) -> Result<Vec<(String, String)>> {
    fn walk(base: &Path, rel: &str, out: &mut Vec<(String, String)>) -> Result<()> {
        let dir = base.join(rel);
        for name in read_dir_names(&dir)? {
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let path = base.join(&rel);
            let meta = fs::symlink_metadata(&path).at(&path)?;
            if meta.is_dir() {
                walk(base, &rel, out)?;
            } else if meta.is_file() {
                out.push((rel, sha256_hex(&path)?));
            } else {
                out.push((rel, String::new()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    Ok(out)
}

fn sha256_hex(path: &Path) -> Result<String> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nofollow())
        .open(path)
        .at(path)?;
    edgevlm_runtime::package::sha256_reader(&mut file).at(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgevlm_runtime::ModelPackage;

    const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo");
    const CHUNK: usize = 4096;

    /// A package to push: `(path, bytes)` of `model.toml` and `model.onnx`.
    struct Payload {
        files: Vec<(String, Vec<u8>)>,
    }

    impl Payload {
        /// The demo package, with its manifest declaring `version`.
        fn demo(version: &str) -> Payload {
            let manifest = fs::read_to_string(Path::new(DEMO).join("model.toml")).unwrap();
            let manifest =
                manifest.replace("version = \"1.0.0\"", &format!("version = \"{version}\""));
            let onnx = fs::read(Path::new(DEMO).join("model.onnx")).unwrap();
            Payload {
                files: vec![
                    ("model.toml".into(), manifest.into_bytes()),
                    ("model.onnx".into(), onnx),
                ],
            }
        }

        fn specs(&self) -> Vec<(String, u64, String)> {
            self.files
                .iter()
                .map(|(p, b)| {
                    let digest = hex(&Sha256::digest(b));
                    (p.clone(), b.len() as u64, digest)
                })
                .collect()
        }

        fn begin(&self, store: &ModelStore, version: &str) -> Result<UploadId> {
            let specs = self.specs();
            let borrowed: Vec<(&str, u64, &str)> = specs
                .iter()
                .map(|(p, s, d)| (p.as_str(), *s, d.as_str()))
                .collect();
            store.begin_upload("demo-parts", version, &borrowed)
        }

        /// Sends `file` in 4 KiB chunks from `from`, stopping after `max` chunks.
        fn send(&self, store: &ModelStore, id: UploadId, file: &str, from: u64, max: usize) {
            let bytes = &self.files.iter().find(|(p, _)| p == file).unwrap().1;
            let mut offset = from as usize;
            for _ in 0..max {
                if offset >= bytes.len() {
                    break;
                }
                let end = (offset + CHUNK).min(bytes.len());
                let verified = store
                    .write_chunk(id, file, offset as u64, &bytes[offset..end])
                    .unwrap();
                assert_eq!(verified, end as u64);
                offset = end;
            }
        }

        fn push(&self, store: &ModelStore, version: &str) -> ModelEntry {
            let id = self.begin(store, version).unwrap();
            for (file, _) in &self.files {
                self.send(store, id, file, 0, usize::MAX);
            }
            store.commit(id).unwrap()
        }
    }

    fn store() -> (tempfile::TempDir, ModelStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path().join("models-root")).unwrap();
        (dir, store)
    }

    #[test]
    fn full_push_commit_activate_list() {
        let (_tmp, store) = store();
        let payload = Payload::demo("1.0.0");
        let entry = payload.push(&store, "1.0.0");
        assert_eq!(entry.name, "demo-parts");
        assert!(!entry.active);
        store.activate("demo-parts", "1.0.0").unwrap();

        let list = store.list().unwrap();
        let total: u64 = payload.files.iter().map(|(_, b)| b.len() as u64).sum();
        let manifest_sha256 = payload.specs()[0].2.clone();
        let expected = ModelEntry {
            name: "demo-parts".into(),
            version: "1.0.0".into(),
            size_bytes: total,
            files: 2,
            manifest_sha256,
            active: true,
            previous: false,
        };
        assert_eq!(list, vec![expected.clone()]);
        assert_eq!(store.entry("demo-parts", "1.0.0").unwrap(), expected);
        assert!(matches!(
            store.entry("demo-parts", "9.9.9"),
            Err(Error::NotFound(_))
        ));
        let (name, version, dir) = store.active().unwrap().unwrap();
        assert_eq!((name.as_str(), version.as_str()), ("demo-parts", "1.0.0"));
        let package = ModelPackage::open(&dir).unwrap();
        assert_eq!(package.manifest().model.version, "1.0.0");
        for (file, _, digest) in payload.specs() {
            assert_eq!(
                edgevlm_runtime::package::sha256_file(&dir.join(&file)).unwrap(),
                digest
            );
        }
        // Staging is cleaned up after the install.
        assert!(read_dir_names(&store.root().join("staging"))
            .unwrap()
            .is_empty());
        // Re-pushing the identical version is accepted.
        payload.push(&store, "1.0.0");
    }

    #[test]
    fn interrupted_push_resumes_after_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let payload = Payload::demo("1.0.0");
        let onnx_len = payload.files[1].1.len() as u64;
        let chunks = onnx_len.div_ceil(CHUNK as u64) as usize;
        {
            let store = ModelStore::open(&root).unwrap();
            let id = payload.begin(&store, "1.0.0").unwrap();
            payload.send(&store, id, "model.toml", 0, usize::MAX);
            payload.send(&store, id, "model.onnx", 0, chunks / 2);
            assert!(matches!(store.commit(id), Err(Error::Incomplete { .. })));
        }
        let store = ModelStore::open(&root).unwrap();
        // The host re-sends its begin after the reconnect and gets the same upload back.
        let id = payload.begin(&store, "1.0.0").unwrap();
        let announced: Vec<_> = store
            .upload_files(id)
            .unwrap()
            .into_iter()
            .map(|f| (f.path, f.size, f.sha256))
            .collect();
        assert_eq!(announced, payload.specs());
        let (verified, size) = store.status(id, "model.onnx").unwrap();
        assert_eq!(verified, (chunks / 2 * CHUNK) as u64);
        assert_eq!(size, onnx_len);
        assert_eq!(
            store.status(id, "model.toml").unwrap().0,
            payload.files[0].1.len() as u64
        );
        payload.send(&store, id, "model.onnx", verified, usize::MAX);
        store.commit(id).unwrap();
        ModelPackage::open(&root.join("models/demo-parts/1.0.0")).unwrap();
    }

    #[test]
    fn progress_is_checkpointed_and_only_fsynced_bytes_count_after_a_reboot() {
        let (_tmp, store) = store();
        let size = 3 * CHECKPOINT_BYTES as usize + 1000;
        let big: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut payload = Payload::demo("1.0.0");
        payload.files.push(("weights.bin".into(), big.clone()));
        let id = payload.begin(&store, "1.0.0").unwrap();
        let sidecar = store.staging_dir(id).join("progress/weights.bin.progress");
        let recorded = || -> (u64, String) {
            let text = fs::read_to_string(&sidecar).unwrap();
            let (n, boot) = text.split_once(' ').unwrap();
            (n.parse().unwrap(), boot.to_owned())
        };
        let mut offset = 0;
        let write = |offset: &mut usize, len: usize| {
            let end = (*offset + len).min(size);
            let got = store
                .write_chunk(id, "weights.bin", *offset as u64, &big[*offset..end])
                .unwrap();
            assert_eq!(got, end as u64);
            *offset = end;
        };
        // The first write of a boot is recorded at once, with the boot id.
        write(&mut offset, 32 << 10);
        assert_eq!(recorded(), (32 << 10, boot_id().to_owned()));
        // Writes inside a checkpoint interval count (same boot) without a new record.
        write(&mut offset, 32 << 10);
        assert_eq!(recorded().0, 32 << 10);
        assert_eq!(store.status(id, "weights.bin").unwrap().0, 64 << 10);
        // Crossing a checkpoint boundary records again.
        while offset < CHECKPOINT_BYTES as usize + (64 << 10) {
            write(&mut offset, 32 << 10);
        }
        assert!(recorded().0 >= CHECKPOINT_BYTES, "{:?}", recorded());
        let checkpoint = recorded().0;
        write(&mut offset, 32 << 10);
        assert_eq!(recorded().0, checkpoint);

        // A record from another boot: only the fsynced length counts, and the host resumes there.
        fs::write(&sidecar, format!("{checkpoint} 00000000-reboot")).unwrap();
        assert_eq!(store.status(id, "weights.bin").unwrap().0, checkpoint);
        let r = store.write_chunk(id, "weights.bin", offset as u64, &big[offset..offset + 10]);
        assert!(
            matches!(r, Err(Error::OutOfOrder { expected }) if expected == checkpoint),
            "{r:?}"
        );
        offset = checkpoint as usize;
        write(&mut offset, 32 << 10);
        assert_eq!(recorded(), (checkpoint + (32 << 10), boot_id().to_owned()));
        // The bytes an earlier boot wrote past its record were cut off, not counted.
        assert_eq!(
            store.status(id, "weights.bin").unwrap().0,
            checkpoint + (32 << 10)
        );
        // The end of the file is always recorded.
        while offset < size {
            write(&mut offset, 32 << 10);
        }
        assert_eq!(recorded().0, size as u64);
        payload.send(&store, id, "model.toml", 0, usize::MAX);
        payload.send(&store, id, "model.onnx", 0, usize::MAX);
        store.commit(id).unwrap();
        assert_eq!(
            fs::read(store.root().join("models/demo-parts/1.0.0/weights.bin")).unwrap(),
            big
        );
    }

    #[test]
    fn corrupted_chunk_fails_commit_and_keeps_active_model() {
        let (_tmp, store) = store();
        Payload::demo("1.0.0").push(&store, "1.0.0");
        store.activate("demo-parts", "1.0.0").unwrap();

        let good = Payload::demo("2.0.0");
        let mut bad = Payload::demo("2.0.0");
        bad.files[1].1[5000] ^= 0x40;
        let id = good.begin(&store, "2.0.0").unwrap();
        good.send(&store, id, "model.toml", 0, usize::MAX);
        bad.send(&store, id, "model.onnx", 0, usize::MAX);
        match store.commit(id) {
            Err(Error::DigestMismatch { file }) => assert_eq!(file, "model.onnx"),
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
        assert_eq!(store.active().unwrap().unwrap().1, "1.0.0");
        assert!(!store.root().join("models/demo-parts/2.0.0").exists());
        // The bad file was dropped: it is re-sent from the start.
        assert_eq!(store.status(id, "model.onnx").unwrap().0, 0);
        good.send(&store, id, "model.onnx", 0, usize::MAX);
        store.commit(id).unwrap();
        assert_eq!(store.active().unwrap().unwrap().1, "1.0.0");
    }

    #[test]
    fn bad_names_are_rejected() {
        let (tmp, store) = store();
        let sha = "0".repeat(64);
        for bad in [
            "../x",
            "a/../b",
            "/etc/passwd",
            "a//b",
            "./a",
            ".hidden",
            "",
            "a\\b",
        ] {
            let r = store.begin_upload("m", "1", &[("model.toml", 1, &sha), (bad, 1, &sha)]);
            assert!(matches!(r, Err(Error::InvalidName(_))), "{bad:?}: {r:?}");
        }
        for bad in ["", "..", "a/b", ".x", "-rf", &"x".repeat(49)] {
            let r = store.begin_upload(bad, "1", &[("model.toml", 1, &sha)]);
            assert!(matches!(r, Err(Error::InvalidName(_))), "{bad:?}: {r:?}");
        }
        for bad in ["..", "1/2", ""] {
            let r = store.begin_upload("m", bad, &[("model.toml", 1, &sha)]);
            assert!(matches!(r, Err(Error::InvalidName(_))), "{bad:?}: {r:?}");
        }
        let long = "x".repeat(MAX_FILE_PATH + 1);
        let r = store.begin_upload("m", "1", &[(long.as_str(), 1, &sha)]);
        assert!(matches!(r, Err(Error::InvalidName(_))));
        let r = store.begin_upload("m", "1", &[("a", 1, &sha), ("a/b", 1, &sha)]);
        assert!(matches!(r, Err(Error::InvalidName(_))));

        // A symlink planted in staging is neither written through nor committed.
        let payload = Payload::demo("1.0.0");
        let id = payload.begin(&store, "1.0.0").unwrap();
        let outside = tmp.path().join("outside");
        fs::write(&outside, b"do not touch").unwrap();
        let staged = store
            .root()
            .join("staging")
            .join(id.dir_name())
            .join("pkg/model.onnx");
        std::os::unix::fs::symlink(&outside, &staged).unwrap();
        let r = store.write_chunk(id, "model.onnx", 0, b"data");
        assert!(matches!(r, Err(Error::InvalidName(_))), "{r:?}");
        assert!(matches!(
            store.status(id, "model.onnx"),
            Err(Error::InvalidName(_))
        ));
        assert_eq!(fs::read(&outside).unwrap(), b"do not touch");
        // Names outside the announced files are unknown, bad ones invalid.
        assert!(matches!(
            store.write_chunk(id, "other.bin", 0, b"x"),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            store.write_chunk(id, "../model.toml", 0, b"x"),
            Err(Error::InvalidName(_))
        ));
    }

    #[test]
    fn out_of_order_offsets_are_rejected() {
        let (_tmp, store) = store();
        let payload = Payload::demo("1.0.0");
        let id = payload.begin(&store, "1.0.0").unwrap();
        let onnx = &payload.files[1].1;
        let r = store.write_chunk(id, "model.onnx", 4096, &onnx[4096..8192]);
        assert!(matches!(r, Err(Error::OutOfOrder { expected: 0 })), "{r:?}");
        store
            .write_chunk(id, "model.onnx", 0, &onnx[..4096])
            .unwrap();
        // A re-sent chunk (lost acknowledgement) is refused and names where to go on.
        let r = store.write_chunk(id, "model.onnx", 0, &onnx[..4096]);
        assert!(
            matches!(r, Err(Error::OutOfOrder { expected: 4096 })),
            "{r:?}"
        );
        let r = store.write_chunk(id, "model.onnx", 8192, &onnx[8192..9000]);
        assert!(
            matches!(r, Err(Error::OutOfOrder { expected: 4096 })),
            "{r:?}"
        );
        // Past the announced size.
        let r = store.write_chunk(id, "model.onnx", 4096, &vec![0; onnx.len()]);
        assert!(matches!(r, Err(Error::InvalidPackage(_))), "{r:?}");
        assert_eq!(store.status(id, "model.onnx").unwrap().0, 4096);
    }

    #[test]
    fn no_space_is_reported_before_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path())
            .unwrap()
            .with_free_space_probe(|_| Ok(1024 * 1024));
        let payload = Payload::demo("1.0.0");
        let total: u64 = payload.files.iter().map(|(_, b)| b.len() as u64).sum();
        match payload.begin(&store, "1.0.0") {
            Err(Error::NoSpace { needed, available }) => {
                assert_eq!(needed, total + SPACE_MARGIN);
                assert_eq!(available, 1024 * 1024);
            }
            other => panic!("expected NoSpace, got {other:?}"),
        }
        assert!(read_dir_names(&tmp.path().join("staging"))
            .unwrap()
            .is_empty());
        let store = store.with_free_space_probe(move |_| Ok(total + SPACE_MARGIN));
        payload.begin(&store, "1.0.0").unwrap();
    }

    #[test]
    fn activate_rollback_and_remove() {
        let (_tmp, store) = store();
        Payload::demo("1.0.0").push(&store, "1.0.0");
        Payload::demo("2.0.0").push(&store, "2.0.0");
        assert!(store.active().unwrap().is_none());
        assert!(matches!(store.rollback(), Err(Error::NotFound(_))));
        assert!(matches!(
            store.activate("demo-parts", "3.0.0"),
            Err(Error::NotFound(_))
        ));

        store.activate("demo-parts", "1.0.0").unwrap();
        store.activate("demo-parts", "2.0.0").unwrap();
        assert_eq!(store.active().unwrap().unwrap().1, "2.0.0");
        store.rollback().unwrap();
        assert_eq!(store.active().unwrap().unwrap().1, "1.0.0");
        let active: Vec<_> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|e| (e.version, e.active, e.previous))
            .collect();
        assert_eq!(
            active,
            vec![
                ("1.0.0".to_string(), true, false),
                ("2.0.0".to_string(), false, true)
            ]
        );

        assert!(matches!(
            store.remove("demo-parts", "1.0.0"),
            Err(Error::InUse { .. })
        ));
        store.remove("demo-parts", "2.0.0").unwrap();
        assert!(matches!(store.rollback(), Err(Error::NotFound(_))));
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(matches!(
            store.remove("demo-parts", "2.0.0"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn commit_refuses_mismatched_manifest_and_different_reinstall() {
        let (_tmp, store) = store();
        // The manifest says 2.0.0 but the upload claims 0.9.0.
        let payload = Payload::demo("2.0.0");
        let id = payload.begin(&store, "0.9.0").unwrap();
        for (file, _) in &payload.files {
            payload.send(&store, id, file, 0, usize::MAX);
        }
        assert!(matches!(store.commit(id), Err(Error::InvalidPackage(_))));

        Payload::demo("1.0.0").push(&store, "1.0.0");
        let mut changed = Payload::demo("1.0.0");
        changed.files[0].1.extend_from_slice(b"\n# changed\n");
        let id = changed.begin(&store, "1.0.0").unwrap();
        for (file, _) in &changed.files {
            changed.send(&store, id, file, 0, usize::MAX);
        }
        assert!(matches!(store.commit(id), Err(Error::InvalidPackage(_))));
    }
}
