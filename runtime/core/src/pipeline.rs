//! The image classification pipeline: package -> image -> tensor -> tract -> probabilities -> verdict.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::classify::{self, ClassScore, Verdict};
use crate::error::{Error, Result};
use crate::manifest::{OutputSpec, Task, VerdictRule};
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
    /// Every class, highest probability first.
    pub classes: Vec<ClassScore>,
    /// Stage timings and memory.
    pub trace: Trace,
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
            trace,
        })
    }
}
