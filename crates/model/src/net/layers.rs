//! Layers the networks share.

use llava_gpu::ops::matmul::linear;
use llava_gpu::ops::norm::layer_norm;
use llava_gpu::{Batch, Tensor};

use crate::error::Result;
use crate::files::weights::Weights;

/// A Linear layer: weight `[out, in]` and optional bias `[out]`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(
        w: &mut Weights,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        Ok(Linear {
            weight: w.take(&format!("{prefix}.weight"), &[out, inp])?,
            bias: if bias {
                Some(w.take(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, batch: &mut Batch, x: &Tensor) -> Result<Tensor> {
        Ok(linear(batch, x, &self.weight, self.bias.as_ref())?)
    }
}

/// LayerNorm with weight and bias.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(w: &mut Weights, prefix: &str, dim: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: w.take(&format!("{prefix}.weight"), &[dim])?,
            bias: w.take(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, batch: &mut Batch, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(batch, x, &self.weight, &self.bias, self.eps)?)
    }
}
