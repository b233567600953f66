//! `edgevlm generate`: text from a vision-language or text-generation package, streamed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use edgevlm_runtime::generate::GraphPaths;
use edgevlm_runtime::package::ModelPackage;
use edgevlm_runtime::preprocess::decode_image;
use edgevlm_runtime::{FirstPrompt, GenerateOptions, Generator, LoadOptions, Sampling};
use serde_json::json;

const AFTER: &str = "\
The prompt is one user turn rendered with the package's chat template; with --image the image
goes before the text, as the model cards do it. --raw-prompt skips the template (the text must
then hold the model's <image> placeholder itself when an image is given).

Exit codes:
  0  success
  2  error: unreadable package, image or prompt; prompt longer than the model's context

Errors are printed once on stderr as `edgevlm: <cause chain>`.";

/// Generate text with a model package: the answer streams to stdout as it is produced, then a
/// line of timings (vision encode, time to first token, prefill and decode tokens/s, peak RSS).
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER)]
pub struct Cmd {
    /// The package directory (task vision-language or text-generation).
    #[arg(long, value_name = "PKG")]
    model: PathBuf,
    /// An image (JPEG or PNG) for vision-language models.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// The question or instruction.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate (default: the package's `[generation]` max_new_tokens).
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// Sample among the most likely tokens holding this probability mass.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also stop when this text appears (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Use --prompt as the full prompt text, without the chat template.
    #[arg(long)]
    raw_prompt: bool,
    /// Untimed generations before the reported one (same prompt and image), so the figures
    /// are steady-state rather than first-run. Without any, the reported generation's prompt
    /// and image are prepared while the decoder loads, and its figures are a cold first run's.
    #[arg(long, default_value_t = 0, value_name = "N")]
    warmup: usize,
    /// Threads for matrix products.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    #[command(flatten)]
    cache: super::CacheArgs,
    /// One JSON object at the end (text, token ids, timings) instead of streamed text.
    #[arg(long)]
    json: bool,
    /// Do not compile 4-bit products a second time for prompts (prefill): less memory
    /// (the weights of those products are held once), slower prefill.
    #[arg(long)]
    no_prefill_plans: bool,
    /// Leave products and attention to tract's kernels instead of edgevlm's x86 ones (AVX-512:
    /// 8-bit, f32 and 4-bit products and attention; AVX2: 8-bit and f32 products), for
    /// comparing the two. Other CPUs always run tract's.
    #[arg(long)]
    no_avx512_kernels: bool,
    /// Run float16 graphs in float16 on tract's kernels instead of in float32 (slow on
    /// CPUs without float16 arithmetic; for comparing the two).
    #[arg(long)]
    keep_f16: bool,
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            anyhow::bail!("--top-p {}: expected a value in (0, 1]", self.top_p);
        }
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            anyhow::bail!("--temperature {}: expected 0 or more", self.temperature);
        }
        let options = LoadOptions {
            threads: self.threads as usize,
            prefill_plans: !self.no_prefill_plans,
            avx512_kernels: !self.no_avx512_kernels,
            f16_as_f32: !self.keep_f16,
            cache_dir: self.cache.dir(),
            ..Default::default()
        };
        let image = match &self.image {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading image {}", path.display()))?;
                Some(decode_image(&bytes, &path.display().to_string())?)
            }
            None => None,
        };
        let loading = || format!("loading model package {}", self.model.display());
        let package = ModelPackage::open(&self.model).with_context(loading)?;
        let graphs = GraphPaths::of(&package).with_context(loading)?;
        let spec = package
            .manifest()
            .generation
            .clone()
            .expect("validated: generation packages have [generation]");
        let mut stop = spec.stop.clone();
        stop.extend(self.stop.iter().cloned());
        let generate = GenerateOptions {
            max_new_tokens: self.max_new_tokens.unwrap_or(spec.max_new_tokens),
            sampling: Sampling {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            stop_strings: stop,
            stop_at_eos: !self.ignore_eos,
        };
        // The prompt is tokenized and its image encoded while the decoder loads.
        let first = FirstPrompt {
            text: &self.prompt,
            raw: self.raw_prompt,
            image: image.as_ref(),
        };
        let (mut generator, prepared) =
            Generator::load_preparing(&self.model, &graphs, &options, Some((first, &generate)))
                .with_context(loading)?;
        let mut prepared = prepared.transpose()?;
        let prompt = if self.raw_prompt {
            self.prompt.clone()
        } else {
            generator.chat_prompt(&self.prompt, image.is_some())?
        };
        for _ in 0..self.warmup {
            match prepared.take() {
                Some(p) => generator.generate_prepared(p, &generate, &mut |_, _| {})?,
                None => generator.generate(&prompt, image.as_ref(), &generate, &mut |_, _| {})?,
            };
        }
        let prepared = match prepared {
            Some(p) => p,
            None => generator.prepare(&prompt, image.as_ref(), &generate)?,
        };
        let mut out = std::io::stdout().lock();
        let mut failed = Ok(());
        let json = self.json;
        let result = generator.generate_prepared(prepared, &generate, &mut |_, piece| {
            if !json && failed.is_ok() {
                failed = write!(out, "{piece}").and_then(|_| out.flush());
            }
        })?;
        failed?;
        let s = &result.stats;
        let m = &package.manifest().model;
        if self.json {
            writeln!(
                out,
                "{}",
                json!({
                    "model": m.name, "version": m.version, "variant": m.variant,
                    "text": result.text, "token_ids": result.token_ids,
                    "stop_reason": result.stop_reason, "load_ms": generator.load_ms(),
                    "stats": s,
                })
            )?;
        } else {
            writeln!(out)?;
            eprintln!(
                "[{} {} {}] {} prompt tokens ({} image, {} frames), {} new ({:?}) | vision encode {:.1} ms | TTFT {:.1} ms | prefill {:.1} tok/s | decode {:.1} tok/s | peak RSS {:.1} MiB | load {:.0} ms",
                m.name,
                m.version,
                m.variant,
                s.prompt_tokens,
                s.image_tokens,
                s.image_frames,
                s.new_tokens,
                result.stop_reason,
                s.vision_encode_ms,
                s.ttft_ms,
                s.prefill_tok_s,
                s.decode_tok_s,
                s.peak_rss_kib as f64 / 1024.0,
                generator.load_ms()
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}
