//! Text generation with exported decoders: SmolVLM-style vision-language models (vision
//! encoder + token embedder + decoder) and LLaMA / Mistral / Qwen2 text decoders.
//!
//! The decoder graphs are the exports' own interface: `inputs_embeds` or `input_ids`,
//! `attention_mask`, `position_ids` and `past_key_values.{i}.key/value` in, `logits` and
//! `present.{i}.key/value` out. One optimized tract plan serves the prefill and every decode
//! step (the sequence dims stay symbolic); the KV cache is the `present` tensors fed back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::hf::{ImageProcessorConfig, ModelConfig};
use crate::idefics3::{self, ImageProcessor};
use crate::manifest::InspectionSpec;
use crate::onnx::{dtype_name, Dim, LoadOptions, OnnxModel};
use crate::package::ModelPackage;
use crate::preprocess::RgbImage;
use crate::sampling::{Sampler, Sampling};
use crate::text::{ContentStyle, Message, StreamDecoder, TextCodec};
use crate::trace::Memory;

/// Graph roles of generation packages, as `model.toml` names them.
pub mod roles {
    /// SmolVLM `vision_encoder`.
    pub const VISION_ENCODER: &str = "vision_encoder";
    /// SmolVLM `embed_tokens`.
    pub const EMBED_TOKENS: &str = "embed_tokens";
    /// The decoder (`decoder_model_merged`, `model`).
    pub const DECODER: &str = "decoder";
}

/// Where the graphs of a generation model are.
#[derive(Debug, Clone)]
pub struct GraphPaths {
    /// The decoder.
    pub decoder: PathBuf,
    /// `embed_tokens` (VLMs).
    pub embed_tokens: Option<PathBuf>,
    /// `vision_encoder` (VLMs).
    pub vision_encoder: Option<PathBuf>,
}

impl GraphPaths {
    /// The graphs of the generation package `package`; an error unless its task generates
    /// text.
    pub fn of(package: &ModelPackage) -> Result<GraphPaths> {
        if !package.manifest().model.task.generates() {
            return Err(Error::manifest(
                package.dir().join(crate::package::MANIFEST),
                "model.task",
                "this is not a generation package (expected task = \"vision-language\" or \"text-generation\")",
            ));
        }
        Ok(GraphPaths {
            decoder: package
                .graph_path(roles::DECODER)
                .expect("validated: generation packages have a decoder"),
            embed_tokens: package.graph_path(roles::EMBED_TOKENS),
            vision_encoder: package.graph_path(roles::VISION_ENCODER),
        })
    }
}

/// What the decoder takes as its token input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenInput {
    /// `input_ids` (text decoders).
    Ids(usize),
    /// `inputs_embeds` (VLM decoders, after `embed_tokens`).
    Embeds(usize),
}

/// Input and output positions of a decoder graph, found by name at load.
#[derive(Debug, Clone)]
struct DecoderLayout {
    tokens: TokenInput,
    attention_mask: Option<usize>,
    position_ids: Option<usize>,
    use_cache_branch: Option<usize>,
    /// (key, value) input index per layer.
    past: Vec<(usize, usize)>,
    logits: usize,
    /// (key, value) output index per layer.
    present: Vec<(usize, usize)>,
    kv_dtype: DatumType,
    embeds_dtype: DatumType,
}

fn graph_err(path: &Path, message: String) -> Error {
    Error::Unsupported {
        path: path.to_owned(),
        message,
    }
}

impl DecoderLayout {
    fn find(model: &OnnxModel, config: &ModelConfig) -> Result<DecoderLayout> {
        let path = model.path();
        let input = |name: &str| model.input_index(name);
        let tokens = match (input("inputs_embeds"), input("input_ids")) {
            (Some(i), _) => TokenInput::Embeds(i),
            (None, Some(i)) => TokenInput::Ids(i),
            (None, None) => {
                return Err(graph_err(
                    path,
                    "decoder has neither an `input_ids` nor an `inputs_embeds` input".into(),
                ))
            }
        };
        let dims = &config.text;
        let mut past = vec![];
        let mut present = vec![];
        let mut kv_dtype = DatumType::F32;
        for layer in 0..dims.layers {
            let mut pair = [0usize; 2];
            let mut out_pair = [0usize; 2];
            for (k, kind) in ["key", "value"].iter().enumerate() {
                let name = format!("past_key_values.{layer}.{kind}");
                let i = input(&name).ok_or_else(|| {
                    graph_err(
                        path,
                        format!(
                            "decoder has no input `{name}`, but config.json says num_hidden_layers = {}",
                            dims.layers
                        ),
                    )
                })?;
                let spec = &model.inputs()[i];
                kv_dtype = spec.datum_type;
                let expect = [None, Some(dims.kv_heads), None, Some(dims.head_dim)];
                let fits = spec.shape.len() == 4
                    && spec.shape.iter().zip(expect).all(|(d, e)| match (d, e) {
                        (Dim::Fixed(n), Some(e)) => *n == e,
                        _ => true,
                    });
                if !fits {
                    return Err(graph_err(
                        path,
                        format!(
                            "input `{name}` is {}, but config.json says [batch, {} key/value heads, past, {} head_dim]",
                            spec.shape_string(),
                            dims.kv_heads,
                            dims.head_dim
                        ),
                    ));
                }
                pair[k] = i;
                let out = format!("present.{layer}.{kind}");
                out_pair[k] = model.output_index(&out).ok_or_else(|| {
                    graph_err(
                        path,
                        format!("decoder has input `{name}` but no output `{out}`"),
                    )
                })?;
            }
            past.push((pair[0], pair[1]));
            present.push((out_pair[0], out_pair[1]));
        }
        if input(&format!("past_key_values.{}.key", dims.layers)).is_some() {
            return Err(graph_err(
                path,
                format!(
                    "decoder has more than the {} layers config.json declares (num_hidden_layers)",
                    dims.layers
                ),
            ));
        }
        let logits = model
            .output_index("logits")
            .ok_or_else(|| graph_err(path, "decoder has no `logits` output".into()))?;
        if let Some(Dim::Fixed(v)) = model.outputs()[logits].shape.last() {
            if *v != dims.vocab_size {
                return Err(graph_err(
                    path,
                    format!(
                        "logits are {v} wide, but config.json says vocab_size = {}",
                        dims.vocab_size
                    ),
                ));
            }
        }
        let embeds_dtype = match tokens {
            TokenInput::Embeds(i) => model.inputs()[i].datum_type,
            TokenInput::Ids(_) => DatumType::F32,
        };
        let layout = DecoderLayout {
            tokens,
            attention_mask: input("attention_mask"),
            position_ids: input("position_ids"),
            use_cache_branch: input("use_cache_branch"),
            past,
            logits,
            present,
            kv_dtype,
            embeds_dtype,
        };
        let known = 1
            + [
                layout.attention_mask,
                layout.position_ids,
                layout.use_cache_branch,
            ]
            .iter()
            .flatten()
            .count()
            + 2 * dims.layers;
        if known != model.inputs().len() {
            let names: Vec<_> = model.inputs().iter().map(|s| s.name.as_str()).collect();
            return Err(graph_err(
                path,
                format!(
                    "decoder inputs {names:?} include some this runtime does not know how to feed"
                ),
            ));
        }
        Ok(layout)
    }
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// Stop when one of these appears in the text (it is cut off).
    pub stop_strings: Vec<String>,
    /// Stop at the model's end-of-sequence tokens.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            sampling: Sampling::greedy(),
            stop_strings: vec![],
            stop_at_eos: true,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    StopString,
    /// `max_new_tokens`.
    MaxTokens,
    /// The model's context is full.
    Context,
}

/// Timings and sizes of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationStats {
    /// Tokens in the prompt, image tokens included.
    pub prompt_tokens: usize,
    /// Image tokens in the prompt.
    pub image_tokens: usize,
    /// Frames the vision encoder ran on (tiles + global image).
    pub image_frames: usize,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Template, tokenization and image processing, ms.
    pub preprocess_ms: f64,
    /// Vision encoder, ms.
    pub vision_encode_ms: f64,
    /// Embedding and decoder over the whole prompt, ms.
    pub prefill_ms: f64,
    /// From the call to the first generated token, ms. For
    /// [`Generator::generate_prepared`]: the preparation's own time plus that call's time to
    /// the first token.
    pub ttft_ms: f64,
    /// Every step after the first token, ms.
    pub decode_ms: f64,
    /// Prompt tokens per second of prefill.
    pub prefill_tok_s: f64,
    /// Generated tokens per second after the first.
    pub decode_tok_s: f64,
    /// Peak resident memory of the process, KiB.
    pub peak_rss_kib: u64,
}

/// The result of [`Generator::generate`].
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated text (special tokens left out, cut before a stop string).
    pub text: String,
    /// Generated token ids (the end-of-sequence token included when it ended generation).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Timings.
    pub stats: GenerationStats,
}

struct Vision {
    encoder: OnnxModel,
    embed: OnnxModel,
    processor: ImageProcessor,
    image_seq_len: usize,
    image_token_id: u32,
}

impl Vision {
    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let vision = self;
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let mut out = vision.embed.run(vec![tensor(&[1, ids.len()], &ids)?])?;
        Ok(out.remove(0))
    }

    /// Runs the vision encoder and writes its features over the image-token rows of `embeds`.
    fn merge_image(
        &self,
        ids: &[u32],
        embeds: Tensor,
        image: idefics3::ProcessedImage,
    ) -> Result<Tensor> {
        let vision = self;
        let mut inputs = vec![Tensor::default(); 2];
        let pv = vision.encoder.input_index("pixel_values").unwrap_or(0);
        let mask = vision
            .encoder
            .input_index("pixel_attention_mask")
            .unwrap_or(1);
        let pv_dtype = vision.encoder.inputs()[pv].datum_type;
        inputs[pv] = image
            .pixel_values
            .cast_to_dt(pv_dtype)
            .map_err(|e| Error::Inference(e.into()))?
            .into_owned();
        inputs[mask] = image.pixel_attention_mask;
        let features = vision.encoder.run(inputs)?.remove(0);
        let hidden = *embeds.shape().last().unwrap_or(&0);
        let rows: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, id)| **id == vision.image_token_id)
            .map(|(i, _)| i)
            .collect();
        let feature_hidden = *features.shape().last().unwrap_or(&0);
        if feature_hidden != hidden || features.len() != rows.len() * hidden {
            return Err(Error::Input {
                name: "image_features".into(),
                message: format!(
                    "the vision encoder returned {:?} features for {} image tokens of width {hidden}",
                    features.shape(),
                    rows.len()
                ),
            });
        }
        let src = crate::values::<f32>(&features)?;
        let mut dst = crate::values::<f32>(&embeds)?;
        for (k, row) in rows.iter().enumerate() {
            dst[row * hidden..(row + 1) * hidden]
                .copy_from_slice(&src[k * hidden..(k + 1) * hidden]);
        }
        tensor(embeds.shape(), &dst)
    }
}

/// A prompt made ready for the decoder ([`Generator::prepare`]): tokenized, its image
/// processed, encoded and merged into the token embeddings.
///
/// It belongs to the generator that prepared it: the image processor's settings at that time
/// apply, and another generator's [`Generator::generate_prepared`] refuses it if its decoder
/// takes the other kind of token input.
pub struct PreparedPrompt {
    ids: Vec<u32>,
    tokens: Tensor,
    /// `tokens` are embeddings, not ids.
    embeds: bool,
    stats: GenerationStats,
    /// Embedding, image encoding and merging, ms (the vision encoder's share is in `stats`).
    tokens_ms: f64,
}

impl std::fmt::Debug for PreparedPrompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedPrompt")
            .field("prompt_tokens", &self.ids.len())
            .field("image_tokens", &self.stats.image_tokens)
            .finish()
    }
}

/// What [`Generator::load_preparing`] prepares while the decoder loads: a prompt (one user
/// turn rendered with the chat template, or raw text) and its image.
#[derive(Debug, Clone, Copy)]
pub struct FirstPrompt<'a> {
    /// The question, or with `raw` the whole prompt text.
    pub text: &'a str,
    /// `text` is the full prompt, not rendered with the chat template.
    pub raw: bool,
    /// The image, for vision-language models.
    pub image: Option<&'a RgbImage>,
}

/// A loaded generation model: tokenizer, template, graphs and (for VLMs) image processor.
pub struct Generator {
    config: ModelConfig,
    codec: TextCodec,
    decoder: OnnxModel,
    layout: DecoderLayout,
    vision: Option<Vision>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("architecture", &self.config.architecture)
            .field("decoder", &self.decoder.path())
            .finish()
    }
}

fn tensor<T: Datum + Copy>(shape: &[usize], data: &[T]) -> Result<Tensor> {
    Tensor::from_shape(shape, data).map_err(|e| Error::Inference(e.into()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Generator {
    /// Loads a model whose config, tokenizer and template files are in `dir` and whose graphs
    /// are at `graphs`: checks that they fit together (layers, heads, vocabulary, image token)
    /// before anything runs.
    pub fn load(dir: &Path, graphs: &GraphPaths, options: &LoadOptions) -> Result<Generator> {
        Ok(Generator::load_preparing(dir, graphs, options, None)?.0)
    }

    /// [`Generator::load`], and `first` made ready for [`Generator::generate_prepared`]
    /// meanwhile: a vision-language model's vision graphs load faster than its decoder, so
    /// they encode the image while the decoder is still loading (a cold start then waits for
    /// the slower of the two instead of both in turn). The outer error is the load's; the
    /// prepared prompt, when `first` is given, is `Ok` or the error [`Generator::prepare`]
    /// would have given. Its timings were taken beside the decoder's load, so on a busy CPU
    /// they are those of a first run, not steady state.
    #[allow(clippy::type_complexity)]
    pub fn load_preparing(
        dir: &Path,
        graphs: &GraphPaths,
        options: &LoadOptions,
        first: Option<(FirstPrompt, &GenerateOptions)>,
    ) -> Result<(Generator, Option<Result<PreparedPrompt>>)> {
        let config = ModelConfig::load(dir)?;
        let codec = TextCodec::load(dir)?;
        // The decoder loads on a second core while the vision graphs load here: cold start is
        // mostly graph loading. Its errors still come first, as when they loaded in turn.
        // Generation reads the last position's logits only.
        let decoder_options = LoadOptions {
            last_position_outputs: vec!["logits".into()],
            ..options.clone()
        };
        let (decoder, vision) = crate::par::join(
            || OnnxModel::load(&graphs.decoder, &decoder_options),
            || {
                let mut vision = Generator::load_vision(dir, graphs, options, &config, &codec)?;
                // A VLM decoder takes embeddings (checked below, after the join).
                let prepared = match (first, vision.as_mut()) {
                    (Some((first, generate)), Some(v)) => {
                        Some(render(&codec, true, first).and_then(|prompt| {
                            let parts = (&codec, &config, Some(v));
                            prepare(parts, true, &prompt, first.image, generate)
                        }))
                    }
                    _ => None,
                };
                Ok((vision, prepared))
            },
        );
        let decoder = decoder?;
        let layout = DecoderLayout::find(&decoder, &config)?;
        if let Some(max) = codec.max_token_id() {
            if max as usize >= config.text.vocab_size {
                return Err(Error::text(
                    codec.tokenizer_path(),
                    format!(
                        "the tokenizer has token ids up to {max}, but the model's vocabulary is {} \
                         (vocab_size in config.json): tokenizer and model do not belong together",
                        config.text.vocab_size
                    ),
                ));
            }
        }
        if config.vision.is_some() && !matches!(layout.tokens, TokenInput::Embeds(_)) {
            return Err(graph_err(
                &graphs.decoder,
                "a vision-language decoder must take `inputs_embeds`".into(),
            ));
        }
        if config.vision.is_none() && matches!(layout.tokens, TokenInput::Embeds(_)) {
            return Err(graph_err(
                &graphs.decoder,
                "a text model's decoder must take `input_ids` (only a vision-language model \
                 has the `embed_tokens` graph that makes `inputs_embeds`)"
                    .into(),
            ));
        }
        let (vision, prepared) = vision?;
        let mut generator = Generator {
            config,
            codec,
            decoder,
            layout,
            vision,
        };
        let prepared = match (prepared, first) {
            (Some(prepared), _) => Some(prepared),
            // A text model: nothing to overlap with the load.
            (None, Some((first, generate))) => Some(
                render(&generator.codec, generator.has_vision(), first)
                    .and_then(|prompt| generator.prepare(&prompt, first.image, generate)),
            ),
            (None, None) => None,
        };
        Ok((generator, prepared))
    }

    /// The vision encoder, token embedding and image processor of a vision-language model
    /// (`None` for a text model), checked against the config and tokenizer.
    fn load_vision(
        dir: &Path,
        graphs: &GraphPaths,
        options: &LoadOptions,
        config: &ModelConfig,
        codec: &TextCodec,
    ) -> Result<Option<Vision>> {
        Ok(match &config.vision {
            None => None,
            Some(dims) => {
                let need = |p: &Option<PathBuf>, role: &str| {
                    p.clone().ok_or_else(|| {
                        Error::manifest(
                            dir,
                            role,
                            format!(
                                "a {} model needs a `{role}` graph",
                                config.architecture.name()
                            ),
                        )
                    })
                };
                let encoder_path = need(&graphs.vision_encoder, roles::VISION_ENCODER)?;
                let embed_path = need(&graphs.embed_tokens, roles::EMBED_TOKENS)?;
                match codec.token_id(idefics3::IMAGE_TOKEN) {
                    Some(id) if id == dims.image_token_id => {}
                    found => {
                        return Err(Error::text(
                            codec.tokenizer_path(),
                            format!(
                            "token {} has id {found:?}, but config.json says image_token_id = {}: \
                                 tokenizer and model do not belong together",
                            idefics3::IMAGE_TOKEN,
                            dims.image_token_id
                        ),
                        ))
                    }
                }
                for token in [
                    idefics3::FAKE_TOKEN_AROUND_IMAGE,
                    idefics3::GLOBAL_IMAGE_TOKEN,
                ] {
                    if codec.token_id(token).is_none() {
                        return Err(Error::text(
                            codec.tokenizer_path(),
                            format!(
                                "the tokenizer has no {token} token, which SmolVLM prompts need"
                            ),
                        ));
                    }
                }
                let processor = ImageProcessor::new(ImageProcessorConfig::load(dir)?);
                let image_seq_len = processor
                    .config()
                    .image_seq_len
                    .unwrap_or_else(|| dims.image_seq_len());
                // Frames are always tile x tile after processing; fixing that lets tract type
                // the connector's reshapes, which it cannot prove equal for symbolic sides.
                let tile = Some(processor.config().tile as usize);
                // The token table first: its load holds the largest protobuf of the three
                // (an f32 vocabulary x hidden table), best read while the decoder has not
                // grown yet on the other core.
                let embed = OnnxModel::load(&embed_path, options)?;
                if embed.input_index("input_ids").is_none() || embed.outputs().len() != 1 {
                    return Err(graph_err(
                        &embed_path,
                        "embed_tokens must take `input_ids` and return one tensor".into(),
                    ));
                }
                let encoder = OnnxModel::load_with_dims(
                    &encoder_path,
                    options,
                    &[
                        ("pixel_values", &[None, None, None, tile, tile]),
                        ("pixel_attention_mask", &[None, None, tile, tile]),
                    ],
                )?;
                for name in ["pixel_values", "pixel_attention_mask"] {
                    if encoder.input_index(name).is_none() {
                        return Err(graph_err(
                            &encoder_path,
                            format!("vision encoder has no `{name}` input"),
                        ));
                    }
                }
                Some(Vision {
                    encoder,
                    embed,
                    processor,
                    image_seq_len,
                    image_token_id: dims.image_token_id,
                })
            }
        })
    }

    /// Loads the generation package in `dir` (hash-checked; task `vision-language` or
    /// `text-generation`).
    pub fn open(dir: &Path, options: &LoadOptions) -> Result<(ModelPackage, Generator)> {
        let package = ModelPackage::open(dir)?;
        let generator = Generator::load(dir, &GraphPaths::of(&package)?, options)?;
        Ok((package, generator))
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer and chat template.
    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    /// True for vision-language models.
    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }

    /// Its graphs: the decoder, then the vision encoder and the embedding if it has them.
    pub fn graphs(&self) -> Vec<&OnnxModel> {
        let mut models = vec![&self.decoder];
        if let Some(v) = &self.vision {
            models.extend([&v.encoder, &v.embed]);
        }
        models
    }

    /// What the loader changed or noticed in each graph, prefixed with the file.
    pub fn notes(&self) -> Vec<String> {
        self.graphs()
            .iter()
            .flat_map(|m| {
                m.notes()
                    .iter()
                    .map(|n| format!("{}: {n}", m.path().display()))
            })
            .collect()
    }

    /// Milliseconds spent loading the graphs.
    pub fn load_ms(&self) -> f64 {
        self.decoder.load_ms()
            + self
                .vision
                .as_ref()
                .map_or(0.0, |v| v.encoder.load_ms() + v.embed.load_ms())
    }

    /// The prompt text for one user turn, rendered with the chat template (image tokens not
    /// yet expanded).
    pub fn chat_prompt(&self, question: &str, with_image: bool) -> Result<String> {
        chat_prompt(&self.codec, self.has_vision(), question, with_image)
    }

    /// The image processor (VLMs), e.g. to inspect or change its settings.
    pub fn image_processor(&mut self) -> Option<&mut ImageProcessor> {
        self.vision.as_mut().map(|v| &mut v.processor)
    }

    /// Expands the image placeholder and tokenizes: the processor's `input_ids` for `prompt`
    /// and, if given, the processed image.
    pub fn prompt_ids(
        &mut self,
        prompt: &str,
        image: Option<&RgbImage>,
    ) -> Result<(Vec<u32>, Option<idefics3::ProcessedImage>)> {
        prompt_ids(
            &self.codec,
            &self.config,
            self.vision.as_mut(),
            prompt,
            image,
        )
    }

    /// One decoder run over `n` new positions after `past` cached ones; returns the last
    /// position's logits and the new cache.
    fn step(
        &self,
        tokens: Tensor,
        n: usize,
        past_len: usize,
        cache: Vec<Tensor>,
    ) -> Result<(Vec<f32>, Vec<Tensor>)> {
        let l = &self.layout;
        let mut inputs = vec![Tensor::default(); self.decoder.inputs().len()];
        match l.tokens {
            TokenInput::Ids(i) => inputs[i] = tokens,
            TokenInput::Embeds(i) => {
                inputs[i] = tokens
                    .cast_to_dt(l.embeds_dtype)
                    .map_err(|e| Error::Inference(e.into()))?
                    .into_owned()
            }
        }
        let total = past_len + n;
        if let Some(i) = l.attention_mask {
            inputs[i] = tensor(&[1, total], &vec![1i64; total])?;
        }
        if let Some(i) = l.position_ids {
            let pos: Vec<i64> = (past_len as i64..total as i64).collect();
            inputs[i] = tensor(&[1, n], &pos)?;
        }
        if let Some(i) = l.use_cache_branch {
            inputs[i] = tensor(&[1], &[past_len > 0])?;
        }
        // Moved, not copied: the cache is the largest thing a decode step touches.
        let mut cache = cache.into_iter();
        for (k, v) in &l.past {
            inputs[*k] = cache.next().expect("one cache tensor per past input");
            inputs[*v] = cache.next().expect("one cache tensor per past input");
        }
        let mut outputs = self.decoder.run(inputs)?;
        let logits = outputs[l.logits]
            .cast_to::<f32>()
            .map_err(|e| Error::Inference(e.into()))?;
        let view = logits
            .to_plain_array_view::<f32>()
            .map_err(|e| Error::Inference(e.into()))?;
        let vocab = view.shape().last().copied().unwrap_or(0);
        // The last position's row: the only one the next token depends on. A prefill's logits
        // are [1, prompt, vocab]: index the row rather than walk the whole tensor to it.
        let last: Vec<f32> = match view.as_slice() {
            Some(all) => all[all.len() - vocab..].to_vec(),
            None => view.iter().skip(view.len() - vocab).copied().collect(),
        };
        drop(view);
        drop(logits);
        let mut next = Vec::with_capacity(2 * l.present.len());
        for (k, v) in &l.present {
            next.push(std::mem::take(&mut outputs[*k]));
            next.push(std::mem::take(&mut outputs[*v]));
        }
        Ok((last, next))
    }

    /// The logits for the token after `prompt` (and the image): one prefill, nothing sampled.
    /// For checking a model against a reference.
    pub fn prefill_logits(&mut self, prompt: &str, image: Option<&RgbImage>) -> Result<Vec<f32>> {
        let (ids, processed) = self.prompt_ids(prompt, image)?;
        let tokens = self.prompt_tokens(&ids, processed, &mut GenerationStats::default())?;
        Ok(self.step(tokens, ids.len(), 0, self.empty_cache()?)?.0)
    }

    /// The most likely next token at each step when `forced` is fed after the prompt, whatever
    /// the model would have chosen (teacher forcing): entry `i` is the model's choice after
    /// `forced[..i]`. Compares a model with a reference without letting one early difference
    /// change every later step.
    pub fn forced_choices(
        &mut self,
        prompt: &str,
        image: Option<&RgbImage>,
        forced: &[u32],
    ) -> Result<Vec<u32>> {
        let (ids, processed) = self.prompt_ids(prompt, image)?;
        let tokens = self.prompt_tokens(&ids, processed, &mut GenerationStats::default())?;
        let (mut logits, mut cache) = self.step(tokens, ids.len(), 0, self.empty_cache()?)?;
        let mut choices = vec![];
        for (i, &token) in forced.iter().enumerate() {
            choices.push(crate::sampling::argmax(&logits) as u32);
            if i + 1 == forced.len() {
                break;
            }
            (logits, cache) = self.step(self.token_input(token)?, 1, ids.len() + i, cache)?;
        }
        Ok(choices)
    }

    /// The decoder's token input for the prompt: ids, or embeddings with image features.
    fn prompt_tokens(
        &self,
        ids: &[u32],
        processed: Option<idefics3::ProcessedImage>,
        stats: &mut GenerationStats,
    ) -> Result<Tensor> {
        let embeds = matches!(self.layout.tokens, TokenInput::Embeds(_));
        prompt_tokens(self.vision.as_ref(), embeds, ids, processed, stats)
    }

    /// The decoder's token input for one generated token: its id, or its embedding.
    fn token_input(&self, token: u32) -> Result<Tensor> {
        match self.layout.tokens {
            TokenInput::Ids(_) => tensor(&[1, 1], &[token as i64]),
            TokenInput::Embeds(_) => self
                .vision
                .as_ref()
                .expect("embeddings are only used by VLMs")
                .embed(&[token]),
        }
    }

    fn empty_cache(&self) -> Result<Vec<Tensor>> {
        let d = &self.config.text;
        let shape = [1, d.kv_heads, 0, d.head_dim];
        (0..2 * d.layers)
            .map(|_| {
                Tensor::zero_dt(self.layout.kv_dtype, &shape)
                    .map_err(|e| Error::Inference(e.into()))
            })
            .collect()
    }

    /// Generates a continuation of `prompt` (already rendered with the chat template; an image
    /// goes with exactly one `<image>` placeholder in it). `on_token` is called once per
    /// generated token, as it is produced, with its id and the text that became final with it
    /// (often empty: incomplete characters and a possible start of a stop string wait); the
    /// pieces add up to the returned text.
    pub fn generate(
        &mut self,
        prompt: &str,
        image: Option<&RgbImage>,
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, &str),
    ) -> Result<Generation> {
        let prepared = self.prepare(prompt, image, options)?;
        self.generate_prepared(prepared, options, on_token)
    }

    /// The first half of [`Generator::generate`]: tokenizes `prompt`, checks it fits the
    /// context (`options.max_new_tokens` is named in that error), and encodes and merges the
    /// image.
    pub fn prepare(
        &mut self,
        prompt: &str,
        image: Option<&RgbImage>,
        options: &GenerateOptions,
    ) -> Result<PreparedPrompt> {
        let embeds = matches!(self.layout.tokens, TokenInput::Embeds(_));
        let parts = (&self.codec, &self.config, self.vision.as_mut());
        prepare(parts, embeds, prompt, image, options)
    }

    /// The second half of [`Generator::generate`]: prefill and decoding of a prompt
    /// [`Generator::prepare`] (or [`Generator::load_preparing`]) made ready by this generator.
    /// Its statistics count the preparation's own time, not the time between the two.
    pub fn generate_prepared(
        &mut self,
        prepared: PreparedPrompt,
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, &str),
    ) -> Result<Generation> {
        let PreparedPrompt {
            ids,
            tokens,
            embeds,
            mut stats,
            tokens_ms,
        } = prepared;
        if embeds != matches!(self.layout.tokens, TokenInput::Embeds(_)) {
            return Err(Error::Input {
                name: "prepared prompt".into(),
                message: format!(
                    "prepared as {} for another model: this decoder takes {}",
                    if embeds { "embeddings" } else { "token ids" },
                    if embeds { "token ids" } else { "embeddings" }
                ),
            });
        }
        let limit = self.config.text.max_positions;
        let prefill_start = Instant::now();
        // The preparation's time stands in for the time before this call.
        let start =
            prefill_start - Duration::from_secs_f64((stats.preprocess_ms + tokens_ms) / 1e3);
        let (mut logits, mut cache) = self.step(tokens, ids.len(), 0, self.empty_cache()?)?;
        stats.prefill_ms = ms(prefill_start.elapsed()) + tokens_ms - stats.vision_encode_ms;

        let mut sampler = Sampler::new(options.sampling.clone());
        let mut stream = StreamDecoder::default();
        let mut generated: Vec<u32> = vec![];
        let mut text = String::new();
        // Text handed to `on_token` so far. The last bytes that could still begin a stop
        // string are held back until the next token shows whether they do.
        let mut emitted = 0;
        let hold = options
            .stop_strings
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut stop_reason = StopReason::MaxTokens;
        let mut first_token_at = None;
        let mut pos = ids.len();
        let max_new = options.max_new_tokens;
        while generated.len() < max_new {
            let next = sampler.pick(&logits);
            generated.push(next);
            first_token_at.get_or_insert_with(Instant::now);
            let eos = options.stop_at_eos && self.config.eos_token_ids.contains(&next);
            if !eos {
                text.push_str(&stream.push(&self.codec, next)?);
            }
            let mut last = true;
            if let Some(cut) = stop_at(&text, &options.stop_strings, emitted) {
                text.truncate(cut);
                stop_reason = StopReason::StopString;
            } else if eos {
                stop_reason = StopReason::Eos;
            } else if generated.len() < max_new && pos + 1 >= limit {
                stop_reason = StopReason::Context;
            } else {
                last = generated.len() >= max_new;
            }
            if last && stop_reason != StopReason::StopString {
                // The stream leaves out a character still incomplete at the end; the result
                // holds everything the tokens decode to.
                let content: Vec<u32> = generated
                    .iter()
                    .copied()
                    .filter(|id| !(options.stop_at_eos && self.config.eos_token_ids.contains(id)))
                    .collect();
                text = self.codec.decode(&content, true)?;
            }
            let mut upto = if last {
                text.len()
            } else {
                text.len().saturating_sub(hold).max(emitted)
            };
            while !text.is_char_boundary(upto) {
                upto -= 1;
            }
            // One call per generated token (end-of-sequence included), its text maybe empty.
            on_token(next, text.get(emitted..upto).unwrap_or(""));
            emitted = emitted.max(upto);
            if last {
                break;
            }
            let (l, c) = self.step(self.token_input(next)?, 1, pos, cache)?;
            logits = l;
            cache = c;
            pos += 1;
        }
        let end = Instant::now();
        if let Some(first) = first_token_at {
            stats.ttft_ms = ms(first - start);
            stats.decode_ms = ms(end - first);
        }
        stats.new_tokens = generated.len();
        stats.prefill_tok_s = ids.len() as f64 / (stats.prefill_ms / 1e3).max(1e-9);
        if generated.len() > 1 {
            stats.decode_tok_s = (generated.len() - 1) as f64 / (stats.decode_ms / 1e3).max(1e-9);
        }
        stats.peak_rss_kib = Memory::sample().peak_rss_kb;
        Ok(Generation {
            text,
            token_ids: generated,
            stop_reason,
            stats,
        })
    }
}

/// [`Generator::chat_prompt`] over the tokenizer, for a model with or without vision.
fn chat_prompt(
    codec: &TextCodec,
    vision: bool,
    question: &str,
    with_image: bool,
) -> Result<String> {
    let style = if vision {
        ContentStyle::Parts
    } else {
        ContentStyle::Text
    };
    codec.render(&[Message::user(question, with_image)], style, true)
}

/// The prompt text of `first`: its text as is, or rendered as one user turn.
fn render(codec: &TextCodec, vision: bool, first: FirstPrompt) -> Result<String> {
    if first.raw {
        Ok(first.text.to_owned())
    } else {
        chat_prompt(codec, vision, first.text, first.image.is_some())
    }
}

/// [`Generator::prompt_tokens`] over the generator's parts: `embeds` when the decoder takes
/// embeddings.
fn prompt_tokens(
    vision: Option<&Vision>,
    embeds: bool,
    ids: &[u32],
    processed: Option<idefics3::ProcessedImage>,
    stats: &mut GenerationStats,
) -> Result<Tensor> {
    if !embeds {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        return tensor(&[1, ids.len()], &ids);
    }
    let vision = vision.expect("embeddings are only used by VLMs");
    let embeds = vision.embed(ids)?;
    match processed {
        Some(p) => {
            let t = Instant::now();
            let merged = vision.merge_image(ids, embeds, p)?;
            stats.vision_encode_ms = ms(t.elapsed());
            Ok(merged)
        }
        None => Ok(embeds),
    }
}

/// [`Generator::prepare`] over the generator's parts (tokenizer, config, vision graphs):
/// `embeds` when the decoder takes embeddings.
fn prepare(
    (codec, config, mut vision): (&TextCodec, &ModelConfig, Option<&mut Vision>),
    embeds: bool,
    prompt: &str,
    image: Option<&RgbImage>,
    options: &GenerateOptions,
) -> Result<PreparedPrompt> {
    let start = Instant::now();
    let (ids, processed) = prompt_ids(codec, config, vision.as_deref_mut(), prompt, image)?;
    let mut stats = GenerationStats {
        prompt_tokens: ids.len(),
        image_frames: processed.as_ref().map_or(0, |p| p.frames()),
        ..Default::default()
    };
    if let Some(v) = &vision {
        stats.image_tokens = ids.iter().filter(|i| **i == v.image_token_id).count();
    }
    let limit = config.text.max_positions;
    if ids.is_empty() || ids.len() >= limit {
        return Err(Error::ContextLength {
            prompt_tokens: ids.len(),
            image_note: if stats.image_tokens > 0 {
                format!(" ({} of them image tokens)", stats.image_tokens)
            } else {
                String::new()
            },
            new_tokens: options.max_new_tokens,
            limit,
            limit_source: "max_position_embeddings in config.json".into(),
        });
    }
    stats.preprocess_ms = ms(start.elapsed());
    let t = Instant::now();
    let tokens = prompt_tokens(vision.as_deref(), embeds, &ids, processed, &mut stats)?;
    Ok(PreparedPrompt {
        ids,
        tokens,
        embeds,
        stats,
        tokens_ms: ms(t.elapsed()),
    })
}

/// [`Generator::prompt_ids`] over the generator's parts.
fn prompt_ids(
    codec: &TextCodec,
    config: &ModelConfig,
    vision: Option<&mut Vision>,
    prompt: &str,
    image: Option<&RgbImage>,
) -> Result<(Vec<u32>, Option<idefics3::ProcessedImage>)> {
    let placeholders = prompt.matches(idefics3::IMAGE_TOKEN).count();
    let Some(vision) = vision else {
        if image.is_some() {
            return Err(Error::Image {
                source_name: "image".into(),
                message: format!(
                    "the {} model is text-only and takes no image",
                    config.architecture.name()
                ),
            });
        }
        // Text decoders: the template already wrote BOS where the model wants it.
        return Ok((codec.encode(prompt, false)?, None));
    };
    let (text, processed) = match image {
        Some(img) => {
            if placeholders != 1 {
                return Err(Error::Image {
                    source_name: "prompt".into(),
                    message: format!(
                        "one image was given, but the prompt has {placeholders} {} placeholders",
                        idefics3::IMAGE_TOKEN
                    ),
                });
            }
            let processed = vision.processor.process(img)?;
            let expansion =
                idefics3::image_prompt(processed.rows, processed.cols, vision.image_seq_len);
            (
                prompt.replacen(idefics3::IMAGE_TOKEN, &expansion, 1),
                Some(processed),
            )
        }
        None if placeholders > 0 => {
            return Err(Error::Image {
                source_name: "prompt".into(),
                message: format!(
                    "the prompt has {placeholders} {} placeholders but no image was given",
                    idefics3::IMAGE_TOKEN
                ),
            })
        }
        None => (prompt.to_owned(), None),
    };
    Ok((codec.encode(&text, true)?, processed))
}

/// Where the first stop string that ends after byte `from - longest stop` starts, if any.
fn stop_at(text: &str, stops: &[String], from: usize) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            // Only look where the new text could complete a match.
            let mut start = from.saturating_sub(s.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            text[start..].find(s.as_str()).map(|i| start + i)
        })
        .min()
}

/// The verdict an inspection answer gives under `rule`: NG for an answer starting with one of
/// `rule.ng`, OK for one starting with one of `rule.ok`, NG for anything else. Case and leading
/// blanks and punctuation are ignored.
pub fn answer_verdict(rule: &InspectionSpec, answer: &str) -> crate::Verdict {
    let answer = answer
        .trim_start_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
        .to_lowercase();
    let starts = |prefixes: &[String]| {
        prefixes
            .iter()
            .any(|p| answer.starts_with(&p.trim().to_lowercase()))
    };
    if starts(&rule.ng) {
        crate::Verdict::Ng
    } else if starts(&rule.ok) {
        crate::Verdict::Ok
    } else {
        crate::Verdict::Ng
    }
}

/// A short description of a graph's inputs, for import reports.
pub fn describe_inputs(model: &OnnxModel) -> String {
    model
        .inputs()
        .iter()
        .filter(|s| !s.name.starts_with("past_key_values."))
        .map(|s| {
            format!(
                "{} {}{}",
                s.name,
                dtype_name(s.datum_type),
                s.shape_string()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_verdicts_and_unclear_ones_fail() {
        let rule = InspectionSpec {
            question: "Is there a scratch?".into(),
            ng: vec!["yes".into()],
            ok: vec!["no".into()],
            max_new_tokens: 8,
        };
        assert_eq!(
            answer_verdict(&rule, " Yes, on the left."),
            crate::Verdict::Ng
        );
        assert_eq!(answer_verdict(&rule, "no."), crate::Verdict::Ok);
        assert_eq!(answer_verdict(&rule, "\"No\""), crate::Verdict::Ok);
        assert_eq!(answer_verdict(&rule, "maybe"), crate::Verdict::Ng);
        assert_eq!(answer_verdict(&rule, ""), crate::Verdict::Ng);
    }

    #[test]
    fn stop_strings_are_found_across_token_boundaries() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(stop_at("yes\nUs", &stops, 4), None);
        assert_eq!(stop_at("yes\nUser:", &stops, 6), Some(3));
        assert_eq!(stop_at("okEND", &stops, 2), Some(2));
        assert_eq!(stop_at("ä€END", &stops, 5), Some(5));
    }
}
