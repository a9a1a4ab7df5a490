//! SentencePiece `tokenizer.model` files (the original LLaVA checkpoints ship no `tokenizer.json`):
//! a reader for the few fields of the `ModelProto` protobuf that matter, and the conversion to a
//! `tokenizer.json` that transformers 5.24's `AutoTokenizer` performs for such a folder.
//!
//! transformers builds one of two tokenizers from the file, depending on the folder:
//! - `LlamaTokenizer` (the folder's `tokenizer_class`, and what the original LLaVA folders get, their
//!   `llava_llama` / `llava_mistral` model types being unknown to transformers): every piece as a
//!   BPE vocabulary entry, merges generated from the vocabulary in piece-id order
//!   (`generate_merges`), byte fallback, no normalizer, `Metaspace` ("first", "always" with
//!   `legacy: true`, "never" with `add_prefix_space: false`).
//! - `TokenizersBackend` for model types `llava` / `llava_next` (on transformers' list of Hub
//!   configs with a wrong `tokenizer_class`): `SpmConverter.build_tokenizer_from_spm_proto`, which
//!   follows the model's normalizer spec and ranks the merges of normal pieces by score.
//!
//! Only BPE models with byte fallback and without a precompiled normalization map or user-defined
//! pieces are converted (Llama, Mistral); anything else is a clear [`ModelError::Tokenizer`].

use serde_json::{Map, Value, json};

use crate::error::{ModelError, Result};

/// The SentencePiece metaspace that stands for a space.
const METASPACE: &str = "\u{2581}";

/// transformers' `LlamaTokenizer` space handling from `tokenizer_config.json`: the `Metaspace`
/// pre-tokenizer ("first", "always" with `legacy: true`, "never" with `add_prefix_space: false`)
/// and the decoder (stripping one leading space unless `add_prefix_space: false`).
pub(crate) fn llama_tokenizer_spaces(config: &Value) -> (Value, Value) {
    let add_prefix_space = config
        .get("add_prefix_space")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let legacy = config
        .get("legacy")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let prepend_scheme = match (add_prefix_space, legacy) {
        (false, _) => "never",
        (true, true) => "always",
        (true, false) => "first",
    };
    let pre_tokenizer = json!({"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": prepend_scheme, "split": false});
    (pre_tokenizer, metaspace_decoder(add_prefix_space))
}

/// Metaspace back to spaces, byte-fallback pieces back to bytes, and (for a tokenizer that adds
/// a prefix space) the first leading space stripped.
fn metaspace_decoder(strip_prefix_space: bool) -> Value {
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": METASPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if strip_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({"type": "Sequence", "decoders": decoders})
}

/// A `tokenizer.json` value: a byte-fallback BPE model (`unk_token` null or a piece) with its
/// added tokens, post-processor and the given normalizer, pre-tokenizer and decoder.
fn bpe_tokenizer_json(
    config: &Value,
    added_tokens: &AddedTokens,
    [normalizer, pre_tokenizer, decoder]: [Value; 3],
    unk_token: Value,
    vocab: Map<String, Value>,
    merges: Vec<Value>,
) -> Result<Value> {
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens.entries,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(config, added_tokens)?,
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk_token, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    Unigram,
    Bpe,
    Word,
    Char,
}

/// `TrainerSpec` fields used by the conversion (defaults as in sentencepiece_model.proto).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerSpec {
    pub model_type: ModelType,
    pub byte_fallback: bool,
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
    pub pad_piece: String,
}

/// `NormalizerSpec` fields used by the conversion (defaults as in sentencepiece_model.proto).
#[derive(Clone, Debug, PartialEq)]
pub struct NormalizerSpec {
    pub name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

/// The parts of a SentencePiece `ModelProto` the conversion needs.
#[derive(Clone, Debug, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    pub trainer: TrainerSpec,
    pub normalizer: NormalizerSpec,
}

impl SentencePieceModel {
    /// Parses a serialized `ModelProto` (the bytes of `tokenizer.model`).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut pieces = Vec::new();
        let mut trainer = TrainerSpec {
            model_type: ModelType::Unigram,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
            pad_piece: "<pad>".into(),
        };
        let mut normalizer = NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut saw_trainer = false;
        let mut reader = Reader::new(bytes);
        while let Some((field, value)) = reader.next_field()? {
            match (field, value) {
                (1, Field::Bytes(piece)) => pieces.push(parse_piece(piece)?),
                (2, Field::Bytes(spec)) => {
                    parse_trainer(spec, &mut trainer)?;
                    saw_trainer = true;
                }
                (3, Field::Bytes(spec)) => parse_normalizer(spec, &mut normalizer)?,
                (1..=3, _) => return Err(malformed("a ModelProto field has the wrong wire type")),
                _ => {}
            }
        }
        if pieces.is_empty() || !saw_trainer {
            return Err(malformed(
                "no pieces or no trainer spec (not a SentencePiece model?)",
            ));
        }
        Ok(SentencePieceModel {
            pieces,
            trainer,
            normalizer,
        })
    }

    /// The `tokenizer.json` (as a JSON value) that transformers 5.24 builds for a folder holding
    /// this model, its `tokenizer_config.json` (`config`, `Null` when absent) and the `model_type`
    /// of its `config.json`.
    pub fn tokenizer_json(&self, config: &Value, model_type: Option<&str>) -> Result<Value> {
        self.check_supported()?;
        if matches!(model_type, Some("llava" | "llava_next")) {
            return self.backend_tokenizer_json(config);
        }
        match config.get("tokenizer_class").and_then(Value::as_str) {
            Some("LlamaTokenizer" | "LlamaTokenizerFast") => self.llama_tokenizer_json(config),
            Some(other) => Err(ModelError::Tokenizer(format!(
                "tokenizer.model with tokenizer_class {other:?}: only LlamaTokenizer folders are supported"
            ))),
            None => Err(ModelError::Tokenizer(
                "tokenizer.model without a tokenizer_class in tokenizer_config.json: \
                 only LlamaTokenizer folders are supported"
                    .into(),
            )),
        }
    }

    fn check_supported(&self) -> Result<()> {
        if self.trainer.model_type != ModelType::Bpe {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.model: {:?} SentencePiece models are not supported (only BPE, as Llama and Mistral use)",
                self.trainer.model_type
            )));
        }
        if !self.trainer.byte_fallback {
            return Err(ModelError::Tokenizer(
                "tokenizer.model: BPE without byte fallback is not supported".into(),
            ));
        }
        if !self.normalizer.precompiled_charsmap.is_empty() {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.model: the precompiled normalization map ({:?}) is not supported",
                self.normalizer.name
            )));
        }
        if let Some(piece) = self
            .pieces
            .iter()
            .find(|p| p.kind == PieceType::UserDefined)
        {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.model: user-defined pieces such as {:?} are not supported",
                piece.piece
            )));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(piece) = self.pieces.iter().find(|p| !seen.insert(p.piece.as_str())) {
            return Err(malformed(&format!("piece {:?} occurs twice", piece.piece)));
        }
        Ok(())
    }

    fn vocab(&self) -> Map<String, Value> {
        self.pieces
            .iter()
            .enumerate()
            .map(|(id, p)| (p.piece.clone(), json!(id)))
            .collect()
    }

    /// transformers' `LlamaTokenizer` from `SentencePieceExtractor.extract`: `generate_merges`
    /// without scores ranks a merge by the id of the merged piece, then by the split position.
    fn llama_tokenizer_json(&self, config: &Value) -> Result<Value> {
        let vocab = self.vocab();
        let mut merges = Vec::new();
        for piece in &self.pieces {
            for (split, _) in piece.piece.char_indices().skip(1) {
                let (left, right) = piece.piece.split_at(split);
                if vocab.contains_key(left) && vocab.contains_key(right) {
                    merges.push(json!([left, right]));
                }
            }
        }
        let (pre_tokenizer, decoder) = llama_tokenizer_spaces(config);
        let defaults = [
            ("bos_token", "<s>"),
            ("eos_token", "</s>"),
            ("unk_token", "<unk>"),
        ];
        let added_tokens = self.added_tokens(config, &defaults, false)?;
        let pipeline = [Value::Null, pre_tokenizer, decoder];
        bpe_tokenizer_json(config, &added_tokens, pipeline, Value::Null, vocab, merges)
    }

    /// transformers' `TokenizersBackend` via `SpmConverter.build_tokenizer_from_spm_proto`: merges of
    /// normal pieces ranked by score (then piece id, then split), the model's normalizer spec.
    fn backend_tokenizer_json(&self, config: &Value) -> Result<Value> {
        let vocab = self.vocab();
        let normal: std::collections::HashSet<&str> = self
            .pieces
            .iter()
            .filter(|p| p.kind == PieceType::Normal)
            .map(|p| p.piece.as_str())
            .collect();
        let mut ranked = Vec::new();
        for (id, piece) in self.pieces.iter().enumerate() {
            if piece.kind != PieceType::Normal {
                continue;
            }
            for (split, _) in piece.piece.char_indices().skip(1) {
                let (left, right) = piece.piece.split_at(split);
                if normal.contains(left) && normal.contains(right) {
                    ranked.push((piece.score, id, left, right));
                }
            }
        }
        ranked.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(b.2))
                .then(a.3.cmp(b.3))
        });
        let merges: Vec<Value> = ranked.iter().map(|(_, _, l, r)| json!([l, r])).collect();

        let spec = &self.normalizer;
        let legacy = config
            .get("legacy")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut normalizers = Vec::new();
        if spec.remove_extra_whitespaces {
            normalizers.push(
                json!({"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""}),
            );
            normalizers
                .push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}));
        }
        if spec.escape_whitespaces {
            normalizers
                .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}));
        }
        if spec.add_dummy_prefix && legacy {
            // Metaspace skips the dummy prefix when the text already starts with "▁"; SentencePiece doesn't.
            normalizers.push(json!({"type": "Replace", "pattern": {"Regex": "\\A\u{2581}"}, "content": "\u{2581}\u{2581}"}));
        }
        let pre_tokenizer = if spec.add_dummy_prefix {
            let scheme = if legacy { "always" } else { "first" };
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": scheme, "split": false}]})
        } else {
            Value::Null
        };

        let trainer = &self.trainer;
        let defaults: Vec<(&str, &str)> = [
            ("bos_token", trainer.bos_id, trainer.bos_piece.as_str()),
            ("eos_token", trainer.eos_id, trainer.eos_piece.as_str()),
            ("unk_token", trainer.unk_id, trainer.unk_piece.as_str()),
        ]
        .into_iter()
        .filter(|(_, id, _)| *id >= 0)
        .map(|(key, _, piece)| (key, piece))
        .collect();
        let added_tokens = self.added_tokens(config, &defaults, spec.add_dummy_prefix)?;
        let normalizer = json!({"type": "Sequence", "normalizers": normalizers});
        let pipeline = [
            normalizer,
            pre_tokenizer,
            metaspace_decoder(spec.add_dummy_prefix),
        ];
        bpe_tokenizer_json(
            config,
            &added_tokens,
            pipeline,
            json!(trainer.unk_piece),
            vocab,
            merges,
        )
    }

    /// The added tokens transformers registers, in its order: `added_tokens_decoder` by id, the
    /// named special tokens (`bos`, `eos`, `unk`, `sep`, `pad`, `cls`, `mask`; `defaults` for
    /// those the config does not name), then the extra special tokens (the config's, then the
    /// model's control pieces). Tokens not in the vocabulary get the next free ids.
    fn added_tokens(
        &self,
        config: &Value,
        defaults: &[(&str, &str)],
        force_unnormalized: bool,
    ) -> Result<AddedTokens> {
        let mut tokens = AddedTokens {
            entries: Vec::new(),
            next_id: self.pieces.len(),
            named: Map::new(),
        };
        let mut declared: Vec<(usize, &Value)> = Vec::new();
        if let Some(decoder) = config.get("added_tokens_decoder") {
            let Some(decoder) = decoder.as_object() else {
                return Err(bad_config("added_tokens_decoder is not an object"));
            };
            for (id, token) in decoder {
                let id = id.parse::<usize>().map_err(|_| {
                    bad_config(&format!("added_tokens_decoder key {id:?} is not an id"))
                })?;
                declared.push((id, token));
            }
        }
        declared.sort_by_key(|(id, _)| *id);
        for (id, token) in declared {
            let mut entry = added_token(token, false)
                .ok_or_else(|| bad_config(&format!("added_tokens_decoder[{id}] has no content")))?;
            if force_unnormalized {
                entry["normalized"] = json!(false);
            }
            let content = entry["content"].as_str().unwrap_or_default().to_string();
            let expected = match self.pieces.get(id) {
                Some(piece) if piece.piece != content => {
                    return Err(bad_config(&format!(
                        "added_tokens_decoder renames piece {id} {:?} to {content:?}, which is not supported",
                        piece.piece
                    )));
                }
                Some(_) => id,
                None => tokens.next_id,
            };
            if id != expected {
                return Err(bad_config(&format!(
                    "added_tokens_decoder: token {content:?} has id {id} but the next free id is {expected}"
                )));
            }
            tokens.push(id, entry);
        }
        const NAMED: [&str; 7] = [
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ];
        for key in NAMED {
            let token = match config.get(key) {
                Some(Value::Null) => None,
                Some(token) => Some(token.clone()),
                None => defaults
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, t)| json!(t)),
            };
            let Some(token) = token else { continue };
            let entry = added_token(&token, true)
                .ok_or_else(|| bad_config(&format!("{key} has no content")))?;
            let content = entry["content"].as_str().unwrap_or_default().to_string();
            let id = tokens.add_if_new(self, entry);
            tokens.named.insert(key.into(), json!([content, id]));
        }
        let mut extras: Vec<Value> = Vec::new();
        for key in ["extra_special_tokens", "additional_special_tokens"] {
            if let Some(list) = config.get(key).and_then(Value::as_array) {
                extras.extend(list.iter().cloned());
            }
        }
        extras.extend(
            self.pieces
                .iter()
                .filter(|p| p.kind == PieceType::Control)
                .map(|p| json!(p.piece)),
        );
        for token in extras {
            let entry = added_token(&token, true)
                .ok_or_else(|| bad_config("an extra special token has no content"))?;
            tokens.add_if_new(self, entry);
        }
        Ok(tokens)
    }
}

struct AddedTokens {
    entries: Vec<Value>,
    next_id: usize,
    /// `bos_token` etc. as `[content, id]`.
    named: Map<String, Value>,
}

impl AddedTokens {
    fn push(&mut self, id: usize, mut entry: Value) {
        entry["id"] = json!(id);
        if id == self.next_id {
            self.next_id += 1;
        }
        self.entries.push(entry);
    }

    /// The id of `entry`'s content: an existing added token, a piece (registered as added), or a
    /// new id.
    fn add_if_new(&mut self, model: &SentencePieceModel, entry: Value) -> usize {
        let content = entry["content"].as_str().unwrap_or_default();
        if let Some(existing) = self
            .entries
            .iter()
            .find(|e| e["content"].as_str() == Some(content))
        {
            return existing["id"].as_u64().unwrap_or_default() as usize;
        }
        let id = model
            .pieces
            .iter()
            .position(|p| p.piece == content)
            .unwrap_or(self.next_id);
        self.push(id, entry);
        id
    }
}

/// A `tokenizer.json` added-token entry from `"<s>"` or an `AddedToken` object; `special` is the
/// default for a bare string (named special tokens), which is also not normalized.
fn added_token(token: &Value, special: bool) -> Option<Value> {
    let (content, flags) = match token {
        Value::String(content) => (content.clone(), None),
        Value::Object(fields) => (fields.get("content")?.as_str()?.to_string(), Some(fields)),
        _ => return None,
    };
    let flag = |name: &str, default: bool| {
        flags
            .and_then(|f| f.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(default)
    };
    let special = flag("special", special);
    Some(json!({
        "id": 0,
        "content": content,
        "single_word": flag("single_word", false),
        "lstrip": flag("lstrip", false),
        "rstrip": flag("rstrip", false),
        "normalized": flag("normalized", !special),
        "special": special,
    }))
}

/// transformers' `update_post_processor`: BOS / EOS around each sequence per `add_bos_token` /
/// `add_eos_token` (both default to false).
fn post_processor(config: &Value, tokens: &AddedTokens) -> Result<Value> {
    let flag = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
    let mut special_tokens = Map::new();
    let mut edge = |key: &str, on: bool| -> Option<String> {
        let [content, id] = tokens.named.get(key).and_then(Value::as_array)?.as_slice() else {
            return None;
        };
        let content = content.as_str()?.to_string();
        if on {
            special_tokens.insert(
                content.clone(),
                json!({"id": content, "ids": [id], "tokens": [content]}),
            );
            Some(content)
        } else {
            None
        }
    };
    let bos = edge("bos_token", flag("add_bos_token"));
    let eos = edge("eos_token", flag("add_eos_token"));
    let sequence = |name: &str, type_id: u32| {
        let mut parts = Vec::new();
        if let Some(bos) = &bos {
            parts.push(json!({"SpecialToken": {"id": bos, "type_id": type_id}}));
        }
        parts.push(json!({"Sequence": {"id": name, "type_id": type_id}}));
        if let Some(eos) = &eos {
            parts.push(json!({"SpecialToken": {"id": eos, "type_id": type_id}}));
        }
        parts
    };
    let single = sequence("A", 0);
    let mut pair = single.clone();
    pair.extend(sequence("B", 1));
    Ok(
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}),
    )
}

fn malformed(msg: &str) -> ModelError {
    ModelError::Tokenizer(format!(
        "tokenizer.model is not a valid SentencePiece model: {msg}"
    ))
}

fn bad_config(msg: &str) -> ModelError {
    ModelError::Tokenizer(format!("tokenizer_config.json: {msg}"))
}

fn parse_piece(bytes: &[u8]) -> Result<Piece> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut reader = Reader::new(bytes);
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, Field::Bytes(text)) => piece.piece = utf8(text)?,
            (2, Field::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Field::Varint(kind)) => {
                piece.kind = match kind {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    other => return Err(malformed(&format!("unknown piece type {other}"))),
                }
            }
            (1..=3, _) => return Err(malformed("a piece field has the wrong wire type")),
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer(bytes: &[u8], spec: &mut TrainerSpec) -> Result<()> {
    let mut reader = Reader::new(bytes);
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (3, Field::Varint(kind)) => {
                spec.model_type = match kind {
                    1 => ModelType::Unigram,
                    2 => ModelType::Bpe,
                    3 => ModelType::Word,
                    4 => ModelType::Char,
                    other => return Err(malformed(&format!("unknown model type {other}"))),
                }
            }
            (35, Field::Varint(v)) => spec.byte_fallback = v != 0,
            // int32 fields are sign-extended 64-bit varints: -1 is 2^64 - 1.
            (40, Field::Varint(v)) => spec.unk_id = v as i64 as i32,
            (41, Field::Varint(v)) => spec.bos_id = v as i64 as i32,
            (42, Field::Varint(v)) => spec.eos_id = v as i64 as i32,
            (43, Field::Varint(v)) => spec.pad_id = v as i64 as i32,
            (45, Field::Bytes(s)) => spec.unk_piece = utf8(s)?,
            (46, Field::Bytes(s)) => spec.bos_piece = utf8(s)?,
            (47, Field::Bytes(s)) => spec.eos_piece = utf8(s)?,
            (48, Field::Bytes(s)) => spec.pad_piece = utf8(s)?,
            (3 | 35 | 40..=43 | 45..=48, _) => {
                return Err(malformed(&format!(
                    "trainer spec field {field} has the wrong wire type"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer(bytes: &[u8], spec: &mut NormalizerSpec) -> Result<()> {
    let mut reader = Reader::new(bytes);
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, Field::Bytes(s)) => spec.name = utf8(s)?,
            (2, Field::Bytes(map)) => spec.precompiled_charsmap = map.to_vec(),
            (3, Field::Varint(v)) => spec.add_dummy_prefix = v != 0,
            (4, Field::Varint(v)) => spec.remove_extra_whitespaces = v != 0,
            (5, Field::Varint(v)) => spec.escape_whitespaces = v != 0,
            (1..=5, _) => {
                return Err(malformed(&format!(
                    "normalizer spec field {field} has the wrong wire type"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

fn utf8(bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| malformed("a string is not UTF-8"))
}

/// One protobuf field value by wire type.
enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A protobuf wire-format reader that never reads past its slice.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.pos)
                .ok_or_else(|| malformed("truncated"))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("a varint is longer than 10 bytes"))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| malformed("truncated"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    /// The next `(field number, value)`, or `None` at the end.
    fn next_field(&mut self) -> Result<Option<(u64, Field<'a>)>> {
        if self.pos == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let len =
                    usize::try_from(self.varint()?).map_err(|_| malformed("length too large"))?;
                Field::Bytes(self.take(len)?)
            }
            5 => {
                let bytes = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            }
            other => return Err(malformed(&format!("unsupported wire type {other}"))),
        };
        if field == 0 {
            return Err(malformed("field number 0"));
        }
        Ok(Some((field, value)))
    }
}
