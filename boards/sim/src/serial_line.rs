//! A simulated serial cable: two pseudo-terminals joined by a relay thread that carries bytes at
//! a baud rate and can corrupt, drop or cut them.
//!
//! Each end of the cable is the slave side of a pty (`/dev/pts/N`), so the host tool and the
//! agent open it exactly as they open a UART (`edgevlm_board_linux::serial::open`). The relay
//! holds the two masters and lets a byte leave only in its time slot: 10 bits per byte (8N1) at
//! the configured baud, with bursts of at most a few milliseconds after an idle line, so measured
//! throughput matches `baud / 10` bytes per second within a few percent.
//!
//! The relay also keeps one descriptor of each slave open. That keeps the raw line settings in
//! place while nobody has the port open (a plain `File::open` gets a raw line too), and it keeps
//! the master from reporting a hang-up each time a side closes its port: a side may close and
//! reopen its end at any time, as the agent does after a host disconnects. Bytes sent towards a
//! closed end wait in that end's input queue (`serial::open` flushes them, as it does on a real
//! UART); once the queue is full the line stops taking bytes from the sender, so nothing is lost.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{self, ControlModes, OptionalActions, SpecialCodeIndex};

/// Longest burst a paced line lets through at once after being idle.
const BURST: Duration = Duration::from_millis(4);
/// Roughly how much line time one wake-up of the relay moves at high baud rates: waking for
/// every single byte at 921600 baud would cost a core for nothing.
const BATCH: Duration = Duration::from_millis(1);
/// How long a fault-triggered cut waits for the receiver to read the bytes that got through.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);
/// Interval between checks of the receivers' queues while draining before a cut.
const DRAIN_CHECK: Duration = Duration::from_millis(2);
/// How long an end whose master reports a hang-up is left out of the poll set before retrying.
const HANGUP_RETRY: Duration = Duration::from_millis(10);
/// Largest read from a master in one go.
const CHUNK: usize = 16 * 1024;

/// Faults injected into one direction of a [`SerialLine`]. Offsets count the bytes the sending
/// side has written into the line since it was opened (across reopens), starting at 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    cut_after: Option<u64>,
    corrupt: Vec<(u64, u8)>,
    drop: Vec<Range<u64>>,
}

impl Faults {
    /// No faults: every byte arrives unchanged.
    pub fn none() -> Self {
        Faults::default()
    }

    /// Once `n_bytes` have gone through, the line goes dead like an unplugged adapter: the relay
    /// waits (briefly) for the receiver to read what got through, then closes both masters, so
    /// both ends see end-of-file or an I/O error and the `/dev/pts` paths disappear.
    pub fn cut_after(mut self, n_bytes: u64) -> Self {
        self.cut_after = Some(n_bytes);
        self
    }

    /// Flips the bits set in `xor` in the byte at offset `at`.
    pub fn corrupt_byte(mut self, at: u64, xor: u8) -> Self {
        self.corrupt.push((at, xor));
        self
    }

    /// Loses the `n` bytes from offset `at` on the way (they still take their line time).
    pub fn drop_bytes(mut self, at: u64, n: u64) -> Self {
        self.drop.push(at..at.saturating_add(n));
        self
    }
}

/// How a [`SerialLine`] behaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialConfig {
    /// Line rate in baud (8N1: 10 bits per byte); `None` carries bytes as fast as the relay can.
    /// Pacing is done by the relay only: the baud rates the two ends set on their ports with
    /// termios are not compared.
    pub baud: Option<u32>,
    /// Faults on the bytes end A writes and end B reads.
    pub a_to_b: Faults,
    /// Faults on the bytes end B writes and end A reads.
    pub b_to_a: Faults,
}

impl SerialConfig {
    /// A fault-free line at `baud`.
    pub fn at(baud: u32) -> Self {
        SerialConfig {
            baud: Some(baud),
            ..Default::default()
        }
    }
}

/// Byte counts of a [`SerialLine`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Bytes end A has put on the line (dropped and corrupted ones included).
    pub a_to_b: u64,
    /// Bytes end B has put on the line (dropped and corrupted ones included).
    pub b_to_a: u64,
    /// The line is dead: cut by a fault, by [`SerialLine::cut`], or by a relay error.
    pub cut: bool,
}

#[derive(Debug, Default)]
struct Shared {
    sent: [AtomicU64; 2],
    cut: AtomicBool,
    stop: AtomicBool,
}

/// A simulated serial cable between two pty paths. Dropping it stops the relay and closes both
/// ends.
#[derive(Debug)]
pub struct SerialLine {
    paths: [PathBuf; 2],
    shared: Arc<Shared>,
    wake: UnixStream,
    relay: Mutex<Option<JoinHandle<()>>>,
}

impl SerialLine {
    /// Creates the two ptys and starts the relay.
    pub fn open(config: SerialConfig) -> io::Result<SerialLine> {
        if config.baud == Some(0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "serial line: baud rate 0",
            ));
        }
        let ends = [End::open(config.baud)?, End::open(config.baud)?];
        let paths = [ends[0].path.clone(), ends[1].path.clone()];
        let (wake, wake_rx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let now = Instant::now();
        let relay = Relay {
            dirs: [
                Direction::new(0, 1, config.a_to_b, config.baud, now),
                Direction::new(1, 0, config.b_to_a, config.baud, now),
            ],
            ends,
            wake: wake_rx,
            shared: shared.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("serial-line".into())
            .spawn(move || relay.run())?;
        Ok(SerialLine {
            paths,
            shared,
            wake,
            relay: Mutex::new(Some(handle)),
        })
    }

    /// The device path of end A (`/dev/pts/N`).
    pub fn a_path(&self) -> &Path {
        &self.paths[0]
    }

    /// The device path of end B (`/dev/pts/N`).
    pub fn b_path(&self) -> &Path {
        &self.paths[1]
    }

    /// Bytes carried so far in each direction, and whether the line is dead.
    pub fn stats(&self) -> LineStats {
        LineStats {
            a_to_b: self.shared.sent[0].load(Ordering::Relaxed),
            b_to_a: self.shared.sent[1].load(Ordering::Relaxed),
            cut: self.shared.cut.load(Ordering::Acquire),
        }
    }

    /// Cuts the line now: bytes in flight are lost, both masters are closed (each end then reads
    /// end-of-file and fails to write) and the paths disappear. Returns once that is done.
    pub fn cut(&self) {
        self.shared.stop.store(true, Ordering::Release);
        // A full socket buffer means a wake-up is already pending.
        let _ = (&self.wake).write(&[1]);
        let handle = self.relay.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for SerialLine {
    fn drop(&mut self) {
        self.cut();
    }
}

/// One end of the cable: a pty master the relay reads and writes, and a slave descriptor the
/// relay keeps open (see the module documentation for why).
#[derive(Debug)]
struct End {
    master: OwnedFd,
    slave: OwnedFd,
    path: PathBuf,
    /// Left out of the poll set until then after its master reported a hang-up.
    hung_until: Option<Instant>,
}

impl End {
    fn open(baud: Option<u32>) -> io::Result<End> {
        let step = |what: &'static str| {
            move |e: Errno| -> io::Error {
                let e = io::Error::from(e);
                io::Error::new(e.kind(), format!("serial line: {what}: {e}"))
            }
        };
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .map_err(step("opening /dev/ptmx"))?;
        grantpt(&master).map_err(step("grantpt"))?;
        unlockpt(&master).map_err(step("unlockpt"))?;
        let name = ptsname(&master, Vec::new()).map_err(step("ptsname"))?;
        let path = PathBuf::from(std::ffi::OsString::from_vec(name.into_bytes()));
        let slave = rustix::fs::open(
            &path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(step("opening the pty slave"))?;
        // Raw 8N1 as `serial::open` sets it: the line discipline must not translate, echo or
        // hold back a single byte in either direction.
        let mut tio = termios::tcgetattr(&slave).map_err(step("reading the pty settings"))?;
        tio.make_raw();
        tio.control_modes |= ControlModes::CLOCAL | ControlModes::CREAD;
        tio.control_modes -= ControlModes::CSTOPB | ControlModes::PARENB;
        tio.special_codes[SpecialCodeIndex::VMIN] = 1;
        tio.special_codes[SpecialCodeIndex::VTIME] = 0;
        if let Some(baud) = baud {
            tio.set_speed(baud)
                .map_err(step("setting the pty's nominal baud rate"))?;
        }
        termios::tcsetattr(&slave, OptionalActions::Now, &tio)
            .map_err(step("making the pty raw"))?;
        rustix::io::ioctl_fionbio(&master, true).map_err(step("making the master non-blocking"))?;
        Ok(End {
            master,
            slave,
            path,
            hung_until: None,
        })
    }

    fn polled(&self, now: Instant) -> bool {
        self.hung_until.is_none_or(|t| t <= now)
    }

    fn hang_up(&mut self, now: Instant) {
        self.hung_until = Some(now + HANGUP_RETRY);
    }
}

/// Lets bytes leave one per time slot of 10 bits at `baud`.
#[derive(Debug)]
struct Pace {
    baud: u64,
    /// Slot 0 starts here.
    epoch: Instant,
    /// Slots already used since `epoch`.
    used: u64,
}

impl Pace {
    fn slot(&self, k: u64) -> Instant {
        let ns = u128::from(k) * 10_000_000_000 / u128::from(self.baud);
        self.epoch + Duration::from_nanos(ns as u64)
    }

    /// How many bytes may leave at `now`.
    fn allowance(&mut self, now: Instant) -> u64 {
        if let Some(earliest) = now.checked_sub(BURST) {
            if self.slot(self.used) < earliest {
                // Idle line: unused slots older than a burst are gone.
                self.epoch = earliest;
                self.used = 0;
            }
        }
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        let open = (elapsed * u128::from(self.baud) / 10_000_000_000) as u64 + 1;
        open.saturating_sub(self.used)
    }

    /// When to wake up next: when a batch of bytes may leave (one byte at low rates).
    fn next_batch(&self) -> Instant {
        let batch = (self.baud / 10 * BATCH.as_micros() as u64 / 1_000_000).max(1);
        self.slot(self.used + batch - 1)
    }
}

/// One direction of the cable.
#[derive(Debug)]
struct Direction {
    src: usize,
    dst: usize,
    faults: Faults,
    pace: Option<Pace>,
    /// Bytes taken from the sender so far.
    offset: u64,
    /// Bytes read from `src`, not yet written to `dst`, from `pending_at` on.
    pending: Vec<u8>,
    pending_at: usize,
}

impl Direction {
    fn new(src: usize, dst: usize, faults: Faults, baud: Option<u32>, now: Instant) -> Self {
        Direction {
            src,
            dst,
            faults,
            pace: baud.map(|b| Pace {
                baud: u64::from(b),
                epoch: now,
                used: 0,
            }),
            offset: 0,
            pending: Vec::with_capacity(CHUNK),
            pending_at: 0,
        }
    }

    fn has_pending(&self) -> bool {
        self.pending_at < self.pending.len()
    }

    fn cut_due(&self) -> bool {
        self.faults.cut_after.is_some_and(|n| self.offset >= n)
    }

    /// How many bytes may be taken from the sender now.
    fn allowance(&mut self, now: Instant) -> u64 {
        let paced = self
            .pace
            .as_mut()
            .map_or(CHUNK as u64, |p| p.allowance(now));
        let before_cut = self.faults.cut_after.map_or(u64::MAX, |n| n - self.offset);
        paced.min(before_cut).min(CHUNK as u64)
    }

    /// Reads up to `limit` bytes from the sender and applies the faults. `Ok(false)`: the
    /// sender's master reports a hang-up.
    fn take(&mut self, src: &OwnedFd, limit: u64, shared: &Shared) -> io::Result<bool> {
        let mut buf = [0u8; CHUNK];
        let n = match rustix::io::read(src, &mut buf[..limit as usize]) {
            Ok(0) | Err(Errno::IO) => return Ok(false),
            Ok(n) => n,
            Err(Errno::AGAIN | Errno::INTR) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        self.pending.clear();
        self.pending_at = 0;
        for (i, &byte) in buf[..n].iter().enumerate() {
            let at = self.offset + i as u64;
            if self.faults.drop.iter().any(|r| r.contains(&at)) {
                continue;
            }
            let xor = self
                .faults
                .corrupt
                .iter()
                .filter(|(c, _)| *c == at)
                .fold(0, |acc, (_, x)| acc ^ x);
            self.pending.push(byte ^ xor);
        }
        self.offset += n as u64;
        if let Some(pace) = &mut self.pace {
            pace.used += n as u64;
        }
        shared.sent[self.src].fetch_add(n as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// Writes what it can of the pending bytes to the receiver. `Ok(false)`: the receiver's
    /// master reports a hang-up.
    fn flush(&mut self, dst: &OwnedFd) -> io::Result<bool> {
        while self.has_pending() {
            match rustix::io::write(dst, &self.pending[self.pending_at..]) {
                Ok(n) => self.pending_at += n,
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(Errno::IO) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

/// The relay thread's state; dropping it closes every descriptor of the line.
struct Relay {
    dirs: [Direction; 2],
    ends: [End; 2],
    wake: UnixStream,
    shared: Arc<Shared>,
}

impl Relay {
    fn run(mut self) {
        if let Err(e) = self.relay() {
            eprintln!(
                "serial line {} <-> {}: relay failed, line cut: {e}",
                self.ends[0].path.display(),
                self.ends[1].path.display()
            );
        }
        self.shared.cut.store(true, Ordering::Release);
        // `self` drops here: masters and slaves close, both ends see the hang-up.
    }

    fn relay(&mut self) -> io::Result<()> {
        // Set once a cut fault is due: from then on no byte is taken, and the line waits for
        // the receivers to read what got through before closing.
        let mut draining: Option<Instant> = None;
        let mut quiet_checks = 0;
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let now = Instant::now();
            if draining.is_none() && self.dirs.iter().any(Direction::cut_due) {
                draining = Some(now);
            }
            let mut events = [PollFlags::empty(); 2];
            let mut wake_at: Option<Instant> = None;
            let mut readable = [false; 2];
            if let Some(since) = draining {
                let quiet = !self.dirs.iter().any(Direction::has_pending)
                    && self
                        .ends
                        .iter()
                        .all(|e| rustix::io::ioctl_fionread(&e.slave).is_ok_and(|n| n == 0));
                // Twice in a row, a check apart: a byte just written to a master may not have
                // reached the slave's queue yet.
                quiet_checks = if quiet { quiet_checks + 1 } else { 0 };
                if quiet_checks >= 2 || now.duration_since(since) > DRAIN_LIMIT {
                    return Ok(());
                }
                wake_at = Some(now + DRAIN_CHECK);
            }
            for d in &mut self.dirs {
                if d.has_pending() {
                    events[d.dst] |= PollFlags::OUT;
                } else if draining.is_none() {
                    if d.allowance(now) > 0 {
                        events[d.src] |= PollFlags::IN;
                        readable[d.src] = true;
                    } else if let Some(pace) = &d.pace {
                        let at = pace.next_batch();
                        wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                    }
                }
            }
            for end in &self.ends {
                if let Some(t) = end.hung_until.filter(|t| *t > now) {
                    wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
                }
            }

            let mut fds = vec![PollFd::new(&self.wake, PollFlags::IN)];
            let mut slots = [None; 2];
            for (i, end) in self.ends.iter().enumerate() {
                if !events[i].is_empty() && end.polled(now) {
                    slots[i] = Some(fds.len());
                    fds.push(PollFd::new(&end.master, events[i]));
                }
            }
            let timeout = wake_at.map(|t| t.saturating_duration_since(now)).map(|d| {
                rustix::event::Timespec::try_from(d).unwrap_or(rustix::event::Timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                })
            });
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
            let revents: Vec<PollFlags> = fds.iter().map(PollFd::revents).collect();
            drop(fds);
            if !revents[0].is_empty() {
                let mut sink = [0u8; 64];
                while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
            }
            let ready = |i: usize| slots[i].map_or(PollFlags::empty(), |s| revents[s]);

            let now = Instant::now();
            for d in &mut self.dirs {
                let (src, dst) = (ready(d.src), ready(d.dst));
                if d.has_pending() && !dst.is_empty() {
                    let open = d.flush(&self.ends[d.dst].master)?;
                    // A hang-up with no room would wake every poll: retry later instead.
                    if !open || (d.has_pending() && dst.intersects(PollFlags::HUP | PollFlags::ERR))
                    {
                        self.ends[d.dst].hang_up(now);
                    }
                }
                if d.has_pending() || draining.is_some() || !readable[d.src] {
                    continue;
                }
                if src.contains(PollFlags::IN) {
                    let limit = d.allowance(now);
                    if limit > 0 {
                        if !d.take(&self.ends[d.src].master, limit, &self.shared)? {
                            self.ends[d.src].hang_up(now);
                        }
                        // Straight on to the receiver: no extra poll round for the usual case.
                        if !d.flush(&self.ends[d.dst].master)? {
                            self.ends[d.dst].hang_up(now);
                        }
                    }
                } else if src.intersects(PollFlags::HUP | PollFlags::ERR) {
                    self.ends[d.src].hang_up(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};

    /// Opens an end with a plain open: the relay has already made the line raw.
    fn port(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Reads until `n` bytes, end-of-file, an error or `within` has passed.
    fn read_within(file: &File, n: usize, within: Duration) -> (Vec<u8>, Option<io::Error>) {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (out, Some(io::ErrorKind::TimedOut.into()));
            }
            let mut fds = [PollFd::new(file, PollFlags::IN)];
            let t = rustix::event::Timespec::try_from(left).unwrap();
            rustix::event::poll(&mut fds, Some(&t)).unwrap();
            if fds[0].revents().is_empty() {
                continue;
            }
            let mut buf = [0u8; 4096];
            match (&*file).read(&mut buf[..(n - out.len()).min(4096)]) {
                Ok(0) => return (out, Some(io::ErrorKind::UnexpectedEof.into())),
                Ok(k) => out.extend_from_slice(&buf[..k]),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    fn all_bytes() -> Vec<u8> {
        (0..=255u8).chain((0..=255u8).rev()).collect()
    }

    #[test]
    fn carries_every_byte_value_both_ways_and_counts_them() {
        let line = SerialLine::open(SerialConfig::default()).unwrap();
        let (a, b) = (port(line.a_path()), port(line.b_path()));
        let data = all_bytes();
        (&a).write_all(&data).unwrap();
        assert_eq!(read_within(&b, data.len(), Duration::from_secs(5)).0, data);
        (&b).write_all(&data[..300]).unwrap();
        assert_eq!(read_within(&a, 300, Duration::from_secs(5)).0, &data[..300]);
        assert_eq!(
            line.stats(),
            LineStats {
                a_to_b: data.len() as u64,
                b_to_a: 300,
                cut: false
            }
        );
    }

    #[test]
    fn paces_at_high_baud() {
        let line = SerialLine::open(SerialConfig::at(921_600)).unwrap();
        let (a, b) = (port(line.a_path()), port(line.b_path()));
        let n = 46_080; // half a second of line time
        let writer = std::thread::spawn(move || (&a).write_all(&vec![0x55; n]).map(|_| a));
        let mut first: Option<(Instant, usize)> = None;
        let mut got = 0;
        let mut buf = [0u8; 8192];
        while got < n {
            let k = (&b).read(&mut buf).unwrap();
            assert!(k > 0);
            got += k;
            first.get_or_insert((Instant::now(), k));
        }
        let (t0, k0) = first.unwrap();
        let rate = (n - k0) as f64 / t0.elapsed().as_secs_f64();
        let _a = writer.join().unwrap().unwrap();
        let expected = 92_160.0;
        assert!(
            (rate / expected - 1.0).abs() < 0.03,
            "{rate:.0} B/s at 921600 baud, expected {expected}"
        );
    }

    #[test]
    fn faults_corrupt_drop_and_cut() {
        let line = SerialLine::open(SerialConfig {
            baud: None,
            a_to_b: Faults::none()
                .corrupt_byte(10, 0xff)
                .drop_bytes(20, 5)
                .cut_after(100),
            b_to_a: Faults::none().corrupt_byte(0, 0x01),
        })
        .unwrap();
        let (a, b) = (port(line.a_path()), port(line.b_path()));
        (&b).write_all(b"\x00xyz").unwrap();
        assert_eq!(read_within(&a, 4, Duration::from_secs(5)).0, b"\x01xyz");

        let data = all_bytes();
        (&a).write_all(&data[..150]).unwrap();
        let mut expected = data[..100].to_vec();
        expected[10] ^= 0xff;
        expected.drain(20..25);
        let (got, err) = read_within(&b, 150, Duration::from_secs(3));
        assert_eq!(
            got, expected,
            "exactly the first 100 bytes, with the faults"
        );
        let err = err.expect("the cut ends the stream");
        assert_ne!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(line.stats().cut);
        assert!(!line.a_path().exists(), "the pty is gone after a cut");
        // The sender's end is dead too.
        let (_, err) = read_within(&a, 1, Duration::from_secs(3));
        assert_ne!(err.unwrap().kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn ends_reopen_and_cut_now_closes_both() {
        let line = SerialLine::open(SerialConfig::at(115_200)).unwrap();
        let a = port(line.a_path());
        for round in 0..3u8 {
            let b = port(line.b_path());
            (&a).write_all(&[round, 0, 13, 10]).unwrap();
            assert_eq!(
                read_within(&b, 4, Duration::from_secs(5)).0,
                [round, 0, 13, 10]
            );
            (&b).write_all(&[round; 3]).unwrap();
            assert_eq!(read_within(&a, 3, Duration::from_secs(5)).0, [round; 3]);
            drop(b);
        }
        let b = port(line.b_path());
        let started = Instant::now();
        line.cut();
        assert!(started.elapsed() < Duration::from_secs(1));
        for end in [&a, &b] {
            let (got, err) = read_within(end, 1, Duration::from_secs(2));
            assert!(got.is_empty());
            assert_ne!(err.unwrap().kind(), io::ErrorKind::TimedOut);
            assert!(
                (&*end).write_all(b"x").is_err(),
                "writes fail on a cut line"
            );
        }
        assert!(line.stats().cut);
    }

    #[test]
    fn rejects_zero_baud() {
        let err = SerialLine::open(SerialConfig::at(0)).unwrap_err();
        assert!(err.to_string().contains("baud rate 0"), "{err}");
    }
}
