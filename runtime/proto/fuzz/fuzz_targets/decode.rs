//! Arbitrary bytes through the frame decoders of both directions.
//!
//! Checks, beyond "no panic": the messages do not depend on how the stream is cut into reads;
//! every decoded message re-encodes and decodes to itself; a delimiter always leaves the decoder
//! empty. A 64-byte decoder beside the full-size one reaches the oversize paths with short inputs.
#![no_main]

use core::fmt::Debug;

use edgevlm_proto::frame::encode_to_vec;
use edgevlm_proto::{AgentMessage, Decoder, FrameError, HostMessage, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size.
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    check::<HostMessage>(stream, step);
    check::<AgentMessage>(stream, step);
});

fn check<M: Message + PartialEq + Debug>(stream: &[u8], step: usize) {
    let whole = decode::<M, { edgevlm_proto::MAX_FRAME }>(stream, stream.len().max(1));
    let pieces = decode::<M, { edgevlm_proto::MAX_FRAME }>(stream, step);
    assert_eq!(whole, pieces, "read boundaries changed the result");
    for msg in whole.iter().flatten() {
        let frame = encode_to_vec(msg).expect("a decoded message re-encodes");
        let back = decode::<M, { edgevlm_proto::MAX_FRAME }>(&frame, frame.len());
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_ref(), Ok(msg));
    }
    let small_whole = decode::<M, 64>(stream, stream.len().max(1));
    let small_pieces = decode::<M, 64>(stream, step);
    assert_eq!(
        small_whole, small_pieces,
        "read boundaries changed the result"
    );
}

/// Decodes `stream` in reads of `step` bytes, then a delimiter, which must leave nothing behind.
fn decode<M: Message, const N: usize>(stream: &[u8], step: usize) -> Vec<Result<M, FrameError>> {
    let mut decoder = Box::new(Decoder::<M, N>::new());
    let mut out = Vec::new();
    for piece in stream.chunks(step) {
        out.extend(decoder.feed(piece));
    }
    out.extend(decoder.feed(&[0]));
    assert_eq!(decoder.buffered(), 0);
    out
}
