//! Helpers for the kernel tests: one shared device, deterministic random data, comparisons.

use std::sync::OnceLock;

pub use crate::random;
use half::f16;

use crate::quant::{dequantize, quantize};
use crate::{DType, GemmTile, Gpu, GpuOptions, Tensor};

/// The device shared by all tests of this crate (tests run in parallel on it). It has
/// shader-f16 where the adapter offers it (llvmpipe does) and `LLAVA_NO_F16` is not set, and runs
/// every GEMM on the wide tile ([`GemmTile::Wide`]).
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::with_options_blocking(GpuOptions {
            gemm_tile: GemmTile::Wide,
            ..GpuOptions::from_env()
        })
        .expect("a wgpu adapter (install mesa-vulkan-drivers)")
    })
}

/// A second shared device opened as a browser's adapter of unknown type gets it: without
/// shader-f16 (the f32 path of kernels that have `SHADER_F16` variants) and with the 8x8 GEMM
/// tile ([`GemmTile::Narrow`]), so that tests run both paths on the same machine.
pub fn browser_like_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::with_options_blocking(GpuOptions {
            f16: false,
            gemm_tile: GemmTile::Narrow,
            ..Default::default()
        })
        .expect("a wgpu adapter (install mesa-vulkan-drivers)")
    })
}

/// Asserts `|got - want| <= tol * max(1, |want|)` element-wise, naming the first failure.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0) && g.is_finite() == w.is_finite(),
            "{what}: element {i}: got {g}, want {w} (tol {tol})"
        );
    }
}

/// Random weights `[n, k]` in `dtype` on `gpu`, with the f32 values a kernel must compute with
/// (the f16-rounded or dequantized ones).
pub fn weights(gpu: &Gpu, dtype: DType, n: usize, k: usize, seed: u64) -> (Tensor, Vec<f32>) {
    let w = random(n * k, seed);
    match dtype {
        DType::F32 => (Tensor::from_f32(gpu, &[n, k], &w).unwrap(), w),
        DType::F16 => {
            let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let exact = h.iter().map(|v| v.to_f32()).collect();
            (Tensor::from_f16(gpu, &[n, k], &h).unwrap(), exact)
        }
        _ => {
            let q = quantize(dtype, n, k, &w);
            (Tensor::from_quant(gpu, &q).unwrap(), dequantize(&q))
        }
    }
}
