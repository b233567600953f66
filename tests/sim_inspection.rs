//! The whole station on the simulator: scripted triggers -> image-folder camera -> demo model
//! -> OK / NG pulses on recorded pins. Every trigger gets exactly one pulse on the right pin.

use std::path::PathBuf;
use std::time::Duration;

use edgevlm_board::{Camera, PinMode, PixelFormat, Signal, Trigger, VerdictOutputs};
use edgevlm_board_sim::{FolderCamera, PinRecorder, ScheduleTrigger, ThreadDelay};
use edgevlm_runtime::{Classifier, Frame, FrameFormat, LoadOptions, Verdict};

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

#[test]
fn triggers_become_pulses_on_the_right_pins() {
    let samples = demo().join("samples");
    let n_samples = std::fs::read_dir(&samples).unwrap().count();
    let triggers = n_samples + 3; // wraps around the folder
    let mut classifier = Classifier::load(&demo(), &LoadOptions::default()).unwrap();
    let mut camera = FolderCamera::open(&samples).unwrap();
    let mut trigger = ScheduleTrigger::periodic(triggers, Duration::from_millis(15));
    let rec = PinRecorder::default();
    let width = Duration::from_millis(4);
    let mut outputs = VerdictOutputs::new(
        rec.pin("ok"),
        rec.pin("ng"),
        Some(rec.pin("error")),
        PinMode::Pulse { width, gap: width },
        ThreadDelay,
    )
    .unwrap();

    let mut expected = vec![];
    while let Some(event) = trigger.wait(Duration::from_secs(2)).unwrap() {
        let frame = camera.capture().unwrap();
        assert!(frame.timestamp >= event.timestamp || frame.sequence == event.sequence);
        let format = match frame.format {
            PixelFormat::Mjpeg | PixelFormat::Png => FrameFormat::Mjpeg,
            other => panic!("folder camera gave {other:?}"),
        };
        let view = Frame {
            format,
            width: frame.width,
            height: frame.height,
            data: &frame.data,
        };
        let signal = match classifier.inspect_frame(&view, &frame.source) {
            Ok(r) if r.verdict == Verdict::Ok => Signal::Ok,
            Ok(_) => Signal::Ng,
            Err(e) => {
                eprintln!("{}: {e}", frame.source);
                Signal::Error
            }
        };
        // Ground truth is in the file name: ok_*, scratch_*, missing_hole_*.
        expected.push(if frame.source.starts_with("ok_") {
            "ok"
        } else {
            "ng"
        });
        outputs.signal(signal).unwrap();
    }
    assert_eq!(expected.len(), triggers);
    let (ok, ng, err) = (rec.pulses("ok"), rec.pulses("ng"), rec.pulses("error"));
    assert_eq!(ok.len(), expected.iter().filter(|e| **e == "ok").count());
    assert_eq!(ng.len(), expected.iter().filter(|e| **e == "ng").count());
    assert!(err.is_empty());
    assert!(
        ok.iter().chain(&ng).all(|(_, w)| *w >= width),
        "pulse shorter than {width:?}"
    );
    // Pulses come out in trigger order, one per trigger.
    let mut all: Vec<(Duration, &str)> = ok
        .iter()
        .map(|p| (p.0, "ok"))
        .chain(ng.iter().map(|p| (p.0, "ng")))
        .collect();
    all.sort();
    assert_eq!(all.iter().map(|p| p.1).collect::<Vec<_>>(), expected);
}

#[test]
fn a_vanished_camera_signals_error_not_ok() {
    let tmp = std::env::temp_dir().join(format!("edgevlm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(demo().join("samples/ok_01.png"), tmp.join("ok_01.png")).unwrap();
    let mut camera = FolderCamera::open(&tmp).unwrap();
    let rec = PinRecorder::default();
    let mut outputs = VerdictOutputs::new(
        rec.pin("ok"),
        rec.pin("ng"),
        Some(rec.pin("error")),
        PinMode::Level,
        ThreadDelay,
    )
    .unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    let signal = match camera.capture() {
        Ok(_) => Signal::Ok,
        Err(e) => {
            assert_eq!(
                edgevlm_board::CameraError::kind(&e),
                edgevlm_board::CameraErrorKind::Disconnected
            );
            Signal::Error
        }
    };
    outputs.signal(signal).unwrap();
    assert_eq!(
        rec.changes().last().map(|c| (c.pin.as_str(), c.high)),
        Some(("error", true))
    );
}
