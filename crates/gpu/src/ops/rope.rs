//! Rotary position embedding (rotate-half convention, as transformers' Llama/Mistral).

use crate::error::{GpuError, Result, shape_err};
use crate::registry::PipelineKey;
use crate::{Batch, DType, Tensor, shader};

const SHADER: crate::registry::Shader = shader!("rope");
const WORKGROUP: u32 = 256;
/// Head dims up to this fit the uniform `inv_freq` table.
const MAX_HEAD_DIM: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    heads: u32,
    seq: u32,
    half_dim: u32,
    pos_offset: u32,
    _pad: [u32; 3],
    inv_freq: [f32; MAX_HEAD_DIM / 2],
}

/// `inv_freq[i] = 1 / theta^(2i / dim)` with transformers' f32 arithmetic.
fn inv_freq(theta: f32, dim: usize) -> impl Iterator<Item = f32> {
    (0..dim / 2).map(move |i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
}

/// Rotary embedding, rotate-half convention (not interleaved), `inv_freq = 1/theta^(2i/D)`;
/// x: `[T, H, D]` or `[B, T, H, D]`, f32; row `t` has position `pos_offset + t`. The angle is the
/// f32 product `position * inv_freq` like in PyTorch.
pub fn rope(batch: &mut Batch, x: &Tensor, pos_offset: usize, theta: f32) -> Result<Tensor> {
    let (seq, heads, dim) = match x.shape() {
        &[t, h, d] | &[_, t, h, d] => (t, h, d),
        s => {
            return Err(shape_err(
                "rope",
                format!("want [T, H, D] or [B, T, H, D], got {s:?}"),
            ));
        }
    };
    if x.dtype() != DType::F32 {
        return Err(GpuError::Unsupported {
            op: "rope",
            what: format!("{:?} input", x.dtype()),
        });
    }
    if dim % 2 != 0 || dim == 0 || dim > MAX_HEAD_DIM {
        return Err(shape_err(
            "rope",
            format!("head dim {dim} must be even and at most {MAX_HEAD_DIM}"),
        ));
    }
    // Positions must stay exact as f32 (and in u32).
    if pos_offset + seq > 1 << 24 {
        return Err(shape_err(
            "rope",
            format!("positions up to {} exceed 2^24", pos_offset + seq),
        ));
    }
    if !(theta.is_finite() && theta > 1.0) {
        return Err(shape_err(
            "rope",
            format!("theta {theta} must be finite and > 1"),
        ));
    }
    let out = batch.tensor(x.shape(), DType::F32)?;
    if x.numel() == 0 {
        return Ok(out);
    }
    let mut params = Params {
        rows: (x.numel() / dim) as u32,
        heads: heads as u32,
        seq: seq as u32,
        half_dim: (dim / 2) as u32,
        pos_offset: pos_offset as u32,
        _pad: [0; 3],
        inv_freq: [0.0; MAX_HEAD_DIM / 2],
    };
    for (slot, f) in params.inv_freq.iter_mut().zip(inv_freq(theta, dim)) {
        *slot = f;
    }
    let grid = batch.gpu().grid((x.numel() as u32 / 2).div_ceil(WORKGROUP));
    batch.dispatch(
        &PipelineKey::new(SHADER, "rope"),
        bytemuck::bytes_of(&params),
        &[x.binding(), out.binding()],
        grid,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random};

    /// transformers' arithmetic: f32 angle `pos * inv_freq`, cos/sin of it (here correctly
    /// rounded via f64), `x * cos + rotate_half(x) * sin` in f32.
    fn rope_cpu(
        x: &[f32],
        seq: usize,
        heads: usize,
        dim: usize,
        pos_offset: usize,
        theta: f32,
    ) -> Vec<f32> {
        let inv: Vec<f32> = inv_freq(theta, dim).collect();
        let half = dim / 2;
        let mut out = vec![0.0; x.len()];
        for (r, (row, o)) in x.chunks(dim).zip(out.chunks_mut(dim)).enumerate() {
            let pos = (pos_offset + (r / heads) % seq) as f32;
            for i in 0..half {
                let a = (pos * inv[i]) as f64;
                let (s, c) = (a.sin() as f32, a.cos() as f32);
                o[i] = row[i] * c + (-row[i + half]) * s;
                o[i + half] = row[i + half] * c + row[i] * s;
            }
        }
        out
    }

    #[test]
    fn rope_matches_cpu_at_large_positions() {
        let gpu = gpu();
        for (shape, pos_offset, theta) in [
            (vec![5, 2, 128], 0, 1e4),
            (vec![3, 3, 128], 1000, 1e6),
            (vec![4, 2, 128], 4090, 1e4),
            (vec![4, 2, 128], 4092, 1e6),
            (vec![2, 3, 4, 64], 2047, 1e4),
            (vec![7, 1, 16], 4093, 5e6),
            (vec![2, 2, 128], 100_000, 1e4),
        ] {
            let n: usize = shape.iter().product();
            let x = random(n, pos_offset as u64 + 1);
            let t = Tensor::from_f32(gpu, &shape, &x).unwrap();
            let mut batch = gpu.batch();
            let out = rope(&mut batch, &t, pos_offset, theta).unwrap();
            batch.submit().unwrap();
            let got = pollster::block_on(out.to_f32(gpu)).unwrap();
            let r = shape.len();
            let want = rope_cpu(
                &x,
                shape[r - 3],
                shape[r - 2],
                shape[r - 1],
                pos_offset,
                theta,
            );
            // Beyond 8192 the in-shader range reduction loses a little (still < 2e-6 at 1e5).
            let tol = if pos_offset > 8192 { 4e-6 } else { 1e-6 };
            assert_close(
                &got,
                &want,
                tol,
                &format!("rope {shape:?} at {pos_offset}, theta {theta}"),
            );
        }
    }

    #[test]
    fn rope_hand_computed() {
        // D = 4, theta 100: inv_freq = [1, 0.1]; position 3 rotates pair 0 by 3 rad, pair 1 by 0.3.
        let gpu = gpu();
        let x = Tensor::from_f32(gpu, &[1, 1, 4], &[1.0, 2.0, 0.0, 0.0]).unwrap();
        let mut batch = gpu.batch();
        let out = rope(&mut batch, &x, 3, 100.0).unwrap();
        batch.submit().unwrap();
        let got = pollster::block_on(out.to_f32(gpu)).unwrap();
        let want = [
            3f32.cos(),
            2.0 * 0.3f32.cos(),
            3f32.sin(),
            2.0 * 0.3f32.sin(),
        ];
        assert_close(&got, &want, 1e-6, "rope hand-computed");
    }

    #[test]
    fn rope_rejects_bad_input() {
        let gpu = gpu();
        let odd = Tensor::from_f32(gpu, &[1, 1, 3], &[0.0; 3]).unwrap();
        assert!(rope(&mut gpu.batch(), &odd, 0, 1e4).is_err());
        let flat = Tensor::from_f32(gpu, &[4], &[0.0; 4]).unwrap();
        assert!(rope(&mut gpu.batch(), &flat, 0, 1e4).is_err());
        let big = Tensor::from_f32(gpu, &[1, 1, 512], &[0.0; 512]).unwrap();
        assert!(rope(&mut gpu.batch(), &big, 0, 1e4).is_err());
        let u = Tensor::from_u32(gpu, &[1, 1, 2], &[0; 2]).unwrap();
        assert!(rope(&mut gpu.batch(), &u, 0, 1e4).is_err());
        let ok = Tensor::from_f32(gpu, &[1, 1, 2], &[0.0; 2]).unwrap();
        assert!(rope(&mut gpu.batch(), &ok, 1 << 24, 1e4).is_err());
        assert!(rope(&mut gpu.batch(), &ok, 0, f32::NAN).is_err());
    }
}
