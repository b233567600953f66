//! sd_notify: READY=1 when the loop starts, WATCHDOG=1 from inside the loop, STOPPING=1 on stop.
//! Its own test binary, because it sets process-wide environment variables.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use edgevlm_agent::sim;

#[test]
fn notifies_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // SAFETY-free in Rust 2021; no other thread of this test binary reads the environment.
    std::env::set_var("NOTIFY_SOCKET", &socket_path);
    std::env::set_var("WATCHDOG_USEC", "100000"); // 100 ms: pings every 50 ms
    std::env::remove_var("WATCHDOG_PID");

    let samples = common::models().join("demo/samples");
    let cfg = common::config(tmp.path(), &samples, 1000, 10, "");
    let (station, trigger, _pins) = sim::build(&cfg).unwrap();
    let handle = station.handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        handle.stop();
    });
    // Read while the station runs, as systemd does: a unix datagram queue is short
    // (net.unix.max_dgram_qlen) and a sender blocks when it is full.
    let reader = std::thread::spawn(move || {
        let mut messages = vec![];
        let mut buf = [0u8; 512];
        let mut quiet = 0;
        while quiet < 5 {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    quiet = 0;
                    messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                Err(_) => quiet += 1,
            }
        }
        messages
    });
    station.run(trigger, |_| {});
    let messages = reader.join().unwrap();
    let all = messages.join("|");
    assert!(
        messages[0].starts_with("READY=1\nSTATUS=inspecting with demo-parts 1.0.0"),
        "{all}"
    );
    let pings = messages
        .iter()
        .filter(|m| m.as_str() == "WATCHDOG=1\n")
        .count();
    assert!(
        pings >= 4,
        "expected a ping every 50 ms over 400 ms, got {pings}: {all}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("STOPPING=1")),
        "{all}"
    );
}
