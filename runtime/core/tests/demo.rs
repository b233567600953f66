//! The bundled demo package (the embedded default) classifies its held-out samples correctly and
//! agrees with the ONNX Runtime probabilities the generator computed with PIL preprocessing.

mod common;

use edgevlm_runtime::{Classifier, LoadOptions, Stage, Verdict};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    file: String,
    label: String,
    probs: Vec<f32>,
}

#[test]
fn demo_samples_get_the_right_verdicts() {
    let demo = common::models().join("demo");
    let expected: Vec<Expected> =
        serde_json::from_str(&std::fs::read_to_string(demo.join("expected.json")).unwrap())
            .unwrap();
    assert!(expected.len() >= 9, "too few samples");
    let mut c = Classifier::load(&demo, &LoadOptions::default()).unwrap();
    let labels = c
        .package()
        .manifest()
        .output
        .as_ref()
        .unwrap()
        .labels
        .clone();
    for e in &expected {
        let r = c.inspect_file(&demo.join("samples").join(&e.file)).unwrap();
        let want = if e.label == "ok" {
            Verdict::Ok
        } else {
            Verdict::Ng
        };
        assert_eq!(r.verdict, want, "{}: {:?}", e.file, r.classes);
        assert_eq!(r.classes[0].label, e.label, "{}", e.file);
        // fast_image_resize and PIL both use a triangle filter scaled to the downscale factor;
        // rounding differences of a grey level stay well inside this bound.
        for score in &r.classes {
            let i = labels.iter().position(|l| *l == score.label).unwrap();
            assert!(
                (score.probability - e.probs[i]).abs() < 0.05,
                "{} {}: {} vs ort {}",
                e.file,
                score.label,
                score.probability,
                e.probs[i]
            );
        }
        for stage in [
            Stage::Decode,
            Stage::Preprocess,
            Stage::Infer,
            Stage::Postprocess,
        ] {
            assert!(
                r.trace.spans.iter().any(|s| s.stage == stage),
                "{stage:?} missing"
            );
        }
        assert!(r.trace.memory.peak_rss_kb > 0);
    }
}
