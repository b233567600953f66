//! Round trips of every message kind, limits, and the decoder's stream handling.

mod common;

use common::{Gen, AGENT_VARIANTS, HOST_VARIANTS};
use edgevlm_proto::frame::{encode_to_vec, max_frame_len, DELIMITER};
use edgevlm_proto::*;

fn decode_all<M: Message>(stream: &[u8]) -> Vec<Result<M, FrameError>> {
    let mut decoder = Box::new(Decoder::<M>::new());
    decoder.feed(stream).collect()
}

/// The postcard encoding without framing.
fn plain<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, Vec::new()).unwrap()
}

fn round_trip<M: Message + PartialEq + core::fmt::Debug>(msg: &M) -> usize {
    let frame = encode_to_vec(msg).unwrap();
    assert_eq!(frame.last(), Some(&DELIMITER));
    assert_eq!(
        frame.iter().filter(|&&b| b == 0).count(),
        1,
        "one zero, at the end"
    );
    let decoded = decode_all::<M>(&frame);
    assert_eq!(decoded.len(), 1);
    assert_eq!(decoded[0].as_ref().unwrap(), msg);
    frame.len()
}

#[test]
fn every_message_kind_round_trips() {
    for seed in 0..50 {
        let mut g = Gen::new(seed);
        for variant in 0..HOST_VARIANTS {
            round_trip(&g.host_message_variant(variant));
        }
        for variant in 0..AGENT_VARIANTS {
            round_trip(&g.agent_message_variant(variant));
        }
    }
}

/// The bounded types keep every message within MAX_MESSAGE / MAX_FRAME: this builds the largest
/// instance of every variant (full strings and vectors, u64::MAX everywhere).
#[test]
fn worst_case_messages_fit_the_frame_limit() {
    let mut g = Gen::max(1);
    let mut largest = 0;
    for variant in 0..HOST_VARIANTS {
        let msg = g.host_message_variant(variant);
        let size = postcard::experimental::serialized_size(&msg).unwrap();
        assert!(
            size <= MAX_MESSAGE,
            "request {variant}: {size} > {MAX_MESSAGE}"
        );
        largest = largest.max(round_trip(&msg));
    }
    for variant in 0..AGENT_VARIANTS {
        let msg = g.agent_message_variant(variant);
        let size = postcard::experimental::serialized_size(&msg).unwrap();
        assert!(
            size <= MAX_MESSAGE,
            "agent message {variant}: {size} > {MAX_MESSAGE}"
        );
        largest = largest.max(round_trip(&msg));
    }
    assert!(largest <= MAX_FRAME);
    assert_eq!(MAX_FRAME, 33_927, "the README quotes it");
    // COBS worst case: data without zeros.
    let mut buf = vec![0u8; MAX_FRAME];
    let chunk = Chunk::new(UploadId(u32::MAX), u16::MAX, u64::MAX, &[0xAA; MAX_CHUNK]).unwrap();
    let msg = HostMessage {
        id: RequestId(u32::MAX),
        request: Request::PushChunk(chunk),
    };
    assert!(encode(&msg, &mut buf).unwrap().len() <= MAX_FRAME);
}

#[test]
fn full_chunk_frame_overhead() {
    // A realistic push: request id and offset well into a 200 MB file, data without zeros (the
    // COBS worst case).
    let chunk = Chunk::new(UploadId(7), 3, 200 << 20, &[0x5A; MAX_CHUNK]).unwrap();
    let msg = HostMessage {
        id: RequestId(1_000),
        request: Request::PushChunk(chunk),
    };
    let frame = encode_to_vec(&msg).unwrap();
    let overhead = frame.len() - MAX_CHUNK;
    println!(
        "32 KiB chunk: frame {} bytes, overhead {overhead}",
        frame.len()
    );
    assert_eq!(overhead, 147, "16 header + 130 COBS + 1 delimiter");
    assert!(frame.len() <= max_frame_len(MAX_CHUNK + 32));
}

#[test]
fn encode_reports_small_buffer() {
    let msg = HostMessage {
        id: RequestId(1),
        request: Request::Hello(HostHello::new("0.1.0")),
    };
    let mut buf = [0u8; 4];
    assert_eq!(encode(&msg, &mut buf), Err(EncodeError::BufferTooSmall));
}

#[test]
fn handshake_prefix_is_frozen() {
    let msg = HostMessage {
        id: RequestId(5),
        request: Request::Hello(HostHello::new("0.1.0")),
    };
    let bytes = plain(&msg);
    // id, Request::Hello, magic, protocol (a one-byte varint below 128), version string.
    let v = u8::try_from(PROTOCOL_VERSION).unwrap();
    assert!(v < 128);
    assert_eq!(&bytes[..8], &[5, 0, b'E', b'V', b'L', b'M', v, 5]);

    let reply = AgentMessage::Response {
        id: RequestId(5),
        result: Ok(Response::Hello(AgentHello::new("0.1.0", "rpi5", "0.23.9"))),
    };
    let bytes = plain(&reply);
    // Response, id, Ok, Response::Hello, magic, protocol.
    assert_eq!(&bytes[..9], &[0, 5, 0, 0, b'E', b'V', b'L', b'M', v]);

    let mismatch = AgentMessage::Response {
        id: RequestId(5),
        result: Err(Error::VersionMismatch { host: 1, agent: 2 }),
    };
    assert_eq!(plain(&mismatch), [0, 5, 1, 0, 1, 2]);
}

/// A newer peer may append fields to its hello: this side still reads the prefix and reports
/// the mismatch instead of failing to decode.
#[test]
fn newer_hello_with_extra_fields_gives_version_mismatch() {
    let mut hello = AgentHello::new("0.9.0", "rpi5", "0.24.0");
    hello.protocol = PROTOCOL_VERSION + 1;
    let mut bytes = plain(&AgentMessage::Response {
        id: RequestId(1),
        result: Ok(Response::Hello(hello)),
    });
    bytes.extend_from_slice(&[3, b'n', b'e', b'w', 0x7F]); // fields v1 does not know
    let mut frame = vec![0u8; bytes.len() + 8];
    let n = cobs_encode(&bytes, &mut frame);
    frame.truncate(n);
    frame.push(0);
    let decoded = decode_all::<AgentMessage>(&frame);
    let Ok(AgentMessage::Response {
        result: Ok(Response::Hello(hello)),
        ..
    }) = &decoded[0]
    else {
        panic!("{decoded:?}")
    };
    assert_eq!(
        hello.check_compatible(),
        Err(Error::VersionMismatch {
            host: PROTOCOL_VERSION,
            agent: PROTOCOL_VERSION + 1
        })
    );
}

/// Minimal COBS encoder for building hand-made frames.
fn cobs_encode(data: &[u8], out: &mut [u8]) -> usize {
    let mut code_at = 0;
    let mut o = 1;
    let mut code = 1u8;
    for &b in data {
        if b == 0 {
            out[code_at] = code;
            code_at = o;
            o += 1;
            code = 1;
        } else {
            out[o] = b;
            o += 1;
            code += 1;
            if code == 0xFF {
                out[code_at] = code;
                code_at = o;
                o += 1;
                code = 1;
            }
        }
    }
    out[code_at] = code;
    o
}

fn sample_messages(n: u64) -> Vec<HostMessage> {
    let mut g = Gen::new(99);
    (0..n).map(|_| g.host_message()).collect()
}

fn stream_of(msgs: &[HostMessage]) -> Vec<u8> {
    msgs.iter()
        .flat_map(|m| encode_to_vec(m).unwrap())
        .collect()
}

#[test]
fn several_frames_in_one_read_and_byte_by_byte() {
    let msgs = sample_messages(40);
    let stream = stream_of(&msgs);
    let at_once: Vec<_> = decode_all::<HostMessage>(&stream)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(at_once, msgs);

    let mut decoder = Box::new(Decoder::<HostMessage>::new());
    let mut one_by_one = Vec::new();
    for b in &stream {
        one_by_one.extend(decoder.feed(std::slice::from_ref(b)).map(Result::unwrap));
    }
    assert_eq!(one_by_one, msgs);
    assert_eq!(decoder.buffered(), 0);
}

#[test]
fn partial_frame_waits_for_the_rest() {
    let msgs = sample_messages(1);
    let frame = stream_of(&msgs);
    let mut decoder = Box::new(Decoder::<HostMessage>::new());
    let (head, tail) = frame.split_at(frame.len() / 2);
    assert_eq!(decoder.feed(head).count(), 0);
    assert_eq!(decoder.buffered(), head.len());
    let got: Vec<_> = decoder.feed(tail).collect();
    assert_eq!(got, vec![Ok(msgs[0].clone())]);
}

#[test]
fn garbage_between_frames_costs_one_error() {
    let msgs = sample_messages(3);
    let mut stream = encode_to_vec(&msgs[0]).unwrap();
    stream.extend_from_slice(b"Welcome to Raspberry Pi OS\n");
    stream.push(0);
    stream.extend(encode_to_vec(&msgs[1]).unwrap());
    stream.extend(encode_to_vec(&msgs[2]).unwrap());
    let got = decode_all::<HostMessage>(&stream);
    assert_eq!(
        got,
        vec![
            Ok(msgs[0].clone()),
            Err(FrameError::Decode),
            Ok(msgs[1].clone()),
            Ok(msgs[2].clone())
        ]
    );
}

#[test]
fn leading_delimiter_absorbs_a_banner() {
    // Without a delimiter the banner would glue onto the first frame; the writer's resync
    // delimiter ends it, and empty frames are not reported.
    let msgs = sample_messages(1);
    let mut stream = b"Last login: Mon".to_vec();
    stream.push(DELIMITER);
    stream.push(DELIMITER);
    stream.extend(encode_to_vec(&msgs[0]).unwrap());
    stream.push(DELIMITER);
    let got = decode_all::<HostMessage>(&stream);
    assert_eq!(got, vec![Err(FrameError::Decode), Ok(msgs[0].clone())]);

    let mut clean = vec![DELIMITER];
    clean.extend(encode_to_vec(&msgs[0]).unwrap());
    assert_eq!(decode_all::<HostMessage>(&clean), vec![Ok(msgs[0].clone())]);
}

#[test]
fn oversize_frame_is_reported_once_and_skipped() {
    let msgs = sample_messages(2);
    for split in [1usize, 7, 1000, 40_000, usize::MAX] {
        let mut stream = encode_to_vec(&msgs[0]).unwrap();
        stream.extend(std::iter::repeat_n(0x41u8, 3 * MAX_FRAME + 17));
        stream.push(0);
        stream.extend(encode_to_vec(&msgs[1]).unwrap());
        let mut decoder = Box::new(Decoder::<HostMessage>::new());
        let mut got = Vec::new();
        for piece in stream.chunks(split.min(stream.len())) {
            got.extend(decoder.feed(piece));
        }
        assert_eq!(
            got,
            vec![
                Ok(msgs[0].clone()),
                Err(FrameError::Oversize { limit: MAX_FRAME }),
                Ok(msgs[1].clone())
            ],
            "split {split}"
        );
    }
}

#[test]
fn frame_of_exactly_the_limit_is_accepted() {
    // A small decoder makes the boundary easy to hit.
    const N: usize = 64;
    let status = |file: &str| HostMessage {
        id: RequestId(1),
        request: Request::PushChunk(Chunk::new(UploadId(1), 0, 0, file.as_bytes()).unwrap()),
    };
    let mut file = String::from("f");
    while encode_to_vec(&status(&file)).unwrap().len() < N {
        file.push('x');
        assert!(file.len() <= MAX_FILE_PATH);
    }
    let exact = encode_to_vec(&status(&file)).unwrap();
    assert_eq!(exact.len(), N);
    file.push('x');
    let over = encode_to_vec(&status(&file)).unwrap();
    let small = status("f");

    let mut decoder = Decoder::<HostMessage, N>::new();
    let mut stream = exact.clone();
    stream.extend(&over);
    stream.extend(encode_to_vec(&small).unwrap());
    let got: Vec<_> = decoder.feed(&stream).collect();
    assert_eq!(got.len(), 3);
    assert!(got[0].is_ok());
    assert_eq!(got[1], Err(FrameError::Oversize { limit: N }));
    assert_eq!(got[2], Ok(small));
}

#[test]
fn wrong_direction_is_a_decode_error_not_a_panic() {
    let mut g = Gen::new(3);
    let stream: Vec<u8> = (0..200)
        .flat_map(|_| encode_to_vec(&g.agent_message()).unwrap())
        .collect();
    // Whatever it makes of them, it must get through them all.
    let got = decode_all::<HostMessage>(&stream);
    assert_eq!(got.len(), 200);
}

#[test]
fn reset_drops_a_partial_frame() {
    let msgs = sample_messages(2);
    let first = encode_to_vec(&msgs[0]).unwrap();
    let mut decoder = Box::new(Decoder::<HostMessage>::new());
    assert_eq!(decoder.feed(&first[..first.len() - 1]).count(), 0);
    decoder.reset();
    assert_eq!(decoder.buffered(), 0);
    let got: Vec<_> = decoder.feed(&encode_to_vec(&msgs[1]).unwrap()).collect();
    assert_eq!(got, vec![Ok(msgs[1].clone())]);
}

#[test]
fn remaining_input_is_visible() {
    let msgs = sample_messages(2);
    let stream = stream_of(&msgs);
    let mut decoder = Box::new(Decoder::<HostMessage>::new());
    let mut frames = decoder.feed(&stream);
    assert_eq!(frames.next(), Some(Ok(msgs[0].clone())));
    assert_eq!(frames.remaining(), &encode_to_vec(&msgs[1]).unwrap()[..]);
}

#[test]
fn errors_display_their_facts() {
    let cases = [
        (
            Error::ChecksumMismatch { offset: 65536 },
            "chunk checksum mismatch at offset 65536",
        ),
        (
            Error::NoSpace {
                needed: 10,
                available: 3,
            },
            "no space on the board: 10 bytes needed, 3 available",
        ),
        (
            Error::OutOfOrder { expected: 32768 },
            "chunk out of order: agent expects offset 32768",
        ),
    ];
    for (err, text) in cases {
        assert_eq!(err.to_string(), text);
    }
    let long = "x".repeat(500);
    let Error::Internal(msg) = Error::internal(&long) else {
        unreachable!()
    };
    assert_eq!(msg.len(), MAX_ERROR_MESSAGE);
    let io: Error = std::io::Error::other("disk on fire").into();
    assert_eq!(io, Error::io("disk on fire"));
    assert_eq!(
        FrameError::Oversize { limit: 10 }.to_string(),
        "frame larger than 10 bytes dropped"
    );
}

#[test]
fn agent_message_helpers() {
    let ev = AgentMessage::Event {
        id: RequestId(9),
        event: Event::Trace(TraceBatch {
            run: RunId(1),
            seq: 0,
            dropped: 0,
            events: heapless::Vec::new(),
        }),
    };
    assert_eq!(ev.id(), RequestId(9));
    assert!(!ev.is_final());
    let done = AgentMessage::Response {
        id: RequestId(9),
        result: Err(Error::Cancelled),
    };
    assert!(done.is_final());
}
