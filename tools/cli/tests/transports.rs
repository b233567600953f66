//! `edgevlm push`, `models`, `bench` and `compare` through real transports: the OpenSSH client
//! against a real `sshd` on 127.0.0.1 (host-key checking on), and a serial line made of two
//! real ptys (`edgevlm agent --serial` on one end, the host on the other), including a line cut
//! mid-push and a corrupted byte.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use edgevlm_board_sim::serial_line::{Faults, SerialConfig, SerialLine};
use edgevlm_e2e::agent::SerialAgent;
use edgevlm_e2e::sshd::Sshd;

const EDGEVLM: &str = env!("CARGO_BIN_EXE_edgevlm");

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn edgevlm(home: &Path, args: &[&str]) -> Output {
    // An explicit $EDGEVLM_BOARDS must exist: the serial tests name their board by URL.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("boards.toml"))
        .unwrap();
    Command::new(EDGEVLM)
        .args(args)
        .env("EDGEVLM_HOME", home)
        .env("EDGEVLM_BOARDS", home.join("boards.toml"))
        .env_remove("EDGEVLM_DB")
        .output()
        .expect("edgevlm runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn push_bench_and_compare_over_real_ssh() {
    let Some(sshd) = Sshd::for_test() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let store = h.join("board-store");
    std::fs::write(
        h.join("boards.toml"),
        format!(
            "[[board]]\nname = \"pi\"\nurl = \"{}\"\nagent = \"{EDGEVLM}\"\nstore = \"{}\"\n\
             profile = \"rpi5\"\nidentity = \"{}\"\nknown_hosts = \"{}\"\n",
            sshd.url(),
            store.display(),
            sshd.identity_file().display(),
            sshd.known_hosts_file().display()
        ),
    )
    .unwrap();
    let demo_dir = demo();
    let demo = demo_dir.to_str().unwrap();

    let out = ok(&edgevlm(h, &["push", "--board", "pi", demo, "--activate"]));
    assert!(out.starts_with("pushed demo-parts 1.0.0 to pi: "), "{out}");
    assert!(store.join("models/demo-parts/1.0.0/model.onnx").is_file());
    let installed = std::fs::read(store.join("models/demo-parts/1.0.0/model.onnx")).unwrap();
    assert_eq!(
        installed,
        std::fs::read(demo_dir.join("model.onnx")).unwrap()
    );

    let out = ok(&edgevlm(h, &["models", "--board", "pi", "--json"]));
    let models: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text_models = models.to_string();
    assert!(
        text_models.contains("demo-parts") && text_models.contains("\"active\":true"),
        "{out}"
    );

    let db = h.join("results.sqlite");
    let db = db.to_str().unwrap();
    let out = ok(&edgevlm(
        h,
        &[
            "bench",
            "--board",
            "pi",
            "--model",
            demo,
            "--warmup",
            "1",
            "--iterations",
            "5",
            "--db",
            db,
            "--json",
        ],
    ));
    assert!(out.contains("demo-parts"), "{out}");
    let out = ok(&edgevlm(h, &["compare", "--last", "1", "--db", db]));
    assert!(out.contains("demo-parts") && out.contains("pi"), "{out}");

    // Host-key checking is on: a known_hosts file without this server's key is refused.
    std::fs::write(h.join("empty_known_hosts"), "").unwrap();
    let boards = std::fs::read_to_string(h.join("boards.toml"))
        .unwrap()
        .replace(
            &sshd.known_hosts_file().display().to_string(),
            &h.join("empty_known_hosts").display().to_string(),
        );
    std::fs::write(h.join("boards.toml"), boards).unwrap();
    let out = edgevlm(h, &["models", "--board", "pi"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("Host key verification failed"),
        "{}",
        text(&out.stderr)
    );
}

fn serial_url(line: &SerialLine, baud: u32) -> String {
    format!("serial://{}?baud={baud}", line.b_path().display())
}

#[test]
fn push_and_bench_over_a_serial_line() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let store = h.join("board-store");
    let baud = 921_600;
    let line = SerialLine::open(SerialConfig::at(baud)).unwrap();
    let _agent = SerialAgent::start(EDGEVLM, line.a_path(), baud, &store);
    let url = serial_url(&line, baud);
    let demo_dir = demo();
    let demo = demo_dir.to_str().unwrap();

    let out = ok(&edgevlm(h, &["push", "--board", &url, demo, "--activate"]));
    assert!(out.starts_with("pushed demo-parts 1.0.0 to "), "{out}");
    assert_eq!(
        std::fs::read(store.join("models/demo-parts/1.0.0/model.onnx")).unwrap(),
        std::fs::read(demo_dir.join("model.onnx")).unwrap()
    );
    let db = h.join("results.sqlite");
    let out = ok(&edgevlm(
        h,
        &[
            "bench",
            "--board",
            &url,
            "--model",
            demo,
            "--warmup",
            "1",
            "--iterations",
            "3",
            "--db",
            db.to_str().unwrap(),
        ],
    ));
    assert!(out.contains("demo-parts"), "{out}");
}

#[test]
fn serial_push_survives_a_cut_line_and_a_corrupted_byte() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let store = h.join("board-store");
    let baud = 921_600;
    let demo = demo();
    let demo_s = demo.to_str().unwrap();
    let model_bytes = std::fs::metadata(demo.join("model.onnx")).unwrap().len();

    // 1. The line dies a third of the way into the push: a clear error, nothing installed.
    let line = SerialLine::open(SerialConfig {
        baud: Some(baud),
        a_to_b: Faults::none(),
        b_to_a: Faults::none().cut_after(model_bytes / 3),
    })
    .unwrap();
    let agent = SerialAgent::start(EDGEVLM, line.a_path(), baud, &store);
    let out = edgevlm(h, &["push", "--board", &serial_url(&line, baud), demo_s]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(!store.join("models/demo-parts").exists());
    drop(agent);
    drop(line);

    // 2. A new line that flips one byte early in the host's stream: the push resumes where
    //    the board's verified data ends, the damaged chunk is sent again, the files match.
    let line = SerialLine::open(SerialConfig {
        baud: Some(baud),
        a_to_b: Faults::none(),
        b_to_a: Faults::none().corrupt_byte(5_000, 0x40),
    })
    .unwrap();
    let _agent = SerialAgent::start(EDGEVLM, line.a_path(), baud, &store);
    let started = Instant::now();
    let out = ok(&edgevlm(
        h,
        &["push", "--board", &serial_url(&line, baud), demo_s],
    ));
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(!out.contains("resumed from 0 B"), "{out}");
    assert!(!out.contains(" 0 retransmits"), "{out}");
    assert_eq!(
        std::fs::read(store.join("models/demo-parts/1.0.0/model.onnx")).unwrap(),
        std::fs::read(demo.join("model.onnx")).unwrap()
    );
}
