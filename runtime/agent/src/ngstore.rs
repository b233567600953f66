//! Keeps the frames of NG and ERROR parts on disk, newest `keep` files, for later review.

use std::path::{Path, PathBuf};

use edgevlm_board::{Frame, PixelFormat};
use edgevlm_runtime::preprocess;

/// A rotating folder of NG frames.
#[derive(Debug, Clone)]
pub struct NgStore {
    dir: PathBuf,
    keep: usize,
}

impl NgStore {
    /// Creates the folder if needed.
    pub fn open(dir: &Path, keep: usize) -> std::io::Result<NgStore> {
        std::fs::create_dir_all(dir)?;
        Ok(NgStore {
            dir: dir.to_owned(),
            keep: keep.max(1),
        })
    }

    /// Saves `frame` as `<unix ms>-<sequence>-<label>.<ext>` (JPEG / PNG kept as they came,
    /// raw frames encoded to PNG), written to a temporary name and renamed so a reader never
    /// sees half a file; then deletes the oldest files beyond `keep`.
    pub fn save(&self, frame: &Frame, sequence: u64, label: &str) -> Result<PathBuf, String> {
        let (bytes, ext) = match frame.format {
            PixelFormat::Mjpeg => (frame.data.clone(), "jpg"),
            PixelFormat::Png => (frame.data.clone(), "png"),
            _ => {
                let view = crate::station::runtime_frame(frame);
                let rgb =
                    preprocess::frame_to_rgb(&view, &frame.source).map_err(|e| e.to_string())?;
                (
                    preprocess::encode_png(&rgb).map_err(|e| e.to_string())?,
                    "png",
                )
            }
        };
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let name = format!("{ms:013}-{sequence:08}-{label}.{ext}");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let path = self.dir.join(&name);
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("saving {}: {e}", path.display())
            })?;
        self.prune()
            .map_err(|e| format!("pruning {}: {e}", self.dir.display()))?;
        Ok(path)
    }

    fn prune(&self) -> std::io::Result<()> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'))
            })
            .collect();
        if files.len() <= self.keep {
            return Ok(());
        }
        // Names start with a zero-padded timestamp and sequence: name order is age order.
        files.sort();
        for old in &files[..files.len() - self.keep] {
            std::fs::remove_file(old)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_files() {
        let tmp = tempfile::tempdir().unwrap();
        let store = NgStore::open(&tmp.path().join("ng"), 3).unwrap();
        let frame = Frame {
            format: PixelFormat::Yuyv,
            width: 2,
            height: 1,
            data: vec![126, 128, 126, 128],
            sequence: 0,
            timestamp: Default::default(),
            source: "cam".into(),
        };
        let saved: Vec<PathBuf> = (0..5)
            .map(|i| store.save(&frame, i, "scratch").unwrap())
            .collect();
        let mut left: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("ng"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        left.sort();
        assert_eq!(left, saved[2..]);
        assert!(saved[4]
            .to_str()
            .unwrap()
            .ends_with("-00000004-scratch.png"));
        // Raw frames are stored as real PNGs.
        let png = std::fs::read(&saved[4]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
