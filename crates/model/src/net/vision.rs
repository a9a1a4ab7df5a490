//! The CLIP ViT vision tower (ViT-L/14-336 in LLaVA-1.6), run on all tiles of an image at once.

use llava_gpu::ops::attention::{Mask, attention};
use llava_gpu::ops::conv::patch_embed;
use llava_gpu::ops::elementwise::{add, gelu};
use llava_gpu::ops::matmul::linear_qkv;
use llava_gpu::{Batch, DType, Gpu, Tensor};

use super::layers::{LayerNorm, Linear, fits, pack};
use crate::error::{ModelError, Result};
use crate::files::config::{Activation, VisionConfig};
use crate::files::weights::Weights;

/// Attention's q, k and v projections with their biases: weights in one buffer and biases in
/// another where they fit one binding, so that one GEMM computes all three ([`linear_qkv`]).
struct QkvProjections {
    weights: [Tensor; 3],
    biases: [Tensor; 3],
}

impl QkvProjections {
    fn load(w: &mut Weights, gpu: &Gpu, attn: &str, d: usize) -> Result<Self> {
        let mut weights = Vec::with_capacity(3);
        let mut biases = Vec::with_capacity(3);
        for name in ["q_proj", "k_proj", "v_proj"] {
            weights.push(w.take(&format!("{attn}.{name}.weight"), &[d, d])?);
            biases.push(w.take(&format!("{attn}.{name}.bias"), &[d])?);
        }
        let [q, k, v]: [Tensor; 3] = weights.try_into().expect("three weights");
        let biases: [Tensor; 3] = biases.try_into().expect("three biases");
        if q.dtype() != k.dtype() || k.dtype() != v.dtype() || !fits(gpu, &[&q, &k, &v]) {
            return Ok(QkvProjections {
                weights: [q, k, v],
                biases,
            });
        }
        Ok(QkvProjections {
            weights: pack(gpu, &[&q, &k, &v])?,
            biases: pack(gpu, &biases.each_ref())?,
        })
    }

    /// `(q, k, v)` of `x`, each `[.., D]`.
    fn forward(&self, batch: &mut Batch, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (weights, biases) = (self.weights.each_ref(), self.biases.each_ref());
        Ok(linear_qkv(batch, x, weights, Some(biases))?)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    qkv: QkvProjections,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(w: &mut Weights, gpu: &Gpu, prefix: &str, cfg: &VisionConfig) -> Result<Self> {
        let (d, m, eps) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.layer_norm_eps as f32,
        );
        let attn = format!("{prefix}.self_attn");
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(w, &format!("{prefix}.layer_norm1"), d, eps)?,
            qkv: QkvProjections::load(w, gpu, &attn, d)?,
            out_proj: Linear::load(w, &format!("{attn}.out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::load(w, &format!("{prefix}.layer_norm2"), d, eps)?,
            fc1: Linear::load(w, &format!("{prefix}.mlp.fc1"), m, d, true)?,
            fc2: Linear::load(w, &format!("{prefix}.mlp.fc2"), d, m, true)?,
        })
    }

    /// `h += out_proj(attn(LN1 h)); h += fc2(act(fc1(LN2 h)))` on `h: [B, T, D]`.
    fn forward(
        &self,
        batch: &mut Batch,
        h: &Tensor,
        heads: usize,
        act: Activation,
    ) -> Result<Tensor> {
        let (b, t, d) = (h.shape()[0], h.shape()[1], h.shape()[2]);
        let split = [b, t, heads, d / heads];
        let x = self.layer_norm1.forward(batch, h)?;
        let (q, k, v) = self.qkv.forward(batch, &x)?;
        let (q, k, v) = (q.reshape(&split)?, k.reshape(&split)?, v.reshape(&split)?);
        let a = attention(batch, &q, &k, &v, t, Mask::None)?.reshape(&[b, t, d])?;
        let h = self.out_proj.forward_residual(batch, &a, h)?;
        let x = self.layer_norm2.forward(batch, &h)?;
        let x = match act {
            Activation::QuickGelu => self.fc1.forward_quick_gelu(batch, &x)?,
            Activation::Gelu => {
                let x = self.fc1.forward(batch, &x)?;
                gelu(batch, &x)?
            }
            other => {
                let msg = format!("vision tower activation {other:?} is not supported");
                return Err(ModelError::config("config.json", msg));
            }
        };
        self.fc2.forward_residual(batch, &x, &h)
    }
}

pub struct VisionTower {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layernorm: LayerNorm,
    /// Only the layers up to the selected feature layer: later ones never affect the output.
    layers: Vec<EncoderLayer>,
    cfg: VisionConfig,
}

impl VisionTower {
    /// Loads the tower. `feature_layer` is LLaVA's `vision_feature_layer` (-2: the output of the
    /// second-to-last layer), an index into CLIP's hidden states, where index 0 is the embeddings.
    pub fn load(
        w: &mut Weights,
        gpu: &Gpu,
        cfg: &VisionConfig,
        feature_layer: i64,
    ) -> Result<VisionTower> {
        let n = cfg.num_hidden_layers as i64;
        let used = if feature_layer < 0 {
            n + 1 + feature_layer
        } else {
            feature_layer
        };
        if !(0..=n).contains(&used) {
            let msg = format!(
                "vision_feature_layer {feature_layer} is outside the {n}-layer vision tower"
            );
            return Err(ModelError::config("config.json", msg));
        }
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let positions = (cfg.image_size / p).pow(2) + 1;
        let e = "vision_model.embeddings";
        Ok(VisionTower {
            patch_embedding: w.take(&format!("{e}.patch_embedding.weight"), &[d, 3, p, p])?,
            class_embedding: w.take(&format!("{e}.class_embedding"), &[d])?,
            position_embedding: w
                .take(&format!("{e}.position_embedding.weight"), &[positions, d])?,
            pre_layernorm: LayerNorm::load(
                w,
                "vision_model.pre_layrnorm",
                d,
                cfg.layer_norm_eps as f32,
            )?,
            layers: (0..used as usize)
                .map(|i| {
                    EncoderLayer::load(w, gpu, &format!("vision_model.encoder.layers.{i}"), cfg)
                })
                .collect::<Result<_>>()?,
            cfg: cfg.clone(),
        })
    }

    /// `pixels: [B, 3, S, S]` -> the selected hidden state `[B, 1 + (S/P)^2, D]` (CLS first).
    pub fn forward(&self, batch: &mut Batch, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.shape()[0];
        let d = self.cfg.hidden_size;
        let patches = patch_embed(batch, pixels, &self.patch_embedding, self.cfg.patch_size)?;
        let n = patches.shape()[1];
        // [CLS, patch 0, patch 1, ...] per image, then + position embedding.
        let tokens = batch.tensor(&[b, n + 1, d], DType::F32)?;
        for i in 0..b {
            let start = i * (n + 1);
            Tensor::copy_rows(batch, &self.class_embedding, 0, &tokens, start, 1)?;
            Tensor::copy_rows(batch, &patches, i * n, &tokens, start + 1, n)?;
        }
        let mut h = add(batch, &tokens, &self.position_embedding)?;
        h = self.pre_layernorm.forward(batch, &h)?;
        for layer in &self.layers {
            h = layer.forward(batch, &h, self.cfg.num_attention_heads, self.cfg.hidden_act)?;
            batch.flush()?;
        }
        Ok(h)
    }
}
