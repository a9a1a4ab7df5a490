//! Text side: the checkpoint's tokenizer (`tokenizer.json` via the `tokenizers` crate, or a
//! SentencePiece `tokenizer.model` converted to one),
//! incremental detokenisation for streaming, and chat templates rendered with minijinja the way
//! transformers' `apply_chat_template` renders them.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::{ConfigLayout, LlavaConfig, TextArch};
use crate::error::{ModelError, Result};
use crate::sentencepiece::{SentencePieceModel, llama_tokenizer_spaces};

/// A `tokenizer.json` tokenizer. Cloning is cheap (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (or, when the folder has none, `dir/tokenizer.model`: see
    /// [`Tokenizer::from_sentencepiece_with_config`]) the way transformers 5.24 `AutoTokenizer`
    /// loads the folder (see [`Tokenizer::from_bytes_with_config`]), reading
    /// `tokenizer_config.json` and the `model_type` of `config.json` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        let sentencepiece_path = dir.join("tokenizer.model");
        let sentencepiece_only = !path.exists() && sentencepiece_path.is_file();
        let tokenizer_config = read_if_present(&dir.join("tokenizer_config.json"))?;
        let model_type = match read_json_if_present(&dir.join("config.json"))? {
            Some(config) => config
                .get("model_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            None => None,
        };
        let tokenizer_config = tokenizer_config.as_deref().map(str::as_bytes);
        let loaded = if sentencepiece_only {
            let model = std::fs::read(&sentencepiece_path).map_err(|e| ModelError::io(&sentencepiece_path, e))?;
            Self::from_sentencepiece_with_config(&model, tokenizer_config, model_type.as_deref())
        } else {
            let json = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            Self::from_bytes_with_config(&json, tokenizer_config, model_type.as_deref())
        };
        loaded.map_err(|e| match e {
            ModelError::Tokenizer(msg) => ModelError::Tokenizer(format!("{}: {msg}", dir.display())),
            other => other,
        })
    }

    /// A SentencePiece `tokenizer.model` (a folder without `tokenizer.json`, like the original
    /// LLaVA checkpoints) converted as transformers 5.24 converts it (see [`crate::sentencepiece`]),
    /// then read like a `tokenizer.json` by [`Tokenizer::from_bytes_with_config`]. Only BPE models
    /// with byte fallback (Llama, Mistral) are supported.
    pub fn from_sentencepiece_with_config(
        sentencepiece_model: &[u8],
        tokenizer_config_json: Option<&[u8]>,
        model_type: Option<&str>,
    ) -> Result<Self> {
        let config = parse_tokenizer_config(tokenizer_config_json)?;
        let json = SentencePieceModel::parse(sentencepiece_model)?.tokenizer_json(&config, model_type)?;
        Self::from_bytes_with_config(&json.to_string().into_bytes(), tokenizer_config_json, model_type)
    }

    /// `tokenizer.json` plus the folder's `tokenizer_config.json` and `config.json` model type.
    ///
    /// transformers 5.24 uses `tokenizer.json` as written for LLaVA model folders (model types
    /// `llava` / `llava_next` are on its list of Hub configs with a wrong `tokenizer_class`), and
    /// the original LLaVA layout is used as written too. Only a folder without such a model type
    /// whose `tokenizer_class` is `LlamaTokenizer` is rebuilt as transformers' `LlamaTokenizer`
    /// does: no normalizer, `Metaspace` with `prepend_scheme` "first" ("always" if `legacy: true`,
    /// "never" if `add_prefix_space: false`), and a decoder stripping one leading space unless
    /// `add_prefix_space: false`. The visible difference: with "first", text right after a special
    /// token such as `<image>` gets no `▁` prefix. The post-processor (which adds BOS) is kept.
    pub fn from_bytes_with_config(
        tokenizer_json: &[u8],
        tokenizer_config_json: Option<&[u8]>,
        model_type: Option<&str>,
    ) -> Result<Self> {
        let config = parse_tokenizer_config(tokenizer_config_json)?;
        let llava_folder = matches!(
            model_type,
            Some("llava" | "llava_next" | "llava_llama" | "llava_mistral")
        );
        let llama_class = matches!(
            config.get("tokenizer_class").and_then(Value::as_str),
            Some("LlamaTokenizer" | "LlamaTokenizerFast")
        );
        if llava_folder || !llama_class {
            return Self::from_bytes(tokenizer_json);
        }
        let mut tokenizer: Value = serde_json::from_slice(tokenizer_json)
            .map_err(|e| ModelError::Tokenizer(format!("tokenizer.json: malformed JSON: {e}")))?;
        let (pre_tokenizer, decoder) = llama_tokenizer_spaces(&config);
        let Some(fields) = tokenizer.as_object_mut() else {
            return Err(ModelError::Tokenizer(
                "tokenizer.json: expected a JSON object".into(),
            ));
        };
        fields.insert("normalizer".into(), Value::Null);
        fields.insert("pre_tokenizer".into(), pre_tokenizer);
        fields.insert("decoder".into(), decoder);
        let inner: tokenizers::Tokenizer = serde_json::from_value(tokenizer)
            .map_err(|e| ModelError::Tokenizer(format!("cannot load tokenizer.json: {e}")))?;
        Ok(Tokenizer {
            inner: Arc::new(inner),
        })
    }

    /// Loads a `tokenizer.json` exactly as written (no `tokenizer_config.json` adjustments).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Loads `tokenizer.json` bytes exactly as written.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| ModelError::Tokenizer(format!("cannot load tokenizer.json: {e}")))?;
        Ok(Tokenizer {
            inner: Arc::new(inner),
        })
    }

    /// Token ids of `text`; with `add_special_tokens` the post-processor adds BOS.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids` (as transformers' `decode` with `clean_up_tokenization_spaces=False`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// The id of a token (including added tokens such as `<image>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A decoder that turns generated ids into text pieces as they arrive.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder {
            tokenizer: self.clone(),
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Incremental detokeniser. Each piece is the text the new ids add to the decoded whole, so the
/// pieces concatenate to `decode(all ids)`: a piece is held back while the ids end inside a
/// multi-byte character (byte-fallback tokens), and a word's leading space is kept by decoding
/// each new id together with the previous ones (decoders strip the first token's space).
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// Ids from `prefix_offset` on; earlier ones no longer affect the text.
    ids: Vec<u32>,
    /// `ids[prefix_offset..read_offset]` is context already emitted; the rest is pending.
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    /// Adds one id; returns the new text, or `None` while it cannot be decoded yet.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if text.len() <= prefix.len()
            || text.ends_with(char::REPLACEMENT_CHARACTER)
            || !text.starts_with(&prefix)
        {
            return Ok(None);
        }
        let piece = text[prefix.len()..].to_string();
        // Keep only the ids still needed as context for the next piece.
        self.ids.drain(..self.prefix_offset);
        self.prefix_offset = self.read_offset - self.prefix_offset;
        self.read_offset = self.ids.len();
        Ok(Some(piece))
    }

    /// Text still held back at the end of generation (an incomplete character decodes to U+FFFD,
    /// as in a full decode).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(text
            .strip_prefix(&prefix)
            .filter(|rest| !rest.is_empty())
            .map(str::to_string))
    }
}

/// One chat turn: `images` `<image>` placeholders, then `text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub images: usize,
    pub text: String,
}

impl Message {
    pub fn user(images: usize, text: impl Into<String>) -> Self {
        Message {
            role: "user".into(),
            images,
            text: text.into(),
        }
    }

    pub fn assistant(text: impl Into<String>) -> Self {
        Message {
            role: "assistant".into(),
            images: 0,
            text: text.into(),
        }
    }

    pub fn system(text: impl Into<String>) -> Self {
        Message {
            role: "system".into(),
            images: 0,
            text: text.into(),
        }
    }

    /// The HF message dict: `{"role", "content": [{"type": "image"}..., {"type": "text", "text"}]}`.
    pub fn to_hf(&self) -> Value {
        let mut content: Vec<Value> = (0..self.images).map(|_| json!({"type": "image"})).collect();
        content.push(json!({"type": "text", "text": self.text}));
        json!({"role": self.role, "content": content})
    }
}

/// Templates for checkpoints that ship none (spec §7, after the LLaVA repo's conversation styles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinTemplate {
    /// `{system} USER: <image>\n{question} ASSISTANT:`
    Vicuna,
    /// `[INST] <image>\n{question} [/INST]` (llava-hf's Mistral template)
    Mistral,
    /// LLaVA's `mistral_instruct` (original liuhaotian checkpoints): `[INST] <image>\n{question}
    /// [/INST]`, answers as ` {answer} </s>`, a system prompt in `<<SYS>>` inside the first turn.
    MistralInstruct,
    /// Yi-34B: `<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n...`
    ChatMl,
}

pub const VICUNA_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. \
     The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// LLaVA's `conv_vicuna_v1`: `{system} USER: {q} ASSISTANT: {a}</s>USER: ...`.
const VICUNA_TEMPLATE: &str = concat!(
    "{% if messages and messages[0]['role'] == 'system' %}",
    "{{ messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}",
    "{% set turns = messages[1:] %}",
    "{% else %}{{ default_system }}{% set turns = messages %}{% endif %}",
    "{{ ' ' }}",
    "{% for message in turns %}",
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}",
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}",
    "{% else %}{{ raise_exception('vicuna template: unexpected role ' + message['role']) }}{% endif %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}",
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}",
    "{{ '</s>' if message['role'] == 'assistant' else ' ' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
);

const MISTRAL_TEMPLATE: &str = concat!(
    "{% for message in messages %}",
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}",
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}",
    "{{ ' [/INST]' }}",
    "{% elif message['role'] == 'assistant' %}",
    "{{ ' ' + (message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) + '</s>' }}",
    "{% else %}{{ raise_exception('mistral template: only user and assistant roles are supported') }}{% endif %}",
    "{% endfor %}",
);

/// LLaVA's `conv_mistral_instruct` (`SeparatorStyle.LLAMA_2`, sep "", sep2 "</s>", no system).
const MISTRAL_INSTRUCT_TEMPLATE: &str = concat!(
    "{% set system = '' %}{% set turns = messages %}",
    "{% if messages and messages[0]['role'] == 'system' %}",
    "{% set system = messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}",
    "{% set turns = messages[1:] %}{% endif %}",
    "{% for message in turns %}",
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}",
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}",
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}",
    "{{ ' [/INST]' }}",
    "{% elif message['role'] == 'assistant' %}",
    "{{ ' ' + (message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) + ' </s>' }}",
    "{% else %}{{ raise_exception('mistral_instruct template: unexpected role ' + message['role']) }}{% endif %}",
    "{% endfor %}",
);

const CHATML_TEMPLATE: &str = concat!(
    "{% if not (messages and messages[0]['role'] == 'system') %}",
    "{{ '<|im_start|>system\\nAnswer the questions.<|im_end|>' }}{% endif %}",
    "{% for message in messages %}",
    "{{ '<|im_start|>' + message['role'] + '\\n' }}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}",
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}",
    "{{ '<|im_end|>' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
);

impl BuiltinTemplate {
    /// Yi-34B (vocab 64000 / 64064) speaks ChatML; otherwise Mistral or Vicuna by architecture.
    /// For original LLaVA checkpoints this is the conversation mode LLaVA's run scripts pick from
    /// the model name (and SGLang's templates follow): `chatml_direct` for llava-v1.6-34b,
    /// `mistral_instruct` for llava-v1.6-mistral-7b, `llava_v1` for llava-v1.6-vicuna-*.
    pub fn for_config(config: &LlavaConfig) -> Self {
        match (config.text.vocab_size, config.text.arch, config.layout) {
            (64000 | 64064, _, _) => BuiltinTemplate::ChatMl,
            (_, TextArch::Mistral, ConfigLayout::OriginalLlava) => BuiltinTemplate::MistralInstruct,
            (_, TextArch::Mistral, ConfigLayout::LlavaHf) => BuiltinTemplate::Mistral,
            (_, TextArch::Llama, _) => BuiltinTemplate::Vicuna,
        }
    }

    fn source(self) -> &'static str {
        match self {
            BuiltinTemplate::Vicuna => VICUNA_TEMPLATE,
            BuiltinTemplate::Mistral => MISTRAL_TEMPLATE,
            BuiltinTemplate::MistralInstruct => MISTRAL_INSTRUCT_TEMPLATE,
            BuiltinTemplate::ChatMl => CHATML_TEMPLATE,
        }
    }
}

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const SENTENCEPIECE_FILE: &str = "tokenizer.model";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const TEMPLATE_JINJA_FILE: &str = "chat_template.jinja";
pub const TEMPLATE_JSON_FILE: &str = "chat_template.json";

/// The files [`ChatTemplate::from_files`] looks in, as read: `(name in messages, text)`.
pub struct TemplateFiles<'a> {
    pub jinja: Option<&'a str>,
    pub json: Option<(&'a str, &'a str)>,
    pub tokenizer_config: Option<(&'a str, &'a str)>,
}

/// A compiled chat template plus the special-token strings templates may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat";

/// Template instructions one render may run: real chat templates use a few dozen per message; a
/// hostile one (nested `range(100000)` loops) stops with an error instead of running for hours.
const TEMPLATE_FUEL: u64 = 1_000_000;

impl ChatTemplate {
    /// Compiles a Jinja chat template with transformers' settings (`trim_blocks`,
    /// `lstrip_blocks`, `raise_exception`, Python string methods).
    pub fn from_source(source: impl Into<String>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.into())
            .map_err(|e| ModelError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: String::new(),
            eos_token: String::new(),
        })
    }

    pub fn builtin(kind: BuiltinTemplate) -> Self {
        let mut template = Self::from_source(kind.source()).expect("built-in chat templates compile");
        template.env.add_global("default_system", VICUNA_SYSTEM);
        template.bos_token = "<s>".into();
        template.eos_token = "</s>".into();
        template
    }

    /// The template a checkpoint folder ships, from `chat_template.jinja`, `chat_template.json`
    /// or the `chat_template` key of `tokenizer_config.json` (first found); `Ok(None)` if none.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let read = |name: &str| {
            let path = dir.join(name);
            Ok::<_, ModelError>(read_if_present(&path)?.map(|text| (path.display().to_string(), text)))
        };
        let tokenizer_config = read(TOKENIZER_CONFIG_FILE)?;
        let jinja = read(TEMPLATE_JINJA_FILE)?;
        let json = if jinja.is_none() { read(TEMPLATE_JSON_FILE)? } else { None };
        fn as_ref(file: &Option<(String, String)>) -> Option<(&str, &str)> {
            file.as_ref().map(|(name, text)| (name.as_str(), text.as_str()))
        }
        Self::from_files(&TemplateFiles {
            jinja: jinja.as_ref().map(|(_, text)| text.as_str()),
            json: as_ref(&json),
            tokenizer_config: as_ref(&tokenizer_config),
        })
    }

    /// The template among a checkpoint's files: `chat_template.jinja`, else `chat_template.json`,
    /// else the `chat_template` key of `tokenizer_config.json`; `Ok(None)` if none. Its
    /// `bos_token` and `eos_token` come from `tokenizer_config.json`.
    pub fn from_files(files: &TemplateFiles<'_>) -> Result<Option<Self>> {
        let tokenizer_config = files
            .tokenizer_config
            .map(|(name, text)| parse_json(name, text))
            .transpose()?;
        let source = if let Some(text) = files.jinja {
            Some(text.to_string())
        } else if let Some((name, text)) = files.json {
            let json = parse_json(name, text)?;
            Some(template_field(&json, name)?.ok_or_else(|| {
                ModelError::Template(format!("{name}: key `chat_template` is missing"))
            })?)
        } else if let (Some(json), Some((name, _))) = (&tokenizer_config, files.tokenizer_config) {
            template_field(json, name)?
        } else {
            None
        };
        let Some(source) = source else { return Ok(None) };
        let mut template = Self::from_source(source)?;
        if let Some(config) = &tokenizer_config {
            template.bos_token = special_token(config, "bos_token");
            template.eos_token = special_token(config, "eos_token");
        }
        Ok(Some(template))
    }

    /// The folder's own template, or the built-in one that fits `config`.
    pub fn for_model(dir: impl AsRef<Path>, config: &LlavaConfig) -> Result<Self> {
        Ok(match Self::from_dir(dir)? {
            Some(template) => template,
            None => Self::builtin(BuiltinTemplate::for_config(config)),
        })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages.iter().map(Message::to_hf).collect();
        self.render_hf(&Value::Array(messages), add_generation_prompt)
    }

    /// Renders HF-style message dicts as given (content lists in any order).
    pub fn render_hf(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::Template(describe(&e)))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::Template(describe(&e)))
    }
}

/// minijinja's message plus its detail (line, offending expression) when it has one.
fn describe(error: &minijinja::Error) -> String {
    match error.detail() {
        Some(detail) if !error.to_string().contains(detail) => format!("{error}: {detail}"),
        _ => error.to_string(),
    }
}

fn parse_tokenizer_config(bytes: Option<&[u8]>) -> Result<Value> {
    match bytes {
        Some(bytes) => serde_json::from_slice(bytes)
            .map_err(|e| ModelError::Tokenizer(format!("tokenizer_config.json: malformed JSON: {e}"))),
        None => Ok(Value::Null),
    }
}

fn read_if_present(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    let Some(text) = read_if_present(path)? else {
        return Ok(None);
    };
    parse_json(&path.display().to_string(), &text).map(Some)
}

fn parse_json(file: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| ModelError::Template(format!("{file}: malformed JSON: {e}")))
}

/// `chat_template` as a string, or (older tokenizer configs) a list of `{name, template}` of
/// which the one named "default" is used.
fn template_field(json: &Value, file: &str) -> Result<Option<String>> {
    match json.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(source.clone())),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| {
                ModelError::Template(format!(
                    "{file}: no template named \"default\" in `chat_template`"
                ))
            }),
        Some(other) => Err(ModelError::Template(format!(
            "{file}: key `chat_template`: expected a string, got {other}"
        ))),
    }
}

/// A special token as `"<s>"` or `{"content": "<s>", ...}`; empty when absent.
fn special_token(config: &Value, key: &str) -> String {
    match config.get(key) {
        Some(Value::String(token)) => token.clone(),
        Some(Value::Object(token)) => token
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    const TOKENIZERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/testdata/tokenizers");

    /// Loading a 3.5 MB tokenizer.json takes a moment; tests share one of each.
    fn tokenizer(name: &str) -> &'static Tokenizer {
        static VICUNA: OnceLock<Tokenizer> = OnceLock::new();
        static MISTRAL: OnceLock<Tokenizer> = OnceLock::new();
        let cell = match name {
            "llama2-vicuna" => &VICUNA,
            "mistral" => &MISTRAL,
            other => panic!("no test tokenizer {other}"),
        };
        cell.get_or_init(|| Tokenizer::from_dir(format!("{TOKENIZERS}/{name}")).unwrap())
    }

    fn fixture(name: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn ids_of(value: &Value) -> Vec<u32> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect()
    }

    /// Reassembles what a stream decoder emits for `ids`, checking each piece on the way.
    fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> (String, usize) {
        let mut decoder = tokenizer.stream_decoder(true);
        let mut text = String::new();
        let mut pieces = 0;
        for &id in ids {
            if let Some(piece) = decoder.step(id).unwrap() {
                assert!(
                    !piece.contains(char::REPLACEMENT_CHARACTER),
                    "broken UTF-8 piece {piece:?} in {ids:?}"
                );
                text.push_str(&piece);
                pieces += 1;
            }
        }
        if let Some(rest) = decoder.finish().unwrap() {
            text.push_str(&rest);
        }
        (text, pieces)
    }

    #[test]
    fn encode_and_decode_match_transformers() {
        let cases = fixture("tokenizer_cases.json");
        assert!(cases.len() >= 40);
        for case in &cases {
            let tokenizer = tokenizer(case["tokenizer"].as_str().unwrap());
            let text = case["text"].as_str().unwrap();
            let add_special = case["add_special_tokens"].as_bool().unwrap();
            let ids = ids_of(&case["ids"]);
            assert_eq!(tokenizer.encode(text, add_special).unwrap(), ids, "{case}");
            assert_eq!(
                tokenizer.decode(&ids, true).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{case}"
            );
        }
    }

    #[test]
    fn stream_decoder_pieces_concatenate_to_full_decode() {
        for case in fixture("tokenizer_cases.json") {
            let tokenizer = tokenizer(case["tokenizer"].as_str().unwrap());
            let ids = ids_of(&case["ids"]);
            let (text, pieces) = stream(tokenizer, &ids);
            assert_eq!(text, case["decoded"].as_str().unwrap(), "{case}");
            assert!(pieces <= ids.len());
        }
    }

    #[test]
    fn stream_decoder_keeps_spaces_and_holds_partial_characters() {
        let vicuna = tokenizer("llama2-vicuna");
        // "Hello world" without BOS: [15043, 3186] per the fixtures.
        let mut decoder = vicuna.stream_decoder(true);
        assert_eq!(decoder.step(15043).unwrap().as_deref(), Some("Hello"));
        assert_eq!(decoder.step(3186).unwrap().as_deref(), Some(" world"));
        assert_eq!(decoder.finish().unwrap(), None);

        // U+1F680 (F0 9F 9A 80) as byte-fallback tokens <0xF0><0x9F><0x9A><0x80> = ids 243, 162, 157, 131.
        let rocket = [243, 162, 157, 131];
        assert_eq!(vicuna.decode(&rocket, true).unwrap(), "\u{1F680}");
        let mut decoder = vicuna.stream_decoder(true);
        assert_eq!(decoder.step(3186).unwrap().as_deref(), Some("world"));
        for &id in &rocket[..3] {
            assert_eq!(decoder.step(id).unwrap(), None);
        }
        assert_eq!(decoder.step(rocket[3]).unwrap().as_deref(), Some("\u{1F680}"));

        // Generation stopped mid-character: the remainder comes out as a full decode shows it.
        let mut decoder = vicuna.stream_decoder(true);
        assert_eq!(decoder.step(243).unwrap(), None);
        assert_eq!(decoder.step(162).unwrap(), None);
        assert_eq!(
            decoder.finish().unwrap().unwrap(),
            vicuna.decode(&[243, 162], true).unwrap()
        );
    }

    #[test]
    fn special_tokens() {
        for name in ["llama2-vicuna", "mistral"] {
            let tokenizer = tokenizer(name);
            assert_eq!(tokenizer.token_id("<image>"), Some(32000), "{name}");
            assert_eq!(tokenizer.token_id("</s>"), Some(2), "{name}");
            assert_eq!(tokenizer.token_id("<no such token>"), None);
            assert!(tokenizer.vocab_size() > 32000);
        }
        let err = Tokenizer::from_bytes(b"{\"not\": \"a tokenizer\"}")
            .err()
            .unwrap();
        assert!(matches!(err, ModelError::Tokenizer(_)), "{err}");
    }

    #[test]
    fn llama_tokenizer_config_adjustments_follow_transformers() {
        // Expected ids and decodes printed by transformers 5.24 AutoTokenizer for these variants
        // of the vicuna folder.
        let dir = format!("{TOKENIZERS}/llama2-vicuna");
        let json: Value =
            serde_json::from_slice(&std::fs::read(format!("{dir}/tokenizer.json")).unwrap()).unwrap();
        let config: Value =
            serde_json::from_slice(&std::fs::read(format!("{dir}/tokenizer_config.json")).unwrap()).unwrap();
        let load = |json: &Value, config: &Value| {
            Tokenizer::from_bytes_with_config(
                json.to_string().as_bytes(),
                Some(config.to_string().as_bytes()),
                None,
            )
            .unwrap()
        };
        let with = |key: &str, value: Value| {
            let mut config = config.clone();
            config[key] = value;
            config
        };

        // Hub files written by transformers 4.x: Prepend + Replace normalizer, no pre-tokenizer.
        let mut hub_json = json.clone();
        hub_json["normalizer"] = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]});
        hub_json["pre_tokenizer"] = Value::Null;
        let hub = load(&hub_json, &config);
        assert_eq!(
            hub.encode("<image>\nWhat is it?", true).unwrap(),
            [1, 32000, 13, 5618, 338, 372, 29973]
        );
        assert_eq!(hub.encode("a  b", true).unwrap(), [1, 263, 29871, 289]);
        assert_eq!(hub.encode(" leading", true).unwrap(), [1, 8236]);

        let legacy = load(&json, &with("legacy", json!(true)));
        assert_eq!(
            legacy.encode("<image>\nWhat is it?", true).unwrap(),
            [1, 32000, 29871, 13, 5618, 338, 372, 29973]
        );

        let no_prefix = load(&json, &with("add_prefix_space", json!(false)));
        assert_eq!(no_prefix.encode("Hello world", true).unwrap(), [1, 10994, 3186]);
        assert_eq!(no_prefix.decode(&[1, 8236], true).unwrap(), " leading");
        assert_eq!(
            no_prefix.encode("<image>\nWhat is it?", true).unwrap(),
            [1, 32000, 13, 5618, 338, 372, 29973]
        );

        // In a llava_next model folder transformers uses the file as written (prepend_scheme
        // "always"): `▁` (29871) follows `<image>`, as in the input_ids of the reference
        // generator's tiny checkpoints (AutoProcessor on a folder with config.json).
        let as_written = [1, 32000, 29871, 13, 5618, 338, 372, 29973];
        let as_is = Tokenizer::from_file(format!("{dir}/tokenizer.json")).unwrap();
        assert_eq!(as_is.encode("<image>\nWhat is it?", true).unwrap(), as_written);
        let model_folder = tempfile::tempdir().unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(format!("{dir}/{file}"), model_folder.path().join(file)).unwrap();
        }
        std::fs::write(
            model_folder.path().join("config.json"),
            r#"{"model_type": "llava_next"}"#,
        )
        .unwrap();
        let in_model_folder = Tokenizer::from_dir(model_folder.path()).unwrap();
        assert_eq!(
            in_model_folder.encode("<image>\nWhat is it?", true).unwrap(),
            as_written
        );

        // A folder without tokenizer.json reads tokenizer.model (tests/sentencepiece.rs).
        let sentencepiece_only = tempfile::tempdir().unwrap();
        std::fs::write(sentencepiece_only.path().join("tokenizer.model"), b"sp").unwrap();
        let err = Tokenizer::from_dir(sentencepiece_only.path()).err().unwrap().to_string();
        assert!(err.contains("tokenizer.model is not a valid SentencePiece model"), "{err}");

        let bad = Tokenizer::from_bytes_with_config(b"{}", Some(b"{\"tokenizer_class\": "), None)
            .err()
            .unwrap();
        assert!(bad.to_string().contains("tokenizer_config.json"), "{bad}");
    }

    /// The fixture's HF messages flattened into [`Message`]s (images first, texts joined).
    fn to_messages(messages: &Value) -> Vec<Message> {
        messages
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let content = m["content"].as_array().unwrap();
                Message {
                    role: m["role"].as_str().unwrap().to_string(),
                    images: content.iter().filter(|c| c["type"] == "image").count(),
                    text: content.iter().filter_map(|c| c["text"].as_str()).collect(),
                }
            })
            .collect()
    }

    fn shipped(name: &str) -> ChatTemplate {
        ChatTemplate::from_dir(format!("{TOKENIZERS}/{name}"))
            .unwrap()
            .expect("test folder ships a template")
    }

    #[test]
    fn shipped_templates_match_transformers() {
        let cases = fixture("chat_cases.json");
        assert!(cases.len() >= 15);
        for case in &cases {
            let template = shipped(case["tokenizer"].as_str().unwrap());
            let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = case["rendered"].as_str().unwrap();
            assert_eq!(
                template
                    .render_hf(&case["messages"], add_generation_prompt)
                    .unwrap(),
                rendered,
                "{case}"
            );
            let messages = to_messages(&case["messages"]);
            assert_eq!(
                template.render(&messages, add_generation_prompt).unwrap(),
                rendered,
                "{case}"
            );
        }
    }

    #[test]
    fn builtin_templates_agree_with_shipped_ones_on_single_turns() {
        let vicuna = ChatTemplate::builtin(BuiltinTemplate::Vicuna);
        let mistral = ChatTemplate::builtin(BuiltinTemplate::Mistral);
        for case in fixture("chat_cases.json") {
            let messages = &case["messages"];
            let single_user_turn = messages.as_array().unwrap().len() == 1 && messages[0]["role"] == "user";
            if !single_user_turn {
                continue;
            }
            let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = case["rendered"].as_str().unwrap();
            match case["tokenizer"].as_str().unwrap() {
                "mistral" => assert_eq!(
                    mistral.render_hf(messages, add_generation_prompt).unwrap(),
                    rendered
                ),
                // The llava-hf vicuna template omits the system line the model cards prepend.
                _ => assert_eq!(
                    vicuna.render_hf(messages, add_generation_prompt).unwrap(),
                    format!("{VICUNA_SYSTEM} {rendered}")
                ),
            }
        }
    }

    #[test]
    fn builtin_templates_multi_turn_and_system() {
        let turns = [
            Message::user(1, "What is shown in this image?"),
            Message::assistant("A rocket."),
            Message::user(0, "What color is it?"),
        ];
        assert_eq!(
            ChatTemplate::builtin(BuiltinTemplate::Vicuna)
                .render(&turns, true)
                .unwrap(),
            format!(
                "{VICUNA_SYSTEM} USER: <image>\nWhat is shown in this image? ASSISTANT: A rocket.</s>\
                 USER: What color is it? ASSISTANT:"
            )
        );
        assert_eq!(
            ChatTemplate::builtin(BuiltinTemplate::Mistral)
                .render(&turns, true)
                .unwrap(),
            "[INST] <image>\nWhat is shown in this image? [/INST] A rocket.</s>[INST] What color is it? [/INST]"
        );
        // Spec §7's 34b prompt.
        assert_eq!(
            ChatTemplate::builtin(BuiltinTemplate::ChatMl)
                .render(&turns[..1], true)
                .unwrap(),
            "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n\
             What is shown in this image?<|im_end|><|im_start|>assistant\n"
        );
        let with_system = [Message::system("Be brief."), Message::user(2, "Compare.")];
        assert_eq!(
            ChatTemplate::builtin(BuiltinTemplate::Vicuna)
                .render(&with_system, true)
                .unwrap(),
            "Be brief. USER: <image>\n<image>\nCompare. ASSISTANT:"
        );
        assert_eq!(
            ChatTemplate::builtin(BuiltinTemplate::ChatMl)
                .render(&with_system, false)
                .unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\n<image>\nCompare.<|im_end|>"
        );
        let err = ChatTemplate::builtin(BuiltinTemplate::Mistral)
            .render(&with_system, true)
            .unwrap_err();
        assert!(err.to_string().contains("only user and assistant roles"), "{err}");
    }

    /// LLaVA's `conv_mistral_instruct.get_prompt()` (`SeparatorStyle.LLAMA_2`: `wrap_inst`, answers
    /// `" " + answer + " " + sep2`, `wrap_sys` only for a non-empty system), worked by hand.
    #[test]
    fn mistral_instruct_follows_llava_conversation() {
        let template = ChatTemplate::builtin(BuiltinTemplate::MistralInstruct);
        let turns = [
            Message::user(1, "What is shown in this image?"),
            Message::assistant("A rocket."),
            Message::user(0, "What color is it?"),
        ];
        assert_eq!(
            template.render(&turns[..1], true).unwrap(),
            "[INST] <image>\nWhat is shown in this image? [/INST]"
        );
        assert_eq!(
            template.render(&turns, true).unwrap(),
            "[INST] <image>\nWhat is shown in this image? [/INST] A rocket. </s>[INST] What color is it? [/INST]"
        );
        let with_system = [Message::system("Be brief."), Message::user(1, "Compare."), Message::assistant("Same.")];
        assert_eq!(
            template.render(&with_system, false).unwrap(),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nCompare. [/INST] Same. </s>"
        );
        let err = template.render(&[Message { role: "tool".into(), images: 0, text: "x".into() }], true);
        assert!(err.unwrap_err().to_string().contains("unexpected role tool"));
    }

    #[test]
    fn shipped_template_raise_exception_is_an_error() {
        let tool = [Message {
            role: "tool".into(),
            images: 0,
            text: "x".into(),
        }];
        let err = shipped("mistral").render(&tool, true).unwrap_err();
        assert!(
            err.to_string()
                .contains("Only user and assistant roles are supported!"),
            "{err}"
        );
    }

    #[test]
    fn template_sources_in_a_folder() {
        let question = [Message::user(0, "hi")];
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());

        // tokenizer_config.json key, with bos/eos given as AddedToken objects.
        let config = json!({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{{ messages[0]['content'][0]['text'] | upper }}{{ eos_token }}"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let template = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(template.render(&question, false).unwrap(), "<s>HI</s>");

        // chat_template.json wins over tokenizer_config.json; Python string methods work.
        let json_template = json!({"chat_template": "{{ messages[0]['role'].upper() }}:{{ bos_token }}"});
        std::fs::write(dir.path().join("chat_template.json"), json_template.to_string()).unwrap();
        assert_eq!(
            ChatTemplate::from_dir(dir.path())
                .unwrap()
                .unwrap()
                .render(&question, false)
                .unwrap(),
            "USER:<s>"
        );

        // chat_template.jinja wins over both; trim_blocks drops the newline after a block tag.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{% if add_generation_prompt %}\nA{% endif %}\n",
        )
        .unwrap();
        let jinja = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(jinja.render(&question, true).unwrap(), "A");

        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        assert!(matches!(
            ChatTemplate::from_dir(dir.path()),
            Err(ModelError::Template(_))
        ));

        // Older list form in tokenizer_config.json.
        let list_dir = tempfile::tempdir().unwrap();
        let listed = json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        std::fs::write(list_dir.path().join("tokenizer_config.json"), listed.to_string()).unwrap();
        assert_eq!(
            ChatTemplate::from_dir(list_dir.path())
                .unwrap()
                .unwrap()
                .render(&question, false)
                .unwrap(),
            "D"
        );

        std::fs::write(
            list_dir.path().join("chat_template.json"),
            "{\"chat_template\": 3}",
        )
        .unwrap();
        let err = ChatTemplate::from_dir(list_dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("chat_template.json") && err.contains("expected a string"),
            "{err}"
        );
    }

    #[test]
    fn builtin_choice_follows_config() {
        let base =
            r#"{"model_type": "llava_next", "text_config": {"model_type": "MODEL", "vocab_size": VOCAB}}"#;
        let choose = |model: &str, vocab: usize| {
            let json = base.replace("MODEL", model).replace("VOCAB", &vocab.to_string());
            BuiltinTemplate::for_config(&LlavaConfig::from_json(&json).unwrap())
        };
        assert_eq!(choose("mistral", 32064), BuiltinTemplate::Mistral);
        assert_eq!(choose("llama", 32064), BuiltinTemplate::Vicuna);
        assert_eq!(choose("llama", 64064), BuiltinTemplate::ChatMl);
        assert_eq!(choose("llama", 64000), BuiltinTemplate::ChatMl);

        // Original LLaVA checkpoints: the conversation modes LLaVA's run scripts pick.
        let original = |model: &str, vocab: usize| {
            let json = format!(
                r#"{{"model_type": "{model}", "vocab_size": {vocab},
                    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
                    "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres",
                    "image_grid_pinpoints": [[336, 672]]}}"#
            );
            BuiltinTemplate::for_config(&LlavaConfig::from_json(&json).unwrap())
        };
        assert_eq!(original("llava_llama", 32000), BuiltinTemplate::Vicuna);
        assert_eq!(original("llava_mistral", 32000), BuiltinTemplate::MistralInstruct);
        assert_eq!(original("llava_llama", 64000), BuiltinTemplate::ChatMl);

        // A folder without a template falls back to the built-in one.
        let dir = tempfile::tempdir().unwrap();
        let config =
            LlavaConfig::from_json(&base.replace("MODEL", "mistral").replace("VOCAB", "32064")).unwrap();
        let template = ChatTemplate::for_model(dir.path(), &config).unwrap();
        assert_eq!(
            template.render(&[Message::user(1, "Q")], true).unwrap(),
            "[INST] <image>\nQ [/INST]"
        );
    }
    #[test]
    fn a_template_that_would_run_for_hours_stops_with_an_error() {
        let nested = "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}";
        let err = ChatTemplate::from_source(nested).unwrap().render(&[Message::user(0, "Q")], true).unwrap_err();
        assert!(err.to_string().starts_with("chat template: ") && err.to_string().contains("fuel"), "{err}");
        // A long conversation stays far within the budget.
        let template = ChatTemplate::builtin(BuiltinTemplate::ChatMl);
        let messages: Vec<Message> =
            (0..500).map(|i| if i % 2 == 0 { Message::user(0, "Q") } else { Message::assistant("A") }).collect();
        assert!(template.render(&messages, true).unwrap().matches("Q").count() >= 250);
    }
}
