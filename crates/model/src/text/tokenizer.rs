//! The checkpoint's tokenizer (`tokenizer.json` via the `tokenizers` crate, or a SentencePiece
//! `tokenizer.model` converted to one) and incremental detokenisation for streaming.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::sentencepiece::{SentencePieceModel, llama_tokenizer_spaces};
use super::{parse_json, read_if_present};
use crate::error::{ModelError, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const SENTENCEPIECE_FILE: &str = "tokenizer.model";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

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
            let model = std::fs::read(&sentencepiece_path)
                .map_err(|e| ModelError::io(&sentencepiece_path, e))?;
            Self::from_sentencepiece_with_config(&model, tokenizer_config, model_type.as_deref())
        } else {
            let json = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            Self::from_bytes_with_config(&json, tokenizer_config, model_type.as_deref())
        };
        loaded.map_err(|e| match e {
            ModelError::Tokenizer(msg) => {
                ModelError::Tokenizer(format!("{}: {msg}", dir.display()))
            }
            other => other,
        })
    }

    /// A SentencePiece `tokenizer.model` (a folder without `tokenizer.json`, like the original
    /// LLaVA checkpoints) converted as transformers 5.24 converts it (see [`crate::text::sentencepiece`]),
    /// then read like a `tokenizer.json` by [`Tokenizer::from_bytes_with_config`]. Only BPE models
    /// with byte fallback (Llama, Mistral) are supported.
    pub fn from_sentencepiece_with_config(
        sentencepiece_model: &[u8],
        tokenizer_config_json: Option<&[u8]>,
        model_type: Option<&str>,
    ) -> Result<Self> {
        let config = parse_tokenizer_config(tokenizer_config_json)?;
        let json =
            SentencePieceModel::parse(sentencepiece_model)?.tokenizer_json(&config, model_type)?;
        Self::from_bytes_with_config(
            &json.to_string().into_bytes(),
            tokenizer_config_json,
            model_type,
        )
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
        let mut tokenizer = parse_tokenizer_json(tokenizer_json)?;
        let (pre_tokenizer, decoder) = llama_tokenizer_spaces(&config);
        let Some(fields) = tokenizer.as_object_mut() else {
            return Err(ModelError::Tokenizer(
                "tokenizer.json: expected a JSON object".into(),
            ));
        };
        fields.insert("normalizer".into(), Value::Null);
        fields.insert("pre_tokenizer".into(), pre_tokenizer);
        fields.insert("decoder".into(), decoder);
        Self::from_value(tokenizer)
    }

    /// Loads a `tokenizer.json` exactly as written (no `tokenizer_config.json` adjustments).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_bytes(&bytes)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Loads `tokenizer.json` bytes exactly as written.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_value(parse_tokenizer_json(bytes)?)
    }

    /// Builds the tokenizer from parsed JSON (tokenizers 0.22, reading bytes itself, panics on a
    /// syntax error inside `decoder`), refusing what it would panic on later.
    fn from_value(mut tokenizer: Value) -> Result<Self> {
        // transformers encodes without the file's truncation and padding (the processor asks for
        // neither), and tokenizers 0.22 panics on a truncation stride over its length.
        if let Some(fields) = tokenizer.as_object_mut() {
            fields.remove("truncation");
            fields.remove("padding");
        }
        check_bpe_merges(&tokenizer["model"])?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(tokenizer)
            .map_err(|e| ModelError::Tokenizer(format!("cannot load tokenizer.json: {e}")))?;
        if let Some(processor) = inner.get_post_processor() {
            // Serialized back, string templates ("<s> $A") are lists of pieces.
            let processor = serde_json::to_value(processor).map_err(|e| {
                ModelError::Tokenizer(format!("tokenizer.json: post_processor: {e}"))
            })?;
            check_templates(&processor)?;
        }
        if let Some(decoder) = inner.get_decoder() {
            let decoder = serde_json::to_value(decoder)
                .map_err(|e| ModelError::Tokenizer(format!("tokenizer.json: decoder: {e}")))?;
            check_strip_decoders(&decoder)?;
        }
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

/// What `tokenizers` does not check when it reads a `TemplateProcessing` post-processor and then
/// panics on when encoding: a template naming a special token that `special_tokens` lacks, and a
/// special token whose `ids` and `tokens` differ in length.
fn check_templates(processor: &Value) -> Result<()> {
    if let Some(processors) = processor.get("processors").and_then(Value::as_array) {
        return processors.iter().try_for_each(check_templates);
    }
    if processor.get("type").and_then(Value::as_str) != Some("TemplateProcessing") {
        return Ok(());
    }
    let bad =
        |rule: String| ModelError::Tokenizer(format!("tokenizer.json: post_processor: {rule}"));
    let defined = processor.get("special_tokens").and_then(Value::as_object);
    for (name, token) in defined.into_iter().flatten() {
        let len = |key| token.get(key).and_then(Value::as_array).map_or(0, Vec::len);
        if len("ids") != len("tokens") {
            return Err(bad(format!(
                "special token {name:?} has {} ids and {} tokens (they must be as many)",
                len("ids"),
                len("tokens")
            )));
        }
    }
    for template in ["single", "pair"] {
        let pieces = processor.get(template).and_then(Value::as_array);
        for piece in pieces.into_iter().flatten() {
            if let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str)
                && !defined.is_some_and(|tokens| tokens.contains_key(id))
            {
                return Err(bad(format!(
                    "the {template} template names special token {id:?}, which special_tokens \
                     does not define"
                )));
            }
        }
    }
    Ok(())
}

/// tokenizers 0.22's `Strip` decoder with `stop` above 0 panics on a token shorter than `stop` or
/// made only of `content` (it indexes below the token's start); transformers' conversions write
/// `stop: 0`.
fn check_strip_decoders(decoder: &Value) -> Result<()> {
    if let Some(decoders) = decoder.get("decoders").and_then(Value::as_array) {
        return decoders.iter().try_for_each(check_strip_decoders);
    }
    let stop = decoder.get("stop").and_then(Value::as_u64).unwrap_or(0);
    if decoder.get("type").and_then(Value::as_str) == Some("Strip") && stop > 0 {
        return Err(ModelError::Tokenizer(format!(
            "tokenizer.json: decoder: a Strip decoder with stop {stop} is not supported (only 0)"
        )));
    }
    Ok(())
}

/// tokenizers 0.22 names a BPE merge's result `a` + `b` less `b`'s first bytes, as many as
/// `continuing_subword_prefix` has, and panics where that cut is not a character boundary of `b`.
fn check_bpe_merges(model: &Value) -> Result<()> {
    let Some(prefix) = model
        .get("continuing_subword_prefix")
        .and_then(Value::as_str)
    else {
        return Ok(());
    };
    let merges = model.get("merges").and_then(Value::as_array);
    for (n, merge) in merges.into_iter().flatten().enumerate() {
        let second = match merge {
            Value::String(line) => line.split(' ').nth(1),
            Value::Array(pair) => pair.get(1).and_then(Value::as_str),
            _ => None,
        };
        if let Some(second) = second
            && !second.is_char_boundary(prefix.len())
        {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.json: model.merges[{n}]: its second token {second:?} has no character \
                 boundary at {} bytes, the length of continuing_subword_prefix {prefix:?}",
                prefix.len()
            )));
        }
    }
    Ok(())
}

fn parse_tokenizer_json(bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes)
        .map_err(|e| ModelError::Tokenizer(format!("tokenizer.json: malformed JSON: {e}")))
}

fn parse_tokenizer_config(bytes: Option<&[u8]>) -> Result<Value> {
    match bytes {
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
            ModelError::Tokenizer(format!("tokenizer_config.json: malformed JSON: {e}"))
        }),
        None => Ok(Value::Null),
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    let Some(text) = read_if_present(path)? else {
        return Ok(None);
    };
    parse_json(&path.display().to_string(), &text).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;

    use crate::text::test_files::{TOKENIZERS, fixture};

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
    fn templates_naming_undefined_or_uneven_special_tokens_are_errors() {
        // tokenizers 0.22 loads these and panics when encoding.
        let tokenizer = |processor: Value| {
            let json = json!({
                "post_processor": processor,
                "model": {"type": "WordLevel", "vocab": {"a": 0, "<s>": 1}, "unk_token": "a"},
            });
            Tokenizer::from_bytes(json.to_string().as_bytes())
        };
        let a = json!({"Sequence": {"id": "A", "type_id": 0}});
        let b = json!({"Sequence": {"id": "B", "type_id": 1}});
        let special = |id: &str| json!({"SpecialToken": {"id": id, "type_id": 0}});
        let template = |single: Value, ids: Value| {
            json!({
                "type": "TemplateProcessing",
                "single": single,
                "pair": [a, b],
                "special_tokens": {"<s>": {"id": "<s>", "ids": ids, "tokens": ["<s>"]}},
            })
        };
        let well_formed = template(json!([special("<s>"), a]), json!([1]));
        let ids = tokenizer(well_formed.clone())
            .unwrap()
            .encode("a", true)
            .unwrap();
        assert_eq!(ids, [1, 0]);
        for (processor, expected) in [
            (
                template(json!([special("<t>"), a]), json!([1])),
                "the single template names special token \"<t>\"",
            ),
            (
                json!({"type": "Sequence", "processors": [
                    well_formed,
                    template(json!([a, special("</s>")]), json!([1])),
                ]}),
                "names special token \"</s>\"",
            ),
            (
                template(json!([special("<s>"), a]), json!([1, 2])),
                "special token \"<s>\" has 2 ids and 1 tokens",
            ),
        ] {
            let err = tokenizer(processor).err().expect("loads").to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn merges_shorter_than_the_subword_prefix_are_errors() {
        // tokenizers 0.22 panics building such a BPE model.
        let tokenizer = |merges: Value| {
            let json = json!({"model": {
                "type": "BPE",
                "vocab": {"a": 0, "b": 1, "ab": 2, "##b": 3, "a##b": 4},
                "merges": merges,
                "continuing_subword_prefix": "##",
            }});
            Tokenizer::from_bytes(json.to_string().as_bytes())
        };
        assert!(tokenizer(json!(["a ##b"])).is_ok());
        for merges in [json!(["a b"]), json!([["a", "##b"], ["a", "b"]])] {
            let err = tokenizer(merges).err().expect("loads").to_string();
            assert!(
                err.contains("has no character boundary at 2 bytes"),
                "{err}"
            );
        }
    }

    #[test]
    fn strip_decoders_that_cut_token_ends_are_errors() {
        // tokenizers 0.22 panics decoding a token shorter than `stop`.
        let tokenizer = |stop: u64| {
            let strip = json!({"type": "Strip", "content": " ", "start": 1, "stop": stop});
            let json = json!({
                "decoder": {"type": "Sequence", "decoders": [{"type": "Fuse"}, strip]},
                "model": {"type": "WordLevel", "vocab": {"a": 0, " ": 1}, "unk_token": "a"},
            });
            Tokenizer::from_bytes(json.to_string().as_bytes())
        };
        assert_eq!(tokenizer(0).unwrap().decode(&[1, 0], false).unwrap(), "a");
        let err = tokenizer(2).err().expect("loads").to_string();
        assert!(
            err.contains("a Strip decoder with stop 2 is not supported"),
            "{err}"
        );
    }

    #[test]
    fn the_files_truncation_and_padding_are_not_applied() {
        // As transformers encodes a prompt; tokenizers 0.22 panics on this stride.
        let json = json!({
            "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 5},
            "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                        "pad_id": 1, "pad_type_id": 0, "pad_token": "b"},
            "pre_tokenizer": {"type": "Whitespace"},
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"},
        });
        let tokenizer = Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
        assert_eq!(tokenizer.encode("a b a", true).unwrap(), [0, 1, 0]);
    }

    #[test]
    fn malformed_json_inside_a_component_is_an_error_not_a_panic() {
        // A syntax error inside `decoder`: tokenizers 0.22 panics reading these bytes itself.
        let json = b"{\"decoder\":{\"type\":\"Fuse\",\"x\":fal\xff},\"model\":{\"type\":\"BPE\"}}";
        for loaded in [
            Tokenizer::from_bytes(json),
            Tokenizer::from_bytes_with_config(
                json,
                Some(br#"{"tokenizer_class": "LlamaTokenizer"}"#),
                None,
            ),
        ] {
            let err = loaded.err().expect("malformed JSON loads").to_string();
            assert!(err.contains("tokenizer.json: malformed JSON"), "{err}");
        }
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
        assert_eq!(
            decoder.step(rocket[3]).unwrap().as_deref(),
            Some("\u{1F680}")
        );

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
            serde_json::from_slice(&std::fs::read(format!("{dir}/tokenizer.json")).unwrap())
                .unwrap();
        let config: Value =
            serde_json::from_slice(&std::fs::read(format!("{dir}/tokenizer_config.json")).unwrap())
                .unwrap();
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
        assert_eq!(
            no_prefix.encode("Hello world", true).unwrap(),
            [1, 10994, 3186]
        );
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
        assert_eq!(
            as_is.encode("<image>\nWhat is it?", true).unwrap(),
            as_written
        );
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
            in_model_folder
                .encode("<image>\nWhat is it?", true)
                .unwrap(),
            as_written
        );

        // A folder without tokenizer.json reads tokenizer.model (tests/sentencepiece.rs).
        let sentencepiece_only = tempfile::tempdir().unwrap();
        std::fs::write(sentencepiece_only.path().join("tokenizer.model"), b"sp").unwrap();
        let err = Tokenizer::from_dir(sentencepiece_only.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("tokenizer.model is not a valid SentencePiece model"),
            "{err}"
        );

        let bad = Tokenizer::from_bytes_with_config(b"{}", Some(b"{\"tokenizer_class\": "), None)
            .err()
            .unwrap();
        assert!(bad.to_string().contains("tokenizer_config.json"), "{bad}");
    }
}
