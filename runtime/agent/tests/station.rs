//! The inspection loop on the simulated board.

mod common;

use std::time::Duration;

use edgevlm_agent::{sim, Event, Station};
use edgevlm_board::{Camera, Frame, Signal, VerdictOutputs};
use edgevlm_board_sim::{FolderCamera, PinRecorder, ScheduleTrigger, SimError, ThreadDelay};
use edgevlm_runtime::{LoadOptions, Memory};

#[test]
fn every_trigger_gets_one_pulse_on_the_right_pin() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = common::models().join("demo/samples");
    let cfg = common::config(
        tmp.path(),
        &samples,
        24,
        25,
        "[outputs]\npulse_ms = 6\n\n[queue]\ncapacity = 32\n",
    );
    let (station, trigger, pins) = sim::build(&cfg).unwrap();
    let mut events = vec![];
    let report = station.run(trigger, |e| events.push(e.clone()));
    let parts = common::parts(&events);

    assert_eq!(
        (
            report.triggers,
            report.processed,
            report.dropped,
            report.errors
        ),
        (24, 24, 0, 0),
        "{report:?}"
    );
    // The folder is read in name order, round and round; names carry the truth.
    let mut names: Vec<String> = std::fs::read_dir(&samples)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p.sequence, i as u64);
        assert_eq!(p.source, names[i % names.len()]);
        let want = if p.source.starts_with("ok_") {
            Signal::Ok
        } else {
            Signal::Ng
        };
        assert_eq!(p.signal, want, "{p:?}");
        assert_eq!(p.capture_attempts, 1);
        assert!(p.latency_us > 0 && p.trace.is_some());
    }
    let (ok, ng) = (pins.pulses("ok"), pins.pulses("ng"));
    assert_eq!(ok.len() as u64, report.ok);
    assert_eq!(ng.len() as u64, report.ng);
    assert_eq!(report.ok, 8);
    assert!(pins.pulses("error").is_empty());
    for (_, width) in ok.iter().chain(&ng) {
        assert!(
            *width >= Duration::from_millis(6) && *width < Duration::from_millis(60),
            "pulse width {width:?}"
        );
    }
    // BUSY went high and low once per part.
    assert_eq!(pins.pulses("busy").len(), 24);
    assert!(report.latency_ms(50.0) > 0.0 && report.latency_ms(99.0) >= report.latency_ms(50.0));
}

#[test]
fn trigger_storm_is_bounded_counted_and_flat_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = common::models().join("demo/samples");
    let storm = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // 1,000 triggers in one second, queue of 4; 5 ms pulses cap the worker at 200 parts/s.
        let cfg = common::config(
            &dir,
            &samples,
            1000,
            1,
            "[outputs]\npulse_ms = 5\n\n[queue]\ncapacity = 4\n",
        );
        let (station, trigger, pins) = sim::build(&cfg).unwrap();
        let mut drops_reported = 0;
        let mut parts = 0;
        let report = station.run(trigger, |e| match e {
            Event::Dropped { new, .. } => drops_reported += new,
            Event::Part(_) => parts += 1,
            _ => {}
        });
        assert_eq!(report.triggers, 1000, "{report:?}");
        assert_eq!(report.processed + report.dropped, 1000, "{report:?}");
        assert_eq!(drops_reported, report.dropped, "every drop is reported");
        assert_eq!(parts, report.processed);
        assert_eq!(
            (pins.pulses("ok").len() + pins.pulses("ng").len()) as u64,
            report.processed
        );
        report
    };
    let warm = storm("warm");
    let before = Memory::sample().rss_kb;
    let second = storm("second");
    let after = Memory::sample().rss_kb;
    eprintln!(
        "storm: processed {} dropped {} | rss {before} -> {after} kB",
        second.processed, second.dropped
    );
    assert!(
        warm.dropped > 0 && second.dropped > 0,
        "a 4-deep queue must overflow in a 1 kHz storm"
    );
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} to {after} kB over a storm"
    );
}

#[test]
fn a_vanished_camera_is_reported_and_the_loop_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let images = common::samples_copy(tmp.path(), "cam");
    let cfg = common::config(
        tmp.path(),
        &images,
        40,
        20,
        "[camera]\nretries = 1\nbackoff_ms = 5\n\n[queue]\ncapacity = 64\n",
    );
    let (station, trigger, pins) = sim::build(&cfg).unwrap();
    let away = tmp.path().join("unplugged");
    let unplug = {
        let (images, away) = (images.clone(), away.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::rename(&images, &away).unwrap();
            std::thread::sleep(Duration::from_millis(250));
            std::fs::rename(&away, &images).unwrap();
        })
    };
    let mut events = vec![];
    let report = station.run(trigger, |e| events.push(e.clone()));
    unplug.join().unwrap();
    let parts = common::parts(&events);
    assert_eq!(report.processed, 40);
    let failed: Vec<_> = parts.iter().filter(|p| p.signal == Signal::Error).collect();
    assert!(
        !failed.is_empty(),
        "no trigger fell into the unplugged window"
    );
    for p in &failed {
        let e = p.error.as_deref().unwrap();
        assert!(
            e.starts_with("camera: camera folder ") && e.contains("(after 2 attempts)"),
            "{e}"
        );
    }
    assert_eq!(pins.pulses("error").len(), failed.len());
    assert!(report.capture_retries >= failed.len() as u64);
    // After the camera is back, parts are judged again.
    let last_failure = parts
        .iter()
        .rposition(|p| p.signal == Signal::Error)
        .unwrap();
    assert!(
        last_failure < parts.len() - 5,
        "loop did not recover: {last_failure} of {}",
        parts.len()
    );
    assert!(parts[last_failure + 1..]
        .iter()
        .all(|p| p.signal != Signal::Error));
}

#[test]
fn a_model_switch_loses_no_trigger_and_a_bad_package_keeps_the_old_model() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = common::models().join("demo/samples");
    let cfg = common::config(
        tmp.path(),
        &samples,
        30,
        15,
        "[queue]\ncapacity = 64\n[outputs]\npulse_ms = 2\n",
    );
    let (station, trigger, pins) = sim::build(&cfg).unwrap();
    let handle = station.handle();
    // A second package: the demo with another version; and a broken one (bad checksum).
    let v2 = tmp.path().join("v2");
    let broken = tmp.path().join("broken");
    let manifest = std::fs::read_to_string(common::models().join("demo/model.toml")).unwrap();
    let sha_line = manifest.lines().find(|l| l.starts_with("sha256")).unwrap();
    let manifests = [
        (
            &v2,
            manifest.replacen("version = \"1.0.0\"", "version = \"2.0.0\"", 1),
        ),
        (
            &broken,
            manifest.replacen(sha_line, &format!("sha256 = \"{}\"", "1".repeat(64)), 1),
        ),
    ];
    for (dir, text) in manifests {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(
            common::models().join("demo/model.onnx"),
            dir.join("model.onnx"),
        )
        .unwrap();
        std::fs::write(dir.join("model.toml"), text).unwrap();
    }
    let loader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        handle
            .load_model(broken, LoadOptions::default())
            .join()
            .unwrap();
        handle
            .load_model(v2, LoadOptions::default())
            .join()
            .unwrap();
    });
    let mut events = vec![];
    let report = station.run(trigger, |e| events.push(e.clone()));
    loader.join().unwrap();
    assert_eq!(
        (
            report.triggers,
            report.processed,
            report.dropped,
            report.errors
        ),
        (30, 30, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.model_switches, 1);
    let rejected = events.iter().find_map(|e| {
        if let Event::ModelRejected { error, .. } = e {
            Some(error.clone())
        } else {
            None
        }
    });
    assert!(
        rejected
            .as_deref()
            .is_some_and(|e| e.contains("sha256 mismatch")),
        "{rejected:?}"
    );
    let switched = events
        .iter()
        .position(|e| matches!(e, Event::ModelSwitched { version, .. } if version == "2.0.0"));
    let switched = switched.expect("model switched to 2.0.0");
    assert!(
        switched > 0 && switched < events.len() - 1,
        "switch happened mid-run"
    );
    assert_eq!(pins.pulses("ok").len() + pins.pulses("ng").len(), 30);
}

#[test]
fn stop_drains_the_queued_triggers() {
    let tmp = tempfile::tempdir().unwrap();
    let samples = common::models().join("demo/samples");
    // Triggers every 2 ms, 20 ms pulses: the queue fills up behind the worker.
    let cfg = common::config(
        tmp.path(),
        &samples,
        200,
        2,
        "[outputs]\npulse_ms = 20\n\n[queue]\ncapacity = 1000\n",
    );
    let (station, trigger, _pins) = sim::build(&cfg).unwrap();
    let handle = station.handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        handle.stop();
    });
    let mut events = vec![];
    let report = station.run(trigger, |e| events.push(e.clone()));
    let queued = events.iter().find_map(|e| {
        if let Event::Draining { queued } = e {
            Some(*queued)
        } else {
            None
        }
    });
    assert!(queued.is_some_and(|q| q > 0), "{queued:?}");
    assert!(report.triggers < 200, "stopped early: {report:?}");
    assert_eq!(
        report.processed + report.dropped,
        report.triggers,
        "every accepted trigger was finished: {report:?}"
    );
    assert_eq!(report.dropped, 0);
}

/// A camera that takes `delay` per capture: to the loop, the same as a slow model (the worker
/// is busy for that long per part while the previous part's pulse runs).
struct SlowCamera {
    inner: FolderCamera,
    delay: Duration,
}

impl Camera for SlowCamera {
    type Error = SimError;

    fn capture(&mut self) -> Result<Frame, SimError> {
        std::thread::sleep(self.delay);
        self.inner.capture()
    }
}

/// A burst of 12 triggers 1 ms apart (all queued behind the first part) over the demo
/// samples, which sort as 4 NG, 4 OK, 4 NG: back-to-back verdicts of one kind. Checks, from the
/// recorded pin edges, one pulse per verdict on the right pin, each `pulse_ms` wide, at least
/// `gap_ms` apart on one pin, rising in verdict order. Time bounds are one-sided or generous:
/// the bug they catch is pulses merged or stretched by a whole judgement.
fn burst(judge: Duration, max_pending: usize) -> (edgevlm_agent::Report, PinRecorder) {
    let (pulse, gap) = (Duration::from_millis(50), Duration::from_millis(30));
    let tmp = tempfile::tempdir().unwrap();
    let samples = common::models().join("demo/samples");
    let cfg = common::config(
        tmp.path(),
        &samples,
        12,
        1,
        "[outputs]\npulse_ms = 50\ngap_ms = 30\n\n[queue]\ncapacity = 16\n",
    );
    let pins = PinRecorder::default();
    let outputs = VerdictOutputs::new(
        pins.pin("ok"),
        pins.pin("ng"),
        Some(pins.pin("error")),
        sim::pin_mode(&cfg),
        ThreadDelay,
    )
    .unwrap()
    .with_max_pending(max_pending);
    let camera = SlowCamera {
        inner: FolderCamera::open(&samples).unwrap(),
        delay: judge,
    };
    let station = Station::new(
        camera,
        outputs,
        sim::load_inspector(&cfg).unwrap(),
        sim::settings(&cfg),
    );
    let mut events = vec![];
    let report = station.run(
        ScheduleTrigger::periodic(12, Duration::from_millis(1)),
        |e| events.push(e.clone()),
    );
    assert_eq!(
        (report.triggers, report.processed, report.dropped),
        (12, 12, 0),
        "{report:?}"
    );
    let verdicts: Vec<&str> = common::parts(&events)
        .iter()
        .map(|p| match p.signal {
            Signal::Ok => "ok",
            Signal::Ng => "ng",
            Signal::Error => "error",
        })
        .collect();
    assert_eq!(verdicts, [["ng"; 4], ["ok"; 4], ["ng"; 4]].concat());

    let tolerance = Duration::from_millis(1);
    for pin in ["ok", "ng", "error"] {
        let p = pins.pulses(pin);
        let count = verdicts.iter().filter(|v| **v == pin).count();
        assert_eq!(p.len(), count, "{pin}: {count} verdicts, pulses {p:?}");
        for (_, width) in &p {
            assert!(
                *width + tolerance >= pulse && *width < pulse + Duration::from_millis(150),
                "{pin}: pulse of {width:?}, expected {pulse:?}: {p:?}"
            );
        }
        for pair in p.windows(2) {
            let low = pair[1].0 - (pair[0].0 + pair[0].1);
            assert!(
                low + tolerance >= gap,
                "{pin}: {low:?} low, expected {gap:?}: {p:?}"
            );
        }
    }
    // The log is in the order the pins changed.
    let rises: Vec<String> = pins
        .changes()
        .into_iter()
        .filter(|c| c.high && c.pin != "busy")
        .map(|c| c.pin)
        .collect();
    assert_eq!(rises, verdicts);
    (report, pins)
}

#[test]
fn a_slow_model_does_not_stretch_pulses() {
    // Each judgement (300 ms) outlasts a pulse (50 ms): pulses end while the worker is busy.
    let (report, _) = burst(Duration::from_millis(300), 16);
    assert_eq!(report.pulse_waits, 0);
}

#[test]
fn verdicts_faster_than_pulses_queue_in_order_and_none_is_lost() {
    // Judged in milliseconds, shown at 80 ms per pulse on a pin: pulses queue. With room for
    // only 2, the worker waits for the pins instead of dropping or merging a pulse.
    let (report, _) = burst(Duration::ZERO, 2);
    assert!(report.pulse_waits > 0, "{report:?}");
}
