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
pub mod quant;
pub mod registry;
pub mod tensor;

pub use context::{Batch, Binding, Gpu, GpuFeatures, GpuOptions};
pub use error::{GpuError, Result};
pub use tensor::{DType, Tensor};

#[cfg(test)]
pub(crate) mod testing;
