//! Read-only file mappings: the load cache reads a packed f32 weight in place from its
//! archive, in the page cache, instead of copying it into fresh memory; ONNX protobufs are
//! decoded from one (`MappedFile::into_bytes`), each weight copied once.
//!
//! Copying was most of an fp32 graph's cached cold start: 120 MB of weights for a 30M
//! graph, two thirds of it page faults on the new memory. Mapped, the pages are the page
//! cache's own, and a weight is only touched by the archive's checksum and its products.
//!
//! A mapped file must not shrink while it is mapped (reading a page past the new end is a
//! `SIGBUS`). The load cache never rewrites an archive in place: it writes a new file and
//! renames it over the old one, which leaves the mapped file intact.

use std::fs::File;
use std::sync::Arc;

/// A whole file, mapped read-only.
pub(crate) struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `file`, which must be `len` bytes long (the caller has checked its size).
    pub(crate) fn open(file: &File, len: u64) -> std::io::Result<Arc<MappedFile>> {
        let len = usize::try_from(len)
            .map_err(|_| std::io::Error::other(format!("{len} bytes do not fit in memory")))?;
        // SAFETY: the mapping is read-only and private. The load cache only ever replaces
        // an archive by renaming a new file over it, never by writing or truncating the
        // mapped one (module docs).
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(file)? };
        Ok(Arc::new(MappedFile { map }))
    }

    /// The file's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The whole file as a `Bytes` that keeps the mapping alive: its slices
    /// (`Buf::copy_to_bytes`, which prost uses for every `bytes` field) are not copies.
    pub(crate) fn into_bytes(self: Arc<Self>) -> bytes::Bytes {
        bytes::Bytes::from_owner(Owner(self))
    }
}

/// A mapping as the owner of a `Bytes`.
struct Owner(Arc<MappedFile>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// `len` f32 values at byte `offset` of a mapped file, in the machine's byte order.
#[derive(Clone)]
pub(crate) struct MappedF32 {
    file: Arc<MappedFile>,
    offset: usize,
    len: usize,
}

impl MappedF32 {
    /// `None` unless the values lie inside the file and `offset` is aligned for f32.
    pub(crate) fn new(file: Arc<MappedFile>, offset: usize, len: usize) -> Option<MappedF32> {
        let end = len.checked_mul(4)?.checked_add(offset)?;
        let aligned =
            (file.bytes().as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<f32>());
        (end <= file.bytes().len() && aligned).then_some(MappedF32 { file, offset, len })
    }

    /// The values.
    pub(crate) fn as_slice(&self) -> &[f32] {
        let bytes = &self.file.bytes()[self.offset..self.offset + self.len * 4];
        // SAFETY: `new` checked that the range is inside the mapping and aligned for f32,
        // every bit pattern is an f32, and the mapping lives as long as `self.file`.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), self.len) }
    }
}

impl std::fmt::Debug for MappedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedF32({} values at byte {})", self.len, self.offset)
    }
}

impl tract_nnef::resource::Resource for MappedF32 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_in_place_and_out_of_range_refused() {
        let mut file = tempfile::tempfile().unwrap();
        let values: Vec<f32> = (0..100).map(|i| i as f32 * 0.5).collect();
        let mut bytes = vec![7u8; 16];
        bytes.extend(values.iter().flat_map(|v| v.to_ne_bytes()));
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        let map = MappedFile::open(&file, bytes.len() as u64).unwrap();
        let mapped = MappedF32::new(map.clone(), 16, 100).unwrap();
        assert_eq!(mapped.as_slice(), &values[..]);
        assert_eq!(
            MappedF32::new(map.clone(), 16, 99)
                .unwrap()
                .as_slice()
                .len(),
            99
        );
        assert!(
            MappedF32::new(map.clone(), 16, 101).is_none(),
            "past the end"
        );
        assert!(MappedF32::new(map.clone(), 18, 10).is_none(), "unaligned");
        assert!(MappedF32::new(map, usize::MAX - 3, 1).is_none(), "overflow");
    }
}
