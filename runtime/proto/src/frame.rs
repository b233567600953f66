//! Framing: postcard messages, COBS-encoded, each followed by a `0x00` delimiter.
//!
//! COBS removes every zero byte from the encoded message, so a `0x00` on the link always ends a
//! frame: after corruption, garbage or a dropped byte, the receiver loses at most the frame in
//! progress and resynchronizes at the next delimiter. Empty frames (two delimiters in a row) are
//! ignored, so a writer should send one [`DELIMITER`] when it opens a link: whatever the reader
//! buffered before (a login banner, half a frame) then ends there instead of spoiling the first
//! real frame.
//!
//! Overhead per frame: the postcard header of the message, at most one COBS byte per 254 bytes
//! plus one, and the delimiter. A full 32 KiB chunk at a 200 MB offset costs 147 bytes (0.45%):
//! 16 of header, 130 of COBS, 1 delimiter; never more than 160.

use core::marker::PhantomData;

use postcard::accumulator::{CobsAccumulator, FeedResult};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{EncodeError, FrameError};
use crate::message::{AgentMessage, HostMessage};
use crate::MAX_FRAME;

/// Ends every frame.
pub const DELIMITER: u8 = 0x00;

/// The longest frame (delimiter included) for a message of `message_len` postcard bytes.
pub const fn max_frame_len(message_len: usize) -> usize {
    // COBS: one code byte per run of at most 254 non-zero bytes, plus the first.
    message_len + message_len / 254 + 1 + 1
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::HostMessage {}
    impl Sealed for crate::AgentMessage {}
}

/// A message that travels in frames: [`HostMessage`] or [`AgentMessage`].
pub trait Message: Serialize + DeserializeOwned + sealed::Sealed {}

impl Message for HostMessage {}
impl Message for AgentMessage {}

/// Encodes `msg` as one frame (delimiter included) at the start of `buf` and returns it.
///
/// A `buf` of [`MAX_FRAME`] bytes always suffices.
pub fn encode<'b, M: Message>(msg: &M, buf: &'b mut [u8]) -> Result<&'b [u8], EncodeError> {
    let frame = postcard::to_slice_cobs(msg, buf).map_err(|err| match err {
        postcard::Error::SerializeBufferFull => EncodeError::BufferTooSmall,
        _ => EncodeError::Serialize,
    })?;
    if frame.len() > MAX_FRAME {
        return Err(EncodeError::TooLarge { len: frame.len() });
    }
    Ok(frame)
}

/// Encodes `msg` as one frame (delimiter included) into a new `Vec`.
#[cfg(feature = "std")]
pub fn encode_to_vec<M: Message>(msg: &M) -> Result<std::vec::Vec<u8>, EncodeError> {
    let mut buf = std::vec![0u8; MAX_FRAME];
    let len = encode(msg, &mut buf)?.len();
    buf.truncate(len);
    Ok(buf)
}

/// Turns a byte stream into messages, whatever pieces it arrives in.
///
/// Feed it every read as it comes (split frames, several frames per read, garbage between
/// frames); it never panics, reports each bad or oversized frame once as a [`FrameError`], and
/// carries on with the next frame. `N` is the buffer size, the largest frame accepted
/// (delimiter included); the decoder holds it inline, so keep one in a `Box` or a `static` on
/// small stacks.
pub struct Decoder<M, const N: usize = MAX_FRAME> {
    acc: CobsAccumulator<N>,
    /// Bytes of the current frame held by `acc` (it does not tell).
    buffered: usize,
    /// Dropping the rest of an oversized frame, up to the next delimiter.
    skipping: bool,
    _msg: PhantomData<fn() -> M>,
}

impl<M: Message, const N: usize> Default for Decoder<M, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Message, const N: usize> Decoder<M, N> {
    /// An empty decoder.
    pub const fn new() -> Self {
        Decoder {
            acc: CobsAccumulator::new(),
            buffered: 0,
            skipping: false,
            _msg: PhantomData,
        }
    }

    /// Decodes what `input` completes: iterate to the end, or the rest of `input` is lost.
    pub fn feed<'d, 'a>(&'d mut self, input: &'a [u8]) -> Frames<'d, 'a, M, N> {
        Frames {
            decoder: self,
            input,
        }
    }

    /// Consumes `input` up to the end of the next complete frame and returns what it held, or
    /// `None` once all of `input` is consumed (keeping any partial frame for the next call).
    pub fn next_frame(&mut self, input: &mut &[u8]) -> Option<Result<M, FrameError>> {
        loop {
            if input.is_empty() {
                return None;
            }
            let delimiter = input.iter().position(|&b| b == DELIMITER);
            if self.skipping {
                match delimiter {
                    Some(at) => {
                        *input = &input[at + 1..];
                        self.skipping = false;
                        continue;
                    }
                    None => {
                        *input = &[];
                        return None;
                    }
                }
            }
            // Hand the accumulator at most one frame at a time, so that its answer tells
            // whether an oversized frame has ended yet.
            let (piece, rest) = match delimiter {
                Some(at) => input.split_at(at + 1),
                None => (*input, &[][..]),
            };
            *input = rest;
            if delimiter.is_some() && self.buffered == 0 && piece.len() == 1 {
                continue; // Empty frame: a writer's resync delimiter.
            }
            match self.acc.feed::<M>(piece) {
                FeedResult::Consumed => {
                    self.buffered += piece.len();
                }
                FeedResult::OverFull(_) => {
                    self.buffered = 0;
                    self.skipping = delimiter.is_none();
                    return Some(Err(FrameError::Oversize { limit: N }));
                }
                FeedResult::DeserError(_) => {
                    self.buffered = 0;
                    return Some(Err(FrameError::Decode));
                }
                FeedResult::Success { data, .. } => {
                    self.buffered = 0;
                    return Some(Ok(data));
                }
            }
        }
    }

    /// Bytes of an unfinished frame held so far.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Drops any unfinished frame (e.g. when the link is reopened).
    pub fn reset(&mut self) {
        *self = Self::new();
    }
}

/// The messages completed by one [`Decoder::feed`]; see there.
#[must_use = "input not iterated over is lost"]
pub struct Frames<'d, 'a, M, const N: usize> {
    decoder: &'d mut Decoder<M, N>,
    input: &'a [u8],
}

impl<M, const N: usize> Frames<'_, '_, M, N> {
    /// Input not consumed yet.
    pub fn remaining(&self) -> &[u8] {
        self.input
    }
}

impl<M: Message, const N: usize> Iterator for Frames<'_, '_, M, N> {
    type Item = Result<M, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.decoder.next_frame(&mut self.input)
    }
}
