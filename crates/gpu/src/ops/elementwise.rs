//! Element-wise kernels over f32 activations: residual/broadcast add, the activations
//! (quick_gelu, exact erf GELU) and the gated MLP's `silu(gate) * up`.

use crate::error::{Result, shape_err};
use crate::registry::{PipelineKey, Shader};
use crate::{Batch, DType, Tensor, shader};

const BINARY: Shader = shader!("elementwise");
const UNARY: Shader = shader!("elementwise_unary");
const WORKGROUP: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BinaryParams {
    n: u32,
    /// Elements of `b`; `b` repeats with this period over `a`.
    nb: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct UnaryParams {
    n: u32,
}

fn check_f32(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(shape_err(
            op,
            format!("expected F32, got {:?} {:?}", t.dtype(), t.shape()),
        ));
    }
    Ok(())
}

fn element_count(op: &'static str, t: &Tensor) -> Result<u32> {
    u32::try_from(t.numel())
        .map_err(|_| shape_err(op, format!("{:?} has too many elements", t.shape())))
}

/// Records `entry(a, b)` where `b`'s shape is `a`'s or a suffix of it.
fn binary(
    batch: &mut Batch,
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    exact: bool,
) -> Result<Tensor> {
    check_f32(op, a)?;
    check_f32(op, b)?;
    let fits = if exact {
        a.shape() == b.shape()
    } else {
        // Leading 1s of b broadcast trivially ([1, T, C] over [B, T, C]).
        let ones = b.shape().iter().take_while(|&&d| d == 1).count();
        b.rank() <= a.rank() && a.shape().ends_with(&b.shape()[ones..])
    };
    if !fits {
        let want = if exact {
            "equal shapes"
        } else {
            "b's shape a suffix of a's"
        };
        return Err(shape_err(
            op,
            format!("{:?} vs {:?} (need {want})", a.shape(), b.shape()),
        ));
    }
    let out = batch.tensor(a.shape(), DType::F32)?;
    let n = element_count(op, a)?;
    if n == 0 {
        return Ok(out);
    }
    let params = BinaryParams {
        n,
        nb: b.numel() as u32,
    };
    let grid = batch.gpu().grid(n.div_ceil(WORKGROUP));
    batch.dispatch(
        &PipelineKey::new(BINARY, op),
        bytemuck::bytes_of(&params),
        &[a.binding(), b.binding(), out.binding()],
        grid,
    )?;
    Ok(out)
}

fn unary(batch: &mut Batch, op: &'static str, x: &Tensor) -> Result<Tensor> {
    check_f32(op, x)?;
    let out = batch.tensor(x.shape(), DType::F32)?;
    let n = element_count(op, x)?;
    if n == 0 {
        return Ok(out);
    }
    let grid = batch.gpu().grid(n.div_ceil(WORKGROUP));
    batch.dispatch(
        &PipelineKey::new(UNARY, op),
        bytemuck::bytes_of(&UnaryParams { n }),
        &[x.binding(), out.binding()],
        grid,
    )?;
    Ok(out)
}

/// `a + b` into a new tensor of `a`'s shape. `b` has `a`'s shape or a suffix of it, possibly
/// with leading 1s (e.g. `[B, T, C] + [T, C]`, `[B, T, C] + [1, T, C]`, `[T, C] + [C]`), and is
/// repeated over `a`'s leading dimensions.
pub fn add(batch: &mut Batch, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(batch, "add", a, b, false)
}

/// `silu(gate) * up` (Llama's gated MLP), shapes equal.
pub fn silu_mul(batch: &mut Batch, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    binary(batch, "silu_mul", gate, up, true)
}

/// CLIP's `quick_gelu(x) = x * sigmoid(1.702 x)`.
pub fn quick_gelu(batch: &mut Batch, x: &Tensor) -> Result<Tensor> {
    unary(batch, "quick_gelu", x)
}

/// Exact GELU `0.5 x (1 + erf(x / sqrt 2))` (PyTorch's default `gelu`). WGSL has no `erf`; the
/// kernel's rational-exponential approximation is accurate to about 1e-7 absolute in f32.
pub fn gelu(batch: &mut Batch, x: &Tensor) -> Result<Tensor> {
    unary(batch, "gelu", x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random};

    fn read(t: &Tensor) -> Vec<f32> {
        pollster::block_on(t.to_f32(gpu())).unwrap()
    }

    fn upload(shape: &[usize], data: &[f32]) -> Tensor {
        Tensor::from_f32(gpu(), shape, data).unwrap()
    }

    #[test]
    fn add_matches_cpu() {
        let gpu = gpu();
        for n in [1, 255, 257, 70_001] {
            let (a, b) = (random(n, 1), random(n, 2));
            let mut batch = gpu.batch();
            let out = add(&mut batch, &upload(&[n], &a), &upload(&[n], &b)).unwrap();
            batch.submit().unwrap();
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_close(&read(&out), &want, 0.0, "add");
        }
    }

    #[test]
    fn add_broadcasts_a_suffix_shape_over_leading_dims() {
        let gpu = gpu();
        let (bsz, t, c) = (3, 7, 37);
        let a = random(bsz * t * c, 3);
        let ta = upload(&[bsz, t, c], &a);
        for b_shape in [vec![t, c], vec![c], vec![1, t, c]] {
            let b = random(b_shape.iter().product(), 4);
            let mut batch = gpu.batch();
            let out = add(&mut batch, &ta, &upload(&b_shape, &b)).unwrap();
            batch.submit().unwrap();
            assert_eq!(out.shape(), &[bsz, t, c]);
            let want: Vec<f32> = (0..a.len()).map(|i| a[i] + b[i % b.len()]).collect();
            assert_close(&read(&out), &want, 0.0, &format!("add {b_shape:?}"));
        }
    }

    #[test]
    fn binary_ops_reject_bad_shapes_and_dtypes() {
        let gpu = gpu();
        let a = upload(&[2, 3], &[1.0; 6]);
        let row2 = upload(&[2], &[1.0; 2]);
        let col = upload(&[2, 1], &[1.0; 2]);
        let ids = Tensor::from_u32(gpu, &[2, 3], &[0; 6]).unwrap();
        // [2] is not a suffix of [2, 3]; [2, 1] neither; b of higher rank than a fails too.
        assert!(add(&mut gpu.batch(), &a, &row2).is_err());
        assert!(add(&mut gpu.batch(), &a, &upload(&[1, 2, 3], &[1.0; 6])).is_err());
        assert!(add(&mut gpu.batch(), &a, &col).is_err());
        assert!(add(&mut gpu.batch(), &row2, &a).is_err());
        assert!(add(&mut gpu.batch(), &a, &ids).is_err());
        // silu_mul needs equal shapes: no broadcasting.
        assert!(silu_mul(&mut gpu.batch(), &a, &upload(&[3], &[1.0; 3])).is_err());
        assert!(gelu(&mut gpu.batch(), &ids).is_err());
    }

    #[test]
    fn silu_mul_matches_cpu() {
        let gpu = gpu();
        let n = 4099;
        // Gate spans [-40, 40] to cover the overflowing exp(-g) branch.
        let gate: Vec<f32> = random(n, 5).iter().map(|v| v * 40.0).collect();
        let up = random(n, 6);
        let mut batch = gpu.batch();
        let out = silu_mul(&mut batch, &upload(&[n], &gate), &upload(&[n], &up)).unwrap();
        batch.submit().unwrap();
        let want: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let (g, u) = (g as f64, u as f64);
                (g / (1.0 + (-g).exp()) * u) as f32
            })
            .collect();
        assert_close(&read(&out), &want, 2e-6, "silu_mul");
    }

    #[test]
    fn quick_gelu_matches_cpu() {
        let gpu = gpu();
        let x: Vec<f32> = random(3001, 7).iter().map(|v| v * 12.0).collect();
        let mut batch = gpu.batch();
        let out = quick_gelu(&mut batch, &upload(&[3001], &x)).unwrap();
        batch.submit().unwrap();
        let want: Vec<f32> = x
            .iter()
            .map(|&v| (v as f64 / (1.0 + (-1.702 * v as f64).exp())) as f32)
            .collect();
        assert_close(&read(&out), &want, 2e-6, "quick_gelu");
    }

    #[test]
    fn gelu_erf_is_accurate_over_minus_ten_to_ten() {
        let gpu = gpu();
        // A dense grid over [-10, 10] (crossing the kernel's branch points at |x| = sqrt 2) and
        // the exact branch points' neighbours.
        let mut x: Vec<f32> = (0..=40_000).map(|i| -10.0 + i as f32 * 5e-4).collect();
        let s2 = std::f32::consts::SQRT_2;
        x.extend([
            s2,
            -s2,
            s2.next_up(),
            s2.next_down(),
            0.0,
            -0.0,
            1e-30,
            -1e-30,
        ]);
        let mut batch = gpu.batch();
        let out = gelu(&mut batch, &upload(&[x.len()], &x)).unwrap();
        batch.submit().unwrap();
        let got = read(&out);
        let mut worst_erf_error = 0f64;
        for (&v, &g) in x.iter().zip(&got) {
            let v64 = v as f64;
            let want = 0.5 * v64 * (1.0 + libm::erf(v64 / std::f64::consts::SQRT_2));
            // Output rounding to f32 is up to half an ulp; the rest is the erf error scaled by
            // 0.5|x|, which must stay within 1e-7 (plus f32 rounding of 1 + erf, ~6e-8).
            let rounding = (want as f32).abs().next_up() as f64 - (want as f32).abs() as f64;
            let erf_error =
                ((g as f64 - want).abs() - rounding).max(0.0) / (0.5 * v64.abs()).max(1e-30);
            assert!(
                (g as f64 - want).abs() <= rounding + 0.5 * v64.abs() * 1.6e-7,
                "gelu({v}) = {g}, want {want}"
            );
            worst_erf_error = worst_erf_error.max(erf_error);
        }
        eprintln!("gelu: worst implied erf error {worst_erf_error:e}");
        // The negative tail keeps relative accuracy (no 1 + erf cancellation).
        for (&v, &g) in x.iter().zip(&got) {
            let v64 = v as f64;
            if (-8.0..=-3.0).contains(&v) {
                let want = 0.5 * v64 * libm::erfc(-v64 / std::f64::consts::SQRT_2);
                assert!(
                    ((g as f64 - want) / want).abs() < 2e-5,
                    "gelu({v}) = {g}, want {want}"
                );
            }
        }
    }
}
