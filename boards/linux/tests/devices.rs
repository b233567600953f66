//! Tests against real kernel devices: a gpio-sim chip and the vivid V4L2 test driver, as a VM
//! or CI runner provides them:
//!
//! ```sh
//! modprobe vivid
//! modprobe gpio-sim
//! mkdir -p /sys/kernel/config/gpio-sim/edgevlm/gpio-bank0
//! echo 8 > /sys/kernel/config/gpio-sim/edgevlm/gpio-bank0/num_lines
//! echo 1 > /sys/kernel/config/gpio-sim/edgevlm/live
//! ```
//!
//! Debian's arm64 kernel lacks gpio-sim: on the emulated board (`ci/emulated-board.sh`)
//! `ci/gpio-sim-module.sh` builds it for that kernel and `insmod` loads it.
//!
//! Where the devices are missing each test prints why it skipped and passes; with
//! `EDGEVLM_REQUIRE_DEVICES` set a skip is a failure instead, for machines that provide the
//! devices. Driving the simulated input (writing gpio-sim's sysfs `pull` attribute) needs root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgevlm_board::{
    monotonic_now, Camera, CameraError, CameraErrorKind, Edge, Trigger, TriggerConfig,
};
use edgevlm_board_linux::Bias;
use edgevlm_board_linux::{CameraFormat, CdevOutput, CdevTrigger, DebounceMode, V4l2Camera};
use embedded_hal::digital::OutputPin;

/// `/dev` entries whose name starts with `prefix`, sorted.
fn dev_nodes(prefix: &str) -> Vec<PathBuf> {
    let mut nodes: Vec<PathBuf> = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
}

/// The directory holding gpio-sim's `sim_gpioN/{pull,value}` attributes of chip `name`: the
/// chip's device directory on older kernels, its parent (the bank's node) on newer ones.
fn sim_attributes(name: &str) -> Option<PathBuf> {
    let dev = std::fs::canonicalize(Path::new("/sys/bus/gpio/devices").join(name)).ok()?;
    let parent = dev.parent().map(Path::to_owned);
    [Some(dev), parent]
        .into_iter()
        .flatten()
        .find(|d| d.join("sim_gpio0").is_dir())
}

/// Reports why a test cannot run here, failing it where the devices are required.
fn skip(why: &str) {
    if std::env::var_os("EDGEVLM_REQUIRE_DEVICES").is_some() {
        panic!("{why}, and EDGEVLM_REQUIRE_DEVICES is set");
    }
    eprintln!("skipping {why}");
}

fn read_attr(dir: &Path, line: u32, attr: &str) -> String {
    let path = dir.join(format!("sim_gpio{line}")).join(attr);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

fn set_pull(dir: &Path, line: u32, pull: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(format!("sim_gpio{line}")).join("pull"), pull)
}

#[test]
fn gpio_sim_outputs_and_trigger_edges() {
    let chips = dev_nodes("gpiochip");
    if chips.is_empty() {
        skip("the gpio-sim test: no /dev/gpiochip*");
        return;
    }
    let found = chips.iter().find_map(|path| {
        let info = gpiocdev::Chip::from_path(path).ok()?.info().ok()?;
        (info.label.starts_with("gpio-sim") && info.num_lines >= 2).then(|| (path.clone(), info))
    });
    let Some((chip, info)) = found else {
        skip(&format!(
            "the gpio-sim test: no gpio-sim chip with 2 lines among {chips:?}"
        ));
        return;
    };
    let attrs = sim_attributes(&info.name);

    // Output on line 1: the simulator shows the driven value.
    let mut pins = CdevOutput::request(&chip, &[1], false).unwrap();
    pins[0].set_high().unwrap();
    if let Some(dir) = &attrs {
        assert_eq!(read_attr(dir, 1, "value"), "1");
    }
    pins[0].set_low().unwrap();
    if let Some(dir) = &attrs {
        assert_eq!(read_attr(dir, 1, "value"), "0");
    }

    // Trigger on line 0, driven through the simulated pull resistor.
    let Some(dir) = attrs else {
        skip(&format!(
            "the trigger part: no sim_gpio attributes for {}",
            info.name
        ));
        return;
    };
    if let Err(e) = set_pull(&dir, 0, "pull-down") {
        skip(&format!(
            "the trigger part: cannot drive gpio-sim ({e}); needs root"
        ));
        return;
    }
    let rising = TriggerConfig {
        edge: Edge::Rising,
        debounce: Duration::ZERO,
    };
    let mut trigger = CdevTrigger::new(&chip, 0, rising, false, Bias::AsIs).unwrap();
    assert_eq!(trigger.debounce_mode(), DebounceMode::Off);
    assert!(!trigger.is_active().unwrap());
    assert_eq!(trigger.wait(Duration::from_millis(20)).unwrap(), None);

    let before = monotonic_now();
    set_pull(&dir, 0, "pull-up").unwrap();
    let event = trigger
        .wait(Duration::from_secs(1))
        .unwrap()
        .expect("rising edge");
    let after = monotonic_now();
    assert_eq!(event.sequence, 0);
    assert!(
        before <= event.timestamp && event.timestamp <= after,
        "{before:?} <= {:?} <= {after:?}",
        event.timestamp
    );
    // The falling edge is not a rising one.
    set_pull(&dir, 0, "pull-down").unwrap();
    assert_eq!(trigger.wait(Duration::from_millis(50)).unwrap(), None);
    drop(trigger);

    // Debounced: a 5 ms pulse is swallowed, a held level counts once, stamped when it began.
    let debounced = TriggerConfig {
        edge: Edge::Rising,
        debounce: Duration::from_millis(30),
    };
    let mut trigger = CdevTrigger::new(&chip, 0, debounced, false, Bias::AsIs).unwrap();
    assert_ne!(trigger.debounce_mode(), DebounceMode::Off);
    set_pull(&dir, 0, "pull-up").unwrap();
    std::thread::sleep(Duration::from_millis(5));
    set_pull(&dir, 0, "pull-down").unwrap();
    assert_eq!(trigger.wait(Duration::from_millis(100)).unwrap(), None);
    let before = monotonic_now();
    set_pull(&dir, 0, "pull-up").unwrap();
    let event = trigger
        .wait(Duration::from_secs(1))
        .unwrap()
        .expect("debounced edge");
    assert_eq!(event.sequence, 0);
    assert!(
        event.timestamp >= before,
        "{:?} >= {before:?}",
        event.timestamp
    );
    assert!(
        event.timestamp < before + Duration::from_millis(30),
        "stamped when the level began, not when debouncing ended: {:?} vs {before:?}",
        event.timestamp
    );
    set_pull(&dir, 0, "pull-down").unwrap();
}

#[test]
fn vivid_captures_fresh_frames() {
    let videos = dev_nodes("video");
    if videos.is_empty() {
        skip("the vivid test: no /dev/video*");
        return;
    }
    let vivid = videos.iter().find(|p| {
        v4l::Device::with_path(p)
            .and_then(|d| d.query_caps())
            .is_ok_and(|c| {
                c.driver == "vivid"
                    && c.capabilities
                        .contains(v4l::capability::Flags::VIDEO_CAPTURE)
            })
    });
    let Some(device) = vivid else {
        skip(&format!(
            "the vivid test: no vivid capture device among {videos:?}"
        ));
        return;
    };

    // A rate the driver cannot do is refused, naming the device and what it chose instead
    // (vivid's webcam input offers 25 and 50 fps at 640x480, first seen in the emulated board).
    match V4l2Camera::open(device, 640, 480, CameraFormat::Yuyv, Some(1000)) {
        Err(e @ edgevlm_board_linux::v4l2::V4l2Error::FrameRate { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&device.display().to_string()) && text.contains("1000 fps"),
                "{text}"
            );
        }
        other => panic!("expected a frame-rate error, got {:?}", other.map(|_| ())),
    }
    // The driver's own rate.
    let mut camera = V4l2Camera::open(device, 640, 480, CameraFormat::Yuyv, None).unwrap();
    let mut previous: Option<edgevlm_board::Frame> = None;
    for i in 0..4 {
        // Let the stream fill every buffer with frames older than the next call.
        std::thread::sleep(Duration::from_millis(200));
        let start = monotonic_now();
        let frame = camera.capture().unwrap();
        assert_eq!(frame.data.len(), 640 * 480 * 2);
        assert_eq!((frame.width, frame.height), (640, 480));
        assert_eq!(frame.sequence, i);
        assert!(
            frame.timestamp >= start,
            "frame {i} taken at {:?}, before the call at {start:?}",
            frame.timestamp
        );
        assert!(
            monotonic_now() - start < Duration::from_millis(500),
            "a fresh frame is a few frame periods away"
        );
        if let Some(p) = &previous {
            assert!(frame.timestamp > p.timestamp);
        }
        previous = Some(frame);
    }
    // Reopening (what the agent does after a Disconnected error) restarts the stream.
    camera.recover().unwrap();
    let start = monotonic_now();
    let frame = camera.capture().unwrap();
    assert_eq!(frame.sequence, 4);
    assert!(frame.timestamp >= start);
    drop(camera);

    // vivid has no MJPG: the error says what it chose instead.
    let e = V4l2Camera::open(device, 640, 480, CameraFormat::Mjpg, None).unwrap_err();
    assert_eq!(e.kind(), CameraErrorKind::Other);
    assert!(e.to_string().contains("the driver chose"), "{e}");
}
