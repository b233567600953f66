//! Serial ports (UART, USB serial adapters, ptys) in raw mode at a given baud rate.
//!
//! The agent serves the wire protocol on one (`edgevlm agent --serial DEV --baud N`) and the host
//! tool talks to it through another (`serial:///dev/ttyUSB0?baud=921600`): both open the device
//! here, so both sides get the same line settings: raw 8N1, no flow control, no echo, no line
//! editing, blocking reads that return as soon as one byte is there.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustix::termios::{self, ControlModes, OptionalActions, QueueSelector, SpecialCodeIndex};

/// Baud rates the host and the agent accept: the standard termios speeds from 9600 up.
pub const BAUD_RATES: &[u32] = &[
    9_600, 19_200, 38_400, 57_600, 115_200, 230_400, 460_800, 500_000, 576_000, 921_600, 1_000_000,
    1_152_000, 1_500_000, 2_000_000, 2_500_000, 3_000_000, 3_500_000, 4_000_000,
];

/// Why a serial port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The baud rate is not one of [`BAUD_RATES`].
    #[error("unsupported baud rate {0} (use one of 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600, ... 4000000)")]
    Baud(u32),
    /// Opening or configuring the device failed.
    #[error("{path}: {what}")]
    Io {
        /// The device.
        path: String,
        /// The step that failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Opens `path` read-write as a raw 8N1 line at `baud`, without making it the controlling
/// terminal, and drops whatever was queued on it before.
pub fn open(path: &Path, baud: u32) -> Result<File, SerialError> {
    if !BAUD_RATES.contains(&baud) {
        return Err(SerialError::Baud(baud));
    }
    let err = |what: &'static str| {
        let path = path.display().to_string();
        move |source: io::Error| SerialError::Io { path, what, source }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
        .open(path)
        .map_err(err("opening"))?;
    let mut tio = termios::tcgetattr(&file)
        .map_err(io::Error::from)
        .map_err(err("not a terminal device"))?;
    tio.make_raw();
    tio.control_modes |= ControlModes::CLOCAL | ControlModes::CREAD;
    tio.control_modes -= ControlModes::CSTOPB | ControlModes::PARENB;
    tio.special_codes[SpecialCodeIndex::VMIN] = 1;
    tio.special_codes[SpecialCodeIndex::VTIME] = 0;
    tio.set_speed(baud)
        .map_err(io::Error::from)
        .map_err(err("setting the baud rate"))?;
    termios::tcsetattr(&file, OptionalActions::Now, &tio)
        .map_err(io::Error::from)
        .map_err(err("configuring the line"))?;
    termios::tcflush(&file, QueueSelector::IOFlush)
        .map_err(io::Error::from)
        .map_err(err("flushing the line"))?;
    Ok(file)
}

/// A serial port read that returns end of file once `stop` is set, checked every 200 ms while
/// the line is quiet: a blocking read on an idle tty never returns, and the port stays open (so
/// the other end never sees it close) as long as a reader thread holds it. The agent's serial
/// server and the host's serial transport both read through it.
#[derive(Debug)]
pub struct StoppableReader {
    file: File,
    stop: Arc<AtomicBool>,
}

impl StoppableReader {
    /// Reads `file` until `stop` is set.
    pub fn new(file: File, stop: Arc<AtomicBool>) -> StoppableReader {
        StoppableReader { file, stop }
    }
}

impl Read for StoppableReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let tick = Timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(0);
            }
            let mut fds = [PollFd::new(&self.file, PollFlags::IN)];
            match poll(&mut fds, Some(&tick)) {
                Ok(0) => continue,
                Ok(_) => return self.file.read(buf),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The baud rate a serial device is set to (for reports).
pub fn baud(file: &File) -> io::Result<u32> {
    Ok(termios::tcgetattr(file)?.output_speed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_baud() {
        let err = open(Path::new("/dev/null"), 12_345).unwrap_err();
        assert!(
            err.to_string().contains("unsupported baud rate 12345"),
            "{err}"
        );
    }

    #[test]
    fn not_a_terminal() {
        let err = open(Path::new("/dev/null"), 115_200).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("/dev/null: not a terminal device"),
            "{text}"
        );
    }

    #[test]
    fn pty_gets_raw_mode_and_speed() {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let path = Path::new(name.to_str().unwrap()).to_owned();
        let port = open(&path, 921_600).unwrap();
        assert_eq!(baud(&port).unwrap(), 921_600);
        let tio = termios::tcgetattr(&port).unwrap();
        assert!(!tio.local_modes.contains(termios::LocalModes::ECHO));
        assert!(!tio.local_modes.contains(termios::LocalModes::ICANON));
        // Bytes pass unchanged in both directions, zeros and CR/LF included.
        use std::io::{Read, Write};
        let mut master = File::from(master);
        (&port).write_all(b"a\0\r\nb").unwrap();
        let mut buf = [0u8; 5];
        master.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"a\0\r\nb");
        master.write_all(b"\x03\x00\r").unwrap();
        let mut buf = [0u8; 3];
        (&port).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"\x03\x00\r");
    }
}
