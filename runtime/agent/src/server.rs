//! The agent's protocol server: one link (stdio under ssh, a serial port) speaking
//! `edgevlm-proto` to the host tool.
//!
//! On open the server writes one `0x00` so that whatever the host buffered before (a login
//! banner, half a frame) ends there. A reader thread decodes [`HostMessage`] frames: it counts
//! undecodable ones and carries on (garbage never ends a link), answers [`Request::Hello`] and
//! [`Request::Cancel`] itself at once, and queues every other request for one worker, which
//! handles them in order. Every message goes out as one flushed frame, the writer behind a
//! mutex, so events of a running benchmark and answers to later requests interleave frame by
//! frame.
//!
//! # Handshake gate
//! Until a compatible hello arrived, every request but `Hello` is refused: with
//! [`Error::BadMagic`] when no hello was seen ("not an edgevlm peer yet"), or with the error of
//! the last hello's `check_compatible()` (e.g. [`Error::VersionMismatch`]) when it was
//! incompatible, so that every refusal tells the host what to fix. The hello itself is always
//! answered with the agent's [`AgentHello`], so the host can say which side to update.
//!
//! # Link loss
//! When the reader hits EOF or an I/O error, or a write fails, everything still running or
//! queued is cancelled (nobody is listening), and [`Server::serve`] returns once the worker is
//! done. Installed models, staged uploads and the traces of the last [`KEPT_RUNS`] benchmarks
//! belong to the [`Server`] and outlive the link: a host that reconnects resumes its upload
//! where the verified bytes end.
//!
//! Store errors map onto wire errors one to one ([`store_error`]).

#![allow(
    clippy::result_large_err,
    reason = "the wire Error is a fixed-capacity no_std value (its message inline): handlers return what the protocol carries"
)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgevlm_proto::{
    bounded, frame, AgentHello, AgentMessage, BenchSpec, Chunk, Decoder, Error, Event, HostHello,
    HostMessage, ModelInfo, ModelRef, Request, RequestId, Response, RunId, UploadId, UploadSpec,
    UploadState, MAX_CHUNK, MAX_FRAME, MAX_MODELS,
};

use crate::bench::{self, RunTrace};
use crate::store::{self, ModelEntry, ModelStore};
use crate::sysinfo;
use edgevlm_board_linux::serial::StoppableReader;
use edgevlm_runtime::package::hex;

/// Benchmarks whose traces are kept for [`Request::FetchTraces`].
pub const KEPT_RUNS: usize = 8;

/// Where the server keeps its state, and what it tells the host about the board.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Root of the model store (see [`ModelStore`]).
    pub store: PathBuf,
    /// Board profile name for the hello (`sim`, `rpi5`).
    pub board: String,
    /// The load cache benchmarks load through (see [`bench::run`]); `None`: from the ONNX
    /// files every time.
    pub cache_dir: Option<PathBuf>,
}

/// Severity of a log line: its syslog priority, which journald turns into the entry's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// A request or the link failed in a way the operator should look at.
    Error = 3,
    /// Something was dropped or refused.
    Warning = 4,
    /// A link opened or closed.
    Notice = 5,
    /// A request was handled.
    Info = 6,
}

type LogFn = dyn Fn(Level, &str) + Send + Sync;

/// What one link saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Requests decoded (hellos and cancels included).
    pub requests: u64,
    /// Frames dropped as corrupt, oversized or undecodable.
    pub bad_frames: u64,
}

/// The protocol server. One per agent process; [`Server::serve`] may be called once per link.
pub struct Server {
    store: ModelStore,
    board: String,
    cache_dir: Option<PathBuf>,
    traces: Mutex<VecDeque<RunTrace>>,
    next_run: AtomicU32,
    log: Box<LogFn>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("store", &self.store)
            .field("board", &self.board)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens (creating if needed) the model store and makes a server for it.
    pub fn new(config: ServerConfig) -> Result<Server, store::Error> {
        Ok(
            Server::with_store(ModelStore::open(config.store)?, &config.board)
                .with_cache_dir(config.cache_dir),
        )
    }

    /// Benchmarks load through the load cache in `dir` (see [`bench::run`]).
    pub fn with_cache_dir(mut self, dir: Option<PathBuf>) -> Server {
        self.cache_dir = dir;
        self
    }

    /// A server over an already opened store (tests inject a free-space probe this way).
    pub fn with_store(store: ModelStore, board: &str) -> Server {
        // Run ids start from the clock, so runs of successive agent processes (one per ssh
        // session) do not reuse ids the host may have recorded.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Server {
            store,
            board: board.to_owned(),
            cache_dir: None,
            traces: Mutex::new(VecDeque::new()),
            next_run: AtomicU32::new(seed),
            log: Box::new(|_, _| {}),
        }
    }

    /// Sends the server's log lines (logfmt, one per request with its outcome, one per link
    /// event) to `log`; by default they are discarded.
    pub fn with_log(mut self, log: impl Fn(Level, &str) + Send + Sync + 'static) -> Server {
        self.log = Box::new(log);
        self
    }

    /// The model store.
    pub fn store(&self) -> &ModelStore {
        &self.store
    }

    /// The hello this agent answers with now (CPU, RAM available, versions).
    pub fn hello(&self) -> AgentHello {
        let mut hello = AgentHello::new(
            env!("CARGO_PKG_VERSION"),
            &self.board,
            edgevlm_runtime::TRACT_VERSION,
        );
        hello.cpu = sysinfo::cpu_info();
        (hello.ram_total_kib, hello.ram_available_kib) = sysinfo::memory_kib();
        hello.max_chunk = MAX_CHUNK as u32;
        hello
    }

    /// Serves one link until the reader hits EOF (or an I/O error); returns stats.
    ///
    /// Returns the reader's I/O error if it had one, else the first write error, else the
    /// link's stats.
    pub fn serve<R, W>(&self, reader: R, writer: W) -> io::Result<ServeStats>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let link = Link {
            writer: Mutex::new((writer, vec![0u8; MAX_FRAME])),
            failed: Mutex::new(None),
            closed: AtomicBool::new(false),
            running: Mutex::new(HashMap::new()),
        };
        link.write_raw(&[frame::DELIMITER]);
        self.log(Level::Notice, "event=link_open");
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (stats, read_error) = std::thread::scope(|s| {
            let reader = s.spawn(|| self.read_link(reader, &link, tx));
            for job in rx {
                self.work(&link, job);
            }
            reader.join().expect("link reader panicked")
        });
        self.log(
            Level::Notice,
            &format!(
                "event=link_closed requests={} bad_frames={}{}",
                stats.requests,
                stats.bad_frames,
                read_error
                    .as_ref()
                    .map(|e| format!(" error={:?}", e.to_string()))
                    .unwrap_or_default()
            ),
        );
        if let Some(e) = read_error {
            return Err(e);
        }
        if let Some(e) = link.failed.lock().unwrap().take() {
            return Err(e);
        }
        Ok(stats)
    }

    /// Serves the serial port `device` at `baud` as a daemon: when a link ends (the port hung
    /// up, or a read failed) the port is reopened and served again, until `stop` is set
    /// (e.g. by a SIGTERM handler; noticed within 200 ms, also while the link is idle).
    ///
    /// Fails only if the port cannot be opened the first time (wrong device, baud rate or
    /// permissions); later failures to reopen are logged and retried every second.
    pub fn serve_serial(
        &self,
        device: &Path,
        baud: u32,
        stop: Arc<AtomicBool>,
    ) -> Result<(), edgevlm_board_linux::serial::SerialError> {
        let mut first = true;
        // A device that stays away (USB adapter unplugged) is logged once, not every second.
        let mut last_failure = None;
        while !stop.load(Ordering::SeqCst) {
            let port = match edgevlm_board_linux::serial::open(device, baud) {
                Ok(port) => port,
                Err(e) if first => return Err(e),
                Err(e) => {
                    let error = e.to_string();
                    if last_failure.as_ref() != Some(&error) {
                        self.log(
                            Level::Error,
                            &format!("event=serial_open_failed error={error:?} retry_ms=1000"),
                        );
                        last_failure = Some(error);
                    }
                    sleep_unless(&stop, Duration::from_secs(1));
                    continue;
                }
            };
            first = false;
            last_failure = None;
            self.log(
                Level::Notice,
                &format!(
                    "event=serial_open device={:?} baud={baud}",
                    device.display().to_string()
                ),
            );
            let reader = match port.try_clone() {
                Ok(file) => StoppableReader::new(file, stop.clone()),
                Err(e) => {
                    self.log(
                        Level::Error,
                        &format!("event=serial_open_failed error={:?}", e.to_string()),
                    );
                    sleep_unless(&stop, Duration::from_secs(1));
                    continue;
                }
            };
            match self.serve(reader, port) {
                Ok(_) => sleep_unless(&stop, Duration::from_millis(200)),
                Err(e) => {
                    self.log(
                        Level::Error,
                        &format!("event=serial_link_failed error={:?}", e.to_string()),
                    );
                    sleep_unless(&stop, Duration::from_secs(1));
                }
            }
        }
        Ok(())
    }

    fn log(&self, level: Level, line: &str) {
        (self.log)(level, line);
    }

    /// The reader thread: decodes frames until EOF, answers hellos and cancels, queues the
    /// rest. Returns the stats and the I/O error that ended the link, if any.
    fn read_link<R: Read>(
        &self,
        mut reader: R,
        link: &Link<impl Write + Send>,
        jobs: std::sync::mpsc::Sender<Job>,
    ) -> (ServeStats, Option<io::Error>) {
        let mut stats = ServeStats::default();
        let mut decoder: Box<Decoder<HostMessage>> = Box::default();
        let mut buf = vec![0u8; 64 * 1024];
        // No hello yet: the host has not shown it is an edgevlm peer.
        let mut gate: Result<(), Error> = Err(Error::BadMagic);
        let error = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Some(e),
            };
            for frame in decoder.feed(&buf[..n]) {
                let msg = match frame {
                    Ok(msg) => msg,
                    Err(e) => {
                        stats.bad_frames += 1;
                        self.log(
                            Level::Warning,
                            &format!("event=bad_frame error={:?}", e.to_string()),
                        );
                        continue;
                    }
                };
                stats.requests += 1;
                let HostMessage { id, request } = msg;
                match request {
                    Request::Hello(hello) => {
                        gate = hello.check_compatible();
                        self.answer_hello(link, id, &hello, &gate);
                    }
                    request => {
                        if let Err(refusal) = &gate {
                            self.log(
                                Level::Warning,
                                &format!(
                                    "event=request id={} request={} outcome=refused error={:?}",
                                    id.0,
                                    request_name(&request),
                                    refusal.to_string()
                                ),
                            );
                            link.send(&AgentMessage::Response {
                                id,
                                result: Err(refusal.clone()),
                            });
                        } else if let Request::Cancel { id: target } = request {
                            self.cancel(link, id, target);
                        } else {
                            let cancel = Arc::new(AtomicBool::new(false));
                            link.running.lock().unwrap().insert(id, cancel.clone());
                            // The worker outlives this thread's sends (it drains the queue).
                            let _ = jobs.send(Job {
                                id,
                                request,
                                cancel,
                            });
                        }
                    }
                }
            }
            if link.closed.load(Ordering::SeqCst) {
                break None; // A write failed: the host is gone.
            }
        };
        link.close();
        (stats, error)
    }

    fn answer_hello(
        &self,
        link: &Link<impl Write + Send>,
        id: RequestId,
        hello: &HostHello,
        gate: &Result<(), Error>,
    ) {
        let outcome = match gate {
            Ok(()) => "outcome=ok".to_owned(),
            Err(e) => format!("outcome=incompatible error={:?}", e.to_string()),
        };
        self.log(
            if gate.is_ok() {
                Level::Info
            } else {
                Level::Warning
            },
            &format!(
                "event=request id={} request=hello host_version={:?} host_protocol={} {outcome}",
                id.0,
                hello.host_version.as_str(),
                hello.protocol
            ),
        );
        link.send(&AgentMessage::Response {
            id,
            result: Ok(Response::Hello(self.hello())),
        });
    }

    fn cancel(&self, link: &Link<impl Write + Send>, id: RequestId, target: RequestId) {
        let flag = link.running.lock().unwrap().get(&target).cloned();
        let result = match flag {
            Some(flag) => {
                flag.store(true, Ordering::SeqCst);
                Ok(Response::Done)
            }
            None => Err(Error::NotFound),
        };
        self.log(
            Level::Info,
            &format!(
                "event=request id={} request=cancel target={} outcome={}",
                id.0,
                target.0,
                if result.is_ok() { "ok" } else { "not_running" }
            ),
        );
        link.send(&AgentMessage::Response { id, result });
    }

    /// The worker: handles one queued request and sends its final response.
    fn work(&self, link: &Link<impl Write + Send>, job: Job) {
        let Job {
            id,
            request,
            cancel,
        } = job;
        let started = Instant::now();
        let mut detail = String::new();
        let result = if cancel.load(Ordering::SeqCst) {
            Err(Error::Cancelled)
        } else {
            self.handle(link, id, &request, &cancel, &mut detail)
        };
        link.running.lock().unwrap().remove(&id);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let (level, outcome) = match &result {
            Ok(_) => (Level::Info, "outcome=ok".to_owned()),
            Err(Error::Cancelled) => (Level::Info, "outcome=cancelled".to_owned()),
            Err(e) => (
                Level::Warning,
                format!("outcome=error error={:?}", e.to_string()),
            ),
        };
        // An accepted chunk is not worth a line: a 64 MiB push is 2,048 of them. The upload's
        // begin and commit lines carry the totals; refused chunks are logged.
        let routine = result.is_ok() && matches!(request, Request::PushChunk(_));
        if !routine {
            self.log(
                level,
                &format!(
                    "event=request id={} request={}{detail} {outcome} ms={ms:.1}",
                    id.0,
                    request_name(&request)
                ),
            );
        }
        link.send(&AgentMessage::Response { id, result });
    }

    fn handle(
        &self,
        link: &Link<impl Write + Send>,
        id: RequestId,
        request: &Request,
        cancel: &AtomicBool,
        detail: &mut String,
    ) -> Result<Response, Error> {
        use std::fmt::Write as _;
        match request {
            Request::ListModels => {
                let entries = self.store.list().map_err(store_error)?;
                let _ = write!(detail, " models={}", entries.len());
                if entries.len() > MAX_MODELS {
                    self.log(
                        Level::Warning,
                        &format!(
                            "event=list_truncated models={} listed={MAX_MODELS}",
                            entries.len()
                        ),
                    );
                }
                let mut list = heapless::Vec::new();
                for entry in entries.iter().take(MAX_MODELS) {
                    // Cannot fail: at most MAX_MODELS are taken.
                    let _ = list.push(model_info(entry));
                }
                Ok(Response::Models(list))
            }
            Request::BeginUpload(spec) => {
                let _ = write!(
                    detail,
                    " model={} version={} files={}",
                    spec.model.name,
                    spec.model.version,
                    spec.files.len()
                );
                self.begin_upload(spec).map(Response::Upload)
            }
            Request::PushChunk(chunk) => {
                let _ = write!(
                    detail,
                    " upload={:08x} file={} offset={} bytes={}",
                    chunk.upload.0,
                    chunk.file,
                    chunk.offset,
                    chunk.data.len()
                );
                self.push_chunk(chunk)
            }
            Request::Commit { upload } => {
                let _ = write!(detail, " upload={:08x}", upload.0);
                let entry = self
                    .store
                    .commit(store::UploadId(upload.0))
                    .map_err(store_error)?;
                let _ = write!(detail, " model={} version={}", entry.name, entry.version);
                Ok(Response::Committed(model_info(&entry)))
            }
            Request::Activate(model) => {
                model_detail(detail, model);
                self.store
                    .activate(&model.name, &model.version)
                    .map_err(store_error)?;
                Ok(Response::Done)
            }
            Request::Rollback => {
                self.store.rollback().map_err(store_error)?;
                if let Ok(Some((name, version, _))) = self.store.active() {
                    let _ = write!(detail, " model={name} version={version}");
                }
                Ok(Response::Done)
            }
            Request::Remove(model) => {
                model_detail(detail, model);
                self.store
                    .remove(&model.name, &model.version)
                    .map_err(store_error)?;
                Ok(Response::Done)
            }
            Request::RunBenchmark(spec) => self.benchmark(link, id, spec, cancel, detail),
            Request::FetchTraces { run } => self.fetch_traces(link, id, *run, cancel, detail),
            // Answered by the reader; never queued.
            Request::Hello(_) | Request::Cancel { .. } => {
                Err(Error::internal("hello or cancel reached the worker"))
            }
        }
    }

    fn begin_upload(&self, spec: &UploadSpec) -> Result<UploadState, Error> {
        let hex: Vec<String> = spec.files.iter().map(|f| hex(&f.sha256)).collect();
        let files: Vec<(&str, u64, &str)> = spec
            .files
            .iter()
            .zip(&hex)
            .map(|(f, h)| (f.path.as_str(), f.size, h.as_str()))
            .collect();
        let id = self
            .store
            .begin_upload(&spec.model.name, &spec.model.version, &files)
            .map_err(store_error)?;
        let mut verified = heapless::Vec::new();
        for f in &spec.files {
            let (done, _) = self.store.status(id, &f.path).map_err(store_error)?;
            // Cannot fail: as many files as the spec, which holds at most MAX_PACKAGE_FILES.
            let _ = verified.push(done);
        }
        Ok(UploadState {
            upload: UploadId(id.0),
            verified,
        })
    }

    fn push_chunk(&self, chunk: &Chunk) -> Result<Response, Error> {
        // A corrupted chunk never reaches the store.
        chunk.verify()?;
        let id = store::UploadId(chunk.upload.0);
        let files = self.store.upload_files(id).map_err(store_error)?;
        let file = files.get(usize::from(chunk.file)).ok_or(Error::NotFound)?;
        let verified = self
            .store
            .write_chunk(id, &file.path, chunk.offset, &chunk.data)
            .map_err(store_error)?;
        Ok(Response::ChunkAccepted {
            file: chunk.file,
            verified,
        })
    }

    fn benchmark(
        &self,
        link: &Link<impl Write + Send>,
        id: RequestId,
        spec: &BenchSpec,
        cancel: &AtomicBool,
        detail: &mut String,
    ) -> Result<Response, Error> {
        use std::fmt::Write as _;
        let run = RunId(self.next_run.fetch_add(1, Ordering::Relaxed));
        let _ = write!(
            detail,
            " run={} model={} version={}",
            run.0, spec.model.name, spec.model.version
        );
        let outcome = bench::run(
            &self.store,
            spec,
            run,
            self.cache_dir.as_deref(),
            cancel,
            |batch| {
                link.send(&AgentMessage::Event {
                    id,
                    event: Event::Trace(batch.clone()),
                });
            },
        );
        if outcome.trace.batches() > 0 || outcome.result.is_ok() {
            let mut traces = self.traces.lock().unwrap();
            if traces.len() == KEPT_RUNS {
                traces.pop_front();
            }
            traces.push_back(outcome.trace);
        }
        let summary = outcome.result?;
        let _ = write!(
            detail,
            " iterations={} load_us={} load={} p50_us={} p99_us={} peak_rss_kib={} dropped={}",
            summary.iterations,
            summary.load_us,
            summary.load_source.as_str(),
            summary.latency.p50_us,
            summary.latency.p99_us,
            summary.peak_rss_kib,
            summary.dropped_events
        );
        Ok(Response::BenchDone(summary))
    }

    fn fetch_traces(
        &self,
        link: &Link<impl Write + Send>,
        id: RequestId,
        run: Option<RunId>,
        cancel: &AtomicBool,
        detail: &mut String,
    ) -> Result<Response, Error> {
        use std::fmt::Write as _;
        let traces = self.traces.lock().unwrap();
        let trace = match run {
            Some(run) => traces.iter().find(|t| t.run == run),
            None => traces.back(),
        }
        .ok_or(Error::NotFound)?;
        let _ = write!(detail, " run={}", trace.run.0);
        let mut batches = 0u32;
        for batch in trace.replay() {
            if cancel.load(Ordering::SeqCst) {
                return Err(Error::Cancelled);
            }
            link.send(&AgentMessage::Event {
                id,
                event: Event::Trace(batch),
            });
            batches += 1;
        }
        Ok(Response::TracesDone {
            run: trace.run,
            batches,
        })
    }
}

/// The wire error for a store error: the same variant, except `InUse` -> `Busy`, and `Io`
/// carrying its path and cause (truncated to the wire's message limit).
pub fn store_error(e: store::Error) -> Error {
    use store::Error as S;
    match e {
        S::NotFound(_) => Error::NotFound,
        S::InvalidName(_) => Error::InvalidName,
        S::ChecksumMismatch { offset } => Error::ChecksumMismatch { offset },
        S::DigestMismatch { file } => Error::DigestMismatch {
            file: bounded(&file),
        },
        S::OutOfOrder { expected } => Error::OutOfOrder { expected },
        S::Incomplete {
            file,
            verified,
            size,
        } => Error::Incomplete {
            file: bounded(&file),
            verified,
            size,
        },
        S::NoSpace { needed, available } => Error::NoSpace { needed, available },
        S::InvalidPackage(msg) => Error::invalid_package(&msg),
        S::InUse { .. } => Error::Busy,
        e @ S::Io { .. } => Error::io(&e.to_string()),
    }
}

/// A store entry as the wire lists it.
pub fn model_info(entry: &ModelEntry) -> ModelInfo {
    ModelInfo {
        name: bounded(&entry.name),
        version: bounded(&entry.version),
        files: u16::try_from(entry.files).unwrap_or(u16::MAX),
        bytes: entry.size_bytes,
        manifest_sha256: from_hex(&entry.manifest_sha256).unwrap_or([0; 32]),
        active: entry.active,
        previous: entry.previous,
    }
}

/// A request queued for the worker.
struct Job {
    id: RequestId,
    request: Request,
    cancel: Arc<AtomicBool>,
}

/// The state of one link shared by its reader, worker and trace batcher.
struct Link<W> {
    /// The writer and a frame buffer.
    writer: Mutex<(W, Vec<u8>)>,
    /// The first write error.
    failed: Mutex<Option<io::Error>>,
    /// Set when the link is gone (EOF, read or write error): nothing more is read or run.
    closed: AtomicBool,
    /// Cancel flags of the requests queued or running.
    running: Mutex<HashMap<RequestId, Arc<AtomicBool>>>,
}

impl<W: Write> Link<W> {
    /// Sends one message as one flushed frame; a write error closes the link.
    fn send(&self, msg: &AgentMessage) {
        let mut guard = self.writer.lock().unwrap();
        let (writer, buf) = &mut *guard;
        let frame = match frame::encode(msg, buf) {
            Ok(frame) => frame,
            // Every wire type is bounded to fit MAX_FRAME: not expected.
            Err(_) => return,
        };
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = writer.write_all(frame).and_then(|()| writer.flush()) {
            drop(guard);
            self.fail(e);
        }
    }

    fn write_raw(&self, bytes: &[u8]) {
        let mut guard = self.writer.lock().unwrap();
        let writer = &mut guard.0;
        if let Err(e) = writer.write_all(bytes).and_then(|()| writer.flush()) {
            drop(guard);
            self.fail(e);
        }
    }

    fn fail(&self, e: io::Error) {
        self.failed.lock().unwrap().get_or_insert(e);
        self.close();
    }

    /// Marks the link gone and cancels everything queued or running.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for flag in self.running.lock().unwrap().values() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let end = Instant::now() + total;
    while !stop.load(Ordering::SeqCst) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Hello(_) => "hello",
        Request::ListModels => "list_models",
        Request::BeginUpload(_) => "begin_upload",
        Request::PushChunk(_) => "push_chunk",
        Request::Commit { .. } => "commit",
        Request::Activate(_) => "activate",
        Request::Rollback => "rollback",
        Request::Remove(_) => "remove",
        Request::RunBenchmark(_) => "run_benchmark",
        Request::FetchTraces { .. } => "fetch_traces",
        Request::Cancel { .. } => "cancel",
    }
}

fn model_detail(detail: &mut String, model: &ModelRef) {
    use std::fmt::Write as _;
    let _ = write!(detail, " model={} version={}", model.name, model.version);
}

fn from_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let digest: [u8; 32] = core::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(from_hex(&hex(&digest)), Some(digest));
        assert_eq!(from_hex(""), None);
        assert_eq!(from_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn store_errors_map_one_to_one() {
        let io = store::Error::Io {
            path: "/var/lib/edgevlm/store/models/x".into(),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        };
        match store_error(io) {
            Error::Io(msg) => assert!(
                msg.contains("/var/lib/edgevlm/store/models/x") && msg.contains("denied"),
                "{msg}"
            ),
            other => panic!("{other:?}"),
        }
        let in_use = store::Error::InUse {
            name: "m".into(),
            version: "1".into(),
        };
        assert_eq!(store_error(in_use), Error::Busy);
        assert_eq!(
            store_error(store::Error::OutOfOrder { expected: 7 }),
            Error::OutOfOrder { expected: 7 }
        );
        let long = "x".repeat(500);
        match store_error(store::Error::InvalidPackage(long)) {
            Error::InvalidPackage(msg) => assert_eq!(msg.len(), edgevlm_proto::MAX_ERROR_MESSAGE),
            other => panic!("{other:?}"),
        }
    }
}
