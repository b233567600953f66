//! The test infrastructure itself: the simulated serial cable with ports opened as the agent and
//! the host tool open them, and the real OpenSSH server fixture.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use edgevlm_board_linux::serial;
use edgevlm_board_sim::serial_line::{Faults, SerialConfig, SerialLine};
use edgevlm_e2e::sshd::Sshd;
use rustix::event::{PollFd, PollFlags, Timespec};

fn open(path: &Path, baud: u32) -> File {
    serial::open(path, baud).unwrap_or_else(|e| panic!("{e}"))
}

/// Reads until `n` bytes, end-of-file, an error or `within` has passed; the error says which.
fn read_within(port: &File, n: usize, within: Duration) -> (Vec<u8>, Option<io::Error>) {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, Some(io::ErrorKind::TimedOut.into()));
        }
        let mut fds = [PollFd::new(port, PollFlags::IN)];
        rustix::event::poll(&mut fds, Some(&Timespec::try_from(left).unwrap())).unwrap();
        if fds[0].revents().is_empty() {
            continue;
        }
        let mut buf = [0u8; 4096];
        match (&*port).read(&mut buf[..(n - out.len()).min(4096)]) {
            Ok(0) => return (out, Some(io::ErrorKind::UnexpectedEof.into())),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// One read of whatever has arrived, waiting at most `within`; end-of-file is an error.
fn read_some(port: &File, within: Duration) -> io::Result<usize> {
    let mut fds = [PollFd::new(port, PollFlags::IN)];
    rustix::event::poll(&mut fds, Some(&Timespec::try_from(within).unwrap()))?;
    if fds[0].revents().is_empty() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    let mut buf = [0u8; 4096];
    match (&*port).read(&mut buf)? {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        k => Ok(k),
    }
}

fn every_byte_value() -> Vec<u8> {
    (0..=255u8)
        .chain((0..=255u8).rev())
        .chain([0; 16])
        .collect()
}

#[test]
fn serial_carries_every_byte_value_both_ways() {
    let line = SerialLine::open(SerialConfig::default()).unwrap();
    let a = open(line.a_path(), 921_600);
    let b = open(line.b_path(), 921_600);
    let data = every_byte_value();
    (&a).write_all(&data).unwrap();
    assert_eq!(read_within(&b, data.len(), Duration::from_secs(5)).0, data);
    let back: Vec<u8> = data.iter().rev().copied().collect();
    (&b).write_all(&back).unwrap();
    assert_eq!(read_within(&a, back.len(), Duration::from_secs(5)).0, back);
    let stats = line.stats();
    assert_eq!((stats.a_to_b, stats.b_to_a), (528, 528));
}

/// Bytes per second arriving at B while A sends `seconds` of line time as fast as it can.
fn measured_rate(baud: u32, seconds: f64) -> f64 {
    let line = SerialLine::open(SerialConfig::at(baud)).unwrap();
    let a = open(line.a_path(), baud);
    let b = open(line.b_path(), baud);
    let n = (f64::from(baud) / 10.0 * seconds) as usize;
    let writer = std::thread::spawn(move || (&a).write_all(&vec![0xa5; n]).map(|_| a));
    let mut first: Option<(Instant, usize)> = None;
    let mut got = 0;
    while got < n {
        let k = read_some(&b, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{e} after {got} of {n} bytes at {baud} baud"));
        got += k;
        // Timing starts at the first arrival, so the bytes of that read do not count.
        first.get_or_insert((Instant::now(), k));
    }
    let (t0, k0) = first.unwrap();
    let rate = (n - k0) as f64 / t0.elapsed().as_secs_f64();
    writer.join().unwrap().unwrap();
    rate
}

#[test]
fn serial_throughput_matches_the_baud_rate() {
    // Both at once: each runs about a second.
    let slow = std::thread::spawn(|| measured_rate(9_600, 1.0));
    let fast = measured_rate(115_200, 1.2);
    let slow = slow.join().unwrap();
    for (baud, rate) in [(9_600.0, slow), (115_200.0, fast)] {
        let expected = baud / 10.0;
        assert!(
            (rate / expected - 1.0).abs() < 0.05,
            "{rate:.0} B/s at {baud} baud, expected {expected} (8N1)"
        );
    }
}

#[test]
fn serial_cut_after_delivers_exactly_that_much_then_ends() {
    let line = SerialLine::open(SerialConfig {
        baud: Some(921_600),
        a_to_b: Faults::none().cut_after(1000),
        b_to_a: Faults::none(),
    })
    .unwrap();
    let a = open(line.a_path(), 921_600);
    let b = open(line.b_path(), 921_600);
    let data: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
    let writer = std::thread::spawn(move || {
        let _ = (&a).write_all(&data);
        a
    });
    let started = Instant::now();
    let (got, err) = read_within(&b, 4000, Duration::from_secs(3));
    assert_eq!(got.len(), 1000);
    assert_eq!(got, (0..1000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>());
    let err = err.expect("the stream ends");
    assert_ne!(
        err.kind(),
        io::ErrorKind::TimedOut,
        "no EOF or error after the cut"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(line.stats().cut);
    // The sender's side is unplugged as well.
    let a = writer.join().unwrap();
    assert!((&a).write_all(b"more").is_err());
}

#[test]
fn serial_cut_now_wakes_a_blocked_reader() {
    let line = SerialLine::open(SerialConfig::at(115_200)).unwrap();
    let b = open(line.b_path(), 115_200);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        let result = (&b).read(&mut buf);
        (result.map_err(|e| e.to_string()), Instant::now())
    });
    std::thread::sleep(Duration::from_millis(100));
    let cut_at = Instant::now();
    line.cut();
    let (result, woke) = reader.join().unwrap();
    assert!(matches!(result, Ok(0) | Err(_)), "{result:?}");
    assert!(woke.duration_since(cut_at) < Duration::from_millis(500));
    assert!(!line.b_path().exists());
}

#[test]
fn serial_corrupt_byte_flips_exactly_that_byte() {
    let line = SerialLine::open(SerialConfig {
        baud: Some(921_600),
        a_to_b: Faults::none(),
        b_to_a: Faults::none().corrupt_byte(77, 0x5a),
    })
    .unwrap();
    let a = open(line.a_path(), 921_600);
    let b = open(line.b_path(), 921_600);
    let data = every_byte_value();
    (&b).write_all(&data).unwrap();
    let (got, _) = read_within(&a, data.len(), Duration::from_secs(5));
    assert_eq!(got.len(), data.len());
    let differ: Vec<usize> = (0..data.len()).filter(|&i| got[i] != data[i]).collect();
    assert_eq!(differ, [77]);
    assert_eq!(got[77], data[77] ^ 0x5a);
    // The other direction is clean.
    (&a).write_all(&data).unwrap();
    assert_eq!(read_within(&b, data.len(), Duration::from_secs(5)).0, data);
}

#[test]
fn serial_side_closes_and_reopens() {
    let line = SerialLine::open(SerialConfig::at(921_600)).unwrap();
    let a = open(line.a_path(), 921_600);
    let b = open(line.b_path(), 921_600);
    (&a).write_all(b"first\0").unwrap();
    assert_eq!(read_within(&b, 6, Duration::from_secs(5)).0, b"first\0");
    drop(b);

    // Sent while B is away: reopening flushes it, as on a real UART.
    (&a).write_all(b"stale").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while line.stats().a_to_b < 11 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let b = open(line.b_path(), 921_600);
    (&a).write_all(b"second\0").unwrap();
    assert_eq!(read_within(&b, 7, Duration::from_secs(5)).0, b"second\0");
    (&b).write_all(b"\x00back\r\n").unwrap();
    assert_eq!(
        read_within(&a, 7, Duration::from_secs(5)).0,
        b"\x00back\r\n"
    );
    assert!(!line.stats().cut);
}

#[test]
fn sshd_runs_commands_with_host_key_checking_on() {
    let Some(sshd) = Sshd::for_test() else { return };
    assert_eq!(
        sshd.url(),
        format!("ssh://{}@127.0.0.1:{}", sshd.user(), sshd.port())
    );
    let out = sshd.ssh_command("echo hello").output().unwrap();
    assert!(
        out.status.success(),
        "{}\nsshd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sshd.log()
    );
    assert_eq!(out.stdout, b"hello\n");

    // A binary named by absolute path runs: this very test binary lists its tests.
    let exe = std::env::current_exe().unwrap();
    let out = sshd
        .ssh_command(&format!("{} --list", exe.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sshd_runs_commands"));

    // A known_hosts entry with another key for [127.0.0.1]:PORT: ssh must refuse.
    let good = std::fs::read_to_string(sshd.known_hosts_file()).unwrap();
    let other_key = std::fs::read_to_string(sshd.identity_file().with_extension("pub")).unwrap();
    let other: Vec<&str> = other_key.split_whitespace().take(2).collect();
    std::fs::write(
        sshd.known_hosts_file(),
        format!("[127.0.0.1]:{} {}\n", sshd.port(), other.join(" ")),
    )
    .unwrap();
    let out = sshd.ssh_command("echo hello").output().unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Host key verification failed"), "{stderr}");

    std::fs::write(sshd.known_hosts_file(), good).unwrap();
    assert!(sshd.ssh_command("true").status().unwrap().success());
}

#[test]
fn sshd_carries_binary_stdin_and_stdout_unchanged() {
    let Some(sshd) = Sshd::for_test() else { return };
    let data: Vec<u8> = (0..256 * 1024u32)
        .map(|i| if i % 5 == 0 { 0 } else { (i ^ (i >> 8)) as u8 })
        .collect();
    let mut child = sshd
        .ssh_command("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&sent));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "bytes changed on the way through ssh");
}

#[test]
fn sshd_two_servers_at_once_then_clean_up() {
    let Some(one) = Sshd::for_test() else { return };
    let two = Sshd::start().unwrap();
    assert_ne!(one.port(), two.port());
    for sshd in [&one, &two] {
        // SSH_CONNECTION = "client-ip client-port server-ip server-port".
        let out = sshd.ssh_command("echo $SSH_CONNECTION").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text.split_whitespace().nth(3),
            Some(sshd.port().to_string().as_str()),
            "{text}"
        );
    }

    // Dropping a server ends its sessions, closes its port and removes its files.
    let mut session = two
        .ssh_command("sleep 30")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (port, dir) = (two.port(), two.identity_file().parent().unwrap().to_owned());
    // Wait for the session to be up: its command shows in the server's log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !two.log().contains("Accepted publickey") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let dropped = Instant::now();
    drop(two);
    let deadline = dropped + Duration::from_secs(3);
    let status = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = session.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.is_some(), "the ssh session outlived its server");
    assert!(!dir.exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    // The other server is unaffected.
    assert!(one.ssh_command("true").status().unwrap().success());
}
