//! GPU core of llava-webgpu: a [`Gpu`] context over wgpu, [`Tensor`]s in GPU buffers, a cached
//! [`registry::PipelineRegistry`] of the WGSL kernels in `shaders/`, and the ops built on them.
//!
//! Every op lives in `ops/<family>.rs` as shape/dtype checks + kernel choice + dispatch, with a CPU
//! reference test beside it. Activations are always f32; weights may be f32, f16 (read in-shader
//! with `unpack2x16float`, so no device feature is needed, or, where the device has
//! `shader-f16`, by `SHADER_F16` kernel variants as `f16` values) or group-quantized int8/int4 ([`quant`]).

pub mod context;
pub mod error;
pub mod ops;
#[cfg(not(target_arch = "wasm32"))]
pub mod probe;
pub mod profile;
pub mod quant;
pub mod registry;
pub mod tensor;

pub use context::{
    Batch, Binding, Counters, GemmTile, Gpu, GpuFeatures, GpuOptions, Plan, Readback, Uniform,
};
pub use error::{GpuError, Result};
pub use profile::KernelTime;
pub use tensor::{DType, Tensor};

/// `n` pseudo-random values in [-1, 1) from `seed` (xorshift64): deterministic inputs for the
/// kernel tests, the benchmark and the web self-test, with no dependency.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod testing;
