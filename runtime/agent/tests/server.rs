//! The protocol server over a real socket pair: the test plays the host with raw
//! `edgevlm-proto` frames, the server runs in a thread on a real model store.
#![allow(
    clippy::result_large_err,
    reason = "the wire Error is a fixed-capacity no_std value, returned as the protocol carries it"
)]

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use edgevlm_agent::server::Level;
use edgevlm_agent::store::{self, ModelStore, SPACE_MARGIN};
use edgevlm_agent::{ServeStats, Server};
use edgevlm_proto::{
    bounded, frame, AgentHello, AgentMessage, BenchInput, BenchSpec, BenchSummary, Chunk, Decoder,
    Error, Event, FileSpec, HostHello, HostMessage, ModelInfo, ModelRef, Request, RequestId,
    Response, RunId, TraceBatch, TraceEvent, TraceOptions, UploadId, UploadSpec, MAX_CHUNK,
    PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo");
const DEMO_NAME: &str = "demo-parts";

/// The host end of one link.
struct Peer {
    stream: UnixStream,
    decoder: Box<Decoder<AgentMessage>>,
    inbox: VecDeque<AgentMessage>,
    next_id: u32,
    server: Option<JoinHandle<io::Result<ServeStats>>>,
}

impl Peer {
    fn connect(server: &Arc<Server>) -> Peer {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let server = server.clone();
        let handle = std::thread::spawn(move || {
            let reader = agent.try_clone().unwrap();
            server.serve(reader, agent)
        });
        Peer {
            stream: host,
            decoder: Box::default(),
            inbox: VecDeque::new(),
            next_id: 1,
            server: Some(handle),
        }
    }

    /// A connected peer that has said a compatible hello.
    fn greeted(server: &Arc<Server>) -> Peer {
        let mut peer = Peer::connect(server);
        let hello = peer.hello(HostHello::new("test"));
        assert_eq!(hello.check_compatible(), Ok(()));
        peer
    }

    fn hello(&mut self, hello: HostHello) -> AgentHello {
        match self.call(Request::Hello(hello)) {
            (events, Ok(Response::Hello(h))) if events.is_empty() => h,
            other => panic!("hello answered with {other:?}"),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn send(&mut self, request: Request) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let frame = frame::encode_to_vec(&HostMessage { id, request }).unwrap();
        self.write(&frame);
        id
    }

    /// The next message from the agent, from the inbox first.
    fn next_message(&mut self) -> AgentMessage {
        if let Some(msg) = self.inbox.pop_front() {
            return msg;
        }
        let mut buf = [0u8; 8192];
        loop {
            let n = self.stream.read(&mut buf).expect("agent answers in time");
            assert!(n > 0, "agent closed the link");
            for frame in self.decoder.feed(&buf[..n]) {
                self.inbox
                    .push_back(frame.expect("the agent sends only valid frames"));
            }
            if let Some(msg) = self.inbox.pop_front() {
                return msg;
            }
        }
    }

    /// Events and final result of request `id`; messages about other requests stay queued.
    fn finish(&mut self, id: RequestId) -> (Vec<Event>, Result<Response, Error>) {
        let mut events = Vec::new();
        let mut others = VecDeque::new();
        let result = loop {
            match self.next_message() {
                AgentMessage::Event { id: i, event } if i == id => events.push(event),
                AgentMessage::Response { id: i, result } if i == id => break result,
                other => others.push_back(other),
            }
        };
        others.extend(self.inbox.drain(..));
        self.inbox = others;
        (events, result)
    }

    fn call(&mut self, request: Request) -> (Vec<Event>, Result<Response, Error>) {
        let id = self.send(request);
        self.finish(id)
    }

    /// The result of a request that streams nothing.
    fn result(&mut self, request: Request) -> Result<Response, Error> {
        let (events, result) = self.call(request);
        assert!(events.is_empty(), "{events:?}");
        result
    }

    /// Closes the host's end and returns what the server saw.
    fn close(mut self) -> ServeStats {
        self.stream.shutdown(std::net::Shutdown::Both).unwrap();
        self.server
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("the link ends without an I/O error")
    }
}

type Logs = Arc<Mutex<Vec<String>>>;

fn server_on(store: ModelStore) -> (Arc<Server>, Logs) {
    let logs: Logs = Arc::default();
    let sink = logs.clone();
    let server = Server::with_store(store, "sim").with_log(move |_level: Level, line: &str| {
        sink.lock().unwrap().push(line.to_owned());
    });
    (Arc::new(server), logs)
}

fn new_server() -> (tempfile::TempDir, Arc<Server>, Logs) {
    let tmp = tempfile::tempdir().unwrap();
    let (server, logs) = server_on(ModelStore::open(tmp.path().join("store")).unwrap());
    (tmp, server, logs)
}

/// Every regular file of the demo package (`path`, bytes), sorted by path.
/// Every file under `base`, as (path relative to it, bytes), sorted.
fn files_of(base: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(base: &Path, rel: &str, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(base.join(rel)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                walk(base, &rel, out);
            } else if kind.is_file() {
                out.push((rel.clone(), std::fs::read(base.join(&rel)).unwrap()));
            }
        }
    }
    let mut files = Vec::new();
    walk(base, "", &mut files);
    files.sort();
    files
}

fn demo_files(version: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = files_of(Path::new(DEMO));
    for (path, bytes) in &mut files {
        if path == "model.toml" {
            let text = String::from_utf8(bytes.clone()).unwrap();
            assert!(text.contains("version = \"1.0.0\""));
            *bytes = text
                .replace("version = \"1.0.0\"", &format!("version = \"{version}\""))
                .into_bytes();
        }
    }
    assert!(files.iter().any(|(p, _)| p == "model.onnx"));
    assert!(files.iter().any(|(p, _)| p.starts_with("samples/")));
    files
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn model_ref(name: &str, version: &str) -> ModelRef {
    ModelRef {
        name: bounded(name),
        version: bounded(version),
    }
}

fn upload_spec(name: &str, version: &str, files: &[(String, Vec<u8>)]) -> UploadSpec {
    let mut specs = heapless::Vec::new();
    for (path, bytes) in files {
        specs
            .push(FileSpec {
                path: bounded(path),
                size: bytes.len() as u64,
                sha256: sha256(bytes),
            })
            .unwrap();
    }
    UploadSpec {
        model: model_ref(name, version),
        files: specs,
    }
}

fn begin(peer: &mut Peer, spec: &UploadSpec) -> (UploadId, Vec<u64>) {
    match peer.result(Request::BeginUpload(spec.clone())) {
        Ok(Response::Upload(state)) => (state.upload, state.verified.to_vec()),
        other => panic!("begin upload: {other:?}"),
    }
}

/// Pushes `bytes[from..]` of file `index` in 32 KiB chunks, at most `max` of them; returns the
/// verified length the agent reported last.
fn push_file(
    peer: &mut Peer,
    upload: UploadId,
    index: u16,
    bytes: &[u8],
    from: u64,
    max: usize,
) -> u64 {
    let mut offset = from as usize;
    for _ in 0..max {
        if offset >= bytes.len() {
            break;
        }
        let end = (offset + MAX_CHUNK).min(bytes.len());
        let chunk = Chunk::new(upload, index, offset as u64, &bytes[offset..end]).unwrap();
        match peer.result(Request::PushChunk(chunk)) {
            Ok(Response::ChunkAccepted { file, verified }) => {
                assert_eq!((file, verified), (index, end as u64));
            }
            other => panic!("chunk {index}@{offset}: {other:?}"),
        }
        offset = end;
    }
    offset as u64
}

/// Uploads, commits and returns the info of a whole package.
fn push_package(
    peer: &mut Peer,
    name: &str,
    version: &str,
    files: &[(String, Vec<u8>)],
) -> ModelInfo {
    let spec = upload_spec(name, version, files);
    let (upload, verified) = begin(peer, &spec);
    for (i, (_, bytes)) in files.iter().enumerate() {
        push_file(peer, upload, i as u16, bytes, verified[i], usize::MAX);
    }
    match peer.result(Request::Commit { upload }) {
        Ok(Response::Committed(info)) => info,
        other => panic!("commit: {other:?}"),
    }
}

fn list(peer: &mut Peer) -> Vec<ModelInfo> {
    match peer.result(Request::ListModels) {
        Ok(Response::Models(models)) => models.to_vec(),
        other => panic!("list: {other:?}"),
    }
}

fn bench_spec(
    model: ModelRef,
    input: BenchInput,
    warmup: u32,
    iterations: u32,
    min_duration_ms: u32,
    trace: TraceOptions,
) -> BenchSpec {
    BenchSpec {
        model,
        warmup,
        iterations,
        min_duration_ms,
        threads: 1,
        input,
        prompt: heapless::String::new(),
        max_new_tokens: 0,
        trace,
    }
}

const FULL_TRACE: TraceOptions = TraceOptions {
    spans: true,
    tokens: false,
    memory_interval_ms: 5,
    top_nodes: 5,
};

fn batches(events: Vec<Event>) -> Vec<TraceBatch> {
    events
        .into_iter()
        .map(|e| match e {
            Event::Trace(batch) => batch,
        })
        .collect()
}

fn run_bench(peer: &mut Peer, spec: BenchSpec) -> (Vec<TraceBatch>, BenchSummary) {
    match peer.call(Request::RunBenchmark(spec)) {
        (events, Ok(Response::BenchDone(summary))) => (batches(events), summary),
        (_, other) => panic!("benchmark: {other:?}"),
    }
}

#[test]
fn handshake_reports_the_board() {
    let (_tmp, server, logs) = new_server();
    let mut peer = Peer::connect(&server);
    // The agent opens the link with a lone delimiter.
    let mut first = [0xffu8];
    peer.stream.read_exact(&mut first).unwrap();
    assert_eq!(first, [0x00]);

    let hello = peer.hello(HostHello::new("0.0.1-test"));
    assert_eq!(hello.check_compatible(), Ok(()));
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    assert_eq!(hello.board.as_str(), "sim");
    assert_eq!(hello.agent_version.as_str(), env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.tract_version.as_str(), edgevlm_runtime::TRACT_VERSION);
    assert_eq!(hello.cpu.arch.as_str(), std::env::consts::ARCH);
    assert!(hello.cpu.cores >= 1);
    assert!(hello.ram_total_kib > 0);
    assert!(hello.ram_available_kib > 0 && hello.ram_available_kib <= hello.ram_total_kib);
    assert_eq!(hello.chunk_limit(), MAX_CHUNK);
    assert_eq!(list(&mut peer), vec![]);

    let stats = peer.close();
    assert_eq!(
        stats,
        ServeStats {
            requests: 2,
            bad_frames: 0
        }
    );
    let logs = logs.lock().unwrap();
    assert!(
        logs.iter()
            .any(|l| l.contains("request=hello") && l.contains("host_version=\"0.0.1-test\"")),
        "{logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("request=list_models") && l.contains("outcome=ok")),
        "{logs:#?}"
    );
}

#[test]
fn requests_before_a_compatible_hello_are_refused() {
    let (_tmp, server, _logs) = new_server();
    let mut peer = Peer::connect(&server);
    assert_eq!(peer.result(Request::ListModels), Err(Error::BadMagic));
    assert_eq!(peer.result(Request::Rollback), Err(Error::BadMagic));

    // A newer host: the agent still says who it is, then refuses with the mismatch.
    let mut newer = HostHello::new("9.0.0");
    newer.protocol = PROTOCOL_VERSION + 1;
    let hello = peer.hello(newer);
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    let refused = peer.result(Request::ListModels).unwrap_err();
    assert_eq!(
        refused,
        Error::VersionMismatch {
            host: PROTOCOL_VERSION + 1,
            agent: PROTOCOL_VERSION
        }
    );
    let text = refused.to_string();
    assert!(
        text.contains(&format!(
            "host speaks v{}, agent speaks v{}",
            PROTOCOL_VERSION + 1,
            PROTOCOL_VERSION
        )) && text.contains("same edgevlm release"),
        "{text}"
    );

    // Not an edgevlm peer at all.
    let mut alien = HostHello::new("x");
    alien.magic = *b"SSH-";
    peer.hello(alien);
    assert_eq!(peer.result(Request::ListModels), Err(Error::BadMagic));

    // A compatible hello opens the gate.
    peer.hello(HostHello::new("test"));
    assert_eq!(list(&mut peer), vec![]);
    peer.close();
}

#[test]
fn upload_resume_commit_activate_remove_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (server, logs) = server_on(ModelStore::open(&root).unwrap());
    let files = demo_files("1.0.0");
    let spec = upload_spec(DEMO_NAME, "1.0.0", &files);
    let manifest_index = files.iter().position(|(p, _)| p == "model.toml").unwrap();
    let onnx_index = files.iter().position(|(p, _)| p == "model.onnx").unwrap();
    let onnx = &files[onnx_index].1;
    assert!(onnx.len() > MAX_CHUNK, "the demo graph spans two chunks");

    let mut peer = Peer::greeted(&server);
    let (upload, verified) = begin(&mut peer, &spec);
    assert_eq!(upload.0, store::UploadId::for_model(DEMO_NAME, "1.0.0").0);
    assert_eq!(verified, vec![0; files.len()]);

    push_file(
        &mut peer,
        upload,
        manifest_index as u16,
        &files[manifest_index].1,
        0,
        usize::MAX,
    );
    let at = push_file(&mut peer, upload, onnx_index as u16, onnx, 0, 1);
    assert_eq!(at, MAX_CHUNK as u64);

    // A chunk corrupted in transit is refused before it reaches the store.
    let staged = root
        .join("staging")
        .join(format!("{:08x}", upload.0))
        .join("pkg/model.onnx");
    let staged_before = std::fs::read(&staged).unwrap();
    let rest = &onnx[at as usize..];
    let mut bad = Chunk::new(
        upload,
        onnx_index as u16,
        at,
        &rest[..rest.len().min(MAX_CHUNK)],
    )
    .unwrap();
    bad.data[100] ^= 0x01;
    assert_eq!(
        peer.result(Request::PushChunk(bad)),
        Err(Error::ChecksumMismatch { offset: at })
    );
    assert_eq!(std::fs::read(&staged).unwrap(), staged_before);
    let status = server
        .store()
        .status(store::UploadId(upload.0), "model.onnx")
        .unwrap();
    assert_eq!(status, (at, onnx.len() as u64));

    // A chunk at the wrong offset names where to resume.
    let ahead = Chunk::new(upload, onnx_index as u16, at + 4096, &onnx[..1024]).unwrap();
    assert_eq!(
        peer.result(Request::PushChunk(ahead)),
        Err(Error::OutOfOrder { expected: at })
    );
    // A file index the upload does not have, an upload that does not exist.
    let stray = Chunk::new(upload, files.len() as u16, 0, b"x").unwrap();
    assert_eq!(peer.result(Request::PushChunk(stray)), Err(Error::NotFound));
    let unknown = Chunk::new(UploadId(upload.0 ^ 1), 0, 0, b"x").unwrap();
    assert_eq!(
        peer.result(Request::PushChunk(unknown)),
        Err(Error::NotFound)
    );
    // Committing now names the incomplete file.
    match peer.result(Request::Commit { upload }) {
        Err(Error::Incomplete { file, verified, .. }) => {
            assert_ne!(file.as_str(), "model.toml");
            assert!(
                verified
                    < files
                        .iter()
                        .find(|(p, _)| p == file.as_str())
                        .unwrap()
                        .1
                        .len() as u64
            );
        }
        other => panic!("{other:?}"),
    }
    let stats = peer.close();
    assert_eq!(stats.bad_frames, 0);

    // The link broke; the host comes back through a new agent process on the same store and
    // re-sends its begin: the answer says where each file resumes.
    let (server, _logs2) = server_on(ModelStore::open(&root).unwrap());
    let mut peer = Peer::greeted(&server);
    let (again, verified) = begin(&mut peer, &spec);
    assert_eq!(again, upload);
    let mut expected = vec![0u64; files.len()];
    expected[manifest_index] = files[manifest_index].1.len() as u64;
    expected[onnx_index] = MAX_CHUNK as u64;
    assert_eq!(verified, expected);
    for (i, (_, bytes)) in files.iter().enumerate() {
        push_file(&mut peer, upload, i as u16, bytes, verified[i], usize::MAX);
    }
    let info = match peer.result(Request::Commit { upload }) {
        Ok(Response::Committed(info)) => info,
        other => panic!("commit: {other:?}"),
    };
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let v1 = ModelInfo {
        name: bounded(DEMO_NAME),
        version: bounded("1.0.0"),
        files: files.len() as u16,
        bytes: total,
        manifest_sha256: sha256(&files[manifest_index].1),
        active: false,
        previous: false,
    };
    assert_eq!(info, v1);
    assert_eq!(list(&mut peer), vec![v1.clone()]);
    // The installed files are the pushed ones.
    for (path, bytes) in &files {
        let installed = root.join("models").join(DEMO_NAME).join("1.0.0").join(path);
        assert_eq!(&std::fs::read(installed).unwrap(), bytes, "{path}");
    }

    let v1_ref = model_ref(DEMO_NAME, "1.0.0");
    assert_eq!(
        peer.result(Request::Activate(v1_ref.clone())),
        Ok(Response::Done)
    );
    assert!(list(&mut peer)[0].active);
    assert_eq!(
        peer.result(Request::Remove(v1_ref.clone())),
        Err(Error::Busy)
    );
    assert_eq!(
        peer.result(Request::Activate(model_ref(DEMO_NAME, "7.0.0"))),
        Err(Error::NotFound)
    );
    assert_eq!(
        peer.result(Request::Activate(model_ref("../etc", "1"))),
        Err(Error::InvalidName)
    );

    // A second version, activated, then rolled back.
    let files2 = demo_files("2.0.0");
    let v2 = push_package(&mut peer, DEMO_NAME, "2.0.0", &files2);
    assert_eq!(v2.manifest_sha256, sha256(&files2[manifest_index].1));
    assert_ne!(v2.manifest_sha256, v1.manifest_sha256);
    let v2_ref = model_ref(DEMO_NAME, "2.0.0");
    assert_eq!(
        peer.result(Request::Activate(v2_ref.clone())),
        Ok(Response::Done)
    );
    let flags = |models: Vec<ModelInfo>| {
        models
            .into_iter()
            .map(|m| (m.version.to_string(), m.active, m.previous))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        flags(list(&mut peer)),
        vec![("1.0.0".into(), false, true), ("2.0.0".into(), true, false)]
    );
    assert_eq!(peer.result(Request::Rollback), Ok(Response::Done));
    assert_eq!(
        flags(list(&mut peer)),
        vec![("1.0.0".into(), true, false), ("2.0.0".into(), false, true)]
    );
    assert_eq!(
        peer.result(Request::Remove(v2_ref.clone())),
        Ok(Response::Done)
    );
    assert_eq!(peer.result(Request::Remove(v2_ref)), Err(Error::NotFound));
    assert_eq!(peer.result(Request::Rollback), Err(Error::NotFound));
    assert_eq!(flags(list(&mut peer)), vec![("1.0.0".into(), true, false)]);
    peer.close();

    let logs = logs.lock().unwrap();
    assert!(
        logs.iter().any(|l| l.contains("request=push_chunk")
            && l.contains("outcome=error")
            && l.contains("checksum mismatch")),
        "{logs:#?}"
    );
    // Accepted chunks are not logged one by one.
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("request=push_chunk") && l.contains("outcome=ok")),
        "{logs:#?}"
    );
}

#[test]
fn no_space_is_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ModelStore::open(tmp.path().join("store"))
        .unwrap()
        .with_free_space_probe(|_| Ok(1024 * 1024));
    let (server, _logs) = server_on(store);
    let mut peer = Peer::greeted(&server);
    let files = demo_files("1.0.0");
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(
        peer.result(Request::BeginUpload(upload_spec(
            DEMO_NAME, "1.0.0", &files
        ))),
        Err(Error::NoSpace {
            needed: total + SPACE_MARGIN,
            available: 1024 * 1024
        })
    );
    assert!(std::fs::read_dir(tmp.path().join("store/staging"))
        .unwrap()
        .next()
        .is_none());
    peer.close();
}

/// A server with the demo package installed, and a greeted peer.
fn demo_server() -> (tempfile::TempDir, Arc<Server>, Peer) {
    let (tmp, server, _logs) = new_server();
    let mut peer = Peer::greeted(&server);
    push_package(&mut peer, DEMO_NAME, "1.0.0", &demo_files("1.0.0"));
    (tmp, server, peer)
}

/// Checks what every benchmark stream must satisfy; returns all its events.
fn check_stream(batches: &[TraceBatch], summary: &BenchSummary) -> Vec<TraceEvent> {
    assert!(!batches.is_empty());
    for (i, b) in batches.iter().enumerate() {
        assert_eq!(b.seq, i as u32);
        assert_eq!(b.run, summary.run);
        assert!(!b.events.is_empty() || b.dropped > 0);
    }
    let dropped: u32 = batches.iter().map(|b| b.dropped).sum();
    assert_eq!(dropped, summary.dropped_events);
    let l = summary.latency;
    assert!(l.min_us > 0);
    assert!(l.min_us <= l.p50_us && l.p50_us <= l.p90_us && l.p90_us <= l.p99_us);
    assert!(l.p99_us <= l.max_us);
    assert!(l.min_us <= l.mean_us && l.mean_us <= l.max_us);
    assert!(summary.load_us > 0 && summary.first_run_us > 0);
    assert!(summary.peak_rss_kib > 0);
    assert!(
        summary.peak_pss_kib > 0,
        "smaps_rollup is readable on Linux 4.14+"
    );
    assert_eq!(summary.tokens, None);
    batches
        .iter()
        .flat_map(|b| b.events.iter().cloned())
        .collect()
}

fn memory_samples(events: &[TraceEvent]) -> Vec<(u64, u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Memory(m) => Some((m.t_us, m.rss_kib, m.pss_kib)),
            _ => None,
        })
        .collect()
}

/// Checks the per-node profile and returns the node count.
fn check_nodes(events: &[TraceEvent], top: usize) -> usize {
    let nodes: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Node(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    assert!(!nodes.is_empty() && nodes.len() <= top, "{nodes:#?}");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n.rank, i as u16);
        assert_eq!(n.graph.as_str(), "main");
        assert!(!n.node.is_empty() && !n.op.is_empty(), "{n:?}");
        assert!(n.iterations >= 1 && n.iterations <= 10, "{n:?}");
        assert!(n.share_permille <= 1000);
    }
    assert!(nodes
        .windows(2)
        .all(|w| w[0].total_us >= w[1].total_us && w[0].share_permille >= w[1].share_permille));
    let share: u32 = nodes.iter().map(|n| u32::from(n.share_permille)).sum();
    assert!(share <= 1000 && share > 0, "{share}");
    // The profile comes after the last iteration.
    let last_iteration = events
        .iter()
        .rposition(|e| matches!(e, TraceEvent::Iteration(_)))
        .unwrap();
    let first_node = events
        .iter()
        .position(|e| matches!(e, TraceEvent::Node(_)))
        .unwrap();
    assert!(first_node > last_iteration);
    nodes.len()
}

#[test]
fn synthetic_benchmark_streams_spans_memory_and_nodes() {
    let (_tmp, server, mut peer) = demo_server();
    let spec = bench_spec(
        model_ref(DEMO_NAME, "1.0.0"),
        BenchInput::Synthetic { seed: 7 },
        2,
        20,
        150,
        FULL_TRACE,
    );
    let (batches, summary) = run_bench(&mut peer, spec);
    let events = check_stream(&batches, &summary);
    assert_eq!(summary.model.as_str(), DEMO_NAME);
    assert_eq!(summary.version.as_str(), "1.0.0");
    assert_eq!(summary.threads, 1);
    assert_eq!(summary.warmup, 2);
    assert!(summary.iterations >= 20);
    let installed = server.store().entry(DEMO_NAME, "1.0.0").unwrap();
    assert_eq!(summary.model_bytes, installed.size_bytes);

    // One infer span and one iteration event per iteration, indexes continuing after warmup.
    let iterations: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Iteration(i) => Some((i.iteration, i.warmup, i.duration_us)),
            _ => None,
        })
        .collect();
    let total = (summary.warmup + summary.iterations) as usize;
    assert_eq!(iterations.len(), total);
    for (i, (index, warmup, _)) in iterations.iter().enumerate() {
        assert_eq!(*index, i as u32);
        assert_eq!(*warmup, i < 2);
    }
    assert_eq!(summary.first_run_us, iterations[0].2);
    let timed: Vec<u64> = iterations[2..].iter().map(|i| i.2).collect();
    assert_eq!(summary.latency.max_us, *timed.iter().max().unwrap());
    assert_eq!(summary.latency.min_us, *timed.iter().min().unwrap());
    let spans: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Span(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(spans.len(), total);
    assert!(spans.iter().all(|s| s.stage.as_str() == "infer"));
    assert!(spans
        .windows(2)
        .all(|w| w[1].start_us >= w[0].start_us + w[0].duration_us));
    // Timed iterations ran for at least the minimum duration. The agent's clock for it starts
    // before the first timed iteration copies its inputs and stops at the check after the last
    // one, so the spans alone cover the duration less those two gaps (microseconds each; 1 ms
    // allowed). Without the minimum, 20 iterations of this model take about 10 ms.
    let timed_span =
        spans.last().unwrap().start_us + spans.last().unwrap().duration_us - spans[2].start_us;
    assert!(timed_span + 1_000 >= 150_000, "{timed_span}");

    let memory = memory_samples(&events);
    assert!(
        memory.len() >= 10,
        "5 ms samples over > 150 ms: {}",
        memory.len()
    );
    assert!(memory.windows(2).all(|w| w[1].0 > w[0].0));
    assert!(memory.iter().all(|m| m.1 > 0 && m.2 > 0));
    assert!(summary.peak_rss_kib >= memory.iter().map(|m| m.1).max().unwrap());
    assert!(summary.peak_pss_kib >= memory.iter().map(|m| m.2).max().unwrap());
    check_nodes(&events, 5);

    // The traces are kept: a replay gives the same batches.
    let (replayed, done) = peer.call(Request::FetchTraces { run: None });
    assert_eq!(
        done,
        Ok(Response::TracesDone {
            run: summary.run,
            batches: batches.len() as u32
        })
    );
    assert_eq!(self::batches(replayed), batches);
    let (_, by_id) = peer.call(Request::FetchTraces {
        run: Some(summary.run),
    });
    assert!(matches!(by_id, Ok(Response::TracesDone { run, .. }) if run == summary.run));
    assert_eq!(
        peer.result(Request::FetchTraces {
            run: Some(RunId(summary.run.0.wrapping_add(1000)))
        }),
        Err(Error::NotFound)
    );

    // Nothing traced: no events, only the summary; the run id moves on.
    let quiet = bench_spec(
        model_ref(DEMO_NAME, "1.0.0"),
        BenchInput::Synthetic { seed: 7 },
        0,
        3,
        0,
        TraceOptions::NONE,
    );
    let (none, quiet) = run_bench(&mut peer, quiet);
    assert!(none.is_empty(), "{none:?}");
    assert_eq!(quiet.iterations, 3);
    assert_eq!(quiet.warmup, 0);
    assert_ne!(quiet.run, summary.run);
    peer.close();
}

#[test]
fn package_image_benchmark_runs_the_whole_pipeline() {
    let (_tmp, _server, mut peer) = demo_server();
    let sample = demo_files("1.0.0")
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| p.starts_with("samples/ok_") && p.ends_with(".png"))
        .unwrap();
    let spec = bench_spec(
        model_ref(DEMO_NAME, "1.0.0"),
        BenchInput::PackageFile(bounded(&sample)),
        1,
        10,
        100,
        FULL_TRACE,
    );
    let (batches, summary) = run_bench(&mut peer, spec);
    let events = check_stream(&batches, &summary);
    assert_eq!(summary.warmup, 1);
    assert!(summary.iterations >= 10);

    let spans: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Span(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let total = summary.warmup + summary.iterations;
    for iteration in 0..total {
        let stages: Vec<_> = spans.iter().filter(|s| s.iteration == iteration).collect();
        let names: Vec<&str> = stages.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(
            names,
            ["decode", "preprocess", "infer", "postprocess"],
            "{iteration}"
        );
        assert!(stages
            .windows(2)
            .all(|w| w[1].start_us >= w[0].start_us + w[0].duration_us));
    }
    assert!(memory_samples(&events).len() >= 5);
    check_nodes(&events, 5);

    // The same image sent inline gives the same pipeline.
    let bytes = demo_files("1.0.0")
        .into_iter()
        .find(|(p, _)| *p == sample)
        .unwrap()
        .1;
    let inline = bench_spec(
        model_ref(DEMO_NAME, "1.0.0"),
        BenchInput::Image(heapless::Vec::from_slice(&bytes).unwrap()),
        0,
        2,
        0,
        TraceOptions {
            memory_interval_ms: 0,
            top_nodes: 0,
            ..FULL_TRACE
        },
    );
    let (batches, summary) = run_bench(&mut peer, inline);
    let events = check_stream(&batches, &summary);
    let stages: BTreeSet<String> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Span(s) => Some(s.stage.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(stages.len(), 4, "{stages:?}");
    assert!(!events
        .iter()
        .any(|e| matches!(e, TraceEvent::Node(_) | TraceEvent::Memory(_))));

    // Inputs outside the package, missing, or not images.
    let with_input = |input| {
        bench_spec(
            model_ref(DEMO_NAME, "1.0.0"),
            input,
            0,
            1,
            0,
            TraceOptions::NONE,
        )
    };
    let refused = |peer: &mut Peer, input| {
        let (_, result) = peer.call(Request::RunBenchmark(with_input(input)));
        result.unwrap_err()
    };
    assert_eq!(
        refused(
            &mut peer,
            BenchInput::PackageFile(bounded("../../active.toml"))
        ),
        Error::InvalidName
    );
    assert_eq!(
        refused(
            &mut peer,
            BenchInput::PackageFile(bounded("samples/none.png"))
        ),
        Error::NotFound
    );
    assert_eq!(
        refused(&mut peer, BenchInput::PackageFile(bounded("samples"))),
        Error::InvalidName
    );
    assert_eq!(
        refused(&mut peer, BenchInput::PackageFile(bounded("model.toml"))),
        Error::Unsupported
    );
    let missing = bench_spec(
        model_ref(DEMO_NAME, "3.0.0"),
        BenchInput::Synthetic { seed: 1 },
        0,
        1,
        0,
        TraceOptions::NONE,
    );
    assert_eq!(
        peer.call(Request::RunBenchmark(missing)).1,
        Err(Error::NotFound)
    );
    peer.close();
}

#[test]
fn raw_package_runs_synthetic_but_not_the_image_pipeline() {
    let (_tmp, server, _logs) = new_server();
    let mut peer = Peer::greeted(&server);
    let mut files = demo_files("1.0.0");
    for (path, bytes) in &mut files {
        if path == "model.toml" {
            let text = String::from_utf8(bytes.clone()).unwrap();
            *bytes = text
                .replace("name = \"demo-parts\"", "name = \"demo-raw\"")
                .replace("task = \"classification\"", "task = \"raw\"")
                .into_bytes();
        }
    }
    push_package(&mut peer, "demo-raw", "1.0.0", &files);
    let spec = |input| {
        bench_spec(
            model_ref("demo-raw", "1.0.0"),
            input,
            0,
            2,
            0,
            TraceOptions::NONE,
        )
    };
    let (_, ok) = peer.call(Request::RunBenchmark(spec(BenchInput::Synthetic {
        seed: 2,
    })));
    assert!(matches!(ok, Ok(Response::BenchDone(s)) if s.iterations == 2));
    let (_, refused) = peer.call(Request::RunBenchmark(spec(BenchInput::PackageFile(
        bounded("samples/ok_01.png"),
    ))));
    assert_eq!(refused, Err(Error::Unsupported));
    peer.close();
}

#[test]
fn cancel_stops_a_long_benchmark() {
    let (_tmp, _server, mut peer) = demo_server();
    // Nothing to cancel yet.
    assert_eq!(
        peer.result(Request::Cancel { id: RequestId(999) }),
        Err(Error::NotFound)
    );
    let spec = bench_spec(
        model_ref(DEMO_NAME, "1.0.0"),
        BenchInput::Synthetic { seed: 1 },
        0,
        u32::MAX,
        600_000,
        FULL_TRACE,
    );
    let bench = peer.send(Request::RunBenchmark(spec));
    // Wait until it streams, so it is running, not queued.
    match peer.next_message() {
        AgentMessage::Event { id, .. } if id == bench => {}
        other => panic!("before the first trace batch: {other:?}"),
    }
    let started = std::time::Instant::now();
    let cancel = peer.send(Request::Cancel { id: bench });
    assert_eq!(peer.finish(cancel).1, Ok(Response::Done));
    let (_, result) = peer.finish(bench);
    assert_eq!(result, Err(Error::Cancelled));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The cancelled run's traces are kept; the link goes on.
    let (replayed, done) = peer.call(Request::FetchTraces { run: None });
    assert!(matches!(done, Ok(Response::TracesDone { .. })), "{done:?}");
    assert!(!replayed.is_empty());
    assert_eq!(list(&mut peer).len(), 1);
    peer.close();
}

#[test]
fn link_loss_cancels_a_running_benchmark() {
    let (_tmp, server, mut peer) = demo_server();
    let spec = bench_spec(
        model_ref(DEMO_NAME, "1.0.0"),
        BenchInput::Synthetic { seed: 1 },
        0,
        u32::MAX,
        600_000,
        FULL_TRACE,
    );
    let bench = peer.send(Request::RunBenchmark(spec));
    loop {
        if let AgentMessage::Event { id, .. } = peer.next_message() {
            if id == bench {
                break;
            }
        }
    }
    let started = std::time::Instant::now();
    // serve() returns once the running benchmark noticed the link is gone.
    let stats = peer.close();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stats.bad_frames, 0);
    // The server serves the next link.
    let mut peer = Peer::greeted(&server);
    assert_eq!(list(&mut peer).len(), 1);
    peer.close();
}

#[test]
fn garbage_on_the_link_is_skipped() {
    let (_tmp, server, _logs) = new_server();
    let mut peer = Peer::connect(&server);
    // Random bytes (with zeros in them), a frame that is valid COBS but no message, a frame
    // that is not valid COBS, and a frame larger than any message.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..5000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    peer.write(&noise);
    peer.write(&[0x00, 0x03, 0x01, 0xff, 0x00]);
    peer.write(&[0x05, 0x01, 0x00]);
    let mut huge = vec![0x01u8; 40_000];
    huge.push(0x00);
    peer.write(&huge);
    // Then a real request: answered.
    let hello = peer.hello(HostHello::new("after-garbage"));
    assert_eq!(hello.check_compatible(), Ok(()));
    assert_eq!(list(&mut peer), vec![]);
    let stats = peer.close();
    assert!(stats.bad_frames >= 3, "{stats:?}");
}

#[test]
fn serial_daemon_serves_a_pty_and_stops_on_request() {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use std::sync::atomic::{AtomicBool, Ordering};

    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let device = PathBuf::from(ptsname(&master, Vec::new()).unwrap().to_str().unwrap());
    let mut master = std::fs::File::from(master);
    // A fresh pty echoes what the host writes until someone makes it raw; the daemon does, but
    // only once it opened the port. Make it raw now, so the host reads only the agent's bytes.
    drop(edgevlm_board_linux::serial::open(&device, 921_600).unwrap());

    let (_tmp, server, logs) = new_server();
    // A port that cannot be opened fails at once.
    let missing = server.serve_serial(
        Path::new("/dev/edgevlm-no-such-tty"),
        115_200,
        Arc::new(AtomicBool::new(false)),
    );
    assert!(missing.is_err());

    let stop = Arc::new(AtomicBool::new(false));
    let daemon = {
        let (server, stop, device) = (server.clone(), stop.clone(), device.clone());
        std::thread::spawn(move || server.serve_serial(&device, 921_600, stop))
    };
    let hello = frame::encode_to_vec(&HostMessage {
        id: RequestId(1),
        request: Request::Hello(HostHello::new("pty")),
    })
    .unwrap();
    // The daemon flushes the line when it opens the port: say hello until it answers.
    let mut decoder: Box<Decoder<AgentMessage>> = Box::default();
    let mut buf = [0u8; 4096];
    let started = std::time::Instant::now();
    let answer = 'read: loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no answer on the pty"
        );
        master.write_all(&hello).unwrap();
        let mut fds = [PollFd::new(&master, PollFlags::IN)];
        let wait = Timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        if poll(&mut fds, Some(&wait)).unwrap() == 0 {
            continue;
        }
        let n = match master.read(&mut buf) {
            Ok(n) => n,
            // No slave open yet (the daemon has not opened the port): the master hangs up.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => panic!("reading the pty: {e}"),
        };
        if let Some(msg) = decoder.feed(&buf[..n]).next() {
            break 'read msg.unwrap();
        }
    };
    match answer {
        AgentMessage::Response {
            id: RequestId(1),
            result: Ok(Response::Hello(h)),
        } => assert_eq!(h.board.as_str(), "sim"),
        other => panic!("{other:?}"),
    }

    // The host side goes away: the daemon keeps going (retrying the port) until told to stop.
    drop(master);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!daemon.is_finished());
    let started = std::time::Instant::now();
    stop.store(true, Ordering::SeqCst);
    while !daemon.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "daemon did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.join().unwrap().unwrap();
    let logs = logs.lock().unwrap();
    assert!(
        logs.iter().any(|l| l.contains("event=serial_open")),
        "{logs:#?}"
    );
}

/// A text-generation package, as `edgevlm models import` makes it from the Mistral-layout
/// fixture snapshot (int8 variant).
fn generation_files() -> Vec<(String, Vec<u8>)> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    let options = edgevlm_runtime::import::ImportOptions {
        variant: Some("int8".into()),
        name: Some("tiny-mistral".into()),
        ..Default::default()
    };
    edgevlm_runtime::import::import(
        &Path::new(DEMO).join("../fixtures/vlm/mistral"),
        &out,
        &options,
    )
    .unwrap();
    files_of(&out)
}

#[test]
fn generation_benchmark_reports_tokens_and_per_token_times() {
    let (_tmp, server, _logs) = new_server();
    let mut peer = Peer::greeted(&server);
    push_package(&mut peer, "tiny-mistral", "1.0.0", &generation_files());
    let mut spec = bench_spec(
        model_ref("tiny-mistral", "1.0.0"),
        BenchInput::Synthetic { seed: 0 },
        1,
        3,
        0,
        TraceOptions {
            spans: true,
            tokens: true,
            memory_interval_ms: 10,
            top_nodes: 5,
        },
    );
    spec.prompt = bounded("Is there a scratch on the part?");
    spec.max_new_tokens = 6;
    let (batches, summary) = run_bench(&mut peer, spec);
    let events: Vec<TraceEvent> = batches
        .iter()
        .flat_map(|b| b.events.iter().cloned())
        .collect();
    let tokens = summary
        .tokens
        .expect("a generation benchmark reports token statistics");
    assert!(tokens.prompt_tokens > 5, "{tokens:?}");
    // Tokens of the timed iterations only: 3 iterations of at most 6 (an EOS may end one early).
    assert!(
        tokens.generated_tokens >= 3 && tokens.generated_tokens <= 18,
        "{tokens:?}"
    );
    assert!(
        tokens.ttft_p50_us > 0 && tokens.inter_token_p50_us > 0,
        "{tokens:?}"
    );
    let token_events: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Token(t) => Some(*t),
            _ => None,
        })
        .collect();
    // Warmup and timed iterations, one event per generated token, indexes from 0.
    for iteration in 0..4 {
        let of_run: Vec<_> = token_events
            .iter()
            .filter(|t| t.iteration == iteration)
            .collect();
        assert!(
            !of_run.is_empty() && of_run.len() <= 6,
            "iteration {iteration}: {of_run:?}"
        );
        assert!(of_run.iter().enumerate().all(|(i, t)| t.index == i as u32));
        assert!(of_run
            .windows(2)
            .all(|w| w[1].start_us >= w[0].start_us + w[0].duration_us));
    }
    let stages: BTreeSet<String> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Span(s) => Some(s.stage.as_str().to_owned()),
            _ => None,
        })
        .collect();
    for stage in ["preprocess", "prefill", "decode"] {
        assert!(stages.contains(stage), "{stages:?}");
    }
    // No per-node profile for generation yet: no Node events, and the run still succeeds.
    assert!(!events.iter().any(|e| matches!(e, TraceEvent::Node(_))));

    // An image input for a text model is refused.
    let spec = bench_spec(
        model_ref("tiny-mistral", "1.0.0"),
        BenchInput::PackageFile(bounded("config.json")),
        0,
        1,
        0,
        FULL_TRACE,
    );
    assert_eq!(
        peer.result(Request::RunBenchmark(spec)),
        Err(Error::Unsupported)
    );
}
