//! Chat templates, rendered with minijinja the way transformers' `apply_chat_template` renders
//! them, and the files they are found in.

use std::path::Path;

use serde_json::{Value, json};

use super::tokenizer::TOKENIZER_CONFIG_FILE;
use super::{parse_json, read_if_present};
use crate::error::{ModelError, Result};
use crate::files::config::{ConfigLayout, LlavaConfig, TextArch};

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
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
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
        let mut template =
            Self::from_source(kind.source()).expect("built-in chat templates compile");
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
            Ok::<_, ModelError>(
                read_if_present(&path)?.map(|text| (path.display().to_string(), text)),
            )
        };
        let tokenizer_config = read(TOKENIZER_CONFIG_FILE)?;
        let jinja = read(TEMPLATE_JINJA_FILE)?;
        let json = if jinja.is_none() {
            read(TEMPLATE_JSON_FILE)?
        } else {
            None
        };
        fn as_ref(file: &Option<(String, String)>) -> Option<(&str, &str)> {
            file.as_ref()
                .map(|(name, text)| (name.as_str(), text.as_str()))
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
        let Some(source) = source else {
            return Ok(None);
        };
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

    use crate::text::test_files::{TOKENIZERS, fixture};

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
            let single_user_turn =
                messages.as_array().unwrap().len() == 1 && messages[0]["role"] == "user";
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
        assert!(
            err.to_string().contains("only user and assistant roles"),
            "{err}"
        );
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
        let with_system = [
            Message::system("Be brief."),
            Message::user(1, "Compare."),
            Message::assistant("Same."),
        ];
        assert_eq!(
            template.render(&with_system, false).unwrap(),
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nCompare. [/INST] Same. </s>"
        );
        let err = template.render(
            &[Message {
                role: "tool".into(),
                images: 0,
                text: "x".into(),
            }],
            true,
        );
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("unexpected role tool")
        );
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
        let json_template =
            json!({"chat_template": "{{ messages[0]['role'].upper() }}:{{ bos_token }}"});
        std::fs::write(
            dir.path().join("chat_template.json"),
            json_template.to_string(),
        )
        .unwrap();
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
        std::fs::write(
            list_dir.path().join("tokenizer_config.json"),
            listed.to_string(),
        )
        .unwrap();
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
        let err = ChatTemplate::from_dir(list_dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("chat_template.json") && err.contains("expected a string"),
            "{err}"
        );
    }

    #[test]
    fn builtin_choice_follows_config() {
        let base = r#"{"model_type": "llava_next", "text_config": {"model_type": "MODEL", "vocab_size": VOCAB}}"#;
        let choose = |model: &str, vocab: usize| {
            let json = base
                .replace("MODEL", model)
                .replace("VOCAB", &vocab.to_string());
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
        assert_eq!(
            original("llava_mistral", 32000),
            BuiltinTemplate::MistralInstruct
        );
        assert_eq!(original("llava_llama", 64000), BuiltinTemplate::ChatMl);

        // A folder without a template falls back to the built-in one.
        let dir = tempfile::tempdir().unwrap();
        let config =
            LlavaConfig::from_json(&base.replace("MODEL", "mistral").replace("VOCAB", "32064"))
                .unwrap();
        let template = ChatTemplate::for_model(dir.path(), &config).unwrap();
        assert_eq!(
            template.render(&[Message::user(1, "Q")], true).unwrap(),
            "[INST] <image>\nQ [/INST]"
        );
    }
    #[test]
    fn a_template_that_would_run_for_hours_stops_with_an_error() {
        let nested = "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}";
        let err = ChatTemplate::from_source(nested)
            .unwrap()
            .render(&[Message::user(0, "Q")], true)
            .unwrap_err();
        assert!(
            err.to_string().starts_with("chat template: ") && err.to_string().contains("fuel"),
            "{err}"
        );
        // A long conversation stays far within the budget.
        let template = ChatTemplate::builtin(BuiltinTemplate::ChatMl);
        let messages: Vec<Message> = (0..500)
            .map(|i| {
                if i % 2 == 0 {
                    Message::user(0, "Q")
                } else {
                    Message::assistant("A")
                }
            })
            .collect();
        assert!(
            template
                .render(&messages, true)
                .unwrap()
                .matches("Q")
                .count()
                >= 250
        );
    }
}
