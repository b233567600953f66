//! `edgevlm models import`, `generate` and `inspect` with generation packages, end to end on the
//! generated SmolVLM2-layout and Mistral-layout fixture snapshots.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vlm() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/vlm")
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

fn import(snapshot: &str, variant: &str, out: &Path) {
    let o = edgevlm(&[
        "models",
        "import",
        vlm().join(snapshot).to_str().unwrap(),
        "--variant",
        variant,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).starts_with("wrote "), "{}", text(&o.stdout));
}

#[test]
fn generate_streams_text_then_reports_timings_and_json_matches_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("smolvlm");
    import("smolvlm", "fp32", &pkg);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(vlm().join("references/smolvlm.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["cases"][0];
    let image = vlm().join(case["image"].as_str().unwrap());
    let base = [
        "generate",
        "--model",
        pkg.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "16",
        "--ignore-eos",
    ];
    let o = edgevlm(&[&base[..], &["--json"]].concat());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let json: serde_json::Value = serde_json::from_str(&text(&o.stdout)).unwrap();
    // A PNG decodes exactly as PIL decodes it: the CLI path gives ONNX Runtime's tokens.
    assert_eq!(json["token_ids"], case["greedy"]["fp32"]);
    assert_eq!(json["stop_reason"], "max_tokens");
    let stats = &json["stats"];
    assert_eq!(
        stats["prompt_tokens"],
        case["input_ids"].as_array().unwrap().len()
    );
    assert_eq!(stats["image_tokens"], case["num_image_tokens"]);
    for key in [
        "vision_encode_ms",
        "ttft_ms",
        "prefill_tok_s",
        "decode_tok_s",
    ] {
        assert!(stats[key].as_f64().unwrap() > 0.0, "{key}: {stats}");
    }
    assert!(stats["peak_rss_kib"].as_u64().unwrap() > 0);
    // Without a warm-up the prompt and image are prepared while the decoder loads; with one,
    // the reported run prepares them itself: the same tokens.
    let o = edgevlm(&[&base[..], &["--json", "--warmup", "1"]].concat());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let warm: serde_json::Value = serde_json::from_str(&text(&o.stdout)).unwrap();
    assert_eq!(warm["token_ids"], case["greedy"]["fp32"]);

    let o = edgevlm(&base);
    assert!(o.status.success());
    assert_eq!(
        text(&o.stdout).trim_end(),
        json["text"].as_str().unwrap().trim_end()
    );
    let err = text(&o.stderr);
    for part in [
        "TTFT",
        "prefill",
        "decode",
        "tok/s",
        "vision encode",
        "peak RSS",
    ] {
        assert!(err.contains(part), "{part} missing in {err}");
    }
}

#[test]
fn generate_and_import_errors_name_the_cause_with_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("mistral");
    import("mistral", "q4", &pkg);
    let o = edgevlm(&[
        "generate",
        "--model",
        pkg.to_str().unwrap(),
        "--prompt",
        "hello",
        "--image",
        vlm().join("images/wide_50x30.png").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("text-only and takes no image"),
        "{}",
        text(&o.stderr)
    );
    let o = edgevlm(&[
        "models",
        "import",
        vlm().join("mistral").to_str().unwrap(),
        "--variant",
        "bnb4",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("edgevlm: importing") && err.contains("model_bnb4.onnx"),
        "{err}"
    );
    let o = edgevlm(&[
        "generate",
        "--model",
        vlm().join("../../demo").to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("not a generation package"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn inspect_asks_a_vlm_package_its_question_and_reports_verdict_and_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("smolvlm");
    import("smolvlm", "q4", &pkg);
    // Without [inspection] the package cannot judge parts.
    let images = vlm().join("images");
    let o = edgevlm(&[
        "inspect",
        "--model",
        pkg.to_str().unwrap(),
        images.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("[inspection]"),
        "{}",
        text(&o.stderr)
    );

    let manifest = pkg.join("model.toml");
    let mut m = std::fs::read_to_string(&manifest).unwrap();
    // The random-weight model answers noise: both rules are exercised across the images.
    m.push_str("\n[inspection]\nquestion = \"Is there a scratch on this part?\"\nng = [\"yes\"]\nok = [\"n\", \"a\", \"e\", \"i\", \"o\", \"s\", \"t\"]\nmax_new_tokens = 4\n");
    std::fs::write(&manifest, m).unwrap();
    let o = edgevlm(&[
        "inspect",
        "--model",
        pkg.to_str().unwrap(),
        images.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let lines: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "5 images and a summary");
    for l in &lines[..5] {
        let answer = l["answer"].as_str().unwrap().trim_start().to_lowercase();
        let ok = ["n", "a", "e", "i", "o", "s", "t"]
            .iter()
            .any(|p| answer.starts_with(p))
            && !answer.starts_with("yes");
        assert_eq!(l["verdict"], if ok { "OK" } else { "NG" }, "{l}");
        assert!(l["stats"]["vision_encode_ms"].as_f64().unwrap() > 0.0);
    }
    let summary = &lines[5]["summary"];
    assert_eq!(summary["images"], 5);
    assert_eq!(
        summary["ok"].as_u64().unwrap() + summary["ng"].as_u64().unwrap(),
        5
    );
}

#[test]
fn the_simulated_station_judges_parts_with_a_vlm_package() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("smolvlm");
    import("smolvlm", "int8", &pkg);
    let manifest = pkg.join("model.toml");
    let mut m = std::fs::read_to_string(&manifest).unwrap();
    m.push_str("\n[inspection]\nquestion = \"Is there a scratch on this part?\"\nng = [\"yes\"]\nok = [\"n\", \"a\", \"e\", \"i\", \"o\", \"s\", \"t\"]\nmax_new_tokens = 3\n");
    std::fs::write(&manifest, m).unwrap();
    let images = vlm().join("images");
    let o = edgevlm(&[
        "inspect",
        "--board",
        "sim",
        "--model",
        pkg.to_str().unwrap(),
        images.to_str().unwrap(),
        "--period-ms",
        "20",
        "--json",
    ]);
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", text(&o.stderr));
    let parts: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.contains("\"sequence\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parts.len(), 5, "{stdout}");
    for p in &parts {
        let answer = p["label"].as_str().expect("the answer is the part's label");
        let lower = answer.trim_start().to_lowercase();
        let ok = ["n", "a", "e", "i", "o", "s", "t"]
            .iter()
            .any(|x| lower.starts_with(x))
            && !lower.starts_with("yes");
        assert_eq!(p["signal"], if ok { "OK" } else { "NG" }, "{p}");
        assert!(p["probability"].is_null());
    }
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let pulses = &summary["pulses"];
    assert_eq!(
        pulses["ok"].as_u64().unwrap() + pulses["ng"].as_u64().unwrap(),
        5,
        "{summary}"
    );
}

#[test]
fn bench_on_the_local_board_reports_tokens_of_a_text_model() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("mistral");
    import("mistral", "q4", &pkg);
    let o = Command::new(env!("CARGO_BIN_EXE_edgevlm"))
        .args([
            "bench",
            "--board",
            "local",
            "--model",
            pkg.to_str().unwrap(),
            "--prompt",
            "Is there a scratch on the part?",
            "--max-new-tokens",
            "5",
            "--iterations",
            "3",
            "--warmup",
            "1",
            "--json",
        ])
        .env("EDGEVLM_HOME", tmp.path().join("home"))
        .env_remove("EDGEVLM_BOARDS")
        .env("HOME", tmp.path())
        .env_remove("EDGEVLM_DB")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let record: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    let tokens = &record["tokens"];
    assert!(tokens["prompt_tokens"].as_u64().unwrap() > 5, "{record}");
    let generated = tokens["generated_tokens"].as_u64().unwrap();
    assert!((3..=15).contains(&generated), "{record}");
    assert!(tokens["decode_tok_s"].as_f64().unwrap() > 0.0, "{record}");
}
