//! A V4L2 camera (USB/UVC and other streaming capture devices) with the `v4l` crate.
//!
//! The device streams continuously into a few mmap buffers, so a fresh frame is at most about
//! one frame period away when a part arrives; starting and stopping the stream per part would
//! cost 0.1-1 s on UVC cameras and restart their auto exposure. [`Camera::capture`] therefore
//! drops the frames that were buffered before it was called. Streaming starts at the first
//! capture after opening, so a station should capture once at startup: the first frames of a
//! UVC camera come before its auto exposure has settled.
//!
//! Frame timestamps are the driver's buffer timestamps on `CLOCK_MONOTONIC`, moved to the start
//! of exposure for drivers that stamp the end of the frame; drivers without monotonic stamps get
//! the dequeue time.

use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgevlm_board::{monotonic_now, Camera, CameraError, CameraErrorKind, Frame};
use v4l::buffer::Type;
use v4l::format::{Format, FourCC};
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::capture::Parameters;
use v4l::video::Capture;
use v4l::Device;

use crate::profile::{CameraFormat, CameraProfile};

/// Buffers asked of the driver: enough to keep streaming while one is being copied out.
const BUFFERS: usize = 4;
/// Dequeues one capture may make: stale buffers plus retries for corrupt frames.
const MAX_DEQUEUES: usize = 2 * BUFFERS + 2;
/// Default wait for one buffer.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

// struct v4l2_buffer flags (videodev2.h).
const FLAG_ERROR: u32 = 0x0000_0040;
const TIMESTAMP_MASK: u32 = 0x0000_e000;
const TIMESTAMP_MONOTONIC: u32 = 0x0000_2000;
const TSTAMP_SRC_MASK: u32 = 0x0007_0000;
const TSTAMP_SRC_SOE: u32 = 0x0001_0000;

/// Errors of a [`V4l2Camera`].
#[derive(Debug, thiserror::Error)]
pub enum V4l2Error {
    /// A system call on the device failed (its errno decides the [`CameraErrorKind`]).
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device node is not a streaming video capture device (a UVC camera's metadata node,
    /// a codec, a CSI receiver that needs libcamera ...).
    #[error("{path} ({driver}: {card}) is not a streaming video capture device")]
    NotCapture {
        /// The device.
        path: PathBuf,
        /// Driver name.
        driver: String,
        /// Device name.
        card: String,
    },
    /// The driver does not do the requested size or pixel format.
    #[error("{path}: asked for {wanted}, the driver chose {got} instead; `v4l2-ctl -d {path} --list-formats-ext` lists what it can do")]
    Format {
        /// The device.
        path: PathBuf,
        /// Requested `WxH FOURCC`.
        wanted: String,
        /// What the driver set.
        got: String,
    },
    /// The driver does not do the requested frame rate.
    #[error("{path}: asked for {wanted} fps, the driver chose {got} instead")]
    FrameRate {
        /// The device.
        path: PathBuf,
        /// Requested frames per second.
        wanted: u32,
        /// The frame interval the driver set, in seconds (`1/30`).
        got: String,
    },
    /// Frames arrived, but none was usable.
    #[error("{path}: {reason}")]
    BadFrame {
        /// The device.
        path: PathBuf,
        /// What was wrong with the last frame.
        reason: String,
    },
}

impl CameraError for V4l2Error {
    fn kind(&self) -> CameraErrorKind {
        match self {
            V4l2Error::Io { source, .. } => io_error_kind(source),
            V4l2Error::BadFrame { .. } => CameraErrorKind::BadFrame,
            V4l2Error::NotCapture { .. }
            | V4l2Error::Format { .. }
            | V4l2Error::FrameRate { .. } => CameraErrorKind::Other,
        }
    }
}

/// What an OS error on a V4L2 device means for the caller.
///
/// ENODEV and ENOENT: the camera is gone (unplugged, node removed). EIO and ESHUTDOWN: vb2
/// returns them once the driver has marked the queue broken, which UVC does on disconnect; in
/// both cases reopening the device is what recovers. A `poll` that timed out is a timeout.
pub fn io_error_kind(e: &io::Error) -> CameraErrorKind {
    use rustix::io::Errno;
    if e.kind() == io::ErrorKind::TimedOut {
        return CameraErrorKind::Timeout;
    }
    match Errno::from_io_error(e) {
        Some(Errno::NODEV | Errno::NOENT | Errno::NXIO | Errno::IO | Errno::SHUTDOWN) => {
            CameraErrorKind::Disconnected
        }
        Some(Errno::AGAIN | Errno::TIMEDOUT) => CameraErrorKind::Timeout,
        _ => CameraErrorKind::Other,
    }
}

/// A buffer's timestamp, if the driver stamped it on `CLOCK_MONOTONIC` (most capture drivers;
/// `TIMESTAMP_COPY` and unknown stamps are not comparable with anything here).
pub fn buffer_timestamp(flags: u32, sec: i64, usec: i64) -> Option<Duration> {
    if flags & TIMESTAMP_MASK != TIMESTAMP_MONOTONIC || sec < 0 || !(0..1_000_000).contains(&usec) {
        return None;
    }
    Some(Duration::new(sec as u64, usec as u32 * 1000))
}

/// When exposure of a frame began, from its monotonic timestamp: the timestamp itself for
/// drivers that stamp the start of exposure (UVC), one frame period earlier for those that
/// stamp the end of the frame, unknown when that period is unknown.
pub fn exposure_start(
    timestamp: Duration,
    flags: u32,
    period: Option<Duration>,
) -> Option<Duration> {
    if flags & TSTAMP_SRC_MASK == TSTAMP_SRC_SOE {
        return Some(timestamp);
    }
    period.map(|p| timestamp.saturating_sub(p))
}

/// Whether the `dequeued`-th buffer (from 1) of a capture that began at `start` holds a frame
/// taken after `start`.
///
/// Frames with a known exposure start are judged by it. Without one, by queue order: buffers
/// are filled in the order they are queued, and each dequeue re-queues the buffer returned
/// before it, so after `buffers` dequeues the buffer coming back is one queued during this
/// capture. The first frames after the stream starts are all fresh.
pub fn is_fresh(
    exposure: Option<Duration>,
    start: Duration,
    dequeued: usize,
    buffers: usize,
    stream_started: bool,
) -> bool {
    if stream_started {
        return true;
    }
    match exposure {
        Some(t) => t >= start,
        None => dequeued >= buffers,
    }
}

/// Checks that a buffer's bytes can be a frame of this format and size.
pub fn check_payload(
    format: CameraFormat,
    width: u32,
    height: u32,
    stride: u32,
    data: &[u8],
) -> Result<(), String> {
    if data.is_empty() {
        return Err("empty buffer".into());
    }
    match format {
        CameraFormat::Mjpg => {
            if !data.starts_with(&[0xff, 0xd8]) {
                return Err(format!(
                    "{} byte MJPG frame without a JPEG start-of-image marker",
                    data.len()
                ));
            }
        }
        CameraFormat::Yuyv => {
            let row = width as usize * 2;
            let stride = (stride as usize).max(row);
            let needed = stride * (height as usize).saturating_sub(1) + row;
            if data.len() < needed {
                return Err(format!(
                    "short buffer: {} bytes, a {width}x{height} YUYV frame needs {needed}",
                    data.len()
                ));
            }
        }
    }
    Ok(())
}

/// Copies `height` rows of `row` bytes out of a buffer whose rows are `stride` bytes apart,
/// dropping the driver's row padding (frames are tightly packed).
pub fn pack_rows(data: &[u8], row: usize, stride: usize, height: usize) -> Vec<u8> {
    if stride <= row {
        return data[..row * height].to_vec();
    }
    let mut out = Vec::with_capacity(row * height);
    for r in 0..height {
        out.extend_from_slice(&data[r * stride..r * stride + row]);
    }
    out
}

fn describe(width: u32, height: u32, fourcc: FourCC) -> String {
    let code = fourcc
        .str()
        .map(str::to_string)
        .unwrap_or_else(|_| format!("{:?}", fourcc.repr));
    format!("{width}x{height} {code}")
}

/// An open device with its stream.
struct OpenDevice {
    // Dropped first: stops streaming and unmaps the buffers while the device is open.
    stream: Stream<'static>,
    _device: Device,
    /// Bytes per row as the driver lays them out.
    stride: u32,
    frame_period: Option<Duration>,
    /// A frame has been dequeued since the stream started.
    streaming: bool,
}

/// A V4L2 streaming capture device as a [`Camera`].
///
/// The camera reopens itself: after a failed capture (device unplugged, timeout, driver error)
/// the device is closed, and the next [`capture`](Camera::capture) opens it again with the same
/// settings, returning a `Disconnected` error for as long as the device node is missing. The
/// caller only has to keep calling `capture`; [`Camera::recover`] (= [`reopen`](V4l2Camera::reopen))
/// reopens at once.
pub struct V4l2Camera {
    path: PathBuf,
    width: u32,
    height: u32,
    format: CameraFormat,
    fps: Option<u32>,
    timeout: Duration,
    open: Option<OpenDevice>,
    sequence: u64,
}

impl std::fmt::Debug for V4l2Camera {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V4l2Camera")
            .field("path", &self.path)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("format", &self.format)
            .field("fps", &self.fps)
            .field("open", &self.open.is_some())
            .field("sequence", &self.sequence)
            .finish()
    }
}

impl V4l2Camera {
    /// Opens `device` and sets and verifies size, pixel format and (if given) frame rate; an
    /// error names what the driver chose instead. Streaming starts at the first capture.
    pub fn open(
        device: &Path,
        width: u32,
        height: u32,
        format: CameraFormat,
        fps: Option<u32>,
    ) -> Result<V4l2Camera, V4l2Error> {
        let mut camera = V4l2Camera {
            path: device.to_owned(),
            width,
            height,
            format,
            fps,
            timeout: DEFAULT_TIMEOUT,
            open: None,
            sequence: 0,
        };
        camera.open = Some(camera.open_device()?);
        Ok(camera)
    }

    /// The camera of a profile's `[camera]`.
    pub fn from_profile(camera: &CameraProfile) -> Result<V4l2Camera, V4l2Error> {
        V4l2Camera::open(
            &camera.device,
            camera.width,
            camera.height,
            camera.format,
            camera.fps,
        )
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the device is open (it is closed after a failed capture until the next one).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// How long to wait for one buffer (default 2 s); applies from the next (re)open.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Closes the device and opens it again with the same settings.
    pub fn reopen(&mut self) -> Result<(), V4l2Error> {
        self.close();
        self.open = Some(self.open_device()?);
        Ok(())
    }

    fn io_error(&self, action: &'static str) -> impl Fn(io::Error) -> V4l2Error + '_ {
        move |source| V4l2Error::Io {
            action,
            path: self.path.clone(),
            source,
        }
    }

    fn open_device(&self) -> Result<OpenDevice, V4l2Error> {
        let device = Device::with_path(&self.path).map_err(self.io_error("opening"))?;
        let caps = device
            .query_caps()
            .map_err(self.io_error("querying the capabilities of"))?;
        let needed = v4l::capability::Flags::VIDEO_CAPTURE | v4l::capability::Flags::STREAMING;
        if !caps.capabilities.contains(needed) {
            return Err(V4l2Error::NotCapture {
                path: self.path.clone(),
                driver: caps.driver,
                card: caps.card,
            });
        }
        let fourcc = FourCC::new(&self.format.fourcc());
        let wanted = Format::new(self.width, self.height, fourcc);
        let got = device
            .set_format(&wanted)
            .map_err(self.io_error("setting the format of"))?;
        if (got.width, got.height, got.fourcc) != (self.width, self.height, fourcc) {
            return Err(V4l2Error::Format {
                path: self.path.clone(),
                wanted: describe(self.width, self.height, fourcc),
                got: describe(got.width, got.height, got.fourcc),
            });
        }
        if let Some(fps) = self.fps {
            let set = device
                .set_params(&Parameters::with_fps(fps))
                .map_err(self.io_error("setting the frame rate of"))?;
            let interval = set.interval;
            let actual = f64::from(interval.denominator) / f64::from(interval.numerator.max(1));
            // Drivers round (30 -> 30000/1001): 5% is a rounding, more is another rate.
            if (actual - f64::from(fps)).abs() > 0.05 * f64::from(fps) {
                return Err(V4l2Error::FrameRate {
                    path: self.path.clone(),
                    wanted: fps,
                    got: format!("{}/{} s", interval.numerator, interval.denominator),
                });
            }
        }
        let frame_period = device.params().ok().and_then(|p| {
            let (n, d) = (p.interval.numerator, p.interval.denominator);
            (n > 0 && d > 0).then(|| Duration::from_secs_f64(f64::from(n) / f64::from(d)))
        });
        let mut stream = Stream::with_buffers(&device, Type::VideoCapture, BUFFERS as u32)
            .map_err(self.io_error("allocating capture buffers of"))?;
        // The v4l crate turns the timeout into i32 milliseconds and panics past that.
        stream.set_timeout(self.timeout.min(Duration::from_millis(i32::MAX as u64)));
        Ok(OpenDevice {
            stream,
            _device: device,
            stride: got.stride,
            frame_period,
            streaming: false,
        })
    }

    fn close(&mut self) {
        if let Some(open) = self.open.take() {
            // The v4l crate panics in Drop when STREAMOFF or freeing the buffers fails with
            // anything but ENODEV; a camera misbehaving on its way out must not take the
            // inspection loop with it.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(open)));
        }
    }

    fn capture_after(&mut self, start: Duration) -> Result<Frame, V4l2Error> {
        let (path, width, height, format) =
            (self.path.clone(), self.width, self.height, self.format);
        let open = self.open.as_mut().expect("opened before capturing");
        let stream_started = !open.streaming;
        let mut last_problem = None;
        for dequeued in 1..=MAX_DEQUEUES {
            let (data, meta) =
                CaptureStream::next(&mut open.stream).map_err(|source| V4l2Error::Io {
                    action: "capturing from",
                    path: path.clone(),
                    source,
                })?;
            let dequeued_at = monotonic_now();
            open.streaming = true;
            let flags = meta.flags.bits();
            // time_t is i32 on 32-bit ARM (Raspberry Pi OS armhf), i64 elsewhere.
            #[allow(clippy::useless_conversion)]
            let timestamp = buffer_timestamp(
                flags,
                i64::from(meta.timestamp.sec),
                i64::from(meta.timestamp.usec),
            );
            let exposure = timestamp.and_then(|t| exposure_start(t, flags, open.frame_period));
            // The queue-order rule assumes the driver allocated the BUFFERS asked for (vb2 may
            // raise the count to a driver minimum, and the v4l crate does not say). It only
            // decides for drivers without monotonic timestamps, where each extra buffer could
            // let through a frame one period older than the call.
            if !is_fresh(exposure, start, dequeued, BUFFERS, stream_started) {
                continue;
            }
            if flags & FLAG_ERROR != 0 {
                last_problem = Some("the driver flagged the frame as corrupt".to_string());
                continue;
            }
            let used = &data[..(meta.bytesused as usize).min(data.len())];
            if let Err(reason) = check_payload(format, width, height, open.stride, used) {
                last_problem = Some(reason);
                continue;
            }
            let data = match format {
                CameraFormat::Mjpg => used.to_vec(),
                CameraFormat::Yuyv => pack_rows(
                    used,
                    width as usize * 2,
                    open.stride as usize,
                    height as usize,
                ),
            };
            let mut stamped = exposure.or(timestamp).unwrap_or(dequeued_at);
            if stream_started {
                // A stream this call started exposed nothing before the call; the one-period
                // end-of-frame correction overshoots for drivers whose first frame comes at
                // once (vivid, seen on the emulated board).
                stamped = stamped.max(start);
            }
            let frame = Frame {
                format: format.pixel_format(),
                width,
                height,
                data,
                sequence: self.sequence,
                timestamp: stamped,
                source: path.display().to_string(),
            };
            self.sequence += 1;
            return Ok(frame);
        }
        Err(V4l2Error::BadFrame {
            path,
            reason: format!(
                "no usable frame in {MAX_DEQUEUES} buffers: {}",
                last_problem.unwrap_or_else(|| "all taken before the capture started".into())
            ),
        })
    }
}

impl Camera for V4l2Camera {
    type Error = V4l2Error;

    fn capture(&mut self) -> Result<Frame, V4l2Error> {
        let start = monotonic_now();
        if self.open.is_none() {
            self.open = Some(self.open_device()?);
        }
        let result = self.capture_after(start);
        if let Err(V4l2Error::Io { .. }) = result {
            // After a failed dequeue the v4l stream would queue an already queued buffer on
            // the next call (EINVAL); a fresh open is the clean state, and what an unplugged
            // camera needs anyway.
            self.close();
        }
        result
    }

    /// Closes and reopens the device now (`capture` would also reopen it by itself).
    fn recover(&mut self) -> Result<(), V4l2Error> {
        self.reopen()
    }
}

impl Drop for V4l2Camera {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: rustix::io::Errno) -> io::Error {
        io::Error::from_raw_os_error(errno.raw_os_error())
    }

    #[test]
    fn os_errors_map_to_camera_error_kinds() {
        use rustix::io::Errno;
        for e in [Errno::NODEV, Errno::NOENT, Errno::IO, Errno::NXIO] {
            assert_eq!(
                io_error_kind(&os(e)),
                CameraErrorKind::Disconnected,
                "{e:?}"
            );
        }
        assert_eq!(
            io_error_kind(&io::Error::new(io::ErrorKind::TimedOut, "VIDIOC_DQBUF")),
            CameraErrorKind::Timeout
        );
        assert_eq!(io_error_kind(&os(Errno::AGAIN)), CameraErrorKind::Timeout);
        for e in [Errno::INVAL, Errno::BUSY, Errno::ACCESS] {
            assert_eq!(io_error_kind(&os(e)), CameraErrorKind::Other, "{e:?}");
        }
        let e = V4l2Error::BadFrame {
            path: "/dev/video0".into(),
            reason: "empty buffer".into(),
        };
        assert_eq!(e.kind(), CameraErrorKind::BadFrame);
        let e = V4l2Error::Format {
            path: "/dev/video0".into(),
            wanted: "1280x720 MJPG".into(),
            got: "640x480 YUYV".into(),
        };
        assert_eq!(e.kind(), CameraErrorKind::Other);
        assert!(e.to_string().starts_with(
            "/dev/video0: asked for 1280x720 MJPG, the driver chose 640x480 YUYV instead"
        ));
    }

    #[test]
    fn missing_device_is_disconnected_and_names_the_path() {
        let e = V4l2Camera::open(
            Path::new("/nonexistent/video7"),
            640,
            480,
            CameraFormat::Yuyv,
            None,
        )
        .unwrap_err();
        assert_eq!(e.kind(), CameraErrorKind::Disconnected);
        assert!(
            e.to_string().starts_with("opening /nonexistent/video7: "),
            "{e}"
        );
    }

    #[test]
    fn only_monotonic_buffer_timestamps_are_used() {
        let soe = TIMESTAMP_MONOTONIC | TSTAMP_SRC_SOE;
        assert_eq!(
            buffer_timestamp(soe, 12, 500_000),
            Some(Duration::from_millis(12_500))
        );
        assert_eq!(buffer_timestamp(0x4000 /* COPY */, 12, 0), None);
        assert_eq!(buffer_timestamp(0 /* UNKNOWN */, 12, 0), None);
        assert_eq!(buffer_timestamp(TIMESTAMP_MONOTONIC, -1, 0), None);
        assert_eq!(buffer_timestamp(TIMESTAMP_MONOTONIC, 1, 1_000_000), None);

        let t = Duration::from_millis(1000);
        let period = Some(Duration::from_millis(33));
        assert_eq!(exposure_start(t, soe, period), Some(t));
        // End-of-frame stamps (the default source) are one frame period after exposure began.
        assert_eq!(
            exposure_start(t, TIMESTAMP_MONOTONIC, period),
            Some(Duration::from_millis(967))
        );
        assert_eq!(exposure_start(t, TIMESTAMP_MONOTONIC, None), None);
    }

    #[test]
    fn freshness_by_timestamp_or_queue_order() {
        let start = Duration::from_secs(10);
        let before = Some(start - Duration::from_millis(1));
        let after = Some(start + Duration::from_millis(1));
        assert!(!is_fresh(before, start, 1, 4, false));
        assert!(is_fresh(Some(start), start, 1, 4, false));
        assert!(is_fresh(after, start, 1, 4, false));
        // A timestamp is authoritative even late in the drain.
        assert!(!is_fresh(before, start, 9, 4, false));
        // Without one, the 4th dequeue of 4 buffers is the first buffer queued by this capture.
        assert!(!is_fresh(None, start, 3, 4, false));
        assert!(is_fresh(None, start, 4, 4, false));
        // Right after the stream starts, every buffer was queued after the call began.
        assert!(is_fresh(before, start, 1, 4, true));
    }

    #[test]
    fn payload_checks_and_row_packing() {
        assert_eq!(
            check_payload(CameraFormat::Mjpg, 4, 2, 0, &[]),
            Err("empty buffer".into())
        );
        assert!(check_payload(CameraFormat::Mjpg, 4, 2, 0, &[0xff, 0xd8, 0xff, 0xe0]).is_ok());
        assert!(check_payload(CameraFormat::Mjpg, 4, 2, 0, &[0, 0, 0])
            .unwrap_err()
            .contains("start-of-image"));
        // 4x2 YUYV = 16 bytes tightly packed; with a 12-byte stride the last row needs only 8.
        assert!(check_payload(CameraFormat::Yuyv, 4, 2, 8, &[0; 16]).is_ok());
        assert_eq!(
            check_payload(CameraFormat::Yuyv, 4, 2, 8, &[0; 15]),
            Err("short buffer: 15 bytes, a 4x2 YUYV frame needs 16".into())
        );
        assert!(check_payload(CameraFormat::Yuyv, 4, 2, 12, &[0; 20]).is_ok());
        assert!(check_payload(CameraFormat::Yuyv, 4, 2, 12, &[0; 19]).is_err());

        let padded: Vec<u8> = (0..24).collect();
        assert_eq!(
            pack_rows(&padded, 8, 12, 2),
            [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]
        );
        assert_eq!(pack_rows(&padded, 8, 8, 2), (0..16).collect::<Vec<u8>>());
        assert_eq!(pack_rows(&padded, 8, 0, 2), (0..16).collect::<Vec<u8>>());
    }

    #[test]
    fn format_descriptions_name_size_and_fourcc() {
        assert_eq!(describe(640, 480, FourCC::new(b"YUYV")), "640x480 YUYV");
        assert_eq!(
            describe(1, 1, FourCC::new(&[0xff, 0, 0, 0])),
            "1x1 [255, 0, 0, 0]"
        );
    }
}
