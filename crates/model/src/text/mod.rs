//! Text: the tokenizer, SentencePiece models, streaming detokenisation and chat templates.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

pub mod sentencepiece;
pub mod template;
pub mod tokenizer;

pub use template::{
    BuiltinTemplate, ChatTemplate, Message, TEMPLATE_JINJA_FILE, TEMPLATE_JSON_FILE, TemplateFiles,
    VICUNA_SYSTEM,
};
pub use tokenizer::{
    SENTENCEPIECE_FILE, StreamDecoder, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer,
};

pub(crate) fn read_if_present(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

pub(crate) fn parse_json(file: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| ModelError::Template(format!("{file}: malformed JSON: {e}")))
}

/// What the tokenizer and template tests read: transformers' fixtures and shipped tokenizers.
#[cfg(test)]
pub(crate) mod test_files {
    use serde_json::Value;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    pub const TOKENIZERS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/testdata/tokenizers"
    );

    pub fn fixture(name: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}
