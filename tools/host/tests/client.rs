//! The host client against the real agent server (`edgevlm_agent::server`), in process over
//! Unix socket pairs, with a real model store in a temporary directory: handshake, push, resume
//! after a broken link, retransmission of corrupted or lost chunks, model management, benchmarks.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use edgevlm_agent::server::{ServeStats, Server, ServerConfig};
use edgevlm_host::client::{Client, ClientError, ClientOptions, PushOptions, PushPhase};
use edgevlm_host::inventory::{Board, Endpoint, Inventory};
use edgevlm_host::package::LocalPackage;
use edgevlm_host::record::RunSettings;
use edgevlm_host::transport::Link;
use edgevlm_proto::{self as proto, frame, BenchInput, BenchSpec, HostMessage, Request};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo() -> PathBuf {
    repo().join("models/demo")
}

fn options() -> ClientOptions {
    ClientOptions {
        handshake_timeout: Duration::from_secs(20),
        request_timeout: Duration::from_secs(60),
        probe_after: Duration::from_millis(500),
        ..ClientOptions::default()
    }
}

/// Copies the demo package to `dir` with `[model] version` changed.
fn demo_version(dir: &Path, version: &str) -> PathBuf {
    copy_tree(&demo(), dir);
    let manifest = dir.join("model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let text = text.replacen(
        "version = \"1.0.0\"",
        &format!("version = \"{version}\""),
        1,
    );
    std::fs::write(&manifest, text).unwrap();
    dir.to_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// One link to a fresh agent server over the store at `store`: the agent end is served on its
/// own thread; `wrap` may interpose on the bytes the host writes.
fn connect_with(
    store: &Path,
    wrap: impl FnOnce(UnixStream) -> Box<dyn Write + Send>,
) -> (
    Result<Client, ClientError>,
    JoinHandle<io::Result<ServeStats>>,
) {
    let server = Server::new(ServerConfig {
        store: store.to_owned(),
        board: "sim".into(),
        cache_dir: None,
    })
    .unwrap();
    connect_server(server, wrap)
}

/// One link to `server`, served on its own thread.
fn connect_server(
    server: Server,
    wrap: impl FnOnce(UnixStream) -> Box<dyn Write + Send>,
) -> (
    Result<Client, ClientError>,
    JoinHandle<io::Result<ServeStats>>,
) {
    let (host, agent) = UnixStream::pair().unwrap();
    let served = std::thread::spawn(move || server.serve(agent.try_clone().unwrap(), agent));
    let writer = wrap(host.try_clone().unwrap());
    let reader = host.try_clone().unwrap();
    let link = Link::from_streams(reader, writer).on_close(move || {
        let _ = host.shutdown(Shutdown::Both);
    });
    (
        Client::connect(link, "test-board", "unix:pair", options()),
        served,
    )
}

fn connect(store: &Path) -> (Client, JoinHandle<io::Result<ServeStats>>) {
    let (client, served) = connect_with(store, |s| Box::new(s));
    (client.unwrap(), served)
}

/// Closes the client and waits until the agent's side of the link is done.
fn close(client: Client, served: JoinHandle<io::Result<ServeStats>>) {
    drop(client);
    let _ = served.join().unwrap();
}

fn installed_file(store: &Path, name: &str, version: &str, path: &str) -> Vec<u8> {
    std::fs::read(store.join("models").join(name).join(version).join(path)).unwrap()
}

fn assert_installed_like(store: &Path, package: &LocalPackage) {
    for f in &package.files {
        assert_eq!(
            installed_file(store, &package.name, &package.version, &f.path),
            std::fs::read(&f.local).unwrap(),
            "{} differs on the board",
            f.path
        );
    }
}

fn state(models: &[proto::ModelInfo]) -> Vec<(String, String, bool, bool)> {
    models
        .iter()
        .map(|m| {
            (
                m.name.to_string(),
                m.version.to_string(),
                m.active,
                m.previous,
            )
        })
        .collect()
}

#[test]
fn handshake_push_list_activate_and_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut client, served) = connect(&store);
    assert_eq!(client.hello().protocol, proto::PROTOCOL_VERSION);
    assert_eq!(client.facts().profile, "sim");
    assert_eq!(client.facts().name, "test-board");
    assert!(client.facts().cores > 0);
    assert!(client.models().unwrap().is_empty());

    let package = LocalPackage::scan(&demo()).unwrap();
    let mut phases = Vec::new();
    let report = client
        .push(&package, &PushOptions { activate: true }, |p| {
            if phases.last() != Some(&p.phase) {
                phases.push(p.phase);
            }
            assert!(p.verified <= p.total);
        })
        .unwrap();
    assert_eq!(
        phases,
        [
            PushPhase::Checking,
            PushPhase::Uploading,
            PushPhase::Committing,
            PushPhase::Activating,
            PushPhase::Done
        ]
    );
    assert!(!report.skipped && report.activated);
    assert_eq!(report.bytes_total, package.total_bytes());
    assert_eq!(report.bytes_sent, package.total_bytes());
    assert_eq!((report.resumed_from, report.retransmits), (0, 0));
    assert_installed_like(&store, &package);

    let models = client.models().unwrap();
    assert_eq!(
        state(&models),
        [("demo-parts".into(), "1.0.0".into(), true, false)]
    );
    assert_eq!(models[0].manifest_sha256, package.manifest_sha256);
    assert_eq!(models[0].files as usize, package.files.len());

    // The same package again: nothing is sent.
    let again = client
        .push(&package, &PushOptions::default(), |_| {})
        .unwrap();
    assert!(again.skipped, "{again:?}");
    assert_eq!(again.bytes_sent, 0);

    // Same name and version, different model.toml: refused before anything is sent.
    let changed = tmp.path().join("changed");
    copy_tree(&demo(), &changed);
    let manifest = changed.join("model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("Synthetic metal", "Changed metal")).unwrap();
    let err = client
        .push_dir(&changed, &PushOptions::default(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("different model.toml") && err.contains("demo-parts 1.0.0"),
        "{err}"
    );
    close(client, served);
}

#[test]
fn broken_package_is_refused_before_connecting() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    copy_tree(&demo(), &pkg);
    let onnx = pkg.join("model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&onnx, bytes).unwrap();
    let store = tmp.path().join("store");
    let (mut client, served) = connect(&store);
    let err = client
        .push_dir(&pkg, &PushOptions::default(), |_| {})
        .unwrap_err();
    let text = edgevlm_runtime::error_chain(&err);
    assert!(
        text.contains("model.onnx") && text.contains("sha256"),
        "{text}"
    );
    // Nothing was staged on the board.
    assert_eq!(std::fs::read_dir(store.join("staging")).unwrap().count(), 0);
    close(client, served);
}

/// Passes the first `budget` bytes through, then breaks the link (both directions), as a
/// dropped ssh connection or a pulled cable does.
struct BreakAfter {
    stream: UnixStream,
    budget: usize,
}

impl Write for BreakAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            let _ = self.stream.shutdown(Shutdown::Both);
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = self.stream.write(&buf[..buf.len().min(self.budget)])?;
        self.budget -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

#[test]
fn a_broken_push_resumes_on_a_new_connection() {
    let package = LocalPackage::scan(&demo()).unwrap();
    let total = package.total_bytes();
    let tmp = tempfile::tempdir().unwrap();
    let old = LocalPackage::scan(&demo_version(&tmp.path().join("old"), "0.9.0")).unwrap();
    // Break inside the announcement, inside the graph file, and late in the samples.
    for budget in [700, 40_000, total as usize / 2, total as usize * 9 / 10] {
        let store = tmp.path().join(format!("store-{budget}"));
        let (mut client, served) = connect(&store);
        client
            .push(&old, &PushOptions { activate: true }, |_| {})
            .unwrap();
        close(client, served);

        let (client, served) =
            connect_with(&store, |stream| Box::new(BreakAfter { stream, budget }));
        let mut client = client.unwrap();
        let err = client
            .push(&package, &PushOptions { activate: true }, |_| {})
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("connection to board test-board lost: "),
            "{budget}: {err}"
        );
        // Once lost, the client says so instead of hanging.
        assert!(matches!(client.models(), Err(ClientError::Lost { .. })));
        close(client, served);

        let (mut client, served) = connect(&store);
        // The previous model stays active while the new one is only staged.
        assert_eq!(
            state(&client.models().unwrap()),
            [("demo-parts".into(), "0.9.0".into(), true, false)],
            "{budget}"
        );
        let report = client
            .push(&package, &PushOptions::default(), |_| {})
            .unwrap();
        assert!(!report.skipped);
        assert_eq!(report.retransmits, 0, "{budget}");
        assert_eq!(report.resumed_from + report.bytes_sent, total, "{budget}");
        if budget > 10_000 {
            assert!(report.resumed_from > 0, "{budget}: {report:?}");
            assert!(report.bytes_sent < total, "{budget}: {report:?}");
        }
        assert_installed_like(&store, &package);
        // Installed, but not activated: the old model is still the active one.
        assert_eq!(
            state(&client.models().unwrap()),
            [
                ("demo-parts".into(), "0.9.0".into(), true, false),
                ("demo-parts".into(), "1.0.0".into(), false, false)
            ],
            "{budget}"
        );
        client.activate("demo-parts", "1.0.0").unwrap();
        assert_eq!(
            state(&client.models().unwrap()),
            [
                ("demo-parts".into(), "0.9.0".into(), false, true),
                ("demo-parts".into(), "1.0.0".into(), true, false)
            ]
        );
        close(client, served);
    }
}

/// What [`Tamper`] does to the one frame it picks.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Flip a data byte and keep the checksum: the agent sees a corrupted chunk.
    FlipData,
    /// Flip a byte of the encoded frame: the frame may no longer decode at all.
    FlipFrame,
    /// Drop the frame: the agent never hears of that chunk.
    Drop,
}

/// Damages the `nth` chunk of file `file` once, passing every other frame through.
struct Tamper {
    stream: UnixStream,
    buffered: Vec<u8>,
    file: u16,
    nth: usize,
    seen: usize,
    damage: Option<Damage>,
}

impl Write for Tamper {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffered.extend_from_slice(buf);
        while let Some(end) = self.buffered.iter().position(|&b| b == frame::DELIMITER) {
            let mut bytes: Vec<u8> = self.buffered.drain(..=end).collect();
            let mut decoder = proto::Decoder::<HostMessage>::new();
            let decoded = decoder.feed(&bytes).next();
            if let Some(Ok(HostMessage {
                id,
                request: Request::PushChunk(mut chunk),
            })) = decoded
            {
                if chunk.file == self.file {
                    self.seen += 1;
                    if self.seen == self.nth {
                        match self.damage.take() {
                            Some(Damage::FlipData) => {
                                let middle = chunk.data.len() / 2;
                                chunk.data[middle] ^= 0x08;
                                let msg = HostMessage {
                                    id,
                                    request: Request::PushChunk(chunk),
                                };
                                bytes = frame::encode_to_vec(&msg).unwrap();
                            }
                            Some(Damage::FlipFrame) => {
                                let at = bytes.len() / 2;
                                bytes[at] ^= 0x55;
                                if bytes[at] == 0 {
                                    bytes[at] = 0x55;
                                }
                            }
                            Some(Damage::Drop) => bytes.clear(),
                            None => {}
                        }
                    }
                }
            }
            self.stream.write_all(&bytes)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

#[test]
fn damaged_and_lost_chunks_are_sent_again() {
    let package = LocalPackage::scan(&demo()).unwrap();
    let onnx = package
        .files
        .iter()
        .position(|f| f.path == "model.onnx")
        .unwrap() as u16;
    let tmp = tempfile::tempdir().unwrap();
    // model.onnx is two chunks: damage the first (a later answer reveals a lost one) and the
    // last (only the probe does).
    for (damage, nth) in [
        (Damage::FlipData, 1),
        (Damage::FlipData, 2),
        (Damage::FlipFrame, 1),
        (Damage::FlipFrame, 2),
        (Damage::Drop, 1),
        (Damage::Drop, 2),
    ] {
        let store = tmp.path().join(format!("store-{damage:?}-{nth}"));
        let (client, served) = connect_with(&store, |stream| {
            Box::new(Tamper {
                stream,
                buffered: Vec::new(),
                file: onnx,
                nth,
                seen: 0,
                damage: Some(damage),
            })
        });
        let mut client = client.unwrap();
        let report = client
            .push(&package, &PushOptions { activate: true }, |_| {})
            .unwrap_or_else(|e| panic!("{damage:?} {nth}: {e}"));
        assert!(report.retransmits >= 1, "{damage:?} {nth}: {report:?}");
        assert!(
            report.bytes_sent > package.total_bytes(),
            "{damage:?} {nth}: {report:?}"
        );
        assert_installed_like(&store, &package);
        assert!(client.models().unwrap()[0].active);
        close(client, served);
    }
}

#[test]
fn activate_rollback_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut client, served) = connect(&store);
    let v1 = LocalPackage::scan(&demo()).unwrap();
    let v2 = LocalPackage::scan(&demo_version(&tmp.path().join("v2"), "2.0.0")).unwrap();
    client
        .push(&v1, &PushOptions { activate: true }, |_| {})
        .unwrap();
    client
        .push(&v2, &PushOptions { activate: true }, |_| {})
        .unwrap();
    assert_eq!(
        state(&client.models().unwrap()),
        [
            ("demo-parts".into(), "1.0.0".into(), false, true),
            ("demo-parts".into(), "2.0.0".into(), true, false)
        ]
    );
    client.rollback().unwrap();
    assert!(client.models().unwrap()[0].active);

    let err = client.remove("demo-parts", "1.0.0").unwrap_err();
    assert!(err.wire_error() == Some(&proto::Error::Busy), "{err}");
    client.remove("demo-parts", "2.0.0").unwrap();
    assert_eq!(client.models().unwrap().len(), 1);
    let err = client
        .activate("demo-parts", "9.9.9")
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "board test-board: activating demo-parts 9.9.9: not found"
    );
    let err = client.activate("../etc", "1").unwrap_err().to_string();
    assert!(err.contains("\"../etc\" is not valid"), "{err}");
    close(client, served);
}

#[test]
fn bench_produces_a_full_record() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut client, served) = connect(&store);
    let package = LocalPackage::scan(&demo()).unwrap();
    client
        .push(&package, &PushOptions::default(), |_| {})
        .unwrap();

    let inputs = [
        BenchInput::Synthetic { seed: 0 },
        BenchInput::PackageFile(proto::file_path("samples/ok_01.png").unwrap()),
        BenchInput::Image(
            std::fs::read(demo().join("samples/ok_04.jpg"))
                .unwrap()
                .as_slice()
                .try_into()
                .unwrap(),
        ),
    ];
    for input in inputs {
        let spec = BenchSpec {
            model: package.model_ref(),
            warmup: 2,
            iterations: 6,
            min_duration_ms: 0,
            threads: 1,
            input: input.clone(),
            prompt: Default::default(),
            max_new_tokens: 0,
            trace: proto::TraceOptions {
                top_nodes: 4,
                memory_interval_ms: 1,
                ..Default::default()
            },
        };
        let mut iterations = 0;
        let run = client
            .bench(&spec, |e| {
                if matches!(e, proto::TraceEvent::Iteration(_)) {
                    iterations += 1;
                }
            })
            .unwrap();
        assert_eq!(iterations, 8, "{input:?}");
        assert_eq!(run.missing_batches, 0);
        // This agent has no load cache.
        assert_eq!(run.summary.load_source, proto::LoadSource::Onnx);
        let settings = RunSettings {
            warmup: 2,
            iterations: 6,
            threads: 1,
            input: format!("{input:?}"),
            traced: true,
            ..RunSettings::default()
        };
        let record = run.record(client.facts(), package.facts(), settings);
        assert_eq!(record.board.name, "test-board");
        assert_eq!(record.board.profile, "sim");
        assert_eq!(record.model.variant, "fp32");
        assert!(record.model.bytes > 0);
        assert!(record.started_at > 1_600_000_000);
        assert_eq!(record.latencies_us.len(), 6, "{input:?}");
        assert!(record.latency.p50_us > 0 && record.latency.max_us >= record.latency.p50_us);
        assert!(record.load_us > 0 && record.first_run_us > 0);
        assert!(!record.stages.is_empty(), "{input:?}");
        assert!(!record.memory.is_empty(), "{input:?}");
        assert!(record.peak_rss_kib > 0);
        assert!(
            !record.nodes.is_empty() && record.nodes.len() <= 4,
            "{input:?}: {:?}",
            record.nodes
        );
        if !matches!(input, BenchInput::Synthetic { .. }) {
            let stages: Vec<_> = record.stages.iter().map(|s| s.stage.as_str()).collect();
            assert!(stages.contains(&"decode"), "{stages:?}");
        }
        // The results database keeps it.
        let mut db = edgevlm_host::db::ResultsDb::open(&tmp.path().join("results.sqlite")).unwrap();
        let mut stored = record.clone();
        let id = db.insert(&mut stored).unwrap();
        assert_eq!(
            db.get(id).unwrap().unwrap().latencies_us,
            record.latencies_us
        );
    }

    // A model that is not installed.
    let mut spec = BenchSpec {
        model: package.model_ref(),
        warmup: 0,
        iterations: 1,
        min_duration_ms: 0,
        threads: 1,
        input: BenchInput::Synthetic { seed: 0 },
        prompt: Default::default(),
        max_new_tokens: 0,
        trace: proto::TraceOptions::NONE,
    };
    spec.model.version = proto::bounded("7.7.7");
    let err = client.bench(&spec, |_| {}).unwrap_err().to_string();
    assert!(
        err.starts_with("board test-board: benchmarking demo-parts 7.7.7: "),
        "{err}"
    );
    close(client, served);
}

/// With a load cache, a benchmark's timed load comes from it, as the station's next start
/// does: the first benchmark writes the entry (untimed) and loads again from it, the next one
/// reads it without writing; the agent's log line says where the load came from.
#[test]
fn benchmarks_load_through_the_load_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = lines.clone();
    let server = Server::new(ServerConfig {
        store: tmp.path().join("store"),
        board: "sim".into(),
        cache_dir: Some(cache.clone()),
    })
    .unwrap()
    .with_log(move |_, line| log.lock().unwrap().push(line.to_owned()));
    let (client, served) = connect_server(server, |s| Box::new(s));
    let mut client = client.unwrap();
    let package = LocalPackage::scan(&demo()).unwrap();
    client
        .push(&package, &PushOptions::default(), |_| {})
        .unwrap();
    let spec = BenchSpec {
        model: package.model_ref(),
        warmup: 1,
        iterations: 2,
        min_duration_ms: 0,
        threads: 1,
        input: BenchInput::Synthetic { seed: 0 },
        prompt: Default::default(),
        max_new_tokens: 0,
        trace: proto::TraceOptions::NONE,
    };
    let entries = || -> Vec<(PathBuf, std::time::SystemTime)> {
        let mut found: Vec<_> = std::fs::read_dir(&cache)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        found.retain(|p: &PathBuf| p.to_string_lossy().ends_with(".nnef.tar"));
        found.sort();
        found
            .into_iter()
            .map(|p| {
                let modified = std::fs::metadata(&p).unwrap().modified().unwrap();
                (p, modified)
            })
            .collect()
    };
    let bench_lines = |lines: &Mutex<Vec<String>>| -> Vec<String> {
        let lines = lines.lock().unwrap();
        lines
            .iter()
            .filter(|l| l.contains("load_us="))
            .cloned()
            .collect()
    };
    assert!(entries().is_empty());
    let first = client.bench(&spec, |_| {}).unwrap();
    assert!(first.summary.load_us > 0);
    assert_eq!(first.summary.load_source, proto::LoadSource::Cache);
    let written = entries();
    assert_eq!(written.len(), 1, "{written:?}");
    let second = client.bench(&spec, |_| {}).unwrap();
    assert!(second.summary.load_us > 0);
    assert_eq!(second.summary.load_source, proto::LoadSource::Cache);
    assert_eq!(entries(), written, "the second benchmark rewrote the cache");
    let logged = bench_lines(&lines);
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert!(
        logged.iter().all(|l| l.contains(" load=cache ")),
        "{logged:?}"
    );
    close(client, served);
}

#[test]
fn a_running_benchmark_can_be_cancelled() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (mut client, served) = connect(&store);
    let package = LocalPackage::scan(&demo()).unwrap();
    client
        .push(&package, &PushOptions::default(), |_| {})
        .unwrap();
    let spec = BenchSpec {
        model: package.model_ref(),
        warmup: 0,
        iterations: 1_000_000,
        min_duration_ms: 600_000,
        threads: 1,
        input: BenchInput::Synthetic { seed: 0 },
        prompt: Default::default(),
        max_new_tokens: 0,
        trace: proto::TraceOptions::default(),
    };
    let canceller = client.canceller();
    assert!(!canceller.cancel().unwrap(), "nothing runs yet");
    let mut cancelled = false;
    let err = client
        .bench(&spec, |e| {
            if let proto::TraceEvent::Iteration(it) = e {
                if it.iteration >= 3 && !cancelled {
                    cancelled = canceller.cancel().unwrap();
                }
            }
        })
        .unwrap_err();
    assert!(cancelled);
    assert!(err.wire_error() == Some(&proto::Error::Cancelled), "{err}");
    // The link is still usable.
    assert_eq!(client.models().unwrap().len(), 1);
    close(client, served);
}

#[test]
fn a_peer_speaking_another_version_is_named() {
    // A future agent: it answers the hello (whose prefix is frozen) with the next protocol.
    let (host, mut agent) = UnixStream::pair().unwrap();
    let peer = std::thread::spawn(move || {
        let mut decoder = proto::Decoder::<HostMessage>::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = io::Read::read(&mut agent, &mut buf).unwrap();
            if n == 0 {
                return;
            }
            for msg in decoder.feed(&buf[..n]) {
                let msg = msg.unwrap();
                let mut hello = proto::AgentHello::new("0.2.0", "rpi5", "0.24.0");
                hello.protocol = proto::PROTOCOL_VERSION + 1;
                let answer = proto::AgentMessage::Response {
                    id: msg.id,
                    result: Ok(proto::Response::Hello(hello)),
                };
                agent
                    .write_all(&frame::encode_to_vec(&answer).unwrap())
                    .unwrap();
            }
        }
    });
    let link = Link::from_streams(host.try_clone().unwrap(), host.try_clone().unwrap()).on_close(
        move || {
            let _ = host.shutdown(Shutdown::Both);
        },
    );
    let err = Client::connect(link, "pi", "ssh://pi@x", options())
        .unwrap_err()
        .to_string();
    let (ours, theirs) = (proto::PROTOCOL_VERSION, proto::PROTOCOL_VERSION + 1);
    assert!(
        err.contains(&format!("protocol version mismatch: host speaks v{ours}, agent speaks v{theirs}; install the same edgevlm release on both sides"))
            && err.contains("agent edgevlm 0.2.0"),
        "{err}"
    );
    peer.join().unwrap();
}

#[test]
fn a_failing_link_process_reports_its_last_words() {
    // What ssh does when the board's host key is not known.
    let mut board = Board::new("line3-pi5", Endpoint::Local);
    board.agent_command = vec![
        "sh".into(),
        "-c".into(),
        "echo 'Host key verification failed.' >&2; exit 255".into(),
    ];
    let err = Client::open(&board, options()).unwrap_err().to_string();
    assert_eq!(
        err,
        "connection to board line3-pi5 lost: sh exited with status 255: Host key verification failed."
    );

    // The real ssh client against a closed port.
    let inventory = Inventory::default();
    let board = inventory.resolve("ssh://nobody@127.0.0.1:1").unwrap();
    let err = Client::open(&board, options()).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "connection to board ssh://nobody@127.0.0.1:1 lost: ssh exited with status 255: "
        ) && err.contains("Connection refused"),
        "{err}"
    );

    // A process that is not an edgevlm agent and says nothing.
    let mut board = Board::new("mute", Endpoint::Local);
    board.agent_command = vec!["sleep".into(), "30".into()];
    let err = Client::open(
        &board,
        ClientOptions {
            handshake_timeout: Duration::from_millis(300),
            ..options()
        },
    )
    .unwrap_err()
    .to_string();
    assert_eq!(err, "board mute did not answer the handshake within 0.3 s");
}

#[test]
fn board_names_and_files_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("boards.toml");
    std::fs::write(
        &file,
        "[[board]]\nname = \"pi\"\nurl = \"ssh://pi@10.0.0.7\"\n\n[[board]]\nname = \"uart\"\nurl = \"serial:///dev/ttyUSB0?baud=9600\"\n",
    )
    .unwrap();
    let inventory = Inventory::load(&file).unwrap();
    let err = inventory.resolve("pi5").unwrap_err().to_string();
    assert!(
        err.contains("\"pi5\"") && err.contains("lists pi, uart"),
        "{err}"
    );
    let err = inventory
        .resolve("ssh://pi@host:70000")
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad port \"70000\""), "{err}");
    let err = inventory
        .resolve("serial:///dev/ttyUSB0?baud=921600&parity=even")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown query key \"parity\""), "{err}");

    std::fs::write(&file, "[[board]]\nname = \"pi\"\nurl = 7\n").unwrap();
    let err = Inventory::load(&file).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}: field `board[0].url`: invalid type",
            file.display()
        )) && err.contains("(line 3)"),
        "{err}"
    );
}

#[test]
fn push_and_bench_over_a_serial_line() {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    // A pty stands in for the cable: the host opens the slave as a serial port, the agent
    // serves the master.
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let slave = ptsname(&master, Vec::new()).unwrap();
    let url = format!("serial://{}?baud=921600", slave.to_str().unwrap());
    let board = Inventory::default().resolve(&url).unwrap();
    // The host opens first: opening flushes whatever the line held.
    let link = Link::open(&board).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::new(ServerConfig {
        store: tmp.path().join("store"),
        board: "uart-board".into(),
        cache_dir: Some(tmp.path().join("cache")),
    })
    .unwrap();
    let master = std::fs::File::from(master);
    let served = std::thread::spawn(move || server.serve(master.try_clone().unwrap(), master));
    let mut client = Client::connect(link, &board.name, &board.url(), options()).unwrap();
    assert_eq!(client.facts().profile, "uart-board");
    assert_eq!(client.facts().url, url);

    let package = LocalPackage::scan(&demo()).unwrap();
    let report = client
        .push(&package, &PushOptions { activate: true }, |_| {})
        .unwrap();
    assert_eq!(report.bytes_sent, package.total_bytes());
    assert_installed_like(&tmp.path().join("store"), &package);
    let spec = BenchSpec {
        model: package.model_ref(),
        warmup: 1,
        iterations: 3,
        min_duration_ms: 0,
        threads: 1,
        input: BenchInput::Synthetic { seed: 1 },
        prompt: Default::default(),
        max_new_tokens: 0,
        trace: proto::TraceOptions::default(),
    };
    let run = client.bench(&spec, |_| {}).unwrap();
    assert_eq!(run.summary.iterations, 3);
    // Closing the port ends the agent's link (the reader thread lets go of it).
    drop(client);
    let _ = served.join().unwrap();
}
