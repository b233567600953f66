//! `edgevlm push`, `models` and `bench` end to end against the embedded board (`--board local`:
//! a real `edgevlm agent --stdio` process started by the CLI, its store in $EDGEVLM_HOME), and
//! their failures against unknown boards, unreachable ssh hosts and oversized inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

/// Runs edgevlm with its data directory (the local board's store, the results database) and
/// boards file under `home`.
fn edgevlm(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgevlm"))
        .args(args)
        .env("EDGEVLM_HOME", home)
        .env("EDGEVLM_BOARDS", home.join("boards.toml"))
        .env_remove("EDGEVLM_DB")
        .output()
        .expect("edgevlm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn home() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("boards.toml"),
        "[[board]]\nname = \"here\"\nurl = \"local\"\ntags = [\"test\"]\n",
    )
    .unwrap();
    home
}

#[test]
fn push_models_and_bench_on_the_local_board() {
    let home = home();
    let h = home.path();
    let demo = demo();
    let demo = demo.to_str().unwrap();

    let out = edgevlm(h, &["push", "--board", "local", demo, "--activate"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("pushed demo-parts 1.0.0 to local: ")
            && stdout.contains("MB/s")
            && stdout.contains("resumed from 0 B, 0 retransmits, activated"),
        "{stdout}"
    );
    // No progress bar drawn into a pipe.
    assert!(!text(&out.stderr).contains('\r'), "{}", text(&out.stderr));
    assert!(h
        .join("local-board/models/demo-parts/1.0.0/model.onnx")
        .is_file());

    // The inventory name reaches the same board.
    let out = edgevlm(h, &["push", "--board", "here", demo]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "demo-parts 1.0.0 already installed on here: nothing sent"
    );

    let out = edgevlm(h, &["models", "--board", "local"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].ends_with("STATE"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("demo-parts  1.0.0") && lines[1].ends_with("active"),
        "{stdout}"
    );

    let out = edgevlm(h, &["models", "--board", "local", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "demo-parts");
    assert_eq!(list[0]["active"], true);
    assert_eq!(list[0]["files"], 16);

    // The active model cannot be removed; a missing one cannot be activated.
    let out = edgevlm(
        h,
        &["models", "--board", "local", "--remove", "demo-parts@1.0.0"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).trim(),
        "edgevlm: board local: removing demo-parts 1.0.0: agent busy"
    );
    let out = edgevlm(
        h,
        &["models", "--board", "local", "--activate", "demo-parts@3"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("activating demo-parts 3: not found"));

    let db = h.join("runs.sqlite");
    let out = edgevlm(
        h,
        &[
            "bench",
            "--board",
            "local",
            "--model",
            demo,
            "--warmup",
            "1",
            "--iterations",
            "4",
            "--top-nodes",
            "3",
            "--package-image",
            "samples/ok_01.png",
            "--db",
            db.to_str().unwrap(),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("demo-parts 1.0.0 (fp32) on local (")
            && stdout.contains("image samples/ok_01.png")
            && stdout.contains("4 iterations: mean ")
            && stdout.contains("stages (mean): decode ")
            && stdout.contains("memory: peak RSS ")
            && stdout.contains(" 1. "),
        "{stdout}"
    );
    let id: i64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("stored as run "))
        .and_then(|l| l.split_whitespace().next())
        .expect("run id printed")
        .parse()
        .unwrap();
    let stored = edgevlm_host::db::ResultsDb::open(&db)
        .unwrap()
        .get(id)
        .unwrap()
        .expect("the run is stored");
    assert_eq!(stored.latencies_us.len(), 4);
    assert_eq!(stored.board.name, "local");
    assert_eq!(stored.settings.input, "image samples/ok_01.png");

    // JSON, synthetic input, no trace, database from the data directory.
    let out = edgevlm(
        h,
        &[
            "bench",
            "--board",
            "local",
            "--model",
            demo,
            "--warmup",
            "0",
            "--iterations",
            "3",
            "--no-trace",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["settings"]["input"], "synthetic seed=0");
    assert_eq!(record["settings"]["traced"], false);
    assert_eq!(record["iterations"], 3);
    assert!(record["id"].as_i64().unwrap() > 0);
    assert!(h.join("results.sqlite").is_file());
}

#[test]
fn failures_are_named_and_exit_2() {
    let home = home();
    let h = home.path();
    let demo = demo();
    let demo = demo.to_str().unwrap();

    let out = edgevlm(h, &["push", "--board", "line9", demo]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("edgevlm: unknown board \"line9\": ")
            && stderr.contains("boards.toml lists here"),
        "{stderr}"
    );

    let out = edgevlm(h, &["models", "--board", "ssh://pi@127.0.0.1:99999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad port \"99999\""),
        "{}",
        text(&out.stderr)
    );

    // The real ssh client, nobody listening: its own words reach the user.
    let out = edgevlm(h, &["models", "--board", "ssh://pi@127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(
            "edgevlm: connection to board ssh://pi@127.0.0.1:1 lost: ssh exited with status 255: "
        ) && stderr.contains("Connection refused"),
        "{stderr}"
    );

    // A broken package is refused before any board is contacted.
    let broken = h.join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        Path::new(demo).join("model.toml"),
        broken.join("model.toml"),
    )
    .unwrap();
    let out = edgevlm(
        h,
        &[
            "push",
            "--board",
            "ssh://pi@127.0.0.1:1",
            broken.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("edgevlm: checking model package ") && stderr.contains("model.onnx"),
        "{stderr}"
    );

    // Inline images are limited to 24 KiB.
    let big = h.join("big.png");
    std::fs::write(&big, vec![0x55u8; 30 * 1024]).unwrap();
    let out = edgevlm(
        h,
        &[
            "bench",
            "--board",
            "local",
            "--model",
            demo,
            "--image",
            big.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("30.0 KiB is too large to send with the request (at most 24 KiB)")
            && stderr.contains("--package-image PATH"),
        "{stderr}"
    );
    let out = edgevlm(
        h,
        &[
            "bench",
            "--board",
            "local",
            "--model",
            demo,
            "--package-image",
            "samples/nope.png",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--package-image samples/nope.png: no such file in package"),
        "{}",
        text(&out.stderr)
    );
}
