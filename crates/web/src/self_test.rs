//! A diagnostic of the GPU core on whatever adapter the page got: runs a handful of real kernels
//! from `llava_gpu::ops` on small deterministic inputs, compares each with a plain-Rust CPU
//! computation, and reports the adapter, its limits and features, and the errors found.
//!
//! The same function runs natively (tested on llvmpipe) and in the browser (exported to JS as
//! `gpuSelfTest`), so a browser result can be read against the native one.

use half::f16;
use llava_gpu::ops::matmul::LinearKernel;
use llava_gpu::quant;
use llava_gpu::{DType, Gpu, Result, Tensor, ops, random};
use serde::Serialize;

/// What [`run`] found. Serialised with camelCase names for JavaScript.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SelfTestReport {
    pub adapter: AdapterReport,
    pub features: FeaturesReport,
    pub limits: LimitsReport,
    pub checks: Vec<Check>,
    /// Every check within its tolerance.
    pub passed: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdapterReport {
    pub name: String,
    pub vendor: u32,
    pub device: u32,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    /// wgpu's backend name: `BrowserWebGpu` in a browser, `Vulkan` etc. natively.
    pub backend: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeaturesReport {
    pub shader_f16: bool,
    pub subgroup: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitsReport {
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_storage_size: u32,
    pub min_storage_buffer_offset_alignment: u32,
}

/// One kernel compared with its CPU reference.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    pub name: &'static str,
    /// Output elements compared.
    pub elements: usize,
    /// Float outputs: the largest `|got - want| / max(1, |want|)`. Index outputs: the number of
    /// mismatching indices.
    pub max_error: f64,
    pub tolerance: f64,
    pub passed: bool,
}

impl Check {
    fn floats(name: &'static str, got: &[f32], want: &[f32], tolerance: f64) -> Check {
        let max_error = if got.len() != want.len() {
            f64::INFINITY
        } else {
            got.iter()
                .zip(want)
                .map(|(&g, &w)| {
                    let (g, w) = (g as f64, w as f64);
                    if g.is_finite() {
                        (g - w).abs() / w.abs().max(1.0)
                    } else {
                        f64::INFINITY
                    }
                })
                .fold(0.0, f64::max)
        };
        Check {
            name,
            elements: want.len(),
            max_error,
            tolerance,
            passed: max_error <= tolerance,
        }
    }

    fn indices(name: &'static str, got: &[u32], want: &[u32]) -> Check {
        let mismatches = if got.len() != want.len() {
            want.len().max(1)
        } else {
            got.iter().zip(want).filter(|(g, w)| g != w).count()
        };
        Check {
            name,
            elements: want.len(),
            max_error: mismatches as f64,
            tolerance: 0.0,
            passed: mismatches == 0,
        }
    }
}

const ROWS: usize = 4;
const D: usize = 64;
const VOCAB: usize = 40;
const ARGMAX_N: usize = 1000;
const PATCH: usize = 14;
const CHANNELS: usize = 16;
const SIDE: usize = 28;
const EPS: f32 = 1e-5;
/// Causal grouped-query attention over T positions at head dim D: 2 query heads per kv head, so
/// 2 T query rows per kv head, past the decode kernel's few, as in a prefill.
const T: usize = 12;
const HQ: usize = 4;
const HKV: usize = 2;

/// Runs the kernels on `gpu` with inputs derived from `seed` and compares them with the CPU.
pub async fn run(gpu: &Gpu, seed: u64) -> Result<SelfTestReport> {
    let x = random(ROWS * D, seed);
    let bias = random(D, seed + 1);
    let weight: Vec<f32> = random(D, seed + 2).iter().map(|v| 1.0 + 0.5 * v).collect();
    let logits = random(ROWS * ARGMAX_N, seed + 3);
    let table: Vec<f16> = random(VOCAB * D, seed + 4)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let table_q8 = quant::quantize(DType::Q8, VOCAB, D, &random(VOCAB * D, seed + 5));
    // The code-book Q4 and the split-plane Q6 layouts, as tables and as linear weights.
    let table_q6 = quant::quantize(DType::Q6, VOCAB, D, &random(VOCAB * D, seed + 8));
    let table_q4 = quant::quantize(DType::Q4, VOCAB, D, &random(VOCAB * D, seed + 9));
    let ids: Vec<u32> = vec![3, 0, VOCAB as u32 - 1, 17, 3, (seed % VOCAB as u64) as u32];
    let pixels = random(3 * SIDE * SIDE, seed + 6);
    let kernel: Vec<f16> = random(CHANNELS * 3 * PATCH * PATCH, seed + 7)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let (q, k, v) = (
        random(T * HQ * D, seed + 10),
        random(T * HKV * D, seed + 11),
        random(T * HKV * D, seed + 12),
    );

    let x_t = Tensor::from_f32(gpu, &[ROWS, D], &x)?;
    let bias_t = Tensor::from_f32(gpu, &[D], &bias)?;
    let weight_t = Tensor::from_f32(gpu, &[D], &weight)?;
    let logits_t = Tensor::from_f32(gpu, &[ROWS, ARGMAX_N], &logits)?;
    let table_t = Tensor::from_f16(gpu, &[VOCAB, D], &table)?;
    let table_q8_t = Tensor::from_quant(gpu, &table_q8)?;
    let table_q6_t = Tensor::from_quant(gpu, &table_q6)?;
    let table_q4_t = Tensor::from_quant(gpu, &table_q4)?;
    let ids_t = Tensor::from_u32(gpu, &[ids.len()], &ids)?;
    let pixels_t = Tensor::from_f32(gpu, &[1, 3, SIDE, SIDE], &pixels)?;
    let kernel_t = Tensor::from_f16(gpu, &[CHANNELS, 3, PATCH, PATCH], &kernel)?;
    let q_t = Tensor::from_f32(gpu, &[1, T, HQ, D], &q)?;
    let k_t = Tensor::from_f32(gpu, &[1, T, HKV, D], &k)?;
    let v_t = Tensor::from_f32(gpu, &[1, T, HKV, D], &v)?;

    // One batch for all of them, as a forward pass records its layers.
    let mut batch = gpu.batch();
    let sum = ops::elementwise::add(&mut batch, &x_t, &bias_t)?;
    let rms = ops::norm::rms_norm(&mut batch, &x_t, &weight_t, EPS)?;
    let layer = ops::norm::layer_norm(&mut batch, &x_t, &weight_t, &bias_t, EPS)?;
    let best = ops::reduce::argmax(&mut batch, &logits_t)?;
    let rows = ops::embed::embedding(&mut batch, &table_t, &ids_t)?;
    let rows_q8 = ops::embed::embedding(&mut batch, &table_q8_t, &ids_t)?;
    let rows_q6 = ops::embed::embedding(&mut batch, &table_q6_t, &ids_t)?;
    let rows_q4 = ops::embed::embedding(&mut batch, &table_q4_t, &ids_t)?;
    // The tables double as [VOCAB, D] linear weights.
    let q6_gemv =
        ops::matmul::linear_with(&mut batch, &x_t, &table_q6_t, None, LinearKernel::Gemv)?;
    let q6_gemm =
        ops::matmul::linear_with(&mut batch, &x_t, &table_q6_t, None, LinearKernel::Gemm)?;
    let q4_gemv =
        ops::matmul::linear_with(&mut batch, &x_t, &table_q4_t, None, LinearKernel::Gemv)?;
    let q4_gemm =
        ops::matmul::linear_with(&mut batch, &x_t, &table_q4_t, None, LinearKernel::Gemm)?;
    let patches = ops::conv::patch_embed(&mut batch, &pixels_t, &kernel_t, PATCH)?;
    let causal = ops::attention::Mask::Causal { q_offset: 0 };
    let attended = ops::attention::attention(&mut batch, &q_t, &k_t, &v_t, T, causal)?;
    batch.submit()?;

    let checks = vec![
        Check::floats("add", &sum.to_f32(gpu).await?, &add_cpu(&x, &bias), 1e-6),
        Check::floats(
            "rms_norm",
            &rms.to_f32(gpu).await?,
            &rms_norm_cpu(&x, &weight),
            1e-4,
        ),
        Check::floats(
            "layer_norm",
            &layer.to_f32(gpu).await?,
            &layer_norm_cpu(&x, &weight, &bias),
            1e-4,
        ),
        Check::indices("argmax", &best.to_u32(gpu).await?, &argmax_cpu(&logits)),
        Check::floats(
            "embedding_f16",
            &rows.to_f32(gpu).await?,
            &gather_cpu(&f16_to_f32(&table), &ids),
            0.0,
        ),
        Check::floats(
            "embedding_q8",
            &rows_q8.to_f32(gpu).await?,
            &gather_cpu(&quant::dequantize(&table_q8), &ids),
            1e-6,
        ),
        Check::floats(
            "embedding_q6",
            &rows_q6.to_f32(gpu).await?,
            &gather_cpu(&quant::dequantize(&table_q6), &ids),
            1e-6,
        ),
        Check::floats(
            "embedding_q4",
            &rows_q4.to_f32(gpu).await?,
            &gather_cpu(&quant::dequantize(&table_q4), &ids),
            1e-6,
        ),
        Check::floats(
            "linear_q6_gemv",
            &q6_gemv.to_f32(gpu).await?,
            &linear_cpu(&x, &table_q6),
            1e-4,
        ),
        Check::floats(
            "linear_q6_gemm",
            &q6_gemm.to_f32(gpu).await?,
            &linear_cpu(&x, &table_q6),
            1e-4,
        ),
        Check::floats(
            "linear_q4_gemv",
            &q4_gemv.to_f32(gpu).await?,
            &linear_cpu(&x, &table_q4),
            1e-4,
        ),
        Check::floats(
            "linear_q4_gemm",
            &q4_gemm.to_f32(gpu).await?,
            &linear_cpu(&x, &table_q4),
            1e-4,
        ),
        Check::floats(
            "patch_embed_f16",
            &patches.to_f32(gpu).await?,
            &patch_embed_cpu(&pixels, &f16_to_f32(&kernel)),
            1e-3,
        ),
        Check::floats(
            "attention_causal",
            &attended.to_f32(gpu).await?,
            &attention_cpu(&q, &k, &v),
            1e-5,
        ),
    ];
    gpu.check()?;

    let info = gpu.info();
    let limits = gpu.limits();
    let features = gpu.features();
    Ok(SelfTestReport {
        adapter: AdapterReport {
            name: info.name.clone(),
            vendor: info.vendor,
            device: info.device,
            device_type: format!("{:?}", info.device_type),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            backend: format!("{:?}", info.backend),
        },
        features: FeaturesReport {
            shader_f16: features.shader_f16,
            subgroup: features.subgroup,
        },
        limits: LimitsReport {
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            min_storage_buffer_offset_alignment: limits.min_storage_buffer_offset_alignment,
        },
        passed: checks.iter().all(|c| c.passed),
        checks,
    })
}

/// x [ROWS, D] times the dequantized weights [N, D] transposed.
fn linear_cpu(x: &[f32], w: &quant::QuantMatrix) -> Vec<f32> {
    let w = quant::dequantize(w);
    x.chunks(D)
        .flat_map(|row| {
            w.chunks(D)
                .map(move |wn| row.iter().zip(wn).map(|(a, b)| a * b).sum::<f32>())
        })
        .collect()
}

fn f16_to_f32(v: &[f16]) -> Vec<f32> {
    v.iter().map(|&h| h.to_f32()).collect()
}

fn add_cpu(x: &[f32], b: &[f32]) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| v + b[i % b.len()])
        .collect()
}

fn rms_norm_cpu(x: &[f32], w: &[f32]) -> Vec<f32> {
    x.chunks(w.len())
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / row.len() as f64;
            let r = 1.0 / (ms + EPS as f64).sqrt();
            row.iter()
                .zip(w)
                .map(move |(&v, &g)| (v as f64 * r * g as f64) as f32)
        })
        .collect()
}

fn layer_norm_cpu(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    x.chunks(w.len())
        .flat_map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let r = 1.0 / (var + EPS as f64).sqrt();
            row.iter()
                .zip(w.iter().zip(b))
                .map(move |(&v, (&g, &o))| ((v as f64 - mean) * r * g as f64 + o as f64) as f32)
        })
        .collect()
}

/// First index of the maximum of each row (torch.argmax's tie rule).
fn argmax_cpu(x: &[f32]) -> Vec<u32> {
    x.chunks(ARGMAX_N)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

fn gather_cpu(table: &[f32], ids: &[u32]) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * D..(id as usize + 1) * D]
                .iter()
                .copied()
        })
        .collect()
}

/// Conv2d with stride = kernel = PATCH over one `[3, SIDE, SIDE]` image, as `[patches, CHANNELS]`.
fn patch_embed_cpu(px: &[f32], weight: &[f32]) -> Vec<f32> {
    let cols = SIDE / PATCH;
    let mut out = Vec::with_capacity(cols * cols * CHANNELS);
    for r in 0..cols {
        for q in 0..cols {
            for o in 0..CHANNELS {
                let mut sum = 0f64;
                for ch in 0..3 {
                    for ky in 0..PATCH {
                        for kx in 0..PATCH {
                            let pix =
                                px[(ch * SIDE + r * PATCH + ky) * SIDE + q * PATCH + kx] as f64;
                            sum += pix * weight[((o * 3 + ch) * PATCH + ky) * PATCH + kx] as f64;
                        }
                    }
                }
                out.push(sum as f32);
            }
        }
    }
    out
}

/// softmax(q k^T / sqrt(D), causal) v for q `[T, HQ, D]` and k, v `[T, HKV, D]`, in f64.
fn attention_cpu(q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(q.len());
    for t in 0..T {
        for h in 0..HQ {
            let kv = |x: &[f32], j: usize| -> Vec<f64> {
                let at = (j * HKV + h / (HQ / HKV)) * D;
                x[at..at + D].iter().map(|&e| e as f64).collect()
            };
            let qr = &q[(t * HQ + h) * D..(t * HQ + h + 1) * D];
            let scores: Vec<f64> = (0..=t)
                .map(|j| {
                    let dot: f64 = qr.iter().zip(kv(k, j)).map(|(&a, b)| a as f64 * b).sum();
                    dot / (D as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut row = vec![0f64; D];
            for (j, w) in weights.iter().enumerate() {
                for (o, x) in row.iter_mut().zip(kv(v, j)) {
                    *o += w / total * x;
                }
            }
            out.extend(row.iter().map(|&x| x as f32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_the_cpu_on_the_native_adapter() {
        let gpu = Gpu::new_blocking().expect("a wgpu adapter (install mesa-vulkan-drivers)");
        let report = pollster::block_on(run(&gpu, 7)).unwrap();
        let names: Vec<_> = report.checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "add",
                "rms_norm",
                "layer_norm",
                "argmax",
                "embedding_f16",
                "embedding_q8",
                "embedding_q6",
                "embedding_q4",
                "linear_q6_gemv",
                "linear_q6_gemm",
                "linear_q4_gemv",
                "linear_q4_gemm",
                "patch_embed_f16",
                "attention_causal"
            ]
        );
        for c in &report.checks {
            assert!(c.passed && c.max_error <= c.tolerance, "{c:?}");
            assert!(c.elements > 0, "{c:?}");
        }
        assert!(report.passed);
        assert_ne!(report.adapter.backend, "BrowserWebGpu");
        assert!(report.limits.max_storage_buffer_binding_size >= 1 << 27);
    }

    #[test]
    fn a_wrong_result_is_reported_as_failed() {
        let c = Check::floats("x", &[1.0, 2.5], &[1.0, 2.0], 1e-3);
        assert!(!c.passed);
        assert_eq!(c.max_error, 0.25);
        let c = Check::indices("i", &[1, 2, 3], &[1, 0, 3]);
        assert_eq!((c.passed, c.max_error), (false, 1.0));
        assert!(!Check::floats("nan", &[f32::NAN], &[0.0], 1.0).passed);
    }
}
