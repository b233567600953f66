//! Bad input gets a clear error naming the file, field or tensor, and never a panic.

mod common;

use std::path::Path;

use edgevlm_runtime::{npy, Classifier, Error, LoadOptions, OnnxModel, Tensor};

fn load_err(path: &Path) -> String {
    format!(
        "{:#}",
        chain(OnnxModel::load(path, &LoadOptions::default()).unwrap_err())
    )
}

/// The error and its cause chain, as `edgevlm: {err:#}` prints it.
fn chain(e: Error) -> String {
    edgevlm_runtime::error_chain(&e)
}

fn demo_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("demo");
    common::copy_dir(&common::models().join("demo"), &pkg);
    (tmp, pkg)
}

fn classifier_err(pkg: &Path) -> String {
    chain(Classifier::load(pkg, &LoadOptions::default()).unwrap_err())
}

#[test]
fn truncated_and_non_onnx_files() {
    let bad = common::models().join("fixtures/bad");
    let e = load_err(&bad.join("truncated.onnx"));
    assert!(
        e.contains("truncated.onnx: not a valid ONNX protobuf"),
        "{e}"
    );
    let e = load_err(&bad.join("not_onnx.onnx"));
    assert!(e.contains("not_onnx.onnx: "), "{e}");
    assert!(
        e.contains("not a valid ONNX protobuf") || e.contains("holds no graph"),
        "{e}"
    );
    let e = load_err(&bad.join("does_not_exist.onnx"));
    assert!(
        e.starts_with("opening ") && e.contains("does_not_exist.onnx"),
        "{e}"
    );
}

#[test]
fn sha256_mismatch_names_both_hashes() {
    let (_tmp, pkg) = demo_copy();
    let mut bytes = std::fs::read(pkg.join("model.onnx")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(pkg.join("model.onnx"), bytes).unwrap();
    let e = classifier_err(&pkg);
    assert!(
        e.contains("model.onnx: sha256 mismatch: manifest says d")
            || e.contains("sha256 mismatch: manifest says"),
        "{e}"
    );
    assert!(e.contains("file has "), "{e}");
}

#[test]
fn symlinked_graph_is_refused() {
    let (tmp, pkg) = demo_copy();
    let elsewhere = tmp.path().join("elsewhere.onnx");
    std::fs::rename(pkg.join("model.onnx"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, pkg.join("model.onnx")).unwrap();
    let e = classifier_err(&pkg);
    assert!(
        e.contains("model.toml: field `graph.file`: model.onnx: not a regular file"),
        "{e}"
    );
}

#[test]
fn missing_graph_file() {
    let (_tmp, pkg) = demo_copy();
    std::fs::remove_file(pkg.join("model.onnx")).unwrap();
    let e = classifier_err(&pkg);
    assert!(
        e.contains("opening graph file") && e.contains("model.onnx") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn manifest_missing_unknown_and_mistyped_fields() {
    let (_tmp, pkg) = demo_copy();
    let manifest = pkg.join("model.toml");
    let good = std::fs::read_to_string(&manifest).unwrap();
    let cases = [
        (
            good.replace("tensor = \"image\"\n", ""),
            "field `input.tensor`: required field is missing",
        ),
        (
            good.replace("width = 64", "width = 64\nwidht = 64"),
            "field `input.widht`: unknown field",
        ),
        (
            good.replace("height = 64", "height = -3"),
            "field `input.height`: invalid value: integer `-3`, expected u32",
        ),
        (
            good.replace("tensor = \"probs\"", "tensor = \"scores\""),
            "field `output.tensor`: \"scores\": the graph's outputs are [\"probs\"]",
        ),
        (
            good.replace("tensor = \"image\"", "tensor = \"pixels\""),
            "field `input.tensor`",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&manifest, text).unwrap();
        let e = classifier_err(&pkg);
        assert!(
            e.contains("model.toml: field") && e.contains(expected),
            "expected {expected:?} in {e:?}"
        );
    }
    std::fs::remove_file(&manifest).unwrap();
    let e = classifier_err(&pkg);
    assert!(e.starts_with("reading ") && e.contains("model.toml"), "{e}");
}

#[test]
fn files_that_are_not_images() {
    let mut c = Classifier::load(&common::models().join("demo"), &LoadOptions::default()).unwrap();
    let bad = common::models().join("fixtures/bad");
    let e = chain(c.inspect_file(&bad.join("not_an_image.png")).unwrap_err());
    assert!(e.contains("not_an_image.png: not an image"), "{e}");
    let e = chain(c.inspect_file(&bad.join("truncated.jpg")).unwrap_err());
    assert!(e.contains("truncated.jpg: cannot decode Jpeg"), "{e}");
}

#[test]
fn input_of_wrong_shape_or_dtype() {
    let model = OnnxModel::load(
        &common::models().join("fixtures/fp32/model.onnx"),
        &LoadOptions::default(),
    )
    .unwrap();
    let wrong_shape = Tensor::zero::<f32>(&[1, 3, 30, 32]).unwrap();
    let e = model.run(vec![wrong_shape]).unwrap_err().to_string();
    assert_eq!(
        e,
        "input `input`: expected f32 [batch,3,32,32], got f32 [1, 3, 30, 32]"
    );
    let wrong_dtype = Tensor::zero::<i64>(&[1, 3, 32, 32]).unwrap();
    let e = model.run(vec![wrong_dtype]).unwrap_err().to_string();
    assert_eq!(
        e,
        "input `input`: expected f32 [batch,3,32,32], got i64 [1, 3, 32, 32]"
    );
    let e = model.run(vec![]).unwrap_err().to_string();
    assert!(e.contains("model takes 1 inputs (input), got 0"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.npy");
    std::fs::write(&p, b"\x93NUMPY\x01\x00").unwrap();
    assert!(npy::read(&p).unwrap_err().to_string().contains("x.npy: "));
}
