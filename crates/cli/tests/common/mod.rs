//! Helpers shared by the CLI's integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A test image of ../shared/testdata/images.
pub fn image(name: &str) -> PathBuf {
    root().join("../shared/testdata/images").join(name)
}

/// Runs the built `llava` with `args`.
pub fn llava(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llava"))
        .args(args)
        .output()
        .expect("run llava")
}

/// A case of the bundled tiny model's transformers fixture (tests/fixtures/expected/mistral-tiny.json).
pub fn case(id: &str) -> Value {
    let path = root().join("tests/fixtures/expected/mistral-tiny.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap()
        .clone()
}
