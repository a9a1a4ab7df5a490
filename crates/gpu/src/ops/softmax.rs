//! Softmax over the last dimension (f32), numerically stable (`exp(x - max)`).

use crate::error::{Result, shape_err};
use crate::registry::PipelineKey;
use crate::{Batch, DType, Tensor, shader};

const SHADER: crate::registry::Shader = shader!("softmax");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    n: u32,
}

/// Softmax over the last dimension. x: `[.., N]`, f32.
pub fn softmax(batch: &mut Batch, x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || x.rank() == 0 || x.numel() == 0 {
        return Err(shape_err(
            "softmax",
            format!(
                "want a non-empty f32 tensor, got {:?} {:?}",
                x.shape(),
                x.dtype()
            ),
        ));
    }
    let out = batch.tensor(x.shape(), DType::F32)?;
    let rows = x.rows() as u32;
    let grid = batch.gpu().grid(rows);
    batch.dispatch(
        &PipelineKey::new(SHADER, "softmax"),
        bytemuck::bytes_of(&Params {
            rows,
            n: x.last_dim() as u32,
        }),
        &[x.binding(), out.binding()],
        grid,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random};

    fn softmax_cpu(x: &[f32], n: usize) -> Vec<f32> {
        x.chunks(n)
            .flat_map(|row| {
                let m = row
                    .iter()
                    .map(|&v| v as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                row.iter().map(move |&v| ((v as f64 - m).exp() / s) as f32)
            })
            .collect()
    }

    fn run(shape: &[usize], x: &[f32]) -> Vec<f32> {
        let gpu = gpu();
        let t = Tensor::from_f32(gpu, shape, x).unwrap();
        let mut batch = gpu.batch();
        let out = softmax(&mut batch, &t).unwrap();
        batch.submit().unwrap();
        pollster::block_on(out.to_f32(gpu)).unwrap()
    }

    #[test]
    fn softmax_matches_cpu() {
        // N = 1, below, at, and not a multiple of the workgroup size, and a long row.
        for (shape, scale) in [
            (vec![3, 1], 1.0),
            (vec![2, 3, 7], 5.0),
            (vec![4, 256], 3.0),
            (vec![3, 1000], 10.0),
            (vec![2, 4099], 1.0),
        ] {
            let n: usize = shape.iter().product();
            let x: Vec<f32> = random(n, n as u64).iter().map(|v| v * scale).collect();
            let got = run(&shape, &x);
            assert_close(
                &got,
                &softmax_cpu(&x, *shape.last().unwrap()),
                1e-5,
                &format!("softmax {shape:?}"),
            );
        }
    }

    #[test]
    fn softmax_is_stable_for_large_values() {
        // exp(1e4) overflows f32; a stable softmax subtracts the row max first.
        let x: Vec<f32> = random(2 * 300, 7).iter().map(|v| v * 1e4 + 5e4).collect();
        let got = run(&[2, 300], &x);
        assert_close(&got, &softmax_cpu(&x, 300), 1e-5, "softmax large");
        let x = [1e30, 1e30, -1e30, 88.0, 89.0, 90.0];
        let got = run(&[2, 3], &x);
        let e = [(-2.0f64).exp(), (-1.0f64).exp(), 1.0];
        let s: f64 = e.iter().sum();
        let want = [
            0.5,
            0.5,
            0.0,
            (e[0] / s) as f32,
            (e[1] / s) as f32,
            (e[2] / s) as f32,
        ];
        assert_close(&got, &want, 1e-6, "softmax hand-computed");
    }

    #[test]
    fn softmax_rejects_bad_input() {
        let gpu = gpu();
        let u = Tensor::from_u32(gpu, &[2, 2], &[1, 2, 3, 4]).unwrap();
        assert!(softmax(&mut gpu.batch(), &u).is_err());
        let empty = Tensor::empty(gpu, &[2, 0], DType::F32).unwrap();
        assert!(softmax(&mut gpu.batch(), &empty).is_err());
    }
}
