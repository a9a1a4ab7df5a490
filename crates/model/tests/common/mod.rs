//! Helpers shared by the model's integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use llava_gpu::Gpu;
use llava_model::files::config::LlavaConfig;
use llava_model::generate::{GenerateParams, Reply, Turn};
use llava_model::llava::Llava;
use serde_json::{Value, json};

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
    GPU.get_or_init(|| Arc::new(Gpu::new_blocking().expect("a wgpu adapter")))
        .clone()
}

/// A test image of ../shared/testdata/images, decoded as Pillow decodes it (JPEGs too: crates/image
/// matches libjpeg-turbo byte for byte).
pub fn load_image(name: &str) -> llava_image::Rgb8 {
    let path = root().join("../shared/testdata/images").join(name);
    llava_image::decode(&std::fs::read(&path).unwrap()).unwrap()
}

/// 16 greedy steps without stopping at eos, as the fixtures were generated.
pub fn greedy16() -> GenerateParams {
    GenerateParams {
        max_new_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    }
}

/// [`greedy16`] on a raw prompt (with `<image>` where the image goes), keeping the first-step
/// logits.
pub fn greedy_raw(llava: &Llava, image: Option<&llava_image::Rgb8>, prompt: &str) -> Reply {
    let mut chat = llava.chat(None).unwrap();
    let turn = Turn {
        image,
        text: prompt,
        raw_prompt: true,
        want_logits: true,
    };
    pollster::block_on(chat.send(llava, turn, &greedy16(), |_| true)).unwrap()
}

/// llava-hf/llava-v1.6-mistral-7b-hf's config (the fields that set the shapes).
pub fn mistral_7b_config() -> LlavaConfig {
    let config = json!({
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "image_token_index": 32000,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "tie_word_embeddings": false,
        "text_config": {
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "vocab_size": 32064,
            "sliding_window": null
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000
        }
    });
    LlavaConfig::from_json(&config.to_string()).unwrap()
}
