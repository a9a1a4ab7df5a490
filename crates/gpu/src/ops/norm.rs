//! Row normalisations over the last dimension: CLIP's LayerNorm and Llama's RMSNorm, in f32.

use crate::error::{Result, shape_err};
use crate::registry::{PipelineKey, Shader};
use crate::{Batch, DType, Tensor, shader};

const SHADER: Shader = shader!("norm");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    d: u32,
    eps: f32,
}

/// Checks `x` (`[.., D]` F32) and its per-feature `[D]` F32 parameters; returns `(rows, D)`.
fn check(op: &'static str, x: &Tensor, params: &[&Tensor]) -> Result<(u32, u32)> {
    if x.dtype() != DType::F32 || x.rank() == 0 {
        return Err(shape_err(
            op,
            format!("x must be F32 [.., D], got {:?} {:?}", x.dtype(), x.shape()),
        ));
    }
    let d = x.last_dim();
    for p in params {
        if p.dtype() != DType::F32 || p.shape() != [d] {
            return Err(shape_err(
                op,
                format!(
                    "parameters must be F32 [{d}], got {:?} {:?}",
                    p.dtype(),
                    p.shape()
                ),
            ));
        }
    }
    if u32::try_from(x.numel()).is_err() {
        return Err(shape_err(
            op,
            format!("{:?} has too many elements", x.shape()),
        ));
    }
    Ok((x.rows() as u32, d as u32))
}

fn norm(
    batch: &mut Batch,
    op: &'static str,
    x: &Tensor,
    params: &[&Tensor],
    eps: f32,
) -> Result<Tensor> {
    let (rows, d) = check(op, x, params)?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(shape_err(
            op,
            format!("eps must be finite and >= 0, got {eps}"),
        ));
    }
    let out = batch.tensor(x.shape(), DType::F32)?;
    if rows == 0 || d == 0 {
        return Ok(out);
    }
    let lanes = lanes_per_row(d);
    let key = PipelineKey::new(SHADER, "norm")
        .flag_if(op == "layer_norm", "LAYER")
        .constant("LANES", lanes);
    let mut buffers = vec![x.binding()];
    buffers.extend(params.iter().map(|p| p.binding()));
    buffers.push(out.binding());
    let grid = batch.gpu().grid(rows.div_ceil(WORKGROUP / lanes));
    batch.dispatch(
        &key,
        bytemuck::bytes_of(&Params { rows, d, eps }),
        &buffers,
        grid,
    )?;
    Ok(out)
}

const WORKGROUP: u32 = 256;

/// Threads per row: about 16 values each (a power of two, 1..=256), so a short row does not
/// leave most of a workgroup idle and pay for a full reduction tree (the 32-wide LayerNorm of a
/// small CLIP took 131 ms for 2885 rows on llvmpipe with 256 threads per row, 7 ms with 2).
fn lanes_per_row(d: u32) -> u32 {
    d.div_ceil(16).next_power_of_two().min(WORKGROUP)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, with the
/// biased variance (PyTorch's). Mean and variance use a corrected two-pass scheme, stable for
/// rows with a large mean and a small spread.
pub fn layer_norm(
    batch: &mut Batch,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    norm(batch, "layer_norm", x, &[weight, bias], eps)
}

/// RMSNorm over the last dimension: `x * rsqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(batch: &mut Batch, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    norm(batch, "rms_norm", x, &[weight], eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random};

    fn layer_norm_cpu(x: &[f32], w: &[f32], b: &[f32], eps: f64) -> Vec<f32> {
        let d = w.len();
        x.chunks(d)
            .flat_map(|row| {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + eps).sqrt();
                row.iter().zip(w.iter().zip(b)).map(move |(&v, (&w, &b))| {
                    ((v as f64 - mean) * rstd * w as f64 + b as f64) as f32
                })
            })
            .collect()
    }

    fn rms_norm_cpu(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
        let d = w.len();
        x.chunks(d)
            .flat_map(|row| {
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + eps).sqrt();
                row.iter()
                    .zip(w)
                    .map(move |(&v, &w)| (v as f64 * r * w as f64) as f32)
            })
            .collect()
    }

    fn run_layer_norm(shape: &[usize], x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
        let gpu = gpu();
        let d = w.len();
        let (tx, tw, tb) = (
            Tensor::from_f32(gpu, shape, x).unwrap(),
            Tensor::from_f32(gpu, &[d], w).unwrap(),
            Tensor::from_f32(gpu, &[d], b).unwrap(),
        );
        let mut batch = gpu.batch();
        let out = layer_norm(&mut batch, &tx, &tw, &tb, eps).unwrap();
        batch.submit().unwrap();
        assert_eq!(out.shape(), shape);
        pollster::block_on(out.to_f32(gpu)).unwrap()
    }

    fn run_rms_norm(shape: &[usize], x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let gpu = gpu();
        let tx = Tensor::from_f32(gpu, shape, x).unwrap();
        let tw = Tensor::from_f32(gpu, &[w.len()], w).unwrap();
        let mut batch = gpu.batch();
        let out = rms_norm(&mut batch, &tx, &tw, eps).unwrap();
        batch.submit().unwrap();
        pollster::block_on(out.to_f32(gpu)).unwrap()
    }

    #[test]
    fn layer_norm_matches_cpu_for_various_widths() {
        for (rows, d) in [(3, 1), (7, 5), (33, 64), (257, 40), (5, 1000), (3, 4096)] {
            let x: Vec<f32> = random(rows * d, d as u64)
                .iter()
                .map(|v| 3.0 * v + 0.5)
                .collect();
            let w: Vec<f32> = random(d, 11).iter().map(|v| 1.0 + v).collect();
            let b = random(d, 12);
            let got = run_layer_norm(&[rows, d], &x, &w, &b, 1e-5);
            assert_close(
                &got,
                &layer_norm_cpu(&x, &w, &b, 1e-5),
                2e-5,
                &format!("layer_norm {rows}x{d}"),
            );
        }
    }

    #[test]
    fn layer_norm_is_stable_for_large_mean_and_tiny_spread() {
        // Mean 1000, std ~0.006: a one-pass E[x^2] - E[x]^2 loses everything and a plain two-pass
        // with the mean rounded to f32 (ulp 6e-5 at 1000) is off by ~1e-2 after normalising.
        for d in [1000, 4096] {
            let rows = 4;
            let x: Vec<f32> = random(rows * d, 21)
                .iter()
                .map(|v| 1000.0 + 0.01 * v)
                .collect();
            let w = vec![1.0; d];
            let b = vec![0.0; d];
            let got = run_layer_norm(&[2, 2, d], &x, &w, &b, 1e-12);
            assert_close(
                &got,
                &layer_norm_cpu(&x, &w, &b, 1e-12),
                2e-4,
                &format!("layer_norm mean 1000, D {d}"),
            );
        }
    }

    #[test]
    fn layer_norm_handles_thousands_of_rows() {
        // The vision tower normalises 5 x 577 rows at once.
        let (rows, d) = (2885, 24);
        let x = random(rows * d, 31);
        let w = random(d, 32);
        let b = random(d, 33);
        let got = run_layer_norm(&[5, 577, d], &x, &w, &b, 1e-5);
        assert_close(
            &got,
            &layer_norm_cpu(&x, &w, &b, 1e-5),
            2e-5,
            "layer_norm 2885 rows",
        );
    }

    #[test]
    fn rms_norm_matches_cpu() {
        for (rows, d) in [
            (3, 1),
            (7, 5),
            (300, 5),
            (33, 64),
            (5, 1000),
            (2, 4096),
            (2885, 8),
        ] {
            let x = random(rows * d, 40 + d as u64);
            let w = random(d, 41);
            let got = run_rms_norm(&[rows, d], &x, &w, 1e-6);
            assert_close(
                &got,
                &rms_norm_cpu(&x, &w, 1e-6),
                2e-5,
                &format!("rms_norm {rows}x{d}"),
            );
        }
        // Large magnitude: only relative error matters.
        let d = 4096;
        let x: Vec<f32> = random(2 * d, 42)
            .iter()
            .map(|v| 1000.0 + 0.01 * v)
            .collect();
        let w = random(d, 43);
        assert_close(
            &run_rms_norm(&[2, d], &x, &w, 1e-6),
            &rms_norm_cpu(&x, &w, 1e-6),
            2e-5,
            "rms_norm mean 1000",
        );
    }

    #[test]
    fn norms_reject_bad_shapes_and_dtypes() {
        let gpu = gpu();
        let x = Tensor::from_f32(gpu, &[2, 4], &[1.0; 8]).unwrap();
        let w4 = Tensor::from_f32(gpu, &[4], &[1.0; 4]).unwrap();
        let w3 = Tensor::from_f32(gpu, &[3], &[1.0; 3]).unwrap();
        let w14 = Tensor::from_f32(gpu, &[1, 4], &[1.0; 4]).unwrap();
        let w16 = Tensor::from_f16(gpu, &[4], &[half::f16::ONE; 4]).unwrap();
        let ids = Tensor::from_u32(gpu, &[2, 4], &[0; 8]).unwrap();
        let mut batch = gpu.batch();
        assert!(layer_norm(&mut batch, &x, &w4, &w3, 1e-5).is_err());
        assert!(layer_norm(&mut batch, &x, &w14, &w4, 1e-5).is_err());
        assert!(layer_norm(&mut batch, &ids, &w4, &w4, 1e-5).is_err());
        assert!(rms_norm(&mut batch, &x, &w3, 1e-6).is_err());
        assert!(rms_norm(&mut batch, &x, &w16, 1e-6).is_err());
        assert!(rms_norm(&mut batch, &x, &w4, f32::NAN).is_err());
    }
}
