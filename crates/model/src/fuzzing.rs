//! Entry points of the fuzz targets in `fuzz/` (`tests/fuzz.sh` runs them with cargo-fuzz);
//! `tests/fuzz_corpus.rs` replays the committed corpus through the same functions in the
//! ordinary test build. Each takes arbitrary bytes and must return without panicking; where a
//! parser has an independent way to get the same answer, it is also checked against it.

use llava_image::ImageConfig;

use crate::files::checkpoint::{header_len, parse_header};
use crate::files::config::{GenerationConfig, LlavaConfig, PreprocessorConfig};
use crate::files::convert::ConversionPlan;
use crate::files::loader::scan_shard;
use crate::files::manifest::Manifest;
use crate::files::weights::{KeepOptions, WeightPrecision};
use crate::text::{ChatTemplate, Message, Tokenizer};

/// A fuzz target: its name (the folder under `fuzz/corpus/`) and entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every fuzz target.
pub const TARGETS: [Target; 8] = [
    ("safetensors_header", safetensors_header),
    ("shard_stream", shard_stream),
    ("manifest", manifest),
    ("config", config),
    ("sentencepiece", sentencepiece),
    ("tokenizer_json", tokenizer_json),
    ("chat_template", chat_template),
    ("image", image),
];

/// A whole safetensors file: the length prefix, then the header.
pub fn safetensors_header(data: &[u8]) {
    let Some(prefix) = data.get(..8).and_then(|p| <[u8; 8]>::try_from(p).ok()) else {
        return;
    };
    let size = data.len() as u64;
    if let Ok(len) = header_len(prefix, size)
        && let Ok(entries) = parse_header(&data[8..8 + len as usize], size)
    {
        for entry in entries {
            assert!(
                entry.start <= entry.end && entry.end <= size,
                "{entry:?} outside {size} bytes"
            );
        }
    }
}

/// A safetensors file through the streaming parser; the first byte picks the chunk size. Any
/// chunking gives what one chunk gives, and each entry's bytes are its range of the file.
pub fn shard_stream(data: &[u8]) {
    let Some((&chunk, file)) = data.split_first() else {
        return;
    };
    let whole = scan_shard(file, file.len());
    let chunked = scan_shard(file, usize::from(chunk) + 1);
    assert_eq!(whole.is_ok(), chunked.is_ok(), "{whole:?} vs {chunked:?}");
    if let (Ok(whole), Ok(chunked)) = (whole, chunked) {
        assert_eq!(whole, chunked);
        for (entry, bytes) in whole {
            assert_eq!(
                &file[entry.start as usize..entry.end as usize],
                bytes.as_slice()
            );
        }
    }
}

/// A converted folder's `manifest.json`.
pub fn manifest(data: &[u8]) {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::from_json(json) {
        manifest.total_bytes();
    }
}

/// `config.json`, also read as the processor and generation configs; a config that parses is
/// planned for conversion (the `--dry-run` size arithmetic) and its image settings checked.
pub fn config(data: &[u8]) {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    let _ = GenerationConfig::from_json(json);
    let preprocessor = PreprocessorConfig::from_any_json(json).ok();
    let Ok(config) = LlavaConfig::from_json(json) else {
        return;
    };
    let _ = crate::llava::image_config(
        &config,
        preprocessor.as_ref(),
        ["config.json", "processor_config.json"],
    );
    // Planning the largest configs the caps allow takes a moment: only small ones here.
    if config.text.num_hidden_layers + config.vision.num_hidden_layers <= 64 {
        let plan = ConversionPlan::for_config(
            &config,
            crate::Dtype::BF16,
            WeightPrecision::Q4,
            KeepOptions::default(),
            1 << 30,
        );
        plan.summary();
    }
}

/// A SentencePiece `tokenizer.model`, converted and used.
pub fn sentencepiece(data: &[u8]) {
    let Ok(tokenizer) = Tokenizer::from_sentencepiece_with_config(data, None, Some("llava_next"))
    else {
        return;
    };
    use_tokenizer(&tokenizer);
}

/// A `tokenizer.json`, loaded as written and as rebuilt for a `LlamaTokenizer` folder, and used.
pub fn tokenizer_json(data: &[u8]) {
    let llama_config = br#"{"tokenizer_class": "LlamaTokenizer", "legacy": false}"#;
    let loaded = [
        Tokenizer::from_bytes(data),
        Tokenizer::from_bytes_with_config(data, Some(llama_config), None),
    ];
    for tokenizer in loaded.iter().flatten() {
        use_tokenizer(tokenizer);
    }
}

/// Encodes a prompt with an image token, then decodes it whole and token by token; then ids a
/// model may sample past the tokenizer's vocabulary.
fn use_tokenizer(tokenizer: &Tokenizer) {
    if let Ok(ids) = tokenizer.encode("Hello <image>\nwörld 🙂 12", true) {
        let _ = tokenizer.decode(&ids, false);
        let mut decoder = tokenizer.stream_decoder(true);
        for id in ids {
            let _ = decoder.step(id);
        }
        let _ = decoder.finish();
    }
    let beyond = [tokenizer.vocab_size() as u32, 32063, u32::MAX];
    let _ = tokenizer.decode(&beyond, true);
    let mut decoder = tokenizer.stream_decoder(false);
    for id in beyond {
        let _ = decoder.step(id);
    }
}

/// A Jinja chat template, rendered for a conversation with an image.
pub fn chat_template(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(template) = ChatTemplate::from_source(source) else {
        return;
    };
    let messages = [
        Message::system("Be brief."),
        Message::user(1, "What is it?"),
        Message::assistant("A cat."),
        Message::user(0, "Which colour?"),
    ];
    let _ = template.render(&messages, true);
}

/// An encoded image (PNG, JPEG, GIF, WebP), decoded and, when small, preprocessed.
pub fn image(data: &[u8]) {
    let Ok(rgb) = llava_image::decode(data) else {
        return;
    };
    assert_eq!(rgb.data.len(), rgb.width as usize * rgb.height as usize * 3);
    if u64::from(rgb.width) * u64::from(rgb.height) <= 1 << 16 {
        let config = ImageConfig {
            tile_size: 28,
            patch_size: 14,
            grid_pinpoints: vec![[28, 56], [56, 28]],
            ..ImageConfig::default()
        };
        llava_image::preprocess(&rgb, &config).expect("a decoded image preprocesses");
    }
}
