//! The inspection loop: trigger -> fresh frame -> model -> verdict -> pins.
//!
//! A trigger thread turns edges into queue entries (bounded; drops are counted and reported,
//! never silent); the worker (the caller's thread) takes them in order, captures with retries
//! and backoff, inspects, hands the verdict to the pins, saves NG frames, swaps in a new model
//! between parts, keeps the systemd watchdog fed, and on stop drains what is queued before
//! returning. A pin thread times the pulses (one per verdict, `pulse_ms` wide, `gap_ms` apart
//! on one pin, in verdict order), so a long inference never stretches or merges them; when
//! its bounded queue of pulses is full the worker waits, and the overload lands in the
//! trigger queue, where drops are counted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use edgevlm_board::{
    monotonic_now, Camera, CameraError, CameraErrorKind, DelayNs, Frame, OutputPin, PixelFormat,
    Signal, Trigger, TriggerEvent, VerdictOutputs,
};
use edgevlm_runtime::{error_chain, FrameFormat, Inspector, LoadOptions, Trace, Verdict};
use serde::Serialize;

use crate::config::WhenFull;
use crate::ngstore::NgStore;
use crate::notify::Notifier;
use crate::outputs::SharedOutputs;

/// Loop settings (from the `[queue]` and `[camera]` config sections).
#[derive(Debug, Clone)]
pub struct StationSettings {
    /// Queue capacity.
    pub queue_capacity: usize,
    /// What to drop when it is full.
    pub when_full: WhenFull,
    /// Capture retries per trigger.
    pub camera_retries: u32,
    /// First retry backoff (doubles, at most 1 s).
    pub backoff: Duration,
    /// Longest the loop sleeps between housekeeping (watchdog, model swaps, reports).
    pub tick: Duration,
}

impl Default for StationSettings {
    fn default() -> Self {
        StationSettings {
            queue_capacity: 8,
            when_full: WhenFull::DropNewest,
            camera_retries: 3,
            backoff: Duration::from_millis(20),
            tick: Duration::from_millis(50),
        }
    }
}

/// What happened to one trigger.
#[derive(Debug, Clone, Serialize)]
pub struct PartRecord {
    /// Trigger sequence number.
    pub sequence: u64,
    /// What the pins said.
    #[serde(serialize_with = "signal_name")]
    pub signal: Signal,
    /// Top label (when the model ran).
    pub label: Option<String>,
    /// Its probability.
    pub probability: Option<f32>,
    /// Why NG.
    pub reason: Option<String>,
    /// Why ERROR.
    pub error: Option<String>,
    /// Trigger edge to the verdict reaching the output pins, in microseconds (in pulse mode
    /// its pulse starts then, or after the pulses queued before it).
    pub latency_us: u64,
    /// Time the trigger waited in the queue, in microseconds.
    pub queue_us: u64,
    /// Capture attempts (1 when the first one worked).
    pub capture_attempts: u32,
    /// Frame source (device or file).
    pub source: String,
    /// Where the NG frame was saved.
    pub saved: Option<PathBuf>,
    /// Why it could not be saved (the part's verdict stands).
    pub save_error: Option<String>,
    /// Stage timings of the model run.
    pub trace: Option<Trace>,
}

fn signal_name<S: serde::Serializer>(s: &Signal, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(match s {
        Signal::Ok => "OK",
        Signal::Ng => "NG",
        Signal::Error => "ERROR",
    })
}

/// Everything the loop reports while it runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// A part was judged (or could not be).
    Part(PartRecord),
    /// Triggers were dropped because the queue was full.
    Dropped {
        /// Since the last report.
        new: u64,
        /// Since start.
        total: u64,
    },
    /// The trigger input failed.
    TriggerFailed(String),
    /// A new model is active.
    ModelSwitched {
        /// Package name.
        name: String,
        /// Package version.
        version: String,
    },
    /// A new model could not be loaded; the previous one stays active.
    ModelRejected {
        /// The package.
        package: PathBuf,
        /// Why.
        error: String,
    },
    /// Stop requested: finishing the queued triggers.
    Draining {
        /// Triggers still queued.
        queued: usize,
    },
    /// An output pin could not be driven.
    OutputFailed(String),
}

/// Counts and latencies of a whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Trigger edges seen.
    pub triggers: u64,
    /// Parts judged or failed (one pin result each).
    pub processed: u64,
    /// OK parts.
    pub ok: u64,
    /// NG parts.
    pub ng: u64,
    /// Parts that could not be judged.
    pub errors: u64,
    /// Triggers dropped on a full queue.
    pub dropped: u64,
    /// Capture attempts beyond the first.
    pub capture_retries: u64,
    /// Models swapped in.
    pub model_switches: u64,
    /// Times the worker waited for room in the pin thread's pulse queue before taking the next
    /// trigger (results come faster than pulses plus gaps can show them). Pulses are never
    /// dropped; a long wait shows up as dropped triggers.
    pub pulse_waits: u64,
    /// Trigger-to-output latency per processed part, microseconds.
    pub latencies_us: Vec<u64>,
}

impl Report {
    /// Latency percentile in milliseconds (nearest rank), 0 without parts.
    pub fn latency_ms(&self, p: f64) -> f64 {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize - 1;
        v[rank.min(v.len() - 1)] as f64 / 1000.0
    }
}

enum Swap {
    Loaded(Box<Inspector>),
    Failed(PathBuf, String),
}

/// Controls a running station from other threads (signal handlers, the protocol server).
#[derive(Clone)]
pub struct StationHandle {
    stop: Arc<AtomicBool>,
    swap: Sender<Swap>,
}

impl StationHandle {
    /// Stops taking triggers; the loop finishes what is queued and returns.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The flag `stop` sets (for signal-hook).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Loads `package` on a background thread, beside the running model; the loop swaps it in
    /// between two parts, so no trigger is lost. If loading fails the old model stays.
    pub fn load_model(
        &self,
        package: PathBuf,
        options: LoadOptions,
    ) -> std::thread::JoinHandle<()> {
        let swap = self.swap.clone();
        std::thread::spawn(move || {
            let msg = match Inspector::load(&package, &options) {
                Ok(c) => Swap::Loaded(Box::new(c)),
                Err(e) => Swap::Failed(package, error_chain(&e)),
            };
            let _ = swap.send(msg);
        })
    }
}

/// The runtime's view of a board frame (encoded PNG frames decode like MJPEG).
pub fn runtime_frame(frame: &Frame) -> edgevlm_runtime::Frame<'_> {
    let format = match frame.format {
        PixelFormat::Rgb8 => FrameFormat::Rgb8,
        PixelFormat::Gray8 => FrameFormat::Gray8,
        PixelFormat::Yuyv => FrameFormat::Yuyv,
        PixelFormat::Nv12 => FrameFormat::Nv12,
        PixelFormat::Mjpeg | PixelFormat::Png => FrameFormat::Mjpeg,
    };
    edgevlm_runtime::Frame {
        format,
        width: frame.width,
        height: frame.height,
        data: &frame.data,
    }
}

/// One inspection station: camera, result pins and the model.
pub struct Station<C: Camera, P: OutputPin, D: DelayNs> {
    camera: C,
    outputs: Arc<SharedOutputs<P, D>>,
    inspector: Inspector,
    settings: StationSettings,
    ng_store: Option<NgStore>,
    notifier: Notifier,
    stop: Arc<AtomicBool>,
    swap_tx: Sender<Swap>,
    swap_rx: Receiver<Swap>,
}

impl<C, P, D> Station<C, P, D>
where
    C: Camera,
    P: OutputPin + Send + 'static,
    D: DelayNs + Send + 'static,
{
    /// A station; nothing runs until [`Station::run`].
    pub fn new(
        camera: C,
        outputs: VerdictOutputs<P, D>,
        inspector: Inspector,
        settings: StationSettings,
    ) -> Self {
        let (swap_tx, swap_rx) = crossbeam_channel::unbounded();
        Station {
            camera,
            outputs: SharedOutputs::new(outputs),
            inspector,
            settings,
            ng_store: None,
            notifier: Notifier::from_env(),
            stop: Arc::new(AtomicBool::new(false)),
            swap_tx,
            swap_rx,
        }
    }

    /// Keeps NG and ERROR frames in `store`.
    pub fn with_ng_store(mut self, store: NgStore) -> Self {
        self.ng_store = Some(store);
        self
    }

    /// A handle to stop the loop or switch models from another thread.
    pub fn handle(&self) -> StationHandle {
        StationHandle {
            stop: self.stop.clone(),
            swap: self.swap_tx.clone(),
        }
    }

    /// Runs until the trigger is exhausted or a stop is requested, then drains the queue.
    /// `observer` sees every event on this thread (log lines, CLI output, tests).
    pub fn run<T>(mut self, mut trigger: T, mut observer: impl FnMut(&Event)) -> Report
    where
        T: Trigger + Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded::<TriggerEvent>(self.settings.queue_capacity);
        let (notice_tx, notice_rx) = crossbeam_channel::unbounded::<String>();
        let received = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let producer = {
            let (stop, received, dropped, rx, tick, when_full) = (
                self.stop.clone(),
                received.clone(),
                dropped.clone(),
                rx.clone(),
                self.settings.tick,
                self.settings.when_full,
            );
            std::thread::Builder::new()
                .name("edgevlm-trigger".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) && !trigger.is_exhausted() {
                        match trigger.wait(tick) {
                            Ok(Some(event)) => {
                                received.fetch_add(1, Ordering::SeqCst);
                                enqueue(&tx, &rx, event, when_full, &dropped);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                let _ = notice_tx.send(e.to_string());
                                std::thread::sleep(tick);
                            }
                        }
                    }
                    // Dropping `tx` here ends the worker once the queue is empty.
                })
                .expect("spawning the trigger thread")
        };

        let (pin_error_tx, pin_error_rx) = crossbeam_channel::unbounded::<String>();
        let pins = self.outputs.spawn(pin_error_tx);

        let mut report = Report::default();
        let mut reported_drops = 0;
        let mut draining = false;
        let mut waiting_for_pins = false;
        let model = &self.inspector.package().manifest().model;
        self.notifier
            .ready(&format!("inspecting with {} {}", model.name, model.version));
        loop {
            self.notifier.ping_if_due();
            while let Ok(swap) = self.swap_rx.try_recv() {
                match swap {
                    Swap::Loaded(c) => {
                        self.inspector = *c;
                        report.model_switches += 1;
                        let m = &self.inspector.package().manifest().model;
                        observer(&Event::ModelSwitched {
                            name: m.name.clone(),
                            version: m.version.clone(),
                        });
                    }
                    Swap::Failed(package, error) => {
                        observer(&Event::ModelRejected { package, error })
                    }
                }
            }
            while let Ok(e) = notice_rx.try_recv() {
                observer(&Event::TriggerFailed(e));
            }
            while let Ok(e) = pin_error_rx.try_recv() {
                observer(&Event::OutputFailed(e));
            }
            let total = dropped.load(Ordering::SeqCst);
            if total > reported_drops {
                observer(&Event::Dropped {
                    new: total - reported_drops,
                    total,
                });
                reported_drops = total;
            }
            if !draining && self.stop.load(Ordering::SeqCst) {
                draining = true;
                self.notifier.stopping();
                observer(&Event::Draining { queued: rx.len() });
            }
            let mut timeout = self.settings.tick;
            if let Some(every) = self.notifier.ping_interval() {
                timeout = timeout.min(every);
            }
            if self.outputs.is_full() {
                // Judging another part now would have nowhere to put its pulse.
                if !waiting_for_pins {
                    waiting_for_pins = true;
                    report.pulse_waits += 1;
                }
                self.outputs.wait_for_room(timeout);
                continue;
            }
            waiting_for_pins = false;
            match rx.recv_timeout(timeout) {
                Ok(event) => {
                    let record = self.inspect_part(event, &mut report);
                    observer(&Event::Part(record));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = producer.join();
        // Every queued pulse is shown before the pins return to the caller's world.
        self.outputs.finish(pins);
        while let Ok(e) = pin_error_rx.try_recv() {
            observer(&Event::OutputFailed(e));
        }
        report.triggers = received.load(Ordering::SeqCst);
        report.dropped = dropped.load(Ordering::SeqCst);
        if report.dropped > reported_drops {
            observer(&Event::Dropped {
                new: report.dropped - reported_drops,
                total: report.dropped,
            });
        }
        report
    }

    fn inspect_part(&mut self, event: TriggerEvent, report: &mut Report) -> PartRecord {
        let start = monotonic_now();
        let busy = self.outputs.set_busy(true);
        let mut record = PartRecord {
            sequence: event.sequence,
            signal: Signal::Error,
            label: None,
            probability: None,
            reason: None,
            error: None,
            latency_us: 0,
            queue_us: start.saturating_sub(event.timestamp).as_micros() as u64,
            capture_attempts: 0,
            source: String::new(),
            saved: None,
            save_error: None,
            trace: None,
        };
        let frame = self.capture_after(event.timestamp, &mut record);
        report.capture_retries += record.capture_attempts.saturating_sub(1) as u64;
        match &frame {
            Ok(frame) => {
                record.source = frame.source.clone();
                match self
                    .inspector
                    .inspect_frame(&runtime_frame(frame), &frame.source)
                {
                    Ok(r) => {
                        record.signal = if r.verdict == Verdict::Ok {
                            Signal::Ok
                        } else {
                            Signal::Ng
                        };
                        record.label = r.label().map(str::to_owned);
                        record.probability = r.classes.first().map(|c| c.probability);
                        record.reason = r.reason;
                        record.trace = Some(r.trace);
                    }
                    Err(e) => record.error = Some(error_chain(&e)),
                }
            }
            Err(e) => record.error = Some(e.clone()),
        }
        if let Err(e) = self.outputs.set(record.signal) {
            record
                .error
                .get_or_insert_with(|| format!("driving the output pins: {e}"));
        }
        record.latency_us = monotonic_now().saturating_sub(event.timestamp).as_micros() as u64;
        if busy.is_ok() {
            let _ = self.outputs.set_busy(false);
        }
        match record.signal {
            Signal::Ok => report.ok += 1,
            Signal::Ng => report.ng += 1,
            Signal::Error => report.errors += 1,
        }
        report.processed += 1;
        report.latencies_us.push(record.latency_us);
        if record.signal != Signal::Ok {
            if let (Some(store), Ok(frame)) = (&self.ng_store, &frame) {
                let label = record.label.as_deref().unwrap_or("error");
                match store.save(frame, event.sequence, label) {
                    Ok(path) => record.saved = Some(path),
                    Err(e) => record.save_error = Some(e),
                }
            }
        }
        record
    }

    /// A frame taken after `after`, retrying with exponential backoff.
    fn capture_after(&mut self, after: Duration, record: &mut PartRecord) -> Result<Frame, String> {
        let mut backoff = self.settings.backoff;
        loop {
            record.capture_attempts += 1;
            let failure = match self.camera.capture() {
                Ok(frame) if frame.timestamp >= after => return Ok(frame),
                Ok(frame) => format!(
                    "stale frame from {}: taken {} us before the trigger",
                    frame.source,
                    (after - frame.timestamp).as_micros()
                ),
                Err(e) => {
                    if e.kind() == CameraErrorKind::Disconnected {
                        let _ = self.camera.recover();
                    }
                    format!("camera: {}", error_chain(&e))
                }
            };
            if record.capture_attempts > self.settings.camera_retries {
                return Err(format!(
                    "{failure} (after {} attempts)",
                    record.capture_attempts
                ));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

fn enqueue(
    tx: &Sender<TriggerEvent>,
    rx: &Receiver<TriggerEvent>,
    event: TriggerEvent,
    when_full: WhenFull,
    dropped: &AtomicU64,
) {
    match tx.try_send(event) {
        Ok(()) => {}
        Err(TrySendError::Full(event)) => match when_full {
            WhenFull::DropNewest => {
                dropped.fetch_add(1, Ordering::SeqCst);
            }
            WhenFull::DropOldest => {
                if rx.try_recv().is_ok() {
                    dropped.fetch_add(1, Ordering::SeqCst);
                }
                // The worker may have freed a slot meanwhile; if not, this trigger is the drop.
                if tx.try_send(event).is_err() {
                    dropped.fetch_add(1, Ordering::SeqCst);
                }
            }
        },
        Err(TrySendError::Disconnected(_)) => {
            dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}
