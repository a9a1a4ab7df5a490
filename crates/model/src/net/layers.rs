//! Layers the networks share.

use llava_gpu::ops::matmul::{linear, linear_quick_gelu, linear_residual};
use llava_gpu::ops::norm::layer_norm;
use llava_gpu::{Batch, Gpu, Tensor};

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

    /// `quick_gelu(self(x))`, the activation applied as the GEMM stores.
    pub fn forward_quick_gelu(&self, batch: &mut Batch, x: &Tensor) -> Result<Tensor> {
        Ok(linear_quick_gelu(
            batch,
            x,
            &self.weight,
            self.bias.as_ref(),
        )?)
    }

    /// `residual + self(x)`, the residual added as the GEMM stores.
    pub fn forward_residual(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        Ok(linear_residual(
            batch,
            x,
            &self.weight,
            self.bias.as_ref(),
            residual,
        )?)
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

/// Whether `tensors` fit one storage binding together (with room for their scales and alignment).
pub fn fits(gpu: &Gpu, tensors: &[&Tensor]) -> bool {
    tensors.iter().map(|t| t.byte_len() * 2).sum::<u64>() <= gpu.max_binding()
}

/// `tensors` in one buffer, so that the decode step's fused kernels and the prefill's fused GEMMs
/// (`linear_qkv`, `linear_silu_mul`) read them through one binding (each keeps its own tensor;
/// its meaning is unchanged).
pub fn pack<const N: usize>(gpu: &Gpu, tensors: &[&Tensor; N]) -> Result<[Tensor; N]> {
    let packed = Tensor::pack(gpu, tensors)?;
    Ok(packed.try_into().expect("one tensor per input"))
}
