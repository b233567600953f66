//! The `edgevlm` binary end to end: outputs, JSON, exit codes and error messages.

use std::path::PathBuf;
use std::process::{Command, Output};

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn edgevlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgevlm"))
        .args(args)
        .output()
        .expect("edgevlm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn inspect_demo_samples_prints_a_line_per_image_and_a_summary() {
    let demo = models().join("demo");
    let out = edgevlm(&[
        "inspect",
        "--model",
        demo.to_str().unwrap(),
        demo.join("samples").to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("OK ") || l.starts_with("NG "))
        .collect();
    assert_eq!(lines.len(), 12, "{stdout}");
    for l in &lines {
        let file = l.split_whitespace().nth(1).unwrap();
        let want = if file.starts_with("ok_") {
            "OK "
        } else {
            "NG "
        };
        assert!(l.starts_with(want), "{l}");
        assert!(l.contains("infer ") && l.contains(" ms"), "{l}");
    }
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("12 images: 4 OK, 8 NG, 0 errors"),
        "{stdout}"
    );
}

#[test]
fn inspect_json_and_fail_on_ng() {
    let demo = models().join("demo");
    let ok = demo.join("samples/ok_01.png");
    let ng = demo.join("samples/scratch_01.png");
    let out = edgevlm(&[
        "inspect",
        "--json",
        "--fail-on-ng",
        "--model",
        demo.to_str().unwrap(),
        ok.to_str().unwrap(),
        ng.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["verdict"], "OK");
    assert_eq!(rows[1]["verdict"], "NG");
    assert_eq!(rows[1]["top"]["label"], "scratch");
    assert!(rows[1]["reason"].as_str().unwrap().starts_with("scratch "));
    assert!(rows[0]["trace"]["spans"].as_array().unwrap().len() == 4);
    assert_eq!(rows[2]["summary"]["ng"], 1);
    let out = edgevlm(&[
        "inspect",
        "--fail-on-ng",
        "--model",
        demo.to_str().unwrap(),
        ok.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_bad_image_is_reported_and_the_rest_still_run() {
    let demo = models().join("demo");
    let bad = models().join("fixtures/bad/not_an_image.png");
    let ok = demo.join("samples/ok_01.png");
    let out = edgevlm(&[
        "inspect",
        "--model",
        demo.to_str().unwrap(),
        bad.to_str().unwrap(),
        ok.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ERROR ") && stdout.contains("not_an_image.png: not an image"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 images: 1 OK, 0 NG, 1 errors"),
        "{stdout}"
    );
}

#[test]
fn errors_are_printed_once_with_the_cause_chain_and_exit_2() {
    let bad = models().join("fixtures/bad/truncated.onnx");
    let out = edgevlm(&["run", "--onnx", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("edgevlm: loading ")
            && stderr.contains("truncated.onnx: not a valid ONNX protobuf"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    std::fs::write(pkg.join("model.toml"), "[model]\nname = \"x\"\n").unwrap();
    let out = edgevlm(&[
        "inspect",
        "--model",
        pkg.to_str().unwrap(),
        models().join("demo/samples").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("model.toml: field `model.version`: required field is missing"),
        "{stderr}"
    );

    let out = edgevlm(&["run", "--bogus"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2 too");
}

#[test]
fn run_writes_outputs_that_match_onnxruntime() {
    let fx = models().join("fixtures/fp32");
    let tmp = tempfile::tempdir().unwrap();
    let input = format!("input={}", fx.join("input.npy").display());
    let out = edgevlm(&[
        "run",
        "--onnx",
        fx.join("model.onnx").to_str().unwrap(),
        "--input",
        &input,
        "--output-dir",
        tmp.path().to_str().unwrap(),
        "--repeat",
        "3",
        "--profile",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // --profile: the two slowest nodes of one profiled run, and every op kind that ran.
    let profile = &summary["profile"];
    let nodes = profile["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{profile}");
    assert!(nodes[0]["ms"].as_f64().unwrap() >= nodes[1]["ms"].as_f64().unwrap());
    let by_op = profile["by_op"].as_array().unwrap();
    assert!(by_op.iter().any(|o| o["op"] == nodes[0]["op"]), "{profile}");
    let shares: f64 = by_op.iter().map(|o| o["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 0.01, "{profile}");
    // The load stages account for the load time (the rest is bookkeeping between them).
    let stages = summary["load_stages_ms"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names.first(), Some(&"read and decode"), "{names:?}");
    assert_eq!(names.last(), Some(&"plan"), "{names:?}");
    assert!(names.contains(&"optimize"), "{names:?}");
    let sum: f64 = stages.iter().map(|s| s["ms"].as_f64().unwrap()).sum();
    let load = summary["load_ms"].as_f64().unwrap();
    assert!(sum <= load + 0.01 && sum >= load * 0.5, "{sum} of {load}");
    assert_eq!(summary["outputs"][0]["name"], "logits");
    assert_eq!(summary["outputs"][0]["shape"], serde_json::json!([2, 4]));
    assert_eq!(summary["inputs"][0]["declared"], "[batch,3,32,32]");
    assert_eq!(summary["repeat"]["runs"], 3);
    assert!(
        summary["repeat"]["min_ms"].as_f64().unwrap()
            <= summary["repeat"]["median_ms"].as_f64().unwrap()
    );
    for name in ["logits", "probs"] {
        let got = edgevlm_runtime::npy::read(&tmp.path().join(format!("{name}.npy"))).unwrap();
        let want = edgevlm_runtime::npy::read(&fx.join(format!("expected_{name}.npy"))).unwrap();
        let (g, w) = (
            edgevlm_runtime::values::<f32>(&got).unwrap(),
            edgevlm_runtime::values::<f32>(&want).unwrap(),
        );
        assert!(
            g.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1e-4),
            "{name}"
        );
    }
}

#[test]
fn run_with_fixed_shapes_loads_the_graph_for_the_given_input_sizes() {
    let fx = models().join("fixtures/fp32");
    let input = format!("input={}", fx.join("input.npy").display());
    let model = fx.join("model.onnx");
    let out = edgevlm(&[
        "run",
        "--onnx",
        model.to_str().unwrap(),
        "--input",
        &input,
        "--fixed-shapes",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["inputs"][0]["declared"], "[2,3,32,32]");
    assert_eq!(summary["outputs"][0]["shape"], serde_json::json!([2, 4]));
}

#[test]
fn run_synthesizes_missing_inputs_from_the_seed_and_checks_given_ones() {
    let model = models().join("fixtures/fp32/model.onnx");
    let tmp = tempfile::tempdir().unwrap();
    let run = |seed: &str, dir: &str| {
        let d = tmp.path().join(dir);
        let out = edgevlm(&[
            "run",
            "--onnx",
            model.to_str().unwrap(),
            "--seed",
            seed,
            "--output-dir",
            d.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        std::fs::read(d.join("logits.npy")).unwrap()
    };
    assert_eq!(run("7", "a"), run("7", "b"));
    assert_ne!(run("7", "a"), run("8", "c"));

    let wrong = tmp.path().join("wrong.npy");
    edgevlm_runtime::npy::write(
        &wrong,
        &edgevlm_runtime::Tensor::zero::<f32>(&[1, 3, 8, 8]).unwrap(),
    )
    .unwrap();
    let out = edgevlm(&[
        "run",
        "--onnx",
        model.to_str().unwrap(),
        "--input",
        &format!("input={}", wrong.display()),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr)
            .contains("input `input`: expected f32 [batch,3,32,32], got f32 [1, 3, 8, 8]"),
        "{}",
        text(&out.stderr)
    );
    let out = edgevlm(&[
        "run",
        "--onnx",
        model.to_str().unwrap(),
        "--input",
        "pixels=x.npy",
    ]);
    assert!(
        text(&out.stderr).contains("the model has no input \"pixels\" (inputs: input)"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_documents_exit_codes() {
    let out = edgevlm(&["--help"]);
    let help = text(&out.stdout);
    assert!(
        help.contains("Exit codes:") && help.contains("2  error"),
        "{help}"
    );
}

#[test]
fn inspect_on_the_simulated_board_reports_pins_and_latency() {
    let demo = models().join("demo");
    let out = edgevlm(&[
        "inspect",
        "--board",
        "sim",
        "--model",
        demo.to_str().unwrap(),
        demo.join("samples").to_str().unwrap(),
        "--triggers",
        "14",
        "--period-ms",
        "20",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let parts: Vec<&str> = stdout.lines().filter(|l| l.starts_with('#')).collect();
    assert_eq!(parts.len(), 14, "{stdout}");
    assert!(
        parts[0].starts_with("#0000 NG  missing_hole_01.png") && parts[0].contains("trigger->pin "),
        "{}",
        parts[0]
    );
    // 14 triggers over 12 images: wraps to missing_hole_01 and _02 again.
    let summary = stdout.lines().last().unwrap();
    assert!(
        summary.starts_with(
            "14 triggers: 14 judged (4 OK, 10 NG, 0 ERROR), 0 dropped | trigger->pin p50 "
        ),
        "{summary}"
    );
    assert!(summary.ends_with("pulses ok 4 ng 10 error 0"), "{summary}");

    let out = edgevlm(&[
        "inspect",
        "--board",
        "sim",
        "--json",
        "--model",
        demo.to_str().unwrap(),
        demo.join("samples").to_str().unwrap(),
    ]);
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = &rows.last().unwrap()["summary"];
    assert_eq!(
        (summary["processed"].as_u64(), summary["dropped"].as_u64()),
        (Some(12), Some(0))
    );
    assert!(rows[0]["latency_us"].as_u64().unwrap() > 0);
}

#[test]
fn agent_drains_on_sigterm_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("agent.toml");
    let demo = models().join("demo");
    std::fs::write(
        &config,
        format!(
            "[board]\nkind = \"sim\"\n[model]\npackage = {:?}\n[sim]\nimages = {:?}\ntriggers = 100000\nperiod_ms = 5\n[outputs]\npulse_ms = 2\n[ng_images]\ndir = \"ng\"\nkeep = 5\n",
            demo.display().to_string(),
            demo.join("samples").display().to_string()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_edgevlm"))
        .args(["agent", "--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr
            .lines()
            .next()
            .unwrap()
            .starts_with("event=start board=sim"),
        "{stderr}"
    );
    assert!(stderr.contains("event=part seq=0 verdict=NG"), "{stderr}");
    let summary = stderr.lines().last().unwrap();
    assert!(summary.starts_with("event=summary triggers="), "{summary}");
    let field = |k: &str| {
        summary
            .split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(field("triggers") > 10, "{summary}");
    assert_eq!(
        field("judged") + field("dropped"),
        field("triggers"),
        "{summary}"
    );
    // NG frames were saved and rotated to the newest 5.
    assert_eq!(std::fs::read_dir(tmp.path().join("ng")).unwrap().count(), 5);
}

#[test]
fn agent_config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "[board]\nkind = \"sim\"\n[model]\npackage = \"x\"\n[sim]\nimages = \"y\"\ntriggers = 1\nperiod_ms = 0\n").unwrap();
    let out = edgevlm(&["agent", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("agent.toml: field `sim.period_ms`: expected at least 1"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn agent_switches_models_on_sighup_and_keeps_the_old_one_when_the_new_is_bad() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = models().join("demo");
    let v2 = tmp.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::copy(demo.join("model.onnx"), v2.join("model.onnx")).unwrap();
    let manifest = std::fs::read_to_string(demo.join("model.toml")).unwrap();
    std::fs::write(
        v2.join("model.toml"),
        manifest.replacen("version = \"1.0.0\"", "version = \"2.0.0\"", 1),
    )
    .unwrap();
    let config = tmp.path().join("agent.toml");
    let write_config = |package: &std::path::Path| {
        std::fs::write(
            &config,
            format!(
                "[board]\nkind = \"sim\"\n[model]\npackage = {:?}\n[sim]\nimages = {:?}\ntriggers = 100000\nperiod_ms = 10\n[outputs]\npulse_ms = 2\n",
                package.display().to_string(),
                demo.join("samples").display().to_string()
            ),
        )
        .unwrap()
    };
    write_config(&demo);
    let child = Command::new(env!("CARGO_BIN_EXE_edgevlm"))
        .args(["agent", "--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let signal = |sig: &str| {
        std::thread::sleep(std::time::Duration::from_millis(700));
        assert!(Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success());
    };
    signal("-CONT"); // a pause: the agent reads the config at start-up
    write_config(&tmp.path().join("missing-package"));
    signal("-HUP");
    signal("-CONT"); // just a pause: let the failed load be reported before rewriting the config
    write_config(&v2);
    signal("-HUP");
    signal("-TERM");
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let rejected = stderr.find("event=model_rejected").expect(&stderr);
    let switched = stderr
        .find("event=model_switched name=demo-parts version=2.0.0")
        .expect(&stderr);
    assert!(rejected < switched);
    assert!(
        stderr[rejected..]
            .lines()
            .next()
            .unwrap()
            .contains("missing-package"),
        "{stderr}"
    );
    // Parts kept flowing between and after the reloads; nothing was dropped.
    assert!(
        stderr[rejected..switched].contains("event=part"),
        "{stderr}"
    );
    assert!(stderr[switched..].contains("event=part"), "{stderr}");
    let summary = stderr.lines().last().unwrap();
    assert!(
        summary.contains(" dropped=0 ") && summary.contains(" model_switches=1 "),
        "{summary}"
    );
}

#[test]
fn agent_takes_triggers_from_stdin_or_a_script_and_a_test_pattern_camera() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let demo = models().join("demo");
    let config = tmp.path().join("agent.toml");
    let write = |sim: &str| {
        std::fs::write(
            &config,
            format!("[board]\nkind = \"sim\"\n[model]\npackage = {:?}\n[sim]\n{sim}\n[outputs]\npulse_ms = 2\n", demo.display().to_string()),
        )
        .unwrap()
    };
    let summary = |stderr: &str| stderr.lines().last().unwrap().to_string();

    // stdin: three lines, three parts, then end of input ends the run.
    write(&format!(
        "images = {:?}\nstdin = true",
        demo.join("samples").display().to_string()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgevlm"))
        .args(["agent", "--config", config.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"part\npart\npart\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        summary(&stderr).contains("triggers=3 judged=3 ok=0 ng=3 error=0 dropped=0"),
        "{stderr}"
    );

    // A script of offsets, and the generated test pattern as the camera.
    std::fs::write(
        tmp.path().join("triggers.txt"),
        "0\n# then two more\n40\n80\n",
    )
    .unwrap();
    write("images = \"test-pattern\"\nscript = \"triggers.txt\"");
    let out = edgevlm(&["agent", "--config", config.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(summary(&stderr).contains("triggers=3 judged=3"), "{stderr}");
    assert!(summary(&stderr).contains(" error=0 "), "{stderr}");
    assert!(stderr.contains("source=\"test-pattern-0\""), "{stderr}");

    // Two trigger sources at once is a config error naming the section.
    write("images = \"test-pattern\"\nscript = \"triggers.txt\"\nstdin = true");
    let out = edgevlm(&["agent", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("field `sim`: expected exactly one trigger source"),
        "{}",
        text(&out.stderr)
    );
    // A broken script names its line.
    std::fs::write(tmp.path().join("triggers.txt"), "0\nsoon\n").unwrap();
    write("images = \"test-pattern\"\nscript = \"triggers.txt\"");
    let out = edgevlm(&["agent", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("triggers.txt: line 2: \"soon\" is not a millisecond offset"),
        "{}",
        text(&out.stderr)
    );
}
