//! Byte buffers on the wire as one block instead of byte by byte.
//!
//! postcard writes a byte string as its varint length and then the raw bytes, which is exactly
//! how it writes a sequence of `u8`: so `#[serde(with = "crate::bytes")]` on a
//! `heapless::Vec<u8, N>` field changes nothing on the wire, but serializing and deserializing
//! it become one copy instead of a serde call per byte (a 32 KiB chunk was 32,768 of them).

use core::fmt;
use core::marker::PhantomData;

use heapless::Vec;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Serializes `bytes` as a byte string.
pub fn serialize<S: Serializer, const N: usize>(
    bytes: &Vec<u8, N>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// Deserializes a byte string (or a sequence of bytes) of at most `N` bytes.
pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
    deserializer: D,
) -> Result<Vec<u8, N>, D::Error> {
    deserializer.deserialize_bytes(BytesVisitor::<N>(PhantomData))
}

struct BytesVisitor<const N: usize>(PhantomData<()>);

impl<'de, const N: usize> Visitor<'de> for BytesVisitor<N> {
    type Value = Vec<u8, N>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "at most {N} bytes")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Vec::from_slice(v).map_err(|_| E::invalid_length(v.len(), &self))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(b) = seq.next_element()? {
            out.push(b)
                .map_err(|_| de::Error::invalid_length(N + 1, &self))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsSeq {
        data: Vec<u8, 8>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsBytes {
        #[serde(with = "crate::bytes")]
        data: Vec<u8, 8>,
    }

    #[test]
    fn same_wire_format_as_a_sequence_of_u8() {
        let bytes = [0u8, 1, 0x7f, 0x80, 0xff];
        let seq = AsSeq {
            data: Vec::from_slice(&bytes).unwrap(),
        };
        let blk = AsBytes {
            data: Vec::from_slice(&bytes).unwrap(),
        };
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        let a = postcard::to_slice(&seq, &mut a).unwrap();
        let b = postcard::to_slice(&blk, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(postcard::from_bytes::<AsBytes>(a).unwrap(), blk);
        assert_eq!(postcard::from_bytes::<AsSeq>(b).unwrap(), seq);
    }

    #[test]
    fn too_long_is_an_error_not_a_panic() {
        // Length 9 for a buffer of 8.
        let wire = [9u8, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert!(postcard::from_bytes::<AsBytes>(&wire).is_err());
        // A length beyond the input.
        assert!(postcard::from_bytes::<AsBytes>(&[5u8, 1]).is_err());
    }
}
