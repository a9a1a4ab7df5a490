//! Prefill and the vision tower allocate per batch, not per op: an op's output takes the buffer of
//! a tensor the batch has dropped, so a tower of four layers creates no more buffers than a tower
//! of one (counted on the GPU, random weights, real op sequence). Both run their fused GEMMs:
//! the dispatches per layer are counted too.

use std::sync::Arc;

use llava_gpu::{DType, Gpu, Tensor};
use llava_model::files::config::{Activation, TextArch, TextConfig, VisionConfig};
use llava_model::files::weights::{WeightPrecision, Weights};
use llava_model::net::language::LanguageModel;
use llava_model::net::vision::VisionTower;

fn text_config(layers: usize) -> TextConfig {
    TextConfig {
        arch: TextArch::Mistral,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        hidden_act: Activation::Silu,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        vocab_size: 1000,
        max_position_embeddings: 4096,
        sliding_window: None,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: None,
    }
}

/// Buffers created by the prefill of 300 prompt rows through `layers` decoder layers.
fn prefill_buffers(layers: usize) -> u64 {
    // A device of its own: its counters see only this model's work.
    let gpu = Arc::new(Gpu::new_blocking().unwrap());
    let cfg = text_config(layers);
    let mut w = Weights::random(gpu.clone(), WeightPrecision::Q4, 7);
    let language = LanguageModel::load(&mut w, &gpu, &cfg, false).unwrap();
    let mut cache = language.new_cache(&gpu, 512, DType::F32).unwrap();
    let rows = 300;
    let x = Tensor::from_f32(&gpu, &[rows, 256], &llava_gpu::random(rows * 256, 1)).unwrap();
    let before = gpu.counters();
    let mut batch = gpu.batch();
    let last = language.forward_last(&mut batch, &x, &mut cache).unwrap();
    batch.submit().unwrap();
    let used = gpu.counters() - before;
    let last = pollster::block_on(last.to_f32(&gpu)).unwrap();
    assert!(last.iter().all(|v| v.is_finite()), "{layers} layers");
    // Per layer: norm, the q/k/v GEMM, two RoPEs, attention, o_proj with the residual add, norm,
    // the gate/up GEMM with its SiLU, down_proj with the residual add (15 with q, k, v, gate and
    // up apart, silu_mul and the adds apart).
    assert_eq!(used.dispatches, 9 * layers as u64, "{used:?}");
    // The readback's staging buffer is not the prefill's.
    used.buffers_created
}

/// Buffers created and dispatches run by the vision tower on 3 tiles through `layers` encoder
/// layers.
fn vision_counters(layers: usize) -> (u64, u64) {
    let gpu = Arc::new(Gpu::new_blocking().unwrap());
    let cfg = VisionConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        image_size: 56,
        patch_size: 14,
        layer_norm_eps: 1e-5,
        hidden_act: Activation::QuickGelu,
    };
    let mut w = Weights::random(gpu.clone(), WeightPrecision::F16, 8);
    let tower = VisionTower::load(&mut w, &gpu, &cfg, -1).unwrap();
    let pixels = 3 * 3 * 56 * 56;
    let pixels = Tensor::from_f32(&gpu, &[3, 3, 56, 56], &llava_gpu::random(pixels, 2)).unwrap();
    let before = gpu.counters();
    let mut batch = gpu.batch();
    let hidden = tower.forward(&mut batch, &pixels).unwrap();
    batch.submit().unwrap();
    let used = gpu.counters() - before;
    assert_eq!(hidden.shape(), &[3, 17, 64]);
    (used.buffers_created, used.dispatches)
}

#[test]
fn prefill_creates_as_many_buffers_for_four_layers_as_for_one() {
    let (one, four) = (prefill_buffers(1), prefill_buffers(4));
    assert_eq!(
        four, one,
        "buffers created by the prefill of 1 and of 4 layers"
    );
}

#[test]
fn the_vision_tower_creates_as_many_buffers_for_four_layers_as_for_one() {
    let ((one, one_dispatches), (four, four_dispatches)) = (vision_counters(1), vision_counters(4));
    assert_eq!(
        four, one,
        "buffers created by the vision tower of 1 and of 4 layers"
    );
    // Per layer: layer_norm1, the q/k/v GEMM with its biases, attention, out_proj with the
    // residual add, layer_norm2, fc1 with quick_gelu, fc2 with the residual add (12 with q, k
    // and v apart, quick_gelu and the adds apart).
    assert_eq!(four_dispatches - one_dispatches, 3 * 7);
}
