//! Folders that ship only a SentencePiece `tokenizer.model`: the conversion against transformers
//! 5.24 (tests/reference/sentencepiece_cases.py), against llava-hf's Mistral `tokenizer.json`, and
//! errors for files it cannot convert.

use std::path::{Path, PathBuf};

use llava_model::text::sentencepiece::{ModelType, PieceType, SentencePieceModel};
use llava_model::{ModelError, Tokenizer};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mistral_model() -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/sentencepiece/mistral-7b-v0.1/tokenizer.model"))
        .unwrap()
}

fn cases() -> Value {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/sentencepiece/cases.json")).unwrap();
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

/// A folder with tokenizer.model, the variant's tokenizer_config.json and (when it names a model
/// type) a config.json, loaded through `Tokenizer::from_dir`.
fn load_variant(variant: &Value) -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.model"), mistral_model()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        variant["tokenizer_config"].to_string(),
    )
    .unwrap();
    if let Some(model_type) = variant["model_type"].as_str() {
        std::fs::write(
            dir.path().join("config.json"),
            json!({"model_type": model_type}).to_string(),
        )
        .unwrap();
    }
    Tokenizer::from_dir(dir.path()).unwrap()
}

#[test]
fn parses_the_model_proto() {
    // Values printed by sentencepiece's own protobuf parser for this file.
    let model = SentencePieceModel::parse(&mistral_model()).unwrap();
    assert_eq!(model.pieces.len(), 32000);
    assert_eq!(model.trainer.model_type, ModelType::Bpe);
    assert!(model.trainer.byte_fallback);
    assert_eq!(
        (
            model.trainer.unk_id,
            model.trainer.bos_id,
            model.trainer.eos_id,
            model.trainer.pad_id
        ),
        (0, 1, 2, -1)
    );
    assert_eq!(model.trainer.pad_piece, "<pad>");
    assert_eq!(model.normalizer.name, "identity");
    assert!(model.normalizer.add_dummy_prefix);
    assert!(!model.normalizer.remove_extra_whitespaces);
    assert!(model.normalizer.escape_whitespaces);
    assert!(model.normalizer.precompiled_charsmap.is_empty());
    let kinds = |kind| model.pieces.iter().filter(|p| p.kind == kind).count();
    assert_eq!(
        [
            PieceType::Normal,
            PieceType::Byte,
            PieceType::Control,
            PieceType::Unknown
        ]
        .map(kinds),
        [31741, 256, 2, 1]
    );
    assert_eq!(
        (model.pieces[0].piece.as_str(), model.pieces[0].kind),
        ("<unk>", PieceType::Unknown)
    );
    assert_eq!(
        (model.pieces[3].piece.as_str(), model.pieces[3].kind),
        ("<0x00>", PieceType::Byte)
    );
    assert_eq!(
        (model.pieces[300].piece.as_str(), model.pieces[300].score),
        ("om", -41.0)
    );
}

#[test]
fn encodes_and_decodes_like_transformers() {
    let cases = cases();
    let variants = cases["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 4);
    for variant in variants {
        let name = variant["name"].as_str().unwrap();
        let tokenizer = load_variant(variant);
        assert_eq!(
            tokenizer.vocab_size() as u64,
            variant["vocab_size"].as_u64().unwrap(),
            "{name}"
        );
        for case in variant["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let add_special = case["add_special_tokens"].as_bool().unwrap();
            let ids = ids_of(&case["ids"]);
            assert_eq!(
                tokenizer.encode(text, add_special).unwrap(),
                ids,
                "{name}: {text:?} {add_special}"
            );
            assert_eq!(
                tokenizer.decode(&ids, true).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{name}: {text:?}"
            );
            assert_eq!(
                tokenizer.decode(&ids, false).unwrap(),
                case["decoded_with_special"].as_str().unwrap(),
                "{name}: {text:?}"
            );
        }
    }
}

#[test]
fn mistral_conversion_matches_llava_hf_tokenizer_json() {
    // llava-hf/llava-v1.6-mistral-7b-hf ships this tokenizer.json (written by transformers from
    // the same tokenizer.model, legacy Metaspace "always").
    let shared = root().join("../shared/testdata/tokenizers/mistral");
    let shipped: Value =
        serde_json::from_slice(&std::fs::read(shared.join("tokenizer.json")).unwrap()).unwrap();
    let config =
        json!({"tokenizer_class": "LlamaTokenizer", "legacy": true, "add_bos_token": true});
    let converted = SentencePieceModel::parse(&mistral_model())
        .unwrap()
        .tokenizer_json(&config, Some("llava_mistral"))
        .unwrap();
    assert_eq!(converted["model"], shipped["model"]);
    assert_eq!(converted["pre_tokenizer"], shipped["pre_tokenizer"]);
    assert_eq!(converted["decoder"], shipped["decoder"]);

    // As written: transformers uses it so in a llava_next model folder.
    let shipped = Tokenizer::from_file(shared.join("tokenizer.json")).unwrap();
    let cases = cases();
    let legacy = cases["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "llava_mistral_legacy")
        .unwrap();
    let converted = load_variant(legacy);
    let mut compared = 0;
    // The llava-hf file has <image> and <pad> as added tokens; the SentencePiece model has not.
    for case in legacy["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        if text.contains("<image>") || text.contains("<pad>") {
            continue;
        }
        for add_special in [true, false] {
            assert_eq!(
                converted.encode(text, add_special).unwrap(),
                shipped.encode(text, add_special).unwrap(),
                "{text:?}"
            );
        }
        compared += 1;
    }
    assert!(compared >= 40, "{compared}");
}

/// Protobuf field helpers for hand-built models.
fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn varint_field(field: u64, value: u64, out: &mut Vec<u8>) {
    varint(field << 3, out);
    varint(value, out);
}

fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(1, text.as_bytes(), &mut out);
    varint(2 << 3 | 5, &mut out);
    out.extend_from_slice(&score.to_le_bytes());
    varint_field(3, kind, &mut out);
    out
}

/// A model with `<unk>`, `<s>`, `</s>`, two normal pieces and optionally a user-defined one.
fn tiny_model(model_type: u64, byte_fallback: bool, user_defined: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (text, score, kind) in [
        ("<unk>", 0.0, 2),
        ("<s>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("a", -1.0, 1),
        ("b", -2.0, 1),
    ] {
        bytes_field(1, &piece(text, score, kind), &mut out);
    }
    if user_defined {
        bytes_field(1, &piece("<image>", 0.0, 4), &mut out);
    }
    let mut normalizer = Vec::new();
    bytes_field(1, b"identity", &mut normalizer);
    bytes_field(3, &normalizer, &mut out);
    // The trainer spec last, so that every truncation lacks it (a prefix that ends between two
    // fields is otherwise a valid message).
    let mut trainer = Vec::new();
    varint_field(3, model_type, &mut trainer);
    varint_field(35, byte_fallback as u64, &mut trainer);
    // pad_id -1 as protobuf writes an int32: a 10-byte varint.
    varint_field(43, u64::MAX, &mut trainer);
    bytes_field(2, &trainer, &mut out);
    out
}

fn conversion_error(model: &[u8], config: &Value, model_type: Option<&str>) -> String {
    let config = config.to_string();
    match Tokenizer::from_sentencepiece_with_config(model, Some(config.as_bytes()), model_type) {
        Ok(_) => panic!("converted an unsupported tokenizer.model"),
        Err(ModelError::Tokenizer(msg)) => msg,
        Err(other) => panic!("not a tokenizer error: {other}"),
    }
}

#[test]
fn hand_built_model_parses_with_defaults() {
    let model = SentencePieceModel::parse(&tiny_model(2, true, false)).unwrap();
    assert_eq!(model.pieces.len(), 5);
    assert_eq!(model.pieces[4].score, -2.0);
    assert_eq!(model.trainer.pad_id, -1);
    assert_eq!(
        (
            model.trainer.unk_id,
            model.trainer.bos_id,
            model.trainer.eos_id
        ),
        (0, 1, 2)
    );
    assert_eq!(model.trainer.unk_piece, "<unk>");
    // NormalizerSpec defaults when the fields are absent.
    assert!(model.normalizer.add_dummy_prefix && model.normalizer.remove_extra_whitespaces);
}

#[test]
fn unsupported_and_corrupt_models_give_clear_errors() {
    let llama = json!({"tokenizer_class": "LlamaTokenizer"});
    let unigram = conversion_error(&tiny_model(1, true, false), &llama, None);
    assert!(
        unigram.contains("Unigram SentencePiece models are not supported"),
        "{unigram}"
    );
    let no_fallback = conversion_error(&tiny_model(2, false, false), &llama, None);
    assert!(
        no_fallback.contains("without byte fallback"),
        "{no_fallback}"
    );
    let user_defined = conversion_error(&tiny_model(2, true, true), &llama, None);
    assert!(
        user_defined.contains("user-defined pieces such as \"<image>\""),
        "{user_defined}"
    );
    let other_class = conversion_error(
        &tiny_model(2, true, false),
        &json!({"tokenizer_class": "T5Tokenizer"}),
        None,
    );
    assert!(
        other_class.contains("tokenizer_class \"T5Tokenizer\""),
        "{other_class}"
    );
    let renamed = json!({"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": {"3": {"content": "x"}}});
    let renamed = conversion_error(&tiny_model(2, true, false), &renamed, None);
    assert!(renamed.contains("renames piece 3"), "{renamed}");

    // Every truncation of a model is an error, never a panic.
    let tiny = tiny_model(2, true, false);
    for len in 0..tiny.len() {
        let msg = conversion_error(&tiny[..len], &llama, None);
        assert!(
            msg.contains("tokenizer.model is not a valid SentencePiece model"),
            "{len}: {msg}"
        );
    }
    let real = mistral_model();
    for len in [1, 1000, real.len() / 2, real.len() - 1] {
        let msg = conversion_error(&real[..len], &llama, None);
        assert!(
            msg.contains("is not a valid SentencePiece model"),
            "{len}: {msg}"
        );
    }
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let msg = conversion_error(&garbage, &llama, None);
    assert!(msg.contains("is not a valid SentencePiece model"), "{msg}");

    // Through from_dir, the message names the folder.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.model"), &real[..real.len() / 3]).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), llama.to_string()).unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains(&dir.path().display().to_string())
            && err.contains("not a valid SentencePiece model"),
        "{err}"
    );
}
