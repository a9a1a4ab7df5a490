//! What a model asks of the GPU, worked out from its config before any weight is read and
//! checked against the adapter's limits: a model this GPU cannot hold is refused up front,
//! naming what does not fit and the limit it breaks, instead of after the download of every
//! shard before it. WebGPU tells no memory size, only per-buffer limits; those are checked:
//! - every weight is one buffer (`max_buffer_size`); ops bind large ones in row windows;
//! - a layer's KV cache is bound whole by the decode step, and the prompt's embeddings by the
//!   prefill (`max_storage_buffer_binding_size`): both grow with the context;
//! - the vision tower runs every tile of the largest image at once (the same limit);
//! - a long prompt runs in chunks of rows that fit one binding ([`prefill_rows`]).

use std::collections::BTreeMap;

use llava_gpu::ops::decode::ATTEND_KEYS;
use llava_gpu::{DType, Gpu};
use llava_image::ImageConfig;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::files::checkpoint::Dtype;
use crate::files::config::{LlavaConfig, TextConfig};
use crate::files::convert::model_tensors;
use crate::files::weights::{WeightPrecision, storage_dtype_of};

/// How the weights will be kept on the GPU.
#[derive(Clone, Copy, Debug)]
pub enum WeightFormats<'a> {
    /// A converted folder's, by canonical name, as its manifest stores them.
    Converted(&'a BTreeMap<String, DType>),
    /// A checkpoint's, converted as they load. `stored` is the dtype its config declares (f16
    /// when it declares none: the upload still checks each tensor as it finds it).
    Checkpoint {
        stored: Dtype,
        precision: WeightPrecision,
    },
}

/// The limits a model is checked against (from [`Gpu::limits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuLimits {
    /// `max_buffer_size`.
    pub max_buffer: u64,
    /// `max_storage_buffer_binding_size` (at most `max_buffer`).
    pub max_binding: u64,
    /// `min_storage_buffer_offset_alignment`.
    pub storage_align: u64,
}

impl GpuLimits {
    pub fn of(gpu: &Gpu) -> GpuLimits {
        GpuLimits {
            max_buffer: gpu.limits().max_buffer_size,
            max_binding: gpu.max_binding(),
            storage_align: gpu.storage_align(),
        }
    }
}

/// Checks that `config`'s weights (kept as `formats` says), a KV cache of `context` tokens at
/// least as `kv` and the vision tower's largest image fit `limits`; errors name `location`.
pub fn check(
    config: &LlavaConfig,
    image: &ImageConfig,
    formats: WeightFormats<'_>,
    context: usize,
    kv: DType,
    limits: GpuLimits,
    location: &str,
) -> Result<()> {
    let too_big = |msg: String| {
        Err(ModelError::Input(format!(
            "{location}: the model does not fit this GPU: {msg}"
        )))
    };
    for (name, shape) in model_tensors(config) {
        let dtype = match formats {
            // A tensor the manifest lacks is reported as missing by the loader.
            WeightFormats::Converted(tensors) => match tensors.get(&name) {
                Some(&dtype) => dtype,
                None => continue,
            },
            WeightFormats::Checkpoint { stored, precision } => {
                storage_dtype_of(&name, &shape, stored, precision)
            }
        };
        let bytes = dtype
            .buffer_bytes(&shape, limits.storage_align)
            .unwrap_or(u64::MAX);
        if bytes > limits.max_buffer {
            let smaller = if dtype.is_quantized() {
                ""
            } else {
                " (quantized, q8 or q4, it may fit)"
            };
            return too_big(format!(
                "{name} {shape:?} kept as {dtype:?} needs a buffer of {bytes} bytes, over its max_buffer_size of {} \
                 bytes{smaller}",
                limits.max_buffer
            ));
        }
    }

    let fits = max_context(&config.text, kv, limits);
    if context > fits {
        let bytes =
            kv_layer_bytes(&config.text, context, kv).max(prompt_bytes(&config.text, context));
        return too_big(format!(
            "a context of {context} tokens needs a buffer of {bytes} bytes (one layer's {kv:?} KV cache, or the \
             prompt's embeddings), over its max_storage_buffer_binding_size of {} bytes: load it with a context of \
             at most {fits} tokens",
            limits.max_binding
        ));
    }

    let (tiles, bytes) = vision_activation(config, image);
    if bytes > limits.max_binding {
        return too_big(format!(
            "the vision tower's activations for the largest image ({tiles} tiles) need a buffer of {bytes} bytes, \
             over its max_storage_buffer_binding_size of {} bytes",
            limits.max_binding
        ));
    }
    Ok(())
}

/// Bytes of one layer's KV cache (keys and values, [`crate::net::language::KvCache`]'s layout) for
/// `context` tokens.
fn kv_layer_bytes(text: &TextConfig, context: usize, kv: DType) -> u64 {
    let rows = (context as u64).next_multiple_of(ATTEND_KEYS as u64);
    let per_row = (text.num_key_value_heads as u64).saturating_mul(text.head_dim as u64);
    kv.data_bytes(1)
        .saturating_mul(2)
        .saturating_mul(rows)
        .saturating_mul(per_row)
}

/// Bytes of a whole prompt's embeddings `[context, hidden]` f32, the input of the prefill.
fn prompt_bytes(text: &TextConfig, context: usize) -> u64 {
    4u64.saturating_mul(context as u64)
        .saturating_mul(text.hidden_size as u64)
}

/// The longest context whose KV cache and prompt fit one storage binding each.
pub fn max_context(text: &TextConfig, kv: DType, limits: GpuLimits) -> usize {
    let per_token = kv_layer_bytes(text, ATTEND_KEYS, kv) / ATTEND_KEYS as u64;
    let kv_rows = (limits.max_binding / per_token.max(1)) / ATTEND_KEYS as u64 * ATTEND_KEYS as u64;
    let prompt_rows = limits.max_binding / prompt_bytes(text, 1).max(1);
    kv_rows.min(prompt_rows).min(usize::MAX as u64) as usize
}

/// The tiles of the largest image (the overview and the largest pinpoint's grid) and the bytes
/// of the widest activation the vision tower and projector make for them.
fn vision_activation(config: &LlavaConfig, image: &ImageConfig) -> (u64, u64) {
    let tile = u64::from(image.tile_size.max(1));
    let grid = image
        .grid_pinpoints
        .iter()
        .map(|&[h, w]| u64::from(h) / tile * (u64::from(w) / tile))
        .max();
    let tiles = 1 + grid.unwrap_or(0);
    let v = &config.vision;
    let positions = ((v.image_size / v.patch_size.max(1)) as u64).pow(2) + 1;
    let widest = v
        .intermediate_size
        .max(v.hidden_size)
        .max(config.text.hidden_size) as u64;
    (
        tiles,
        4u64.saturating_mul(tiles)
            .saturating_mul(positions)
            .saturating_mul(widest),
    )
}

/// Prompt tokens the prefill runs at once: as many as keep its widest activation (an MLP's
/// `[rows, intermediate]`, or q's or the residual stream's) within one storage binding, and at
/// most `cap` when one is set.
pub fn prefill_rows(text: &TextConfig, max_binding: u64, cap: Option<usize>) -> usize {
    let widest = text
        .intermediate_size
        .max(text.hidden_size)
        .max(text.num_attention_heads * text.head_dim) as u64;
    let fit = (max_binding / (4 * widest).max(1)).clamp(1, usize::MAX as u64) as usize;
    cap.map_or(fit, |cap| fit.min(cap.max(1)))
}

/// The dtype a checkpoint's config declares for its weights (`torch_dtype` in transformers 4,
/// `dtype` in 5; at the top or in `text_config`), if it names one the runtime reads.
pub fn declared_dtype(config_text: &str) -> Option<Dtype> {
    let config: Value = serde_json::from_str(config_text).ok()?;
    let named = |v: &Value| {
        ["dtype", "torch_dtype"]
            .iter()
            .find_map(|key| v.get(key)?.as_str().map(str::to_owned))
    };
    let name = named(&config).or_else(|| named(config.get("text_config")?))?;
    match name.trim_start_matches("torch.") {
        "float32" => Some(Dtype::F32),
        "float16" => Some(Dtype::F16),
        "bfloat16" => Some(Dtype::BF16),
        _ => None,
    }
}
