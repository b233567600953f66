//! `model.toml`: the manifest of a model package.
//!
//! ```toml
//! [model]
//! name = "demo-parts"
//! version = "1.0.0"
//! task = "classification"          # classification | raw
//!
//! [[graph]]
//! role = "main"
//! file = "model.onnx"
//! sha256 = "<64 hex digits>"
//!
//! [input]                           # how a camera image becomes the input tensor
//! tensor = "image"
//! width = 64
//! height = 64
//! layout = "NCHW"                   # NCHW | NHWC
//! channels = "RGB"                  # RGB | BGR | GRAY
//! resize = "stretch"                # stretch | letterbox | center-crop
//! filter = "bilinear"               # nearest | bilinear | bicubic | lanczos3
//! scale = 0.00392156862745098       # u8 pixels are multiplied by this, then (x - mean) / std
//! mean = [0.5, 0.5, 0.5]
//! std = [0.25, 0.25, 0.25]
//!
//! [output]
//! tensor = "probs"
//! decode = "probabilities"          # probabilities | logits (softmax applied) | sigmoid
//! labels = ["ok", "scratch", "missing_hole"]
//!
//! [verdict]                         # NG when any listed label reaches its probability, else OK
//! ng = { scratch = 0.5, missing_hole = 0.5 }
//! ```
//!
//! Generation packages (`edgevlm models import` writes them from a Hugging Face snapshot) list
//! their graphs by role and every other file they load with its hash:
//!
//! ```toml
//! [model]
//! name = "smolvlm2-256m"
//! version = "1.0.0"
//! task = "vision-language"          # or "text-generation"
//! variant = "q4"
//!
//! [[graph]]                         # roles: vision_encoder, embed_tokens, decoder
//! role = "decoder"
//! file = "onnx/decoder_model_merged_q4.onnx"
//! sha256 = "..."
//!
//! [[file]]                          # config.json, tokenizer.json, templates, external weights
//! path = "config.json"
//! sha256 = "..."
//!
//! [generation]
//! architecture = "idefics3"         # idefics3 | llama | mistral | qwen2
//! max_new_tokens = 64
//! stop = ["<end_of_utterance>"]
//!
//! [inspection]                      # optional: lets `edgevlm inspect` judge parts with a VLM
//! question = "Is there a scratch on the part? Answer yes or no."
//! ng = ["yes"]                      # answers starting with one of these are NG
//! ok = ["no"]                       # ... with one of these OK; anything else is NG
//! ```

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A parsed and validated `model.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Identity and task.
    pub model: ModelInfo,
    /// Graph files with their hashes.
    pub graph: Vec<GraphFile>,
    /// Image-to-tensor preprocessing (required for `classification`).
    pub input: Option<InputSpec>,
    /// Output decoding (required for `classification`).
    pub output: Option<OutputSpec>,
    /// Output-to-verdict rule (required for `classification`).
    pub verdict: Option<VerdictRule>,
    /// Other files the package loads (configs, tokenizer, external weights), hash-checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file: Vec<PackageFile>,
    /// Generation settings (required for `vision-language` and `text-generation`).
    pub generation: Option<GenerationSpec>,
    /// Question and answer rule for inspecting parts with a VLM.
    pub inspection: Option<InspectionSpec>,
}

/// `[[file]]`: a non-graph file of the package.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PackageFile {
    /// Path relative to the package directory.
    pub path: String,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
}

/// `[generation]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    /// Model family (`idefics3`, `llama`, `mistral`, `qwen2`), detected at import.
    pub architecture: String,
    /// Default for `--max-new-tokens`.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Generation stops when one of these appears in the text.
    #[serde(default)]
    pub stop: Vec<String>,
}

fn default_max_new_tokens() -> usize {
    64
}

/// `[inspection]`: how a VLM's answer becomes a verdict.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InspectionSpec {
    /// The question asked about every image.
    pub question: String,
    /// Answers starting with one of these (case-insensitive, leading blanks ignored) are NG.
    pub ng: Vec<String>,
    /// Answers starting with one of these are OK. Any other answer is NG: an inspection that
    /// cannot tell is not a pass.
    #[serde(default)]
    pub ok: Vec<String>,
    /// Tokens to generate for the answer.
    #[serde(default = "default_answer_tokens")]
    pub max_new_tokens: usize,
}

fn default_answer_tokens() -> usize {
    16
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Package name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Package version.
    pub version: String,
    /// What the model does.
    pub task: Task,
    /// Which export of the model this is (`fp32`, `int8`, `q4`, ...), for comparisons.
    #[serde(default)]
    pub variant: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// What the package's outputs mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One image in, class scores out, a verdict from the scores.
    Classification,
    /// Outputs are reported as they are.
    Raw,
    /// Image + prompt in, text out (SmolVLM-style three-graph export).
    VisionLanguage,
    /// Prompt in, text out (decoder-only LLM export).
    TextGeneration,
}

impl Task {
    /// True for the generation tasks.
    pub fn generates(self) -> bool {
        matches!(self, Task::VisionLanguage | Task::TextGeneration)
    }
}

/// `[[graph]]`: one ONNX file of the package.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    /// What the graph is for (`main`; VLMs add `vision_encoder`, `embed_tokens`, `decoder`).
    pub role: String,
    /// Path relative to the package directory.
    pub file: String,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
}

/// Tensor memory layout of an image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Layout {
    /// Batch, channel, height, width.
    NCHW,
    /// Batch, height, width, channel.
    NHWC,
}

/// Channel order of an image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Channels {
    /// Red, green, blue.
    RGB,
    /// Blue, green, red (OpenCV-trained models).
    BGR,
    /// One luma channel.
    GRAY,
}

impl Channels {
    /// Number of channels.
    pub fn count(self) -> usize {
        if self == Channels::GRAY {
            1
        } else {
            3
        }
    }
}

/// How the camera image is fitted to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Scale each axis independently.
    Stretch,
    /// Keep the aspect ratio, pad the rest with `pad`.
    Letterbox,
    /// Keep the aspect ratio, crop the centre.
    CenterCrop,
}

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    /// Nearest neighbour.
    Nearest,
    /// Triangle filter (PIL `BILINEAR`).
    Bilinear,
    /// Catmull-Rom (PIL `BICUBIC`).
    Bicubic,
    /// Lanczos3 (PIL `LANCZOS`).
    Lanczos3,
}

/// Element type of an image input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputDtype {
    /// Normalized floats.
    #[default]
    F32,
    /// Raw pixels; `scale`, `mean` and `std` must be left at their defaults.
    U8,
}

/// `[input]`: how an image becomes the input tensor.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Input tensor name in the graph.
    pub tensor: String,
    /// Model input width in pixels.
    pub width: u32,
    /// Model input height in pixels.
    pub height: u32,
    /// Tensor layout.
    pub layout: Layout,
    /// Channel order.
    pub channels: Channels,
    /// How the image is fitted.
    pub resize: ResizeMode,
    /// Resampling filter.
    #[serde(default = "default_filter")]
    pub filter: Filter,
    /// Element type.
    #[serde(default)]
    pub dtype: InputDtype,
    /// Multiplier applied to u8 pixels before mean/std.
    #[serde(default = "one")]
    pub scale: f32,
    /// Per-channel mean (after `scale`).
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation (after `scale`).
    pub std: Option<Vec<f32>>,
    /// Letterbox padding pixel value (0-255).
    #[serde(default)]
    pub pad: u8,
}

fn default_filter() -> Filter {
    Filter::Bilinear
}

fn one() -> f32 {
    1.0
}

/// How raw outputs become class probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decode {
    /// The graph already outputs probabilities.
    Probabilities,
    /// Softmax is applied to the output.
    Logits,
    /// Independent per-class sigmoid (multi-label).
    Sigmoid,
}

/// `[output]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output tensor name in the graph.
    pub tensor: String,
    /// How to turn it into probabilities.
    pub decode: Decode,
    /// One label per class, in output order.
    pub labels: Vec<String>,
}

/// `[verdict]`: NG when any listed label's probability reaches its threshold.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictRule {
    /// Label -> minimum probability for NG.
    pub ng: BTreeMap<String, f32>,
}

impl Manifest {
    /// Reads and validates `model.toml` at `path`.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        Manifest::parse(&text, path)
    }

    /// Parses and validates manifest text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let manifest: Manifest = parse_toml(text, path)?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    /// The graph with role `role`.
    pub fn graph(&self, role: &str) -> Option<&GraphFile> {
        self.graph.iter().find(|g| g.role == role)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| Err(Error::manifest(path, field, message));
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && !s.starts_with('.')
        };
        if !name_ok(&self.model.name) {
            return bad(
                "model.name",
                format!(
                    "{:?}: expected letters, digits, '.', '_' or '-'",
                    self.model.name
                ),
            );
        }
        if !name_ok(&self.model.version) {
            return bad(
                "model.version",
                format!("{:?}: expected e.g. \"1.0.0\"", self.model.version),
            );
        }
        if self.graph.is_empty() {
            return bad("graph", "at least one [[graph]] entry is required".into());
        }
        let check_path = |field: &str, file: &str| {
            let p = Path::new(file);
            if file.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
                return bad(
                    field,
                    format!("{file:?}: expected a path inside the package (no '..', not absolute)"),
                );
            }
            Ok(())
        };
        let check_sha = |field: &str, sha: &str| {
            if sha.len() != 64
                || !sha
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            {
                return bad(field, format!("{sha:?}: expected 64 lowercase hex digits"));
            }
            Ok(())
        };
        for (i, g) in self.graph.iter().enumerate() {
            check_path(&format!("graph[{i}].file"), &g.file)?;
            check_sha(&format!("graph[{i}].sha256"), &g.sha256)?;
            if self.graph.iter().filter(|o| o.role == g.role).count() > 1 {
                return bad(
                    &format!("graph[{i}].role"),
                    format!("role {:?} appears more than once", g.role),
                );
            }
        }
        for (i, f) in self.file.iter().enumerate() {
            check_path(&format!("file[{i}].path"), &f.path)?;
            check_sha(&format!("file[{i}].sha256"), &f.sha256)?;
            if self.file[..i].iter().any(|o| o.path == f.path) {
                return bad(
                    &format!("file[{i}].path"),
                    format!("{:?} is listed twice", f.path),
                );
            }
        }
        if self.model.task.generates() {
            return self.validate_generation(path);
        }
        if let Some(field) = [
            self.generation.is_some().then_some("generation"),
            self.inspection.is_some().then_some("inspection"),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            return bad(
                field,
                "only for task = \"vision-language\" or \"text-generation\"".into(),
            );
        }
        if self.model.task != Task::Classification {
            return Ok(());
        }
        if self.graph("main").is_none() {
            return bad(
                "graph",
                "a classification package needs a graph with role = \"main\"".into(),
            );
        }
        let Some(input) = &self.input else {
            return bad("input", "required for task = \"classification\"".into());
        };
        let Some(output) = &self.output else {
            return bad("output", "required for task = \"classification\"".into());
        };
        let Some(verdict) = &self.verdict else {
            return bad("verdict", "required for task = \"classification\"".into());
        };
        if input.width == 0 || input.height == 0 || input.width > 8192 || input.height > 8192 {
            return bad(
                "input.width",
                format!("{}x{}: expected 1..=8192 each", input.width, input.height),
            );
        }
        let channels = input.channels.count();
        for (field, values) in [("input.mean", &input.mean), ("input.std", &input.std)] {
            if let Some(v) = values {
                if v.len() != channels {
                    return bad(
                        field,
                        format!(
                            "{} values for {:?}: expected {channels}",
                            v.len(),
                            input.channels
                        ),
                    );
                }
            }
        }
        if input
            .std
            .iter()
            .flatten()
            .any(|s| *s == 0.0 || !s.is_finite())
        {
            return bad("input.std", "values must be finite and non-zero".into());
        }
        if input.dtype == InputDtype::U8
            && (input.scale != 1.0 || input.mean.is_some() || input.std.is_some())
        {
            return bad(
                "input.dtype",
                "\"u8\" inputs take raw pixels: remove scale, mean and std".into(),
            );
        }
        if output.labels.is_empty() {
            return bad("output.labels", "expected at least one label".into());
        }
        for (i, l) in output.labels.iter().enumerate() {
            if output.labels[..i].contains(l) {
                return bad("output.labels", format!("label {l:?} appears twice"));
            }
        }
        if verdict.ng.is_empty() {
            return bad(
                "verdict.ng",
                "expected at least one label = minimum probability".into(),
            );
        }
        for (label, p) in &verdict.ng {
            if !output.labels.contains(label) {
                return bad(
                    &format!("verdict.ng.{label}"),
                    format!("not one of output.labels {:?}", output.labels),
                );
            }
            if !(0.0..=1.0).contains(p) {
                return bad(
                    &format!("verdict.ng.{label}"),
                    format!("{p}: expected a probability in 0..=1"),
                );
            }
        }
        Ok(())
    }
}

impl ModelInfo {
    /// The task as `model.toml` spells it.
    pub fn task_name(&self) -> String {
        task_name(self.task)
    }
}

impl Manifest {
    fn validate_generation(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| Err(Error::manifest(path, field, message));
        let Some(generation) = &self.generation else {
            return bad(
                "generation",
                format!("required for task = {:?}", task_name(self.model.task)),
            );
        };
        if crate::hf::Architecture::from_model_type(&generation.architecture).is_none() {
            return bad(
                "generation.architecture",
                format!(
                    "{:?}: expected one of {}",
                    generation.architecture,
                    crate::hf::SUPPORTED_MODEL_TYPES
                ),
            );
        }
        let roles: &[&str] = if self.model.task == Task::VisionLanguage {
            &["vision_encoder", "embed_tokens", "decoder"]
        } else {
            &["decoder"]
        };
        for role in roles {
            if self.graph(role).is_none() {
                return bad(
                    "graph",
                    format!(
                        "a {:?} package needs a graph with role = {role:?}",
                        task_name(self.model.task)
                    ),
                );
            }
        }
        for needed in [crate::hf::files::CONFIG, crate::hf::files::TOKENIZER] {
            if !self.file.iter().any(|f| f.path == needed) {
                return bad("file", format!("{needed} must be listed as a [[file]]"));
            }
        }
        if let Some(inspection) = &self.inspection {
            if self.model.task != Task::VisionLanguage {
                return bad(
                    "inspection",
                    "only vision-language packages inspect images".into(),
                );
            }
            if inspection.question.trim().is_empty() {
                return bad("inspection.question", "must not be empty".into());
            }
            if inspection.ng.is_empty() || inspection.ng.iter().any(|a| a.trim().is_empty()) {
                return bad(
                    "inspection.ng",
                    "expected at least one non-empty answer prefix, e.g. [\"yes\"]".into(),
                );
            }
            if inspection.ok.iter().any(|a| a.trim().is_empty()) {
                return bad("inspection.ok", "answer prefixes must not be empty".into());
            }
            if inspection.max_new_tokens == 0 {
                return bad("inspection.max_new_tokens", "must be at least 1".into());
            }
        }
        Ok(())
    }
}

fn task_name(task: Task) -> String {
    serde_json::to_value(task)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Deserializes TOML text into `T`, turning serde's errors into [`Error::Manifest`] errors that
/// name the file, the dotted field and the line: used for every TOML file edgevlm reads
/// (package manifests, the agent config).
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    edgevlm_config::parse_toml(text).map_err(|e| Error::manifest(path, e.field, e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
name = "demo-parts"
version = "1.0.0"
task = "classification"

[[graph]]
role = "main"
file = "model.onnx"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[input]
tensor = "image"
width = 64
height = 64
layout = "NCHW"
channels = "RGB"
resize = "stretch"
scale = 0.00392156862745098
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[output]
tensor = "probs"
decode = "probabilities"
labels = ["ok", "scratch", "missing_hole"]

[verdict]
ng = { scratch = 0.5, missing_hole = 0.6 }
"#;

    fn err(text: &str) -> String {
        Manifest::parse(text, Path::new("pkg/model.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_a_complete_manifest() {
        let m = Manifest::parse(GOOD, Path::new("model.toml")).unwrap();
        assert_eq!(m.model.task, Task::Classification);
        assert_eq!(m.input.as_ref().unwrap().filter, Filter::Bilinear);
        assert_eq!(m.verdict.unwrap().ng["missing_hole"], 0.6);
    }

    #[test]
    fn names_file_and_field_of_every_error() {
        let cases = [
            (
                GOOD.replace("version = \"1.0.0\"\n", ""),
                "pkg/model.toml: field `model.version`: required field is missing",
            ),
            (
                GOOD.replace("task = ", "colour = \"red\"\ntask = "),
                "field `model.colour`: unknown field",
            ),
            (
                GOOD.replace("width = 64", "width = \"64\""),
                "field `input.width`: invalid type: string \"64\", expected u32",
            ),
            (
                GOOD.replace("layout = \"NCHW\"", "layout = \"CHW\""),
                "field `input.layout`: unknown variant `CHW`, expected `NCHW` or `NHWC`",
            ),
            (
                GOOD.replace("[0.5, 0.5, 0.5]", "[0.5, 0.5]"),
                "field `input.mean`: 2 values for RGB: expected 3",
            ),
            (
                GOOD.replace("missing_hole = 0.6", "dent = 0.6"),
                "field `verdict.ng.dent`: not one of output.labels",
            ),
            (
                GOOD.replace("scratch = 0.5", "scratch = 1.5"),
                "field `verdict.ng.scratch`: 1.5: expected a probability",
            ),
            (
                GOOD.replace("file = \"model.onnx\"", "file = \"../x.onnx\""),
                "field `graph[0].file`",
            ),
            (
                GOOD.replace("sha256 = \"0000", "sha256 = \"zz00"),
                "field `graph[0].sha256`: ",
            ),
            (
                GOOD.replace(
                    "[verdict]\nng = { scratch = 0.5, missing_hole = 0.6 }\n",
                    "",
                ),
                "field `verdict`: required",
            ),
            ("[model\nname=".to_string(), "pkg/model.toml: field `.`"),
        ];
        for (text, expected) in cases {
            let e = err(&text);
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
    }
}
