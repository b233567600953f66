//! The protocol client: handshake, models, push with resume, benchmarks.
//!
//! A reader thread turns the agent's bytes into messages; each method sends its request with a
//! fresh id and waits for that id's events and final response. Every wait has a timeout, and a
//! link that ends or fails turns into [`ClientError::Lost`] carrying why (for ssh, its stderr:
//! "Host key verification failed.", "Permission denied (publickey).").
//!
//! Pushes are resumable and pipelined: the package is announced with every file's size and
//! SHA-256, the agent answers how much of each file it already holds, and chunks go out with
//! [`ClientOptions::window`] of them in flight. A chunk the agent rejects (corrupted, or sent
//! behind a rejected one) is sent again from the offset the agent names.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgevlm_proto::{self as proto, frame, AgentMessage, Decoder, HostMessage, Request, Response};

use crate::inventory::Board;
use crate::package::{LocalPackage, PackageError};
use crate::record::{BenchRecord, BoardFacts, ModelFacts, RunSettings};
use crate::transport::{Link, LinkGuard, TransportError};

/// How long the handshake waits for an answer before sending the hello again: doubling from
/// the first to the last value, so an agent that starts a moment after the host is answered at
/// once, and a slow line is not flooded with hellos.
const HELLO_RESEND: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));

/// Timeouts and tuning of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The host tool's release, sent in the hello.
    pub host_version: String,
    /// How long the link may take to start and answer the hello (ssh login included).
    pub handshake_timeout: Duration,
    /// How long a request may go without any answer (a commit hashes every file on the board).
    pub request_timeout: Duration,
    /// How long a benchmark may go without any event, on top of its minimum duration (a large
    /// model loads for a while before the first event).
    pub bench_idle_timeout: Duration,
    /// Chunks in flight during a push.
    pub window: usize,
    /// During a push, how long to wait for the next chunk answer before asking the agent where
    /// the upload stands (a chunk frame damaged beyond decoding gets no answer).
    pub probe_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            host_version: env!("CARGO_PKG_VERSION").to_owned(),
            handshake_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            bench_idle_timeout: Duration::from_secs(600),
            window: 8,
            probe_after: Duration::from_secs(10),
        }
    }
}

/// Why talking to a board failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The link could not be opened.
    #[error("connecting to board {board}")]
    Transport {
        /// The board.
        board: String,
        /// The cause.
        #[source]
        source: TransportError,
    },
    /// The agent speaks another protocol version, or is not an edgevlm agent.
    #[error("board {board}: {error} (host edgevlm {host_version}, agent edgevlm {agent_version})")]
    Incompatible {
        /// The board.
        board: String,
        /// `VersionMismatch` or `BadMagic`.
        error: Box<proto::Error>,
        /// This tool's release.
        host_version: String,
        /// The agent's release.
        agent_version: String,
    },
    /// The link ended or failed.
    #[error("connection to board {board} lost: {cause}")]
    Lost {
        /// The board.
        board: String,
        /// Why, as far as known (the ssh client's or agent's last words included).
        cause: String,
    },
    /// The agent did not answer in time.
    #[error("board {board} did not answer {what} within {} s{hint}", timeout.as_secs_f64())]
    Timeout {
        /// The board.
        board: String,
        /// The request waited for.
        what: String,
        /// How long it waited.
        timeout: Duration,
        /// A guess at why, or empty.
        hint: String,
    },
    /// The agent refused or failed a request.
    #[error("board {board}: {what}: {error}")]
    Agent {
        /// The board.
        board: String,
        /// The request (`activating demo-parts 1.0.0`).
        what: String,
        /// The agent's answer.
        error: Box<proto::Error>,
    },
    /// The agent answered something that does not fit the request.
    #[error("board {board}: unexpected answer to {what}: {answer}")]
    Unexpected {
        /// The board.
        board: String,
        /// The request.
        what: String,
        /// The answer, debug-printed.
        answer: String,
    },
    /// The request cannot be made as asked.
    #[error("board {board}: {message}")]
    Refused {
        /// The board.
        board: String,
        /// Why, and what to do instead.
        message: String,
    },
    /// The local package cannot be pushed.
    #[error(transparent)]
    Package(#[from] PackageError),
    /// Reading a package file during a push failed.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The agent's wire error, for a refused or failed request ([`ClientError::Agent`]) or an
    /// incompatible agent ([`ClientError::Incompatible`]).
    pub fn wire_error(&self) -> Option<&proto::Error> {
        match self {
            ClientError::Agent { error, .. } | ClientError::Incompatible { error, .. } => {
                Some(error)
            }
            _ => None,
        }
    }
}

enum Incoming {
    Message(Box<AgentMessage>),
    Garbled,
    Closed(String),
}

/// A connection to one board's agent.
pub struct Client {
    facts: BoardFacts,
    hello: proto::AgentHello,
    options: ClientOptions,
    writer: Arc<Mutex<Box<dyn Write + Send>>>,
    incoming: Receiver<Incoming>,
    next_id: Arc<AtomicU32>,
    /// The request a [`Canceller`] stops (0: none).
    running: Arc<AtomicU32>,
    guard: LinkGuard,
    lost: Option<String>,
    garbled: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("board", &self.facts.name)
            .field("agent", &self.hello.agent_version)
            .finish_non_exhaustive()
    }
}

/// Phase of a push, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushPhase {
    /// Comparing with the installed models and announcing the files.
    Checking,
    /// Sending chunks.
    Uploading,
    /// The agent verifies and installs the package.
    Committing,
    /// Making it the active model.
    Activating,
    /// Finished.
    Done,
}

/// Progress of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushProgress {
    /// What is happening.
    pub phase: PushPhase,
    /// The file being sent (empty outside [`PushPhase::Uploading`]).
    pub file: String,
    /// Bytes the agent holds verified, over all files.
    pub verified: u64,
    /// Bytes of the package.
    pub total: u64,
    /// Chunk bytes sent on this connection.
    pub sent: u64,
    /// Chunks sent again so far.
    pub retransmits: u32,
}

/// How to push.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushOptions {
    /// Make the package the active model once installed (also when it was installed already).
    pub activate: bool,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq)]
pub struct PushReport {
    /// `[model] name`.
    pub name: String,
    /// `[model] version`.
    pub version: String,
    /// Bytes of the package.
    pub bytes_total: u64,
    /// Chunk bytes sent, retransmissions included.
    pub bytes_sent: u64,
    /// Bytes the board held already from an interrupted push.
    pub resumed_from: u64,
    /// Chunks sent again because the agent rejected them (corrupted in transit, or sent behind
    /// a rejected one).
    pub retransmits: u32,
    /// Wall time of the push.
    pub elapsed: Duration,
    /// The same package (name, version, `model.toml`) was installed already: nothing was sent.
    pub skipped: bool,
    /// It was made the active model.
    pub activated: bool,
    /// The installed model as the board lists it.
    pub installed: Option<proto::ModelInfo>,
}

impl PushReport {
    /// Throughput of the sent bytes, MB/s (0 when nothing was sent).
    pub fn mb_per_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if self.bytes_sent == 0 || secs <= 0.0 {
            0.0
        } else {
            self.bytes_sent as f64 / 1e6 / secs
        }
    }
}

/// A finished benchmark: the agent's summary and every trace event it streamed.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRun {
    /// The agent's summary.
    pub summary: proto::BenchSummary,
    /// Trace events in arrival order.
    pub events: Vec<proto::TraceEvent>,
    /// Trace batches lost on the way (gaps in their sequence numbers).
    pub missing_batches: u32,
    /// When the request was sent, seconds since the Unix epoch (host clock).
    pub started_at: i64,
}

impl BenchRun {
    /// The run as the results database keeps it.
    pub fn record(
        &self,
        board: &BoardFacts,
        model: ModelFacts,
        settings: RunSettings,
    ) -> BenchRecord {
        let mut record =
            BenchRecord::from_run(board.clone(), model, settings, &self.summary, &self.events);
        record.started_at = self.started_at;
        record
    }
}

/// Stops the benchmark a [`Client`] is running, from another thread (a Ctrl-C handler).
#[derive(Clone)]
pub struct Canceller {
    writer: Arc<Mutex<Box<dyn Write + Send>>>,
    next_id: Arc<AtomicU32>,
    running: Arc<AtomicU32>,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("running", &self.running.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Canceller {
    /// Asks the agent to stop the running benchmark, which then fails with
    /// [`proto::Error::Cancelled`]. `Ok(false)` if none is running.
    pub fn cancel(&self) -> std::io::Result<bool> {
        let running = self.running.load(Ordering::SeqCst);
        if running == 0 {
            return Ok(false);
        }
        let id = proto::RequestId(self.next_id.fetch_add(1, Ordering::SeqCst));
        let message = HostMessage {
            id,
            request: Request::Cancel {
                id: proto::RequestId(running),
            },
        };
        write_frame(&self.writer, &message)?;
        Ok(true)
    }
}

fn write_frame(
    writer: &Mutex<Box<dyn Write + Send>>,
    message: &HostMessage,
) -> std::io::Result<()> {
    let bytes = frame::encode_to_vec(message).map_err(std::io::Error::other)?;
    let mut writer = writer
        .lock()
        .map_err(|_| std::io::Error::other("writer poisoned"))?;
    writer.write_all(&bytes)?;
    writer.flush()
}

fn spawn_reader(
    mut reader: Box<dyn std::io::Read + Send>,
    tx: Sender<Incoming>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("edgevlm-link-reader".into())
        .spawn(move || {
            let mut decoder: Box<Decoder<AgentMessage>> = Box::default();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(Incoming::Closed("the agent closed the link".into()));
                        return;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.send(Incoming::Closed(format!("reading: {e}")));
                        return;
                    }
                };
                for decoded in decoder.feed(&buf[..n]) {
                    let item = match decoded {
                        Ok(message) => Incoming::Message(Box::new(message)),
                        Err(_) => Incoming::Garbled,
                    };
                    if tx.send(item).is_err() {
                        return; // The client is gone.
                    }
                }
            }
        })?;
    Ok(())
}

fn what_model(verb: &str, name: &str, version: &str) -> String {
    format!("{verb} {name} {version}")
}

impl Client {
    /// Opens a link to `board` and connects.
    pub fn open(board: &Board, options: ClientOptions) -> Result<Client, ClientError> {
        let link = Link::open(board).map_err(|source| ClientError::Transport {
            board: board.name.clone(),
            source,
        })?;
        Client::connect(link, &board.name, &board.url(), options)
    }

    /// Handshakes over `link` with the agent of board `name` reached at `url`: sends a resync
    /// delimiter and the hello, waits for the agent's hello and checks the versions match.
    pub fn connect(
        link: Link,
        name: &str,
        url: &str,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let Link {
            reader,
            writer,
            guard,
        } = link;
        let (tx, rx) = mpsc::channel();
        if let Err(e) = spawn_reader(reader, tx) {
            return Err(ClientError::Lost {
                board: name.to_owned(),
                cause: format!("starting the link reader thread: {e}"),
            });
        }
        let mut client = Client {
            facts: BoardFacts {
                name: name.to_owned(),
                url: url.to_owned(),
                ..BoardFacts::default()
            },
            hello: proto::AgentHello::new("", "", ""),
            writer: Arc::new(Mutex::new(writer)),
            incoming: rx,
            next_id: Arc::new(AtomicU32::new(1)),
            running: Arc::new(AtomicU32::new(0)),
            guard,
            lost: None,
            garbled: 0,
            options,
        };
        client.handshake()?;
        Ok(client)
    }

    fn handshake(&mut self) -> Result<(), ClientError> {
        let what = "the handshake";
        {
            let mut writer = self.writer.lock().expect("writer lock");
            if let Err(e) = writer
                .write_all(&[frame::DELIMITER])
                .and_then(|()| writer.flush())
            {
                drop(writer);
                return Err(self.lost_on_write(e));
            }
        }
        // The hello is sent again (after 0.1 s, 0.2 s, ... up to every second) until one is
        // answered: a serial agent that opens (and flushes) its port after the host has spoken
        // never saw the first one. Every hello gets an answer; the ones after the first are
        // dropped as stale.
        let deadline = Instant::now() + self.options.handshake_timeout;
        let mut sent = Vec::new();
        let mut resend = HELLO_RESEND.0;
        let answer = loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.timeout(what, self.options.handshake_timeout));
            }
            sent.push(self.send(Request::Hello(proto::HostHello::new(
                &self.options.host_version,
            )))?);
            let wait = (deadline - now).min(resend);
            resend = (resend * 2).min(HELLO_RESEND.1);
            let round_end = Instant::now() + wait;
            let mut answered = None;
            while answered.is_none() {
                let left = round_end.saturating_duration_since(Instant::now());
                match self.try_next_message(left)? {
                    Some(AgentMessage::Response { id, result }) if sent.contains(&id) => {
                        answered = Some(result)
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            if let Some(result) = answered {
                break result.map_err(|error| self.agent_error(what, error))?;
            }
        };
        let Response::Hello(hello) = answer else {
            return Err(self.unexpected(what, &answer));
        };
        if let Err(error) = hello.check_compatible() {
            return Err(ClientError::Incompatible {
                board: self.facts.name.clone(),
                error: Box::new(error),
                host_version: self.options.host_version.clone(),
                agent_version: hello.agent_version.to_string(),
            });
        }
        self.facts = BoardFacts {
            name: self.facts.name.clone(),
            url: self.facts.url.clone(),
            profile: hello.board.to_string(),
            arch: hello.cpu.arch.to_string(),
            cpu_model: hello.cpu.model.to_string(),
            cores: hello.cpu.cores,
            ram_total_kib: hello.ram_total_kib,
            agent_version: hello.agent_version.to_string(),
            tract_version: hello.tract_version.to_string(),
        };
        self.hello = hello;
        Ok(())
    }

    /// The agent's hello.
    pub fn hello(&self) -> &proto::AgentHello {
        &self.hello
    }

    /// The board as a benchmark record names it (inventory name, URL, the agent's facts).
    pub fn facts(&self) -> &BoardFacts {
        &self.facts
    }

    /// The board's name.
    pub fn board(&self) -> &str {
        &self.facts.name
    }

    /// A handle that cancels the running benchmark from another thread.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            writer: self.writer.clone(),
            next_id: self.next_id.clone(),
            running: self.running.clone(),
        }
    }

    /// Installed models.
    pub fn models(&mut self) -> Result<Vec<proto::ModelInfo>, ClientError> {
        let what = "listing models";
        match self.call(Request::ListModels, what)? {
            Response::Models(models) => Ok(models.into_iter().collect()),
            other => Err(self.unexpected(what, &other)),
        }
    }

    /// Makes installed `name` `version` the active model.
    pub fn activate(&mut self, name: &str, version: &str) -> Result<(), ClientError> {
        let model = self.model_ref(name, version)?;
        self.call_done(
            Request::Activate(model),
            &what_model("activating", name, version),
        )
    }

    /// Re-activates the previously active model.
    pub fn rollback(&mut self) -> Result<(), ClientError> {
        self.call_done(Request::Rollback, "rolling back")
    }

    /// Deletes installed `name` `version` (refused for the active one).
    pub fn remove(&mut self, name: &str, version: &str) -> Result<(), ClientError> {
        let model = self.model_ref(name, version)?;
        self.call_done(
            Request::Remove(model),
            &what_model("removing", name, version),
        )
    }

    /// Validates and pushes the package in `dir` (see [`Client::push`]).
    pub fn push_dir(
        &mut self,
        dir: &Path,
        options: &PushOptions,
        progress: impl FnMut(&PushProgress),
    ) -> Result<PushReport, ClientError> {
        let package = LocalPackage::scan(dir)?;
        self.push(&package, options, progress)
    }

    /// Installs `package` on the board: skipped if the same name, version and `model.toml` are
    /// installed, otherwise uploaded (resuming an interrupted upload), verified and installed by
    /// the agent, then activated if asked.
    pub fn push(
        &mut self,
        package: &LocalPackage,
        options: &PushOptions,
        mut progress: impl FnMut(&PushProgress),
    ) -> Result<PushReport, ClientError> {
        let start = Instant::now();
        let total = package.total_bytes();
        let mut state = PushProgress {
            phase: PushPhase::Checking,
            file: String::new(),
            verified: 0,
            total,
            sent: 0,
            retransmits: 0,
        };
        progress(&state);
        let mut report = PushReport {
            name: package.name.clone(),
            version: package.version.clone(),
            bytes_total: total,
            bytes_sent: 0,
            resumed_from: 0,
            retransmits: 0,
            elapsed: Duration::ZERO,
            skipped: false,
            activated: false,
            installed: None,
        };

        let installed = self
            .models()?
            .into_iter()
            .find(|m| m.name.as_str() == package.name && m.version.as_str() == package.version);
        if let Some(model) = installed {
            if model.manifest_sha256 != package.manifest_sha256 {
                return Err(ClientError::Refused {
                    board: self.facts.name.clone(),
                    message: format!(
                        "{} is installed with a different model.toml: bump [model] version in {}, \
                         or remove the installed one first",
                        package.label(),
                        package.dir.join("model.toml").display()
                    ),
                });
            }
            report.skipped = true;
            report.resumed_from = total;
            state.verified = total;
            if options.activate && !model.active {
                state.phase = PushPhase::Activating;
                progress(&state);
                self.activate(&package.name, &package.version)?;
                report.activated = true;
            }
            report.installed = Some(model);
            report.installed.as_mut().expect("just set").active |= report.activated;
            report.elapsed = start.elapsed();
            state.phase = PushPhase::Done;
            progress(&state);
            return Ok(report);
        }

        let label = package.label();
        let what = format!("starting the upload of {label}");
        let spec = package.upload_spec();
        let upload = match self.call(Request::BeginUpload(spec.clone()), &what)? {
            Response::Upload(upload) => upload,
            other => return Err(self.unexpected(&what, &other)),
        };
        if upload.verified.len() != package.files.len() {
            return Err(self.unexpected(&what, &Response::Upload(upload)));
        }
        let verified: Vec<u64> = package
            .files
            .iter()
            .zip(&upload.verified)
            .map(|(f, &v)| v.min(f.size))
            .collect();
        report.resumed_from = verified.iter().sum();
        state.verified = report.resumed_from;
        state.phase = PushPhase::Uploading;
        progress(&state);

        for (index, file) in package.files.iter().enumerate() {
            if verified[index] >= file.size {
                continue;
            }
            state.file = file.path.clone();
            self.upload_file(
                &spec,
                upload.upload,
                index,
                file,
                verified[index],
                &mut state,
                &mut progress,
            )?;
        }
        report.bytes_sent = state.sent;
        report.retransmits = state.retransmits;

        state.phase = PushPhase::Committing;
        state.file.clear();
        progress(&state);
        let what = format!("installing {label}");
        let info = match self.call(
            Request::Commit {
                upload: upload.upload,
            },
            &what,
        )? {
            Response::Committed(info) => info,
            other => return Err(self.unexpected(&what, &other)),
        };
        report.installed = Some(info);
        if options.activate {
            state.phase = PushPhase::Activating;
            progress(&state);
            self.activate(&package.name, &package.version)?;
            report.activated = true;
            if let Some(info) = report.installed.as_mut() {
                info.active = true;
            }
        }
        report.elapsed = start.elapsed();
        state.phase = PushPhase::Done;
        progress(&state);
        Ok(report)
    }

    /// Sends `file` from `from` with a window of chunks in flight; on a rejected chunk, waits
    /// for every answer in flight and resumes where the agent's verified data ends.
    ///
    /// The agent handles chunks in order, so an answer to a later request means that earlier
    /// chunks still unanswered were lost on the way (a frame too damaged to decode is dropped
    /// without an answer); when answers stop coming, a re-sent `BeginUpload` serves as a probe
    /// whose answer settles what is lost and where the file's verified data ends.
    #[allow(clippy::too_many_arguments)]
    fn upload_file(
        &mut self,
        spec: &proto::UploadSpec,
        upload: proto::UploadId,
        index: usize,
        file: &crate::package::PackageFile,
        from: u64,
        state: &mut PushProgress,
        progress: &mut impl FnMut(&PushProgress),
    ) -> Result<(), ClientError> {
        struct InFlight {
            id: u32,
            offset: u64,
        }
        let read_err = |source| ClientError::Read {
            path: file.local.clone(),
            source,
        };
        let what = format!("sending {}", file.path);
        let local = File::open(&file.local).map_err(read_err)?;
        let chunk_size = self.hello.chunk_limit();
        let window = self.options.window.max(1);
        let base = state.verified - from; // Verified bytes of the other files.
        let file_index = u16::try_from(index).expect("at most MAX_PACKAGE_FILES files");
        let mut buf = vec![0u8; chunk_size];
        let mut pending: VecDeque<InFlight> = VecDeque::new();
        let mut next = from;
        let mut confirmed = from;
        // Where the agent's verified data ends, per its latest answer (and that answer's id).
        let (mut agent_at, mut agent_at_id) = (from, 0u32);
        let mut draining = false;
        let mut best_resume = from;
        let mut stalls = 0u32;
        let mut probe: Option<u32> = None;
        let mut last_answer = Instant::now();
        loop {
            while !draining && pending.len() < window && next < file.size {
                let len = usize::try_from((file.size - next).min(chunk_size as u64))
                    .expect("chunk fits in memory");
                local
                    .read_exact_at(&mut buf[..len], next)
                    .map_err(read_err)?;
                let chunk = proto::Chunk::new(upload, file_index, next, &buf[..len])
                    .map_err(|error| self.agent_error(&what, error))?;
                let id = self.send(Request::PushChunk(chunk))?;
                if pending.is_empty() {
                    last_answer = Instant::now();
                }
                pending.push_back(InFlight {
                    id: id.0,
                    offset: next,
                });
                next += len as u64;
                state.sent += len as u64;
            }
            if pending.is_empty() {
                if !draining {
                    break;
                }
                // Every answer is in: resume where the agent says its data ends.
                draining = false;
                if agent_at > best_resume {
                    best_resume = agent_at;
                    stalls = 0;
                } else {
                    stalls += 1;
                    if stalls > 16 {
                        return Err(ClientError::Refused {
                            board: self.facts.name.clone(),
                            message: format!(
                                "{}: the board keeps rejecting the chunk at offset {agent_at} \
                                 ({} chunks sent again): the link corrupts data (try a lower \
                                 baud rate or another cable)",
                                file.path, state.retransmits
                            ),
                        });
                    }
                }
                next = agent_at;
                continue;
            }
            let wait = self.options.probe_after.min(self.options.request_timeout);
            let Some(message) = self.try_next_message(wait)? else {
                if last_answer.elapsed() >= self.options.request_timeout {
                    return Err(self.timeout(&what, self.options.request_timeout));
                }
                if probe.is_none() {
                    probe = Some(self.send(Request::BeginUpload(spec.clone()))?.0);
                }
                continue;
            };
            let AgentMessage::Response { id, result } = message else {
                continue;
            };
            last_answer = Instant::now();
            // Chunks sent before this request and still unanswered were lost on the way.
            while pending.front().is_some_and(|p| p.id < id.0) {
                pending.pop_front();
                state.retransmits += 1;
                draining = true;
            }
            if probe == Some(id.0) {
                probe = None;
                match result {
                    Ok(Response::Upload(u)) => {
                        if let Some(&verified) = u.verified.get(index) {
                            if id.0 > agent_at_id {
                                (agent_at, agent_at_id) = (verified, id.0);
                            }
                        }
                    }
                    Ok(other) => return Err(self.unexpected(&what, &other)),
                    Err(error) => return Err(self.agent_error(&what, error)),
                }
                continue;
            }
            if pending.front().is_none_or(|p| p.id != id.0) {
                continue; // A late answer to something else (a cancel, an earlier probe).
            }
            let sent = pending.pop_front().expect("front exists");
            let at = match result {
                Ok(Response::ChunkAccepted { file: f, verified }) if f == file_index => {
                    confirmed = confirmed.max(verified);
                    state.verified = base + confirmed;
                    progress(state);
                    verified
                }
                Err(proto::Error::ChecksumMismatch { offset }) => {
                    state.retransmits += 1;
                    draining = true;
                    offset.min(sent.offset)
                }
                Err(proto::Error::OutOfOrder { expected }) => {
                    state.retransmits += 1;
                    draining = true;
                    expected
                }
                Err(error) => return Err(self.agent_error(&what, error)),
                Ok(other) => return Err(self.unexpected(&what, &other)),
            };
            if id.0 > agent_at_id {
                (agent_at, agent_at_id) = (at, id.0);
            }
        }
        Ok(())
    }

    /// Runs a benchmark, passing every trace event to `on_event` as it arrives.
    pub fn bench(
        &mut self,
        spec: &proto::BenchSpec,
        mut on_event: impl FnMut(&proto::TraceEvent),
    ) -> Result<BenchRun, ClientError> {
        let what = what_model("benchmarking", &spec.model.name, &spec.model.version);
        let started_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let idle = self.options.bench_idle_timeout
            + Duration::from_millis(u64::from(spec.min_duration_ms));
        let id = self.send(Request::RunBenchmark(spec.clone()))?;
        self.running.store(id.0, Ordering::SeqCst);
        let result = self.collect_bench(id, &what, idle, &mut on_event);
        self.running.store(0, Ordering::SeqCst);
        let (summary, events, missing_batches) = result?;
        Ok(BenchRun {
            summary,
            events,
            missing_batches,
            started_at,
        })
    }

    fn collect_bench(
        &mut self,
        id: proto::RequestId,
        what: &str,
        idle: Duration,
        on_event: &mut impl FnMut(&proto::TraceEvent),
    ) -> Result<(proto::BenchSummary, Vec<proto::TraceEvent>, u32), ClientError> {
        let mut events = Vec::new();
        let mut next_seq = 0u32;
        let mut missing = 0u32;
        loop {
            match self.next_message(what, idle)? {
                AgentMessage::Event {
                    id: event_id,
                    event: proto::Event::Trace(batch),
                } if event_id == id => {
                    missing += batch.seq.saturating_sub(next_seq);
                    next_seq = batch.seq.saturating_add(1).max(next_seq);
                    for event in batch.events {
                        on_event(&event);
                        events.push(event);
                    }
                }
                AgentMessage::Response {
                    id: response_id,
                    result,
                } if response_id == id => {
                    return match result {
                        Ok(Response::BenchDone(summary)) => Ok((summary, events, missing)),
                        Ok(other) => Err(self.unexpected(what, &other)),
                        Err(error) => Err(self.agent_error(what, error)),
                    };
                }
                _ => {} // Answers to a cancel, or late answers.
            }
        }
    }

    fn model_ref(&self, name: &str, version: &str) -> Result<proto::ModelRef, ClientError> {
        let bad = |field: &str, value: &str| {
            ClientError::Refused {
            board: self.facts.name.clone(),
            message: format!(
                "{field} {value:?} is not valid: letters, digits, '.', '_', '-', not starting with '.' or '-'"
            ),
        }
        };
        proto::validate_model_name(name).map_err(|_| bad("model name", name))?;
        if version.len() > proto::MAX_VERSION || proto::validate_model_name(version).is_err() {
            return Err(bad("version", version));
        }
        Ok(proto::ModelRef {
            name: proto::bounded(name),
            version: proto::bounded(version),
        })
    }

    fn call_done(&mut self, request: Request, what: &str) -> Result<(), ClientError> {
        match self.call(request, what)? {
            Response::Done => Ok(()),
            other => Err(self.unexpected(what, &other)),
        }
    }

    fn call(&mut self, request: Request, what: &str) -> Result<Response, ClientError> {
        let timeout = self.options.request_timeout;
        self.call_within(request, what, timeout)
    }

    /// Sends `request` and waits for its final response; events for it are dropped.
    fn call_within(
        &mut self,
        request: Request,
        what: &str,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let id = self.send(request)?;
        loop {
            let (answered, result) = self.next_response(what, timeout)?;
            if answered == id {
                return result.map_err(|error| self.agent_error(what, error));
            }
        }
    }

    fn send(&mut self, request: Request) -> Result<proto::RequestId, ClientError> {
        if let Some(cause) = &self.lost {
            return Err(ClientError::Lost {
                board: self.facts.name.clone(),
                cause: cause.clone(),
            });
        }
        let id = proto::RequestId(self.next_id.fetch_add(1, Ordering::SeqCst));
        match write_frame(&self.writer, &HostMessage { id, request }) {
            Ok(()) => Ok(id),
            Err(e) => Err(self.lost_on_write(e)),
        }
    }

    /// The next final response (of any request).
    fn next_response(
        &mut self,
        what: &str,
        timeout: Duration,
    ) -> Result<(proto::RequestId, Result<Response, proto::Error>), ClientError> {
        loop {
            if let AgentMessage::Response { id, result } = self.next_message(what, timeout)? {
                return Ok((id, result));
            }
        }
    }

    /// The next message, waiting at most `timeout` for it.
    fn next_message(&mut self, what: &str, timeout: Duration) -> Result<AgentMessage, ClientError> {
        match self.try_next_message(timeout)? {
            Some(message) => Ok(message),
            None => Err(self.timeout(what, timeout)),
        }
    }

    /// The next message, or `None` if none came within `timeout`.
    fn try_next_message(&mut self, timeout: Duration) -> Result<Option<AgentMessage>, ClientError> {
        if let Some(cause) = &self.lost {
            return Err(ClientError::Lost {
                board: self.facts.name.clone(),
                cause: cause.clone(),
            });
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.incoming.recv_timeout(left) {
                Ok(Incoming::Message(message)) => return Ok(Some(*message)),
                Ok(Incoming::Garbled) => self.garbled += 1,
                Ok(Incoming::Closed(cause)) => return Err(self.lost_with(cause)),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.lost_with("the reader stopped".into()))
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
            }
        }
    }

    fn timeout(&self, what: &str, timeout: Duration) -> ClientError {
        let hint = if self.garbled > 0 {
            format!(
                " ({} undecodable frames received: is the remote command an edgevlm agent of \
                 the same release?)",
                self.garbled
            )
        } else {
            String::new()
        };
        ClientError::Timeout {
            board: self.facts.name.clone(),
            what: what.to_owned(),
            timeout,
            hint,
        }
    }

    fn lost_on_write(&mut self, e: std::io::Error) -> ClientError {
        // The reader usually knows better why (the process ended, with its last words).
        if let Ok(Incoming::Closed(cause)) = self.incoming.recv_timeout(Duration::from_millis(500))
        {
            return self.lost_with(cause);
        }
        self.lost_with(format!("writing: {e}"))
    }

    fn lost_with(&mut self, cause: String) -> ClientError {
        let cause = match self.guard.failure_detail(Duration::from_secs(2)) {
            Some(detail) => detail,
            None => cause,
        };
        self.lost = Some(cause.clone());
        ClientError::Lost {
            board: self.facts.name.clone(),
            cause,
        }
    }

    fn agent_error(&self, what: &str, error: proto::Error) -> ClientError {
        ClientError::Agent {
            board: self.facts.name.clone(),
            what: what.to_owned(),
            error: Box::new(error),
        }
    }

    fn unexpected(&self, what: &str, answer: &Response) -> ClientError {
        let mut answer = format!("{answer:?}");
        answer.truncate(200);
        ClientError::Unexpected {
            board: self.facts.name.clone(),
            what: what.to_owned(),
            answer,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // End of input tells the agent to finish; give it a moment before killing it.
        if let Ok(mut writer) = self.writer.lock() {
            *writer = Box::new(std::io::sink());
        }
        self.guard.close_within(Duration::from_secs(1));
    }
}
