//! Text side of generation: `tokenizer.json` through the `tokenizers` crate and chat templates
//! rendered with `minijinja` the way `transformers` renders them.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::hf::{files, JsonFile};

/// One part of a chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Content {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image placeholder; the template writes the model's image token there.
    Image,
}

/// A chat message: a role (`user`, `assistant`, `system`) and its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `user`, `assistant` or `system`.
    pub role: String,
    /// Text and images in order.
    pub content: Vec<Content>,
}

impl Message {
    /// A user message: optionally an image first, then the text (the layout model cards use).
    pub fn user(text: &str, image: bool) -> Message {
        let mut content = vec![];
        if image {
            content.push(Content::Image);
        }
        content.push(Content::Text {
            text: text.to_owned(),
        });
        Message {
            role: "user".into(),
            content,
        }
    }
}

/// How a template expects `message.content`: VLM templates iterate a list of typed parts,
/// text-model templates concatenate a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentStyle {
    /// `[{"type": "image"}, {"type": "text", "text": ...}]`.
    Parts,
    /// The text parts joined.
    Text,
}

/// A tokenizer and the chat template that goes with it.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    tokenizer_path: PathBuf,
    template: Option<(String, PathBuf)>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec")
            .field("tokenizer", &self.tokenizer_path)
            .field("vocab", &self.vocab_size())
            .field("template", &self.template.as_ref().map(|t| &t.1))
            .finish()
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn special_token(config: &JsonFile, key: &str) -> Option<String> {
    let v = config.get(key)?;
    v.as_str()
        .or_else(|| v.get("content").and_then(|c| c.as_str()))
        .map(str::to_owned)
}

impl TextCodec {
    /// Loads `tokenizer.json` and the chat template from a snapshot or package directory: the
    /// template comes from `chat_template.jinja`, `chat_template.json` or
    /// `tokenizer_config.json`'s `chat_template`, in that order.
    pub fn load(dir: &Path) -> Result<TextCodec> {
        let tokenizer_path = dir.join(files::TOKENIZER);
        let bytes =
            std::fs::read(&tokenizer_path).map_err(|e| Error::io("reading", &tokenizer_path, e))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::text(&tokenizer_path, format!("not a usable tokenizer: {e}")))?;
        let config = JsonFile::load_optional(&dir.join(files::TOKENIZER_CONFIG))?;
        let mut template = None;
        let jinja = dir.join(files::CHAT_TEMPLATE_JINJA);
        let json = dir.join(files::CHAT_TEMPLATE_JSON);
        if jinja.exists() {
            let text =
                std::fs::read_to_string(&jinja).map_err(|e| Error::io("reading", &jinja, e))?;
            template = Some((text, jinja));
        } else if let Some(file) = JsonFile::load_optional(&json)? {
            let text = file.opt_str("chat_template")?.ok_or_else(|| {
                Error::manifest(&json, "chat_template", "required key is missing")
            })?;
            template = Some((text.to_owned(), json));
        } else if let Some(config) = &config {
            template = template_from_config(config)?;
        }
        let (bos_token, eos_token) = match &config {
            Some(c) => (special_token(c, "bos_token"), special_token(c, "eos_token")),
            None => (None, None),
        };
        let codec = TextCodec {
            tokenizer,
            tokenizer_path,
            template,
            bos_token,
            eos_token,
        };
        if let Some((source, path)) = &codec.template {
            // A template that does not compile is a broken package, not a bad prompt.
            environment()
                .template_from_str(source)
                .map_err(|e| Error::text(path, format!("chat template does not compile: {e}")))?;
        }
        Ok(codec)
    }

    /// The `tokenizer.json` this codec was loaded from.
    pub fn tokenizer_path(&self) -> &Path {
        &self.tokenizer_path
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Largest token id the tokenizer can produce, if it has any.
    pub fn max_token_id(&self) -> Option<u32> {
        self.tokenizer.get_vocab(true).values().copied().max()
    }

    /// The id of a token (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// True when the snapshot has a chat template.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders `messages` with the chat template, as `transformers`' `apply_chat_template`
    /// does (`trim_blocks`, `lstrip_blocks`, `bos_token` / `eos_token` set,
    /// `add_generation_prompt`). Without a template the text parts are joined.
    pub fn render(
        &self,
        messages: &[Message],
        style: ContentStyle,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some((source, path)) = &self.template else {
            return Ok(messages
                .iter()
                .flat_map(|m| &m.content)
                .filter_map(|c| match c {
                    Content::Text { text } => Some(text.as_str()),
                    Content::Image => None,
                })
                .collect::<Vec<_>>()
                .join("\n"));
        };
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| match style {
                ContentStyle::Parts => serde_json::json!({"role": m.role, "content": m.content}),
                ContentStyle::Text => {
                    let text: String = m
                        .content
                        .iter()
                        .filter_map(|c| match c {
                            Content::Text { text } => Some(text.as_str()),
                            Content::Image => None,
                        })
                        .collect();
                    serde_json::json!({"role": m.role, "content": text})
                }
            })
            .collect();
        let env = environment();
        let template = env
            .template_from_str(source)
            .map_err(|e| Error::text(path, format!("chat template does not compile: {e}")))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(|e| Error::text(path, format!("rendering the chat template: {e:#}")))
    }

    /// Token ids of `text`; `add_special_tokens` applies `tokenizer.json`'s post-processor
    /// (e.g. a BOS token), as `transformers` does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::text(&self.tokenizer_path, format!("encoding the prompt: {e}")))
    }

    /// Text of `ids`; special tokens are left out when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::text(&self.tokenizer_path, format!("decoding tokens: {e}")))
    }
}

fn template_from_config(config: &JsonFile) -> Result<Option<(String, PathBuf)>> {
    let path = config.path().to_owned();
    match config.get("chat_template") {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some((s.clone(), path))),
        // A list of named templates: the one called "default" is what apply_chat_template uses.
        Some(serde_json::Value::Array(list)) => {
            let default = list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
            match default
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
            {
                Some(s) => Ok(Some((s.to_owned(), path))),
                None => Err(Error::manifest(
                    &path,
                    "chat_template",
                    "a list of templates without one named \"default\"",
                )),
            }
        }
        Some(v) => Err(Error::manifest(
            &path,
            "chat_template",
            format!("{v}: expected a string"),
        )),
    }
}

/// A Jinja environment configured like `transformers`' chat-template sandbox.
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Templates call Python string methods (`.strip()`, `.startswith()`, ...).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env
}

/// Text that arrives token by token: emits only complete characters, so a character split
/// over several tokens (byte-fallback pieces, multi-byte UTF-8) is emitted once, whole. Decodes
/// a short window (the tokens since the last emission plus the one before), as streaming
/// servers do, so the work per token stays constant.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    /// Adds a token and returns the text it completes (may be empty).
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = codec.decode(&self.ids[self.prefix..self.read], true)?;
        let now = codec.decode(&self.ids[self.prefix..], true)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // Decoding more tokens may rewrite the end of the earlier text (a space the decoder
        // strips at the end); emit from the first character that differs is not possible once
        // printed, so only a clean extension is emitted here.
        let Some(new) = now.strip_prefix(before.as_str()) else {
            return Ok(String::new());
        };
        let new = new.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLVLM_TEMPLATE: &str = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

    fn codec_with(template: &str) -> TextCodec {
        let tokenizer: tokenizers::Tokenizer = serde_json::from_value(serde_json::json!({
            "version": "1.0",
            "model": {"type": "WordLevel", "vocab": {"a": 0, "<unk>": 1}, "unk_token": "<unk>"},
        }))
        .unwrap();
        TextCodec {
            tokenizer,
            tokenizer_path: "tokenizer.json".into(),
            template: Some((template.into(), "chat_template.json".into())),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
        }
    }

    #[test]
    fn renders_parts_and_text_styles() {
        let codec = codec_with(SMOLVLM_TEMPLATE);
        let text = codec
            .render(
                &[Message::user("Is there a scratch?", true)],
                ContentStyle::Parts,
                true,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>User:<image>Is there a scratch?<end_of_utterance>\nAssistant:"
        );
        let mistral = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% else %}{{ raise_exception('only user messages') }}{% endif %}{% endfor %}";
        let codec = codec_with(mistral);
        let text = codec
            .render(&[Message::user(" hello ", false)], ContentStyle::Text, true)
            .unwrap();
        assert_eq!(text, "<s>[INST] hello [/INST]");
        let assistant = Message {
            role: "assistant".into(),
            content: vec![Content::Text { text: "x".into() }],
        };
        let e = codec
            .render(&[assistant], ContentStyle::Text, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only user messages"), "{e}");
    }
}
