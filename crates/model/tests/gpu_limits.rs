//! A model is checked against the GPU's limits before any weight is read (`llava_model::files::needs`):
//! hand-counted needs of LLaVA-1.6-Mistral-7B against smaller GPUs, the bundled model on a
//! limits-capped device, and long prompts run in chunks with transformers' answer unchanged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use llava_gpu::{DType, Gpu, GpuOptions};
use llava_image::ImageConfig;
use llava_model::files::checkpoint::Dtype;
use llava_model::files::config::LlavaConfig;
use llava_model::files::convert::{ConversionPlan, DEFAULT_SHARD_BYTES};
use llava_model::files::needs::{self, GpuLimits, WeightFormats};
use llava_model::files::npy;
use llava_model::files::weights::{KeepOptions, WeightPrecision};
use llava_model::llava::{Llava, LoadOptions};
use serde_json::Value;

mod common;
use common::{expected, fixture, greedy_raw, load_image, mistral_7b_config, root};

const MIB: u64 = 1 << 20;

fn limits(max_buffer: u64, max_binding: u64) -> GpuLimits {
    GpuLimits {
        max_buffer,
        max_binding,
        storage_align: 256,
    }
}

fn image_config(config: &LlavaConfig) -> ImageConfig {
    ImageConfig {
        tile_size: config.vision.image_size as u32,
        patch_size: config.vision.patch_size as u32,
        grid_pinpoints: config
            .image_grid_pinpoints
            .iter()
            .map(|&[h, w]| [h as u32, w as u32])
            .collect(),
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
    }
}

fn check_7b(formats: WeightFormats<'_>, context: usize, limits: GpuLimits) -> Result<(), String> {
    let config = mistral_7b_config();
    needs::check(
        &config,
        &image_config(&config),
        formats,
        context,
        DType::F16,
        limits,
        "llava-7b",
    )
    .map_err(|e| e.to_string())
}

fn checkpoint(stored: Dtype, precision: WeightPrecision) -> WeightFormats<'static> {
    WeightFormats::Checkpoint { stored, precision }
}

#[test]
fn mistral_7b_weights_against_webgpu_default_limits() {
    // WebGPU's defaults: maxBufferSize 256 MiB, maxStorageBufferBindingSize 128 MiB.
    let defaults = limits(256 * MIB, 128 * MIB);
    // f32: the [32064, 4096] embedding table is 32064 * 4096 * 4 bytes.
    assert_eq!(
        check_7b(
            checkpoint(Dtype::F32, WeightPrecision::Native),
            4096,
            defaults
        )
        .unwrap_err(),
        "llava-7b: the model does not fit this GPU: model.embed_tokens.weight [32064, 4096] kept as F32 needs a \
         buffer of 525336576 bytes, over its max_buffer_size of 268435456 bytes (quantized, q8 or q4, it may fit)"
    );
    // bf16 is kept as f16: 262668288 bytes, under 256 MiB; q8 and q4 are smaller still.
    for precision in [
        WeightPrecision::Native,
        WeightPrecision::Q8,
        WeightPrecision::Q4,
    ] {
        check_7b(checkpoint(Dtype::BF16, precision), 4096, defaults).unwrap();
    }
    // Under q4 the lm_head stays Q8: 32064 * 4096 bytes, then 32064 * 128 f16 scales.
    let want = "llava-7b: the model does not fit this GPU: lm_head.weight [32064, 4096] kept as Q8 needs a buffer of \
                139542528 bytes, over its max_buffer_size of 134217728 bytes";
    let small = limits(128 * MIB, 128 * MIB);
    assert_eq!(
        check_7b(checkpoint(Dtype::F16, WeightPrecision::Q4), 4096, small).unwrap_err(),
        want
    );
    // A converted folder is checked by its manifest's storage: the converter's rules agree.
    let config = mistral_7b_config();
    let plan = ConversionPlan::for_config(
        &config,
        Dtype::F16,
        WeightPrecision::Q4,
        KeepOptions::default(),
        DEFAULT_SHARD_BYTES,
    );
    let stored: BTreeMap<_, _> = plan
        .shards
        .iter()
        .flat_map(|s| &s.tensors)
        .map(|t| (t.name.clone(), t.storage))
        .collect();
    assert_eq!(
        check_7b(WeightFormats::Converted(&stored), 4096, small).unwrap_err(),
        want
    );
    check_7b(WeightFormats::Converted(&stored), 4096, defaults).unwrap();
}

#[test]
fn mistral_7b_context_and_image_against_a_32_mib_binding() {
    let config = mistral_7b_config();
    let narrow = limits(256 * MIB, 32 * MIB);
    // Per token: the prompt's embeddings 4096 * 4 = 16 KiB; one layer's f16 KV 2 * 8 * 128 * 2 = 4 KiB.
    assert_eq!(needs::max_context(&config.text, DType::F16, narrow), 2048);
    let q4 = checkpoint(Dtype::F16, WeightPrecision::Q4);
    assert_eq!(
        check_7b(q4, 4096, narrow).unwrap_err(),
        "llava-7b: the model does not fit this GPU: a context of 4096 tokens needs a buffer of 67108864 bytes (one \
         layer's F16 KV cache, or the prompt's embeddings), over its max_storage_buffer_binding_size of 33554432 \
         bytes: load it with a context of at most 2048 tokens"
    );
    // The largest image is 5 tiles (the overview and a 672x672 grid) of 577 positions, its widest
    // activation CLIP's MLP: 5 * 577 * 4096 * 4 bytes.
    assert_eq!(
        check_7b(q4, 1024, narrow).unwrap_err(),
        "llava-7b: the model does not fit this GPU: the vision tower's activations for the largest image (5 tiles) \
         need a buffer of 47267840 bytes, over its max_storage_buffer_binding_size of 33554432 bytes"
    );
    check_7b(q4, 2048, limits(256 * MIB, 48 * MIB)).unwrap();

    // With a KV head per query head (Vicuna's layout) an f32 cache row is 2 * 4096 * 4 = 32 KiB.
    let mut vicuna = config.text.clone();
    vicuna.num_key_value_heads = 32;
    assert_eq!(needs::max_context(&vicuna, DType::F32, narrow), 1024);
    assert_eq!(needs::max_context(&vicuna, DType::F16, narrow), 2048);

    // The prefill's widest row is the MLP's 14336 f32 values: 128 MiB / 57344 bytes.
    assert_eq!(needs::prefill_rows(&config.text, 128 * MIB, None), 2340);
    assert_eq!(needs::prefill_rows(&config.text, 128 * MIB, Some(512)), 512);
    assert_eq!(needs::prefill_rows(&config.text, 1, None), 1);
}

#[test]
fn the_declared_dtype_is_read_from_either_key() {
    for (config, want) in [
        (r#"{"torch_dtype": "bfloat16"}"#, Some(Dtype::BF16)),
        (
            r#"{"dtype": "float16", "text_config": {"dtype": "float32"}}"#,
            Some(Dtype::F16),
        ),
        (
            r#"{"text_config": {"torch_dtype": "float32"}}"#,
            Some(Dtype::F32),
        ),
        (r#"{"dtype": "int8"}"#, None),
        (r#"{}"#, None),
        ("not json", None),
    ] {
        assert_eq!(needs::declared_dtype(config), want, "{config}");
    }
}

fn capped_gpu(max_buffer_bytes: u64) -> Arc<Gpu> {
    let options = GpuOptions {
        max_buffer_bytes: Some(max_buffer_bytes),
        ..GpuOptions::from_env()
    };
    let gpu = Arc::new(Gpu::with_options_blocking(options).unwrap());
    assert_eq!(gpu.limits().max_buffer_size, max_buffer_bytes);
    gpu
}

#[test]
fn a_model_over_the_gpu_limits_is_refused_before_any_weight_is_read() {
    // The bundled model's largest tensors are its [32064, 64] F16 embedding table and LM head:
    // 32064 * 64 * 2 = 4104192 bytes.
    let dir = fixture("mistral-tiny");
    let mut weight_bytes_read = 0;
    let err = Llava::load_dir_with_progress(
        capped_gpu(1 << 20),
        &dir,
        &LoadOptions::default(),
        &mut |p| weight_bytes_read = weight_bytes_read.max(p.bytes_done),
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        format!(
            "{}: the model does not fit this GPU: model.embed_tokens.weight [32064, 64] kept as F16 needs a buffer \
             of 4104192 bytes, over its max_buffer_size of 1048576 bytes (quantized, q8 or q4, it may fit)",
            dir.display()
        )
    );
    assert_eq!(weight_bytes_read, 0);
    // With room for it, the same limits-capped device loads the model.
    Llava::load_dir(capped_gpu(4104192), &dir, &LoadOptions::default()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_tensor_larger_than_its_config_declares_is_still_refused_at_upload() {
    // tied-f32 stores its [32064, 32] embedding table in f32 (4104192 bytes). Without the config's
    // "dtype" the check before loading assumes f16 (half that); the upload then names the tensor.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("tied-f32"), dir.path());
    let config_file = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("dtype");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let err = Llava::load_dir(capped_gpu(3_000_000), dir.path(), &LoadOptions::default())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with(
            "model.safetensors: tensor language_model.model.embed_tokens.weight: a GPU buffer of 4104192 bytes \
             exceeds this GPU's max_buffer_size of 3000000 bytes"
        ),
        "{err}"
    );
}

#[test]
fn a_prompt_run_in_chunks_gives_transformers_answer() {
    let case = expected("mistral-tiny")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "rocket_en")
        .unwrap()
        .clone();
    let options = LoadOptions {
        precision: WeightPrecision::F32,
        context: None,
    };
    let mut llava = Llava::load_dir(common::gpu(), &fixture("mistral-tiny"), &options).unwrap();
    // 2162 prompt tokens: four chunks of 500 and one of 162, each attending to the cache before it.
    llava.set_prefill_chunk(Some(500));
    let image = load_image(case["image"].as_str().unwrap());
    let reply = greedy_raw(&llava, Some(&image), case["prompt"].as_str().unwrap());
    assert_eq!(reply.prompt_tokens, 2162);
    let want_ids: Vec<u32> = case["greedy_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(reply.tokens, want_ids);
    let logits_file = root()
        .join("tests/fixtures/expected")
        .join(case["logits_npy"].as_str().unwrap());
    let (_, want) = npy::read_f32(logits_file).unwrap();
    let got = reply.first_logits.unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(
        diff <= 1e-4 * scale,
        "first-step logits: max |diff| {diff} > 1e-4 x {scale}"
    );
}
