//! The configuration files of a Hugging Face snapshot, as exported models ship them:
//! `config.json`, `generation_config.json`, `preprocessor_config.json`, `processor_config.json`.
//!
//! Only what the runtime needs is read, and every missing or mistyped key is an
//! [`Error::Manifest`] naming the file and the dotted key.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::manifest::Filter;

/// A parsed JSON file and its path, with typed, error-naming accessors.
#[derive(Debug, Clone)]
pub struct JsonFile {
    path: PathBuf,
    value: Value,
}

impl JsonFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<JsonFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::manifest(path, ".", format!("not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(Error::manifest(path, ".", "expected a JSON object"));
        }
        Ok(JsonFile {
            path: path.to_owned(),
            value,
        })
    }

    /// Reads `path` if it exists.
    pub fn load_optional(path: &Path) -> Result<Option<JsonFile>> {
        if path.exists() {
            JsonFile::load(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value at a dotted key (`text_config.hidden_size`), if present and not null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        key.split('.')
            .try_fold(&self.value, |v, k| v.get(k))
            .filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::manifest(&self.path, key, message)
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?
            .ok_or_else(|| self.err(key, "required key is missing"))
    }

    /// The value at `key` converted by `read`, `None` when absent; `expected` says what a
    /// value of the wrong type should have been.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        read: impl FnOnce(&'a Value) -> Option<T>,
        expected: &str,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => read(v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("{v}: expected {expected}"))),
        }
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, Value::as_u64, "a non-negative integer")
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, Value::as_f64, "a number")
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, Value::as_bool, "true or false")
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, Value::as_str, "a string")
    }

    /// Token ids given as one integer or a list of integers (`eos_token_id` is either).
    pub fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.err(key, format!("{v}: expected a token id")))
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    /// Three per-channel floats, or one float for all channels.
    pub fn channels(&self, key: &str) -> Result<Option<[f32; 3]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(Some([n.as_f64().unwrap_or(0.0) as f32; 3])),
            Some(Value::Array(items)) if items.len() == 3 && items.iter().all(Value::is_number) => {
                let f = |i: usize| items[i].as_f64().unwrap_or(0.0) as f32;
                Ok(Some([f(0), f(1), f(2)]))
            }
            Some(v) => Err(self.err(key, format!("{v}: expected 3 numbers (R, G, B)"))),
        }
    }
}

/// Model families the generation pipelines run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Idefics3 and SmolVLM / SmolVLM2: SigLIP encoder + pixel-shuffle connector + LLaMA decoder.
    Idefics3,
    /// LLaMA-family text decoder (SmolLM, TinyLlama, ...).
    Llama,
    /// Mistral text decoder.
    Mistral,
    /// Qwen2 / Qwen2.5 text decoder.
    Qwen2,
}

impl Architecture {
    /// Short lowercase name, as manifests store it.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Idefics3 => "idefics3",
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// Parses [`Architecture::name`] and the `model_type`s of `config.json`.
    pub fn from_model_type(model_type: &str) -> Option<Architecture> {
        Some(match model_type {
            "idefics3" | "smolvlm" | "smolvlm_vision" => Architecture::Idefics3,
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            _ => return None,
        })
    }

    /// True for vision-language models (three graphs, images in prompts).
    pub fn has_vision(self) -> bool {
        self == Architecture::Idefics3
    }
}

/// The `model_type`s [`Architecture::from_model_type`] accepts, for error messages.
pub const SUPPORTED_MODEL_TYPES: &str = "idefics3, smolvlm, llama, mistral, qwen2";

/// Decoder dimensions from `config.json` (`text_config` for VLMs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDims {
    /// Hidden (embedding) width.
    pub hidden_size: usize,
    /// Decoder layers: one `past_key_values.{i}.key/value` pair each.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Output vocabulary (logits width).
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub max_positions: usize,
}

/// Vision-side values from `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisionDims {
    /// Side of one square tile the encoder takes, pixels.
    pub image_size: usize,
    /// Patch side, pixels.
    pub patch_size: usize,
    /// Pixel-shuffle factor of the connector.
    pub scale_factor: usize,
    /// Id of the `<image>` placeholder token.
    pub image_token_id: u32,
}

impl VisionDims {
    /// Image tokens per tile: `(image_size / patch_size)^2 / scale_factor^2`, as the processor
    /// computes it.
    pub fn image_seq_len(&self) -> usize {
        let patches = self.image_size / self.patch_size;
        patches * patches / (self.scale_factor * self.scale_factor)
    }
}

/// What the runtime takes from `config.json` and `generation_config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The model family.
    pub architecture: Architecture,
    /// `config.json`'s `model_type`, as written.
    pub model_type: String,
    /// Decoder dimensions.
    pub text: TextDims,
    /// Vision values (VLMs only).
    pub vision: Option<VisionDims>,
    /// Ids that end generation (config and generation config together, deduplicated).
    pub eos_token_ids: Vec<u32>,
    /// `generation_config.json`, if the snapshot has one.
    pub generation: GenerationDefaults,
}

/// Sampling defaults from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// `do_sample`.
    pub do_sample: bool,
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_k`.
    pub top_k: Option<usize>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `max_new_tokens`.
    pub max_new_tokens: Option<usize>,
}

/// File names inside a snapshot or package.
pub mod files {
    /// Model configuration.
    pub const CONFIG: &str = "config.json";
    /// Sampling defaults and end-of-sequence ids.
    pub const GENERATION_CONFIG: &str = "generation_config.json";
    /// Image processor settings.
    pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
    /// Processor settings (`image_seq_len`).
    pub const PROCESSOR_CONFIG: &str = "processor_config.json";
    /// The tokenizer.
    pub const TOKENIZER: &str = "tokenizer.json";
    /// Tokenizer settings and, often, the chat template.
    pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
    /// The chat template, where it is kept apart from `tokenizer_config.json`.
    pub const CHAT_TEMPLATE_JSON: &str = "chat_template.json";
    /// The chat template as a plain Jinja file (newer exports).
    pub const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
    /// Special tokens (informational; `tokenizer.json` is authoritative).
    pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
}

impl ModelConfig {
    /// Reads `config.json` (required) and `generation_config.json` (optional) from `dir`.
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let config = JsonFile::load(&dir.join(files::CONFIG))?;
        let model_type = config
            .opt_str("model_type")?
            .ok_or_else(|| config.err("model_type", "required key is missing"))?
            .to_owned();
        let architecture = Architecture::from_model_type(&model_type).ok_or_else(|| {
            config.err(
                "model_type",
                format!("{model_type:?} is not supported (supported: {SUPPORTED_MODEL_TYPES})"),
            )
        })?;
        let prefix = if architecture.has_vision() {
            "text_config."
        } else {
            ""
        };
        let key = |k: &str| format!("{prefix}{k}");
        let size = |k: &str| -> Result<usize> {
            let n = config.u64(&key(k))?;
            if n == 0 {
                return Err(config.err(&key(k), "must be at least 1"));
            }
            Ok(n as usize)
        };
        let hidden_size = size("hidden_size")?;
        let heads = size("num_attention_heads")?;
        let kv_heads = match config.opt_u64(&key("num_key_value_heads"))? {
            Some(0) => return Err(config.err(&key("num_key_value_heads"), "must be at least 1")),
            Some(n) => n as usize,
            None => heads,
        };
        if heads % kv_heads != 0 {
            return Err(config.err(
                &key("num_key_value_heads"),
                format!("{kv_heads} does not divide num_attention_heads {heads}"),
            ));
        }
        let head_dim = match config.opt_u64(&key("head_dim"))? {
            Some(n) if n > 0 => n as usize,
            _ => hidden_size / heads,
        };
        let text = TextDims {
            hidden_size,
            layers: size("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab_size: size("vocab_size")?,
            max_positions: config
                .opt_u64(&key("max_position_embeddings"))?
                .map_or(usize::MAX, |n| n as usize),
        };
        let vision = if architecture.has_vision() {
            let image_token_id = config
                .opt_u64("image_token_id")?
                .or(config.opt_u64("image_token_index")?)
                .ok_or_else(|| config.err("image_token_id", "required key is missing"))?;
            let dims = VisionDims {
                image_size: config.u64("vision_config.image_size")? as usize,
                patch_size: config.u64("vision_config.patch_size")? as usize,
                scale_factor: config.u64("scale_factor")? as usize,
                image_token_id: u32::try_from(image_token_id)
                    .map_err(|_| config.err("image_token_id", "out of range"))?,
            };
            if dims.patch_size == 0 || dims.scale_factor == 0 || dims.image_seq_len() == 0 {
                return Err(config.err(
                    "vision_config.patch_size",
                    "patch_size and scale_factor must be at least 1 and leave at least one image token",
                ));
            }
            Some(dims)
        } else {
            None
        };
        let mut eos_token_ids = config.ids(&key("eos_token_id"))?;
        if prefix.is_empty() {
            // Nothing more at the top level.
        } else {
            eos_token_ids.extend(config.ids("eos_token_id")?);
        }
        let mut generation = GenerationDefaults::default();
        if let Some(g) = JsonFile::load_optional(&dir.join(files::GENERATION_CONFIG))? {
            eos_token_ids.extend(g.ids("eos_token_id")?);
            generation = GenerationDefaults {
                do_sample: g.opt_bool("do_sample")?.unwrap_or(false),
                temperature: g.opt_f64("temperature")?.map(|t| t as f32),
                top_k: g.opt_u64("top_k")?.map(|k| k as usize),
                top_p: g.opt_f64("top_p")?.map(|p| p as f32),
                max_new_tokens: g.opt_u64("max_new_tokens")?.map(|n| n as usize),
            };
        }
        let mut seen = std::collections::BTreeSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));
        Ok(ModelConfig {
            architecture,
            model_type,
            text,
            vision,
            eos_token_ids,
            generation,
        })
    }
}

/// `preprocessor_config.json` of an Idefics3 / SmolVLM image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Resize so the longest edge equals `longest_edge` first.
    pub do_resize: bool,
    /// `size.longest_edge`.
    pub longest_edge: u32,
    /// `max_image_size.longest_edge`: the encoder's tile side.
    pub tile: u32,
    /// Upper bound on either side after the first resize (4096 for SmolVLM, 1820 for Idefics3).
    pub max_side: u32,
    /// Resampling filter (`resample`, PIL numbering).
    pub filter: Filter,
    /// Split into tiles plus a global image.
    pub do_image_splitting: bool,
    /// Multiply pixels by `rescale_factor`.
    pub do_rescale: bool,
    /// Usually 1/255.
    pub rescale_factor: f64,
    /// Subtract `mean`, divide by `std`.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// `image_seq_len` from `processor_config.json`, if given there.
    pub image_seq_len: Option<usize>,
}

impl ImageProcessorConfig {
    /// Reads `preprocessor_config.json` (required) and `processor_config.json` (optional).
    pub fn load(dir: &Path) -> Result<ImageProcessorConfig> {
        let c = JsonFile::load(&dir.join(files::PREPROCESSOR_CONFIG))?;
        let kind = c.opt_str("image_processor_type")?.unwrap_or("");
        let max_side = if kind.starts_with("Idefics3") {
            1820
        } else {
            4096
        };
        let edge = |key: &str, default: u64| -> Result<u32> {
            let n = c.opt_u64(key)?.unwrap_or(default);
            if n == 0 || n > 16384 {
                return Err(c.err(key, format!("{n}: expected 1..=16384 pixels")));
            }
            Ok(n as u32)
        };
        let filter = match c.opt_u64("resample")?.unwrap_or(1) {
            0 => Filter::Nearest,
            1 => Filter::Lanczos3,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            n => {
                return Err(c.err(
                    "resample",
                    format!("{n}: expected a PIL filter 0 (nearest), 1 (lanczos), 2 (bilinear) or 3 (bicubic)"),
                ))
            }
        };
        let std = c.channels("image_std")?.unwrap_or([0.5; 3]);
        if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(c.err("image_std", "values must be finite and non-zero"));
        }
        let image_seq_len = match JsonFile::load_optional(&dir.join(files::PROCESSOR_CONFIG))? {
            Some(p) => p.opt_u64("image_seq_len")?.map(|n| n as usize),
            None => None,
        };
        Ok(ImageProcessorConfig {
            do_resize: c.opt_bool("do_resize")?.unwrap_or(true),
            longest_edge: edge("size.longest_edge", 4 * 364)?,
            tile: edge("max_image_size.longest_edge", 364)?,
            max_side,
            filter,
            do_image_splitting: c.opt_bool("do_image_splitting")?.unwrap_or(true),
            do_rescale: c.opt_bool("do_rescale")?.unwrap_or(true),
            rescale_factor: c.opt_f64("rescale_factor")?.unwrap_or(1.0 / 255.0),
            do_normalize: c.opt_bool("do_normalize")?.unwrap_or(true),
            mean: c.channels("image_mean")?.unwrap_or([0.5; 3]),
            std,
            image_seq_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_a_text_config_and_merges_eos_ids() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "config.json",
            r#"{"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300,
                "eos_token_id": 2, "max_position_embeddings": 512}"#,
        );
        write(
            tmp.path(),
            "generation_config.json",
            r#"{"eos_token_id": [2, 7], "do_sample": true, "temperature": 0.7}"#,
        );
        let c = ModelConfig::load(tmp.path()).unwrap();
        assert_eq!(c.architecture, Architecture::Mistral);
        assert_eq!(c.text.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert!(c.generation.do_sample);
        assert_eq!(c.generation.temperature, Some(0.7));
    }

    #[test]
    fn errors_name_file_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"model_type": "gpt2"}"#,
                "field `model_type`: \"gpt2\" is not supported",
            ),
            (
                r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                    "num_hidden_layers": 2}"#,
                "config.json: field `vocab_size`: required key is missing",
            ),
            (
                r#"{"model_type": "smolvlm", "text_config": {"hidden_size": "64"}}"#,
                "field `text_config.hidden_size`: \"64\": expected a non-negative integer",
            ),
            ("{", "config.json: field `.`: not valid JSON"),
        ];
        for (text, expected) in cases {
            write(tmp.path(), "config.json", text);
            let e = ModelConfig::load(tmp.path()).unwrap_err().to_string();
            assert!(e.contains(expected), "{expected:?} not in {e:?}");
        }
        std::fs::remove_file(tmp.path().join("config.json")).unwrap();
        let e = ModelConfig::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("reading") && e.contains("config.json"), "{e}");
    }
}
