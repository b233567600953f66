//! `edgevlm models import`: a downloaded Hugging Face snapshot folder to a model package.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use edgevlm_runtime::import::{import, ImportOptions};
use edgevlm_runtime::LoadOptions;

const AFTER: &str = "\
Layouts: SmolVLM / SmolVLM2 exports (onnx/vision_encoder*.onnx, onnx/embed_tokens*.onnx,
onnx/decoder_model_merged*.onnx) and text decoders (model*.onnx or decoder_model_merged*.onnx,
at the top or under onnx/), with config.json, tokenizer.json and the template files beside them.
The variant picks the file suffix: fp32 none, otherwise _VARIANT (_int8, _uint8, _q4, _fp16, ...).

Every graph is loaded through tract before anything is written: a variant the runtime cannot
run (an operator tract lacks, a config that does not match the graphs, a tokenizer from another
model) is refused here, with the file and the cause named, and no package is left behind.

Exit codes:
  0  package written
  2  error: not a snapshot, unsupported model_type, missing variant, a graph tract cannot run,
     --out exists";

/// Import a Hugging Face snapshot folder (SmolVLM2, LLaMA, Mistral, Qwen2 ONNX exports) as a
/// model package: manifest, files and sha256s.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER)]
pub struct Cmd {
    /// The snapshot folder (holding config.json).
    #[arg(value_name = "SNAPSHOT_DIR")]
    snapshot: PathBuf,
    /// Export variant: fp32, fp16, int8, uint8, q4, q4f16, bnb4, quantized (default: fp32).
    #[arg(long)]
    variant: Option<String>,
    /// The package folder to write (must not exist).
    #[arg(long, value_name = "PKG")]
    out: PathBuf,
    /// Package name (default: the snapshot folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Package version.
    #[arg(long, default_value = "1.0.0")]
    version: String,
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let options = ImportOptions {
            variant: self.variant.clone(),
            name: self.name.clone(),
            version: Some(self.version.clone()),
            load: LoadOptions::default(),
        };
        let imported = import(&self.snapshot, &self.out, &options)
            .with_context(|| format!("importing {}", self.snapshot.display()))?;
        let m = &imported.manifest;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "wrote {} ({} {} {}, {:?}, {} graphs, {} other files, {:.1} MB)",
            imported.dir.display(),
            m.model.name,
            m.model.version,
            m.model.variant,
            m.generation
                .as_ref()
                .map(|g| g.architecture.as_str())
                .unwrap_or(""),
            m.graph.len(),
            m.file.len(),
            imported.bytes as f64 / 1e6
        )?;
        for note in &imported.notes {
            writeln!(out, "note: {note}")?;
        }
        Ok(ExitCode::SUCCESS)
    }
}
