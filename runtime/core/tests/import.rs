//! `models import` on the generated snapshots, and what the generation pipeline refuses:
//! unsupported operators, mismatched tokenizers, broken configs, bad images, long prompts.

mod common;

use std::path::{Path, PathBuf};

use edgevlm_runtime::import::{import, variants, ImportOptions};
use edgevlm_runtime::preprocess::decode_image;
use edgevlm_runtime::{Error, GenerateOptions, Generator, LoadOptions};
use prost::Message;

fn snapshot(name: &str) -> PathBuf {
    common::models().join("fixtures/vlm").join(name)
}

fn options(variant: &str) -> ImportOptions {
    ImportOptions {
        variant: Some(variant.into()),
        ..Default::default()
    }
}

/// A writable copy of a snapshot.
fn copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    common::copy_dir(&snapshot(name), &dir);
    (tmp, dir)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn imports_every_variant_into_a_package_that_loads_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        variants(
            &snapshot("smolvlm"),
            edgevlm_runtime::hf::Architecture::Idefics3
        ),
        ["fp32", "int8", "q4"]
    );
    for (name, variant) in [("smolvlm", "fp32"), ("smolvlm", "q4"), ("mistral", "int8")] {
        let out = tmp.path().join(format!("{name}-{variant}"));
        let imported = import(&snapshot(name), &out, &options(variant)).unwrap();
        let m = &imported.manifest;
        assert_eq!(m.model.variant, variant);
        let files: Vec<_> = m.file.iter().map(|f| f.path.as_str()).collect();
        assert!(
            files.contains(&"config.json") && files.contains(&"tokenizer.json"),
            "{files:?}"
        );
        let (package, mut g) = Generator::open(&out, &LoadOptions::default()).unwrap();
        if name == "smolvlm" {
            assert_eq!(package.manifest().graph.len(), 3);
            assert!(package.graph_path("decoder").unwrap().ends_with(format!(
                "decoder_model_merged{}.onnx",
                if variant == "fp32" { "" } else { "_q4" }
            )));
            let img = decode_image(
                &std::fs::read(snapshot("images/wide_50x30.png")).unwrap(),
                "wide",
            )
            .unwrap();
            let prompt = g.chat_prompt("Is there a scratch?", true).unwrap();
            let mut streamed = String::new();
            let r = g
                .generate(
                    &prompt,
                    Some(&img),
                    &GenerateOptions {
                        max_new_tokens: 5,
                        ..Default::default()
                    },
                    &mut |_, t| streamed.push_str(t),
                )
                .unwrap();
            assert!(r.stats.image_tokens > 0 && r.stats.image_frames == 7);
            assert!(r.token_ids.len() <= 5 && !r.token_ids.is_empty());
            assert!(
                r.text.starts_with(&streamed),
                "{:?} vs streamed {streamed:?}",
                r.text
            );
        } else {
            let prompt = g.chat_prompt("Is there a scratch?", false).unwrap();
            assert!(prompt.starts_with("<s>[INST]"), "{prompt}");
            let r = g
                .generate(
                    &prompt,
                    None,
                    &GenerateOptions {
                        max_new_tokens: 4,
                        ..Default::default()
                    },
                    &mut |_, _| {},
                )
                .unwrap();
            assert!(!r.token_ids.is_empty());
        }
        // A tampered file is caught when the package opens.
        std::fs::write(out.join("tokenizer.json"), b"{}").unwrap();
        let e = Generator::open(&out, &LoadOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Checksum { .. }), "{e}");
    }
    // Nothing but the packages in the output folder: no staging leftovers.
    assert_eq!(
        leftovers(tmp.path()).len(),
        3,
        "{:?}",
        leftovers(tmp.path())
    );
}

#[test]
fn import_refuses_missing_variants_existing_outputs_and_unknown_models() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pkg");
    let e = import(&snapshot("smolvlm"), &out, &options("q4f16"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vision_encoder_q4f16.onnx") && e.contains("[\"fp32\", \"int8\", \"q4\"]"),
        "{e}"
    );
    std::fs::create_dir(&out).unwrap();
    let e = import(&snapshot("mistral"), &out, &options("fp32"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");

    let (_t, dir) = copy("mistral");
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"mistral\"", "\"gpt2\"")).unwrap();
    let e = import(&dir, &tmp.path().join("x"), &options("fp32"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json: field `model_type`: \"gpt2\" is not supported"),
        "{e}"
    );
    std::fs::write(&config, text.replace("\"num_hidden_layers\"", "\"layers\"")).unwrap();
    let e = import(&dir, &tmp.path().join("x"), &options("fp32"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("field `num_hidden_layers`: required key is missing"),
        "{e}"
    );
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn a_graph_with_an_operator_tract_lacks_is_refused_at_import_by_name() {
    let (_t, dir) = copy("mistral");
    let path = dir.join("onnx/model.onnx");
    let mut proto =
        tract_onnx::pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let node = graph
        .node
        .iter_mut()
        .find(|n| n.op_type == "Sigmoid")
        .unwrap();
    node.op_type = "QLinearSigmoid".into();
    node.domain = "com.microsoft".into();
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    let out = dir.parent().unwrap().join("pkg");
    let e = import(&dir, &out, &options("fp32"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.onnx") && e.contains("com.microsoft.QLinearSigmoid"),
        "{e}"
    );
    assert!(!out.exists());

    // A truncated graph: the file and the cause are named.
    let bytes = std::fs::read(dir.join("onnx/model_q4.onnx")).unwrap();
    std::fs::write(dir.join("onnx/model_q4.onnx"), &bytes[..bytes.len() / 2]).unwrap();
    let e = import(&dir, &out, &options("q4")).unwrap_err().to_string();
    assert!(
        e.contains("model_q4.onnx") && e.contains("not a valid ONNX protobuf"),
        "{e}"
    );
}

#[test]
fn a_tokenizer_from_another_model_is_refused_at_load() {
    // Mistral's tokenizer with SmolVLM's graphs: <image> is missing.
    let (_t, dir) = copy("smolvlm");
    std::fs::copy(
        snapshot("mistral/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let e = import(&dir, &dir.parent().unwrap().join("pkg"), &options("fp32"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json")
            && e.contains("image_token_id")
            && e.contains("do not belong together"),
        "{e}"
    );

    // SmolVLM's larger tokenizer with Mistral's graphs: ids past the vocabulary.
    let (_t2, dir) = copy("mistral");
    std::fs::copy(
        snapshot("smolvlm/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let e = import(&dir, &dir.parent().unwrap().join("pkg"), &options("fp32"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("token ids up to") && e.contains("vocab_size"),
        "{e}"
    );

    // A config that disagrees with the graph.
    let (_t3, dir) = copy("mistral");
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4");
    std::fs::write(&config, text).unwrap();
    let e = import(&dir, &dir.parent().unwrap().join("pkg"), &options("fp32"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("past_key_values.0.key") && e.contains("4 key/value heads"),
        "{e}"
    );
}

#[test]
fn bad_images_and_long_prompts_get_clear_errors() {
    let dir = snapshot("smolvlm");
    let graphs = edgevlm_runtime::generate::GraphPaths {
        decoder: dir.join("onnx/decoder_model_merged.onnx"),
        embed_tokens: Some(dir.join("onnx/embed_tokens.onnx")),
        vision_encoder: Some(dir.join("onnx/vision_encoder.onnx")),
    };
    let mut g = Generator::load(&dir, &graphs, &LoadOptions::default()).unwrap();
    for (bytes, expected) in [
        (vec![], "empty file"),
        (b"not an image at all".to_vec(), "not an image"),
        (
            std::fs::read(common::models().join("fixtures/bad/truncated.jpg")).unwrap(),
            "truncated",
        ),
    ] {
        let e = decode_image(&bytes, "part.jpg").unwrap_err().to_string();
        assert!(e.contains("part.jpg") && e.contains(expected), "{e}");
    }
    // A PNG header claiming 100000 x 100000 pixels is refused before anything is allocated.
    let mut huge = std::fs::read(snapshot("images/wide_50x30.png")).unwrap();
    huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let e = decode_image(&huge, "huge.png").unwrap_err().to_string();
    assert!(e.contains("huge.png"), "{e}");

    let img = decode_image(
        &std::fs::read(snapshot("images/tiny_7x5.png")).unwrap(),
        "tiny",
    )
    .unwrap();
    let no_placeholder = g.generate(
        "no image here",
        Some(&img),
        &GenerateOptions::default(),
        &mut |_, _| {},
    );
    assert!(no_placeholder
        .unwrap_err()
        .to_string()
        .contains("0 <image> placeholders"));
    let prompt = g.chat_prompt("x", true).unwrap();
    let without = g.generate(&prompt, None, &GenerateOptions::default(), &mut |_, _| {});
    assert!(without
        .unwrap_err()
        .to_string()
        .contains("no image was given"));

    // Longer than max_position_embeddings (8192 here): the error names the limit.
    let long = g.chat_prompt(&"yes no ".repeat(5000), true).unwrap();
    let e = g
        .generate(
            &long,
            Some(&img),
            &GenerateOptions::default(),
            &mut |_, _| {},
        )
        .unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(e, Error::ContextLength { limit: 8192, .. }),
        "{text}"
    );
    assert!(
        text.contains("context limit of 8192 tokens") && text.contains("image tokens"),
        "{text}"
    );
}
