//! The simulated board: an image-folder camera, scripted triggers and output pins that record
//! every level change with a timestamp. It drives the embedded default and the tests.
#![warn(missing_docs)]

pub mod serial_line;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgevlm_board::{
    monotonic_now, Camera, CameraError, CameraErrorKind, Frame, PixelFormat, Trigger, TriggerEvent,
};
use embedded_hal::digital::{ErrorType, OutputPin};

/// Errors of the simulated devices.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The image folder is missing or empty.
    #[error("camera folder {path}: {message}")]
    Disconnected {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An image file could not be read.
    #[error("camera image {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl CameraError for SimError {
    fn kind(&self) -> CameraErrorKind {
        match self {
            SimError::Disconnected { .. } => CameraErrorKind::Disconnected,
            SimError::Read { .. } => CameraErrorKind::BadFrame,
        }
    }
}

/// A camera that returns the JPEG / PNG files of a folder in name order, round and round.
/// The folder is re-listed on every capture, so removing it simulates an unplugged camera and
/// restoring it a camera that comes back.
#[derive(Debug)]
pub struct FolderCamera {
    dir: PathBuf,
    next: usize,
    sequence: u64,
}

impl FolderCamera {
    /// A camera over `dir`; fails when it holds no images.
    pub fn open(dir: &Path) -> Result<FolderCamera, SimError> {
        let camera = FolderCamera {
            dir: dir.to_owned(),
            next: 0,
            sequence: 0,
        };
        camera.list()?;
        Ok(camera)
    }

    fn list(&self) -> Result<Vec<(PathBuf, PixelFormat)>, SimError> {
        let gone = |message: String| SimError::Disconnected {
            path: self.dir.clone(),
            message,
        };
        let entries = std::fs::read_dir(&self.dir).map_err(|e| gone(e.to_string()))?;
        let mut images: Vec<(PathBuf, PixelFormat)> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let ext = p.extension()?.to_str()?.to_ascii_lowercase();
                let format = match ext.as_str() {
                    "jpg" | "jpeg" => PixelFormat::Mjpeg,
                    "png" => PixelFormat::Png,
                    _ => return None,
                };
                Some((p, format))
            })
            .collect();
        if images.is_empty() {
            return Err(gone("holds no .jpg, .jpeg or .png files".into()));
        }
        images.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(images)
    }
}

impl Camera for FolderCamera {
    type Error = SimError;

    fn capture(&mut self) -> Result<Frame, SimError> {
        let images = self.list()?;
        let (path, format) = images[self.next % images.len()].clone();
        self.next = (self.next + 1) % images.len();
        let data = std::fs::read(&path).map_err(|source| SimError::Read {
            path: path.clone(),
            source,
        })?;
        let frame = Frame {
            format,
            width: 0,
            height: 0,
            data,
            sequence: self.sequence,
            timestamp: monotonic_now(),
            source: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        self.sequence += 1;
        Ok(frame)
    }
}

/// A camera that generates colour bars with a moving stripe (`Rgb8`), for running the whole
/// loop without any image at hand.
#[derive(Debug)]
pub struct PatternCamera {
    width: u32,
    height: u32,
    sequence: u64,
}

impl PatternCamera {
    /// A `width` x `height` pattern.
    pub fn new(width: u32, height: u32) -> Self {
        PatternCamera {
            width: width.max(8),
            height: height.max(8),
            sequence: 0,
        }
    }
}

impl Camera for PatternCamera {
    type Error = SimError;

    fn capture(&mut self) -> Result<Frame, SimError> {
        const BARS: [[u8; 3]; 8] = [
            [255, 255, 255],
            [255, 255, 0],
            [0, 255, 255],
            [0, 255, 0],
            [255, 0, 255],
            [255, 0, 0],
            [0, 0, 255],
            [0, 0, 0],
        ];
        let (w, h) = (self.width as usize, self.height as usize);
        let stripe = (self.sequence as usize * 4) % h;
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let px = if y.abs_diff(stripe) < 2 {
                    [128, 128, 128]
                } else {
                    BARS[x * 8 / w]
                };
                data.extend_from_slice(&px);
            }
        }
        let frame = Frame {
            format: PixelFormat::Rgb8,
            width: self.width,
            height: self.height,
            data,
            sequence: self.sequence,
            timestamp: monotonic_now(),
            source: format!("test-pattern-{}", self.sequence),
        };
        self.sequence += 1;
        Ok(frame)
    }
}

/// Parses a trigger script: one trigger per line at that many milliseconds after the start;
/// blank lines and `#` comments are skipped. Errors name the line.
pub fn parse_script(text: &str) -> Result<Vec<Duration>, String> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(n, l)| {
            l.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("line {n}: {l:?} is not a millisecond offset"))
        })
        .collect()
}

/// One trigger per line read from `input` (e.g. stdin, a FIFO); ends at end of input.
#[derive(Debug)]
pub struct LineTrigger {
    lines: std::sync::mpsc::Receiver<()>,
    ended: bool,
    sequence: u64,
}

impl LineTrigger {
    /// Reads `input` on a background thread.
    pub fn new(input: impl std::io::BufRead + Send + 'static) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in input.lines() {
                if line.is_err() || tx.send(()).is_err() {
                    break;
                }
            }
        });
        LineTrigger {
            lines: rx,
            ended: false,
            sequence: 0,
        }
    }
}

impl Trigger for LineTrigger {
    type Error = std::convert::Infallible;

    fn is_exhausted(&self) -> bool {
        self.ended
    }

    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, Self::Error> {
        match self.lines.recv_timeout(timeout) {
            Ok(()) => {
                let event = TriggerEvent {
                    sequence: self.sequence,
                    timestamp: monotonic_now(),
                };
                self.sequence += 1;
                Ok(Some(event))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                self.ended = true;
                Ok(None)
            }
        }
    }
}

/// Triggers at fixed offsets from when the schedule starts; ends after the last one.
#[derive(Debug)]
pub struct ScheduleTrigger {
    at: Vec<Duration>,
    next: usize,
    start: Option<Instant>,
}

impl ScheduleTrigger {
    /// Events at the given offsets (sorted on creation).
    pub fn new(mut at: Vec<Duration>) -> Self {
        at.sort();
        ScheduleTrigger {
            at,
            next: 0,
            start: None,
        }
    }

    /// `count` events, one every `period`, the first at `period`.
    pub fn periodic(count: usize, period: Duration) -> Self {
        ScheduleTrigger::new((1..=count as u32).map(|i| period * i).collect())
    }
}

impl Trigger for ScheduleTrigger {
    type Error = std::convert::Infallible;

    fn is_exhausted(&self) -> bool {
        self.next >= self.at.len()
    }

    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, Self::Error> {
        let start = *self.start.get_or_insert_with(Instant::now);
        let Some(&due) = self.at.get(self.next) else {
            return Ok(None);
        };
        let now = start.elapsed();
        if due > now + timeout {
            std::thread::sleep(timeout);
            return Ok(None);
        }
        if due > now {
            std::thread::sleep(due - now);
        }
        let event = TriggerEvent {
            sequence: self.next as u64,
            timestamp: monotonic_now(),
        };
        self.next += 1;
        Ok(Some(event))
    }
}

/// One recorded level change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinChange {
    /// Pin name.
    pub pin: String,
    /// New level.
    pub high: bool,
    /// Time since the recorder was created.
    pub at: Duration,
}

/// A shared log of pin changes, in order, across all pins made from it.
#[derive(Debug, Clone)]
pub struct PinRecorder {
    log: Arc<Mutex<Vec<PinChange>>>,
    start: Instant,
}

impl Default for PinRecorder {
    fn default() -> Self {
        PinRecorder {
            log: Default::default(),
            start: Instant::now(),
        }
    }
}

impl PinRecorder {
    /// An output pin called `name` that records into this log.
    pub fn pin(&self, name: &str) -> RecordedPin {
        RecordedPin {
            name: name.into(),
            high: None,
            recorder: self.clone(),
        }
    }

    /// Every change so far.
    pub fn changes(&self) -> Vec<PinChange> {
        self.log.lock().unwrap().clone()
    }

    /// Completed high pulses of `pin` as (rise time, width).
    pub fn pulses(&self, pin: &str) -> Vec<(Duration, Duration)> {
        let mut rise = None;
        let mut out = vec![];
        for c in self.changes().into_iter().filter(|c| c.pin == pin) {
            match (c.high, rise) {
                (true, None) => rise = Some(c.at),
                (false, Some(r)) => {
                    out.push((r, c.at - r));
                    rise = None;
                }
                _ => {}
            }
        }
        out
    }
}

/// An embedded-hal output pin whose level changes go to a [`PinRecorder`].
#[derive(Debug)]
pub struct RecordedPin {
    name: String,
    high: Option<bool>,
    recorder: PinRecorder,
}

impl RecordedPin {
    fn set(&mut self, high: bool) {
        if self.high != Some(high) {
            self.high = Some(high);
            let at = self.recorder.start.elapsed();
            self.recorder.log.lock().unwrap().push(PinChange {
                pin: self.name.clone(),
                high,
                at,
            });
        }
    }
}

impl ErrorType for RecordedPin {
    type Error = std::convert::Infallible;
}

impl OutputPin for RecordedPin {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        self.set(false);
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Self::Error> {
        self.set(true);
        Ok(())
    }
}

/// Pulse widths on the simulator are real time.
pub use edgevlm_board::ThreadDelay;

#[cfg(test)]
mod tests {
    use super::*;
    use edgevlm_board::{PinMode, Signal, VerdictOutputs};

    #[test]
    fn folder_camera_cycles_and_reports_a_vanished_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cam");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            FolderCamera::open(&dir).unwrap_err().kind(),
            CameraErrorKind::Disconnected
        );
        std::fs::write(dir.join("b.png"), b"png").unwrap();
        std::fs::write(dir.join("a.jpg"), b"jpg").unwrap();
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        let mut cam = FolderCamera::open(&dir).unwrap();
        let frames: Vec<Frame> = (0..3).map(|_| cam.capture().unwrap()).collect();
        assert_eq!(
            frames.iter().map(|f| f.source.as_str()).collect::<Vec<_>>(),
            ["a.jpg", "b.png", "a.jpg"]
        );
        assert_eq!(
            (frames[0].format, frames[1].format),
            (PixelFormat::Mjpeg, PixelFormat::Png)
        );
        assert_eq!(frames[2].sequence, 2);
        std::fs::rename(&dir, tmp.path().join("away")).unwrap();
        let e = cam.capture().unwrap_err();
        assert_eq!(e.kind(), CameraErrorKind::Disconnected);
        assert!(e.to_string().starts_with("camera folder "), "{e}");
        std::fs::rename(tmp.path().join("away"), &dir).unwrap();
        assert_eq!(cam.capture().unwrap().data, b"png");
    }

    #[test]
    fn pattern_camera_and_line_trigger() {
        let mut cam = PatternCamera::new(16, 8);
        let f = cam.capture().unwrap();
        assert_eq!((f.format, f.data.len()), (PixelFormat::Rgb8, 16 * 8 * 3));
        // Row 5 is clear of frame 0's stripe (row 0): the last of 8 bars is black.
        let px = (5 * 16 + 15) * 3;
        assert_eq!(&f.data[px..px + 3], &[0, 0, 0], "last bar is black");
        assert_ne!(cam.capture().unwrap().data, f.data, "the stripe moves");

        let mut t = LineTrigger::new(std::io::Cursor::new("go\n\ngo\n"));
        let mut events = 0;
        while !t.is_exhausted() {
            events += t.wait(Duration::from_secs(1)).unwrap().is_some() as usize;
        }
        assert_eq!(events, 3);
        assert_eq!(
            parse_script("0\n# pause\n150 # second\n\n300").unwrap(),
            [0, 150, 300].map(Duration::from_millis)
        );
        assert_eq!(
            parse_script("0\nsoon").unwrap_err(),
            "line 2: \"soon\" is not a millisecond offset"
        );
    }

    #[test]
    fn schedule_ends_after_last_event() {
        let t0 = monotonic_now();
        let mut t = ScheduleTrigger::periodic(2, Duration::from_millis(2));
        let a = t.wait(Duration::from_secs(1)).unwrap().unwrap();
        let b = t.wait(Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!((a.sequence, b.sequence), (0, 1));
        // Offsets count from the first wait, which starts after t0.
        assert!(
            a.timestamp >= t0 + Duration::from_millis(2)
                && b.timestamp >= t0 + Duration::from_millis(4)
        );
        assert_eq!(t.wait(Duration::from_millis(1)).unwrap(), None);
        assert!(t.is_exhausted());
    }

    #[test]
    fn pulses_and_levels_on_recorded_pins() {
        let rec = PinRecorder::default();
        let mut out = VerdictOutputs::new(
            rec.pin("ok"),
            rec.pin("ng"),
            None,
            PinMode::Pulse {
                width: Duration::from_millis(3),
                gap: Duration::from_millis(2),
            },
            ThreadDelay,
        )
        .unwrap();
        out.signal(Signal::Ok).unwrap();
        out.signal(Signal::Ng).unwrap();
        out.signal(Signal::Error).unwrap(); // no ERROR pin: reported on NG, never as OK
        assert_eq!(rec.pulses("ok").len(), 1);
        let ng = rec.pulses("ng");
        assert_eq!(ng.len(), 2);
        assert!(
            ng.iter().all(|(_, w)| *w >= Duration::from_millis(3)),
            "{ng:?}"
        );
        // Back-to-back NG results: two pulses with the low gap between them, not one.
        let low = ng[1].0 - (ng[0].0 + ng[0].1);
        assert!(
            low + Duration::from_micros(500) >= Duration::from_millis(2),
            "{ng:?}"
        );

        let rec = PinRecorder::default();
        let mut out = VerdictOutputs::new(
            rec.pin("ok"),
            rec.pin("ng"),
            Some(rec.pin("err")),
            PinMode::Level,
            ThreadDelay,
        )
        .unwrap();
        out.signal(Signal::Ng).unwrap();
        out.signal(Signal::Ok).unwrap();
        out.signal(Signal::Error).unwrap();
        let last: Vec<(String, bool)> = rec
            .changes()
            .into_iter()
            .skip(3)
            .map(|c| (c.pin, c.high))
            .collect();
        let expected = [
            ("ng", true),
            ("ng", false),
            ("ok", true),
            ("ok", false),
            ("err", true),
        ];
        assert_eq!(last, expected.map(|(p, h)| (p.to_string(), h)));
    }
}
