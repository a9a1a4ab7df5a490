//! Row reductions: greedy decoding's argmax over the vocabulary.

use crate::error::{Result, shape_err};
use crate::registry::{PipelineKey, Shader};
use crate::{Batch, DType, Tensor, shader};

const SHADER: Shader = shader!("reduce");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    n: u32,
}

/// Index of the largest value of each row of `x` (`[R, N]` F32, `N >= 1`) as `[R]` U32; ties go
/// to the first index, like `torch.argmax`. Inputs must be NaN-free: with NaNs the result is
/// unspecified (the logits of a healthy model have none).
pub fn argmax(batch: &mut Batch, x: &Tensor) -> Result<Tensor> {
    let (rows, n) = x
        .dims2()
        .map_err(|_| shape_err("argmax", format!("x must be [R, N], got {:?}", x.shape())))?;
    if x.dtype() != DType::F32 || n == 0 || u32::try_from(x.numel()).is_err() {
        return Err(shape_err(
            "argmax",
            format!(
                "x must be F32 [R, N >= 1], got {:?} {:?}",
                x.dtype(),
                x.shape()
            ),
        ));
    }
    let out = batch.tensor(&[rows], DType::U32)?;
    if rows == 0 {
        return Ok(out);
    }
    let grid = batch.gpu().grid(rows as u32);
    batch.dispatch(
        &PipelineKey::new(SHADER, "argmax"),
        bytemuck::bytes_of(&Params {
            rows: rows as u32,
            n: n as u32,
        }),
        &[x.binding(), out.binding()],
        grid,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gpu, random};

    fn argmax_cpu(x: &[f32], n: usize) -> Vec<u32> {
        x.chunks(n)
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

    fn run(rows: usize, n: usize, x: &[f32]) -> Vec<u32> {
        let gpu = gpu();
        let tx = Tensor::from_f32(gpu, &[rows, n], x).unwrap();
        let mut batch = gpu.batch();
        let out = argmax(&mut batch, &tx).unwrap();
        batch.submit().unwrap();
        assert_eq!(out.shape(), &[rows]);
        pollster::block_on(out.to_u32(gpu)).unwrap()
    }

    #[test]
    fn argmax_matches_cpu_on_random_rows() {
        for (rows, n) in [(1, 1), (5, 1), (3, 7), (4, 257), (2, 32_000), (2, 64_064)] {
            let x = random(rows * n, n as u64);
            assert_eq!(run(rows, n, &x), argmax_cpu(&x, n), "{rows}x{n}");
        }
    }

    #[test]
    fn argmax_takes_the_first_of_tied_maxima() {
        let n = 64_064;
        let mut x = vec![-1.0f32; 3 * n];
        // Row 0: ties at 40_100 (thread 164 of 256) and 60_000 (thread 96): the later index sits
        // in the lower thread, so the tree reduction must compare indices.
        x[40_100] = 2.0;
        x[60_000] = 2.0;
        // Row 1: all equal -> 0.
        x[n..2 * n].fill(3.5);
        // Row 2: all negative; ties at 556 and 812 (both thread 44) and 557 (thread 45) -> 556.
        let row2 = &mut x[2 * n..];
        row2.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = -1.0 - (i % 97) as f32);
        for i in [556, 557, 812] {
            row2[i] = -0.5;
        }
        let got = run(3, n, &x);
        assert_eq!(got, [40_100, 0, 556]);
        assert_eq!(got, argmax_cpu(&x, n));
    }

    #[test]
    fn argmax_handles_many_rows() {
        // Many short rows with frequent ties (values rounded to integers).
        let (rows, n) = (3000, 3);
        let x: Vec<f32> = random(rows * n, 9)
            .iter()
            .map(|v| (v * 4.0).round())
            .collect();
        assert_eq!(run(rows, n, &x), argmax_cpu(&x, n));
    }

    #[test]
    fn argmax_rejects_bad_shapes_and_dtypes() {
        let gpu = gpu();
        let v = Tensor::from_f32(gpu, &[4], &[0.0; 4]).unwrap();
        let empty = Tensor::from_f32(gpu, &[2, 0], &[]).unwrap();
        let ids = Tensor::from_u32(gpu, &[1, 4], &[0; 4]).unwrap();
        let mut batch = gpu.batch();
        assert!(argmax(&mut batch, &v).is_err());
        assert!(argmax(&mut batch, &empty).is_err());
        assert!(argmax(&mut batch, &ids).is_err());
    }
}
