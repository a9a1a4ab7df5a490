//! Helpers shared by the model's integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use llava_gpu::Gpu;
use llava_model::generate::{GenerateParams, Reply, Turn};
use llava_model::llava::Llava;
use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fixture checkpoint folder of tests/fixtures/models.
pub fn fixture(model: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(model)
}

/// tests/fixtures/expected/<model>.json.
pub fn expected(model: &str) -> Value {
    let path = root().join(format!("tests/fixtures/expected/{model}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// One device for all the tests of a binary.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Arc::new(Gpu::new_blocking().expect("a wgpu adapter"))).clone()
}

/// A test image of ../shared/testdata/images, decoded as Pillow decodes it (JPEGs too: crates/image
/// matches libjpeg-turbo byte for byte).
pub fn load_image(name: &str) -> llava_image::Rgb8 {
    let path = root().join("../shared/testdata/images").join(name);
    llava_image::decode(&std::fs::read(&path).unwrap()).unwrap()
}

/// 16 greedy steps without stopping at eos, as the fixtures were generated.
pub fn greedy16() -> GenerateParams {
    GenerateParams { max_new_tokens: 16, ignore_eos: true, ..Default::default() }
}

/// [`greedy16`] on a raw prompt (with `<image>` where the image goes), keeping the first-step
/// logits.
pub fn greedy_raw(llava: &Llava, image: Option<&llava_image::Rgb8>, prompt: &str) -> Reply {
    let mut chat = llava.chat(None).unwrap();
    let turn = Turn { image, text: prompt, raw_prompt: true, want_logits: true };
    pollster::block_on(chat.send(llava, turn, &greedy16(), |_| true)).unwrap()
}
