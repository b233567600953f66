//! CRC-32 (IEEE 802.3, the zlib/PNG one), no_std: `crc32fast`, which uses the CPU's CRC or
//! carry-less multiply instructions where it can (detected at run time with the `std` feature)
//! and a slicing table elsewhere. A byte-at-a-time table cost a third of a push's host CPU.

/// Incremental CRC-32: `update` with the pieces in order, then `finish`.
#[derive(Debug, Clone)]
pub struct Crc32 {
    hasher: crc32fast::Hasher,
}

impl Crc32 {
    /// A fresh checksum.
    pub fn new() -> Self {
        Crc32 {
            hasher: crc32fast::Hasher::new(),
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    /// The checksum of everything fed so far.
    pub fn finish(&self) -> u32 {
        self.hasher.clone().finalize()
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

/// CRC-32 of `bytes` in one go.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: [u8; 1000] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        let mut crc = Crc32::new();
        for piece in data.chunks(33) {
            crc.update(piece);
        }
        assert_eq!(crc.finish(), crc32(&data));
    }
}
