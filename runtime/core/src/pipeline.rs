//! Inspection pipelines: package -> image -> verdict. A [`Classifier`] runs one graph and
//! thresholds class probabilities; a [`VlmInspector`] asks a vision-language model its
//! package's question and maps the answer. [`Inspector`] is whichever the package is.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::classify::{self, ClassScore, Verdict};
use crate::error::{Error, Result};
use crate::generate::{answer_verdict, GenerateOptions, Generation, Generator};
use crate::manifest::{InspectionSpec, Manifest, OutputSpec, Task, VerdictRule};
use crate::onnx::{Dim, LoadOptions, OnnxModel};
use crate::package::{ModelPackage, MANIFEST};
use crate::preprocess::{self, Frame, Preprocessor, RgbImage};
use crate::trace::{Stage, Trace};

/// The result of inspecting one image.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// OK or NG.
    pub verdict: Verdict,
    /// Why NG (the label and threshold that fired).
    pub reason: Option<String>,
    /// Every class, highest probability first (empty for vision-language models).
    pub classes: Vec<ClassScore>,
    /// A vision-language model's answer, as generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Stage timings and memory.
    pub trace: Trace,
}

impl Inspection {
    /// The top class, or the answer of a vision-language model.
    pub fn label(&self) -> Option<&str> {
        self.classes
            .first()
            .map(|c| c.label.as_str())
            .or(self.answer.as_deref())
    }
}

/// A loaded classification package, ready to inspect images.
#[derive(Debug)]
pub struct Classifier {
    package: ModelPackage,
    model: OnnxModel,
    pre: Preprocessor,
    output: OutputSpec,
    rule: VerdictRule,
    output_index: usize,
}

impl Classifier {
    /// Opens and verifies the package in `dir` and loads its main graph.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Classifier> {
        let package = ModelPackage::open(dir)?;
        let manifest_path = dir.join(MANIFEST);
        let m = package.manifest();
        if m.model.task != Task::Classification {
            return Err(Error::manifest(
                &manifest_path,
                "model.task",
                "expected \"classification\" for image inspection",
            ));
        }
        // validate() guarantees these exist for classification packages.
        let (input, output, rule) = (
            m.input.clone().unwrap(),
            m.output.clone().unwrap(),
            m.verdict.clone().unwrap(),
        );
        let model = OnnxModel::load(&package.graph_path("main").unwrap(), options)?;
        let names = |specs: &[crate::onnx::TensorSpec]| {
            specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>()
        };
        if model.inputs().len() != 1 || model.inputs()[0].name != input.tensor {
            return Err(Error::manifest(
                &manifest_path,
                "input.tensor",
                format!("{:?}: the graph's inputs are {:?} (a classifier takes exactly one image input)", input.tensor, names(model.inputs())),
            ));
        }
        let pre = Preprocessor::new(input);
        let spec = &model.inputs()[0];
        let want = pre.shape();
        let dims_fit = spec.shape.len() == 4
            && spec
                .shape
                .iter()
                .zip(want)
                .all(|(d, w)| matches!(d, Dim::Symbol(_)) || *d == Dim::Fixed(w));
        if !dims_fit {
            return Err(Error::manifest(
                &manifest_path,
                "input",
                format!(
                    "[input] makes a {want:?} tensor but the graph's input `{}` is {}",
                    spec.name,
                    spec.shape_string()
                ),
            ));
        }
        let output_index = model.output_index(&output.tensor).ok_or_else(|| {
            Error::manifest(
                &manifest_path,
                "output.tensor",
                format!(
                    "{:?}: the graph's outputs are {:?}",
                    output.tensor,
                    names(model.outputs())
                ),
            )
        })?;
        if let Some(Dim::Fixed(n)) = model.outputs()[output_index].shape.last() {
            if *n != output.labels.len() {
                return Err(Error::manifest(
                    &manifest_path,
                    "output.labels",
                    format!(
                        "{} labels but output `{}` has {n} classes",
                        output.labels.len(),
                        output.tensor
                    ),
                ));
            }
        }
        Ok(Classifier {
            package,
            model,
            pre,
            output,
            rule,
            output_index,
        })
    }

    /// The package.
    pub fn package(&self) -> &ModelPackage {
        &self.package
    }

    /// The loaded graph.
    pub fn model(&self) -> &OnnxModel {
        &self.model
    }

    /// Inspects an image file (JPEG or PNG).
    pub fn inspect_file(&mut self, path: &Path) -> Result<Inspection> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        let mut trace = Trace::default();
        let name = path.display().to_string();
        let img = trace.time(Stage::Decode, || preprocess::decode_image(&bytes, &name))?;
        self.inspect_rgb(&img, trace)
    }

    /// Inspects a raw camera frame.
    pub fn inspect_frame(&mut self, frame: &Frame, name: &str) -> Result<Inspection> {
        let mut trace = Trace::default();
        let img = trace.time(Stage::Decode, || preprocess::frame_to_rgb(frame, name))?;
        self.inspect_rgb(&img, trace)
    }

    /// Inspects a decoded image, appending to `trace` (which may already hold a decode span).
    pub fn inspect_rgb(&mut self, img: &RgbImage, mut trace: Trace) -> Result<Inspection> {
        let input = trace.time(Stage::Preprocess, || self.pre.tensor(img))?;
        let outputs = trace.time(Stage::Infer, || self.model.run(vec![input]))?;
        let start = Instant::now();
        let raw = crate::values::<f32>(&outputs[self.output_index])?;
        if raw.len() != self.output.labels.len() {
            return Err(Error::Inference(
                format!(
                    "output `{}` has {} values for {} labels",
                    self.output.tensor,
                    raw.len(),
                    self.output.labels.len()
                )
                .into(),
            ));
        }
        let probs = classify::probabilities(self.output.decode, &raw);
        let (verdict, reason) = classify::verdict(&self.rule, &self.output, &probs);
        let classes = classify::ranked(&self.output, &probs);
        trace.record(Stage::Postprocess, start.elapsed());
        trace.finish();
        Ok(Inspection {
            verdict,
            reason,
            classes,
            answer: None,
            trace,
        })
    }
}

/// A vision-language package with an `[inspection]` section: asks its question about each
/// image (greedy) and turns the answer into the verdict by the package's rule.
pub struct VlmInspector {
    package: ModelPackage,
    generator: Generator,
    rule: InspectionSpec,
    prompt: String,
    options: GenerateOptions,
}

impl std::fmt::Debug for VlmInspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VlmInspector")
            .field("package", &self.package.dir())
            .field("question", &self.rule.question)
            .finish()
    }
}

impl VlmInspector {
    /// Opens the package in `dir`, loads its graphs and renders the question once.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<VlmInspector> {
        let (package, generator) = Generator::open(dir, options)?;
        let m = package.manifest();
        let rule = m.inspection.clone().ok_or_else(|| {
            Error::manifest(
                dir.join(MANIFEST),
                "inspection",
                format!(
                    "this {} package has no [inspection] section (question, ng, ok), so it cannot judge parts; `edgevlm generate` asks it anything",
                    m.model.task_name()
                ),
            )
        })?;
        let prompt = generator.chat_prompt(&rule.question, true)?;
        let options = GenerateOptions {
            max_new_tokens: rule.max_new_tokens,
            stop_strings: m
                .generation
                .as_ref()
                .map(|g| g.stop.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        Ok(VlmInspector {
            package,
            generator,
            rule,
            prompt,
            options,
        })
    }

    /// The package.
    pub fn package(&self) -> &ModelPackage {
        &self.package
    }

    /// The loaded model.
    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// The question and the answer rule.
    pub fn rule(&self) -> &InspectionSpec {
        &self.rule
    }

    /// Asks the question about `img`: the verdict and the whole generation (answer, tokens,
    /// timings).
    pub fn ask(&mut self, img: &RgbImage) -> Result<(Verdict, Generation)> {
        let g = self
            .generator
            .generate(&self.prompt, Some(img), &self.options, &mut |_, _| {})?;
        Ok((answer_verdict(&self.rule, &g.text), g))
    }

    /// Inspects a decoded image, appending to `trace`: `preprocess` (template, tokens, image
    /// tiles) and `infer` (vision encoder, prefill, decoding) spans.
    pub fn inspect_rgb(&mut self, img: &RgbImage, mut trace: Trace) -> Result<Inspection> {
        let start = Instant::now();
        let (verdict, g) = self.ask(img)?;
        let total = start.elapsed();
        let pre = std::time::Duration::from_secs_f64(g.stats.preprocess_ms / 1e3).min(total);
        trace.record(Stage::Preprocess, pre);
        trace.record(Stage::Infer, total - pre);
        trace.finish();
        Ok(Inspection {
            verdict,
            reason: (verdict == Verdict::Ng).then(|| format!("answer {:?}", g.text.trim())),
            classes: vec![],
            answer: Some(g.text),
            trace,
        })
    }
}

/// Whatever a package inspects with: a classifier or a vision-language model.
#[derive(Debug)]
pub enum Inspector {
    /// A `classification` package.
    Classifier(Box<Classifier>),
    /// A `vision-language` package with an `[inspection]` section.
    Vlm(Box<VlmInspector>),
}

impl Inspector {
    /// Loads the package in `dir` according to its task.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Inspector> {
        let manifest = Manifest::load(&dir.join(MANIFEST))?;
        if manifest.model.task == Task::VisionLanguage {
            return Ok(Inspector::Vlm(Box::new(VlmInspector::load(dir, options)?)));
        }
        Ok(Inspector::Classifier(Box::new(Classifier::load(
            dir, options,
        )?)))
    }

    /// The package.
    pub fn package(&self) -> &ModelPackage {
        match self {
            Inspector::Classifier(c) => c.package(),
            Inspector::Vlm(v) => v.package(),
        }
    }

    /// Inspects a raw camera frame.
    pub fn inspect_frame(&mut self, frame: &Frame, name: &str) -> Result<Inspection> {
        let mut trace = Trace::default();
        let img = trace.time(Stage::Decode, || preprocess::frame_to_rgb(frame, name))?;
        match self {
            Inspector::Classifier(c) => c.inspect_rgb(&img, trace),
            Inspector::Vlm(v) => v.inspect_rgb(&img, trace),
        }
    }
}
