//! CLIP's patch embedding: `Conv2d(3, C, kernel_size = P, stride = P, bias = False)` over
//! `[B, 3, H, W]` pixels, written as `[B, (H/P) * (W/P), C]` with patch index `row * (W/P) + col`.

use crate::error::{GpuError, Result, shape_err};
use crate::registry::{PipelineKey, Shader};
use crate::{Batch, DType, Tensor, shader};

const SHADER: Shader = shader!("conv");
/// Output tile of one workgroup: patches x channels (as in conv.wgsl).
const TILE_M: usize = 32;
const TILE_N: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    size: u32,
    h: u32,
    w: u32,
    cols: u32,
    patches: u32,
}

/// Patch embedding of `pixels` (`[B, 3, H, W]` F32) with `weight` (`[C, 3, P, P]` F32 or F16);
/// `H` and `W` must be multiples of `patch`.
pub fn patch_embed(
    batch: &mut Batch,
    pixels: &Tensor,
    weight: &Tensor,
    patch: usize,
) -> Result<Tensor> {
    const OP: &str = "patch_embed";
    let [images, 3, h, w] = pixels.shape()[..] else {
        return Err(shape_err(
            OP,
            format!("pixels must be [B, 3, H, W], got {:?}", pixels.shape()),
        ));
    };
    if pixels.dtype() != DType::F32 {
        return Err(shape_err(
            OP,
            format!("pixels must be F32, got {:?}", pixels.dtype()),
        ));
    }
    if patch == 0 || h % patch != 0 || w % patch != 0 {
        return Err(shape_err(
            OP,
            format!("image {h}x{w} is not a whole number of {patch}x{patch} patches"),
        ));
    }
    let channels = weight.shape()[0];
    if weight.shape() != [channels, 3, patch, patch] {
        return Err(shape_err(
            OP,
            format!(
                "weight must be [C, 3, {patch}, {patch}], got {:?}",
                weight.shape()
            ),
        ));
    }
    let flag = match weight.dtype() {
        DType::F32 => None,
        DType::F16 => Some("F16"),
        d => {
            return Err(GpuError::Unsupported {
                op: OP,
                what: format!("{d:?} weights"),
            });
        }
    };
    let (rows, cols) = (h / patch, w / patch);
    let m = images * rows * cols;
    let out = batch.tensor(&[images, rows * cols, channels], DType::F32)?;
    if m == 0 || channels == 0 {
        return Ok(out);
    }
    let too_big = |n: usize| u32::try_from(n).is_err();
    if too_big(pixels.numel()) || too_big(m * channels) {
        return Err(shape_err(
            OP,
            format!(
                "{:?} -> {:?} has too many elements",
                pixels.shape(),
                out.shape()
            ),
        ));
    }
    let groups = [m.div_ceil(TILE_M), channels.div_ceil(TILE_N)];
    let max = batch.gpu().limits().max_compute_workgroups_per_dimension as usize;
    if groups.iter().any(|&g| g > max) {
        return Err(shape_err(
            OP,
            format!("{groups:?} workgroups exceed the limit {max}"),
        ));
    }
    let params = Params {
        m: m as u32,
        n: channels as u32,
        k: (3 * patch * patch) as u32,
        size: patch as u32,
        h: h as u32,
        w: w as u32,
        cols: cols as u32,
        patches: (rows * cols) as u32,
    };
    let key = match flag {
        Some(f) => PipelineKey::new(SHADER, "patch_embed").flag(f),
        None => PipelineKey::new(SHADER, "patch_embed"),
    };
    batch.dispatch(
        &key,
        bytemuck::bytes_of(&params),
        &[pixels.binding(), weight.binding(), out.binding()],
        [groups[0] as u32, groups[1] as u32, 1],
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random};

    /// Direct convolution, stride = kernel = `p`, in f64.
    fn conv_cpu(
        px: &[f32],
        images: usize,
        h: usize,
        w: usize,
        weight: &[f32],
        c: usize,
        p: usize,
    ) -> Vec<f32> {
        let (rows, cols) = (h / p, w / p);
        let mut out = vec![0f32; images * rows * cols * c];
        for b in 0..images {
            for r in 0..rows {
                for q in 0..cols {
                    for o in 0..c {
                        let mut sum = 0f64;
                        for ch in 0..3 {
                            for ky in 0..p {
                                for kx in 0..p {
                                    let pix =
                                        px[((b * 3 + ch) * h + r * p + ky) * w + q * p + kx] as f64;
                                    sum += pix * weight[((o * 3 + ch) * p + ky) * p + kx] as f64;
                                }
                            }
                        }
                        out[((b * rows + r) * cols + q) * c + o] = sum as f32;
                    }
                }
            }
        }
        out
    }

    fn check(images: usize, h: usize, w: usize, c: usize, p: usize, f16: bool, seed: u64) {
        let gpu = gpu();
        let px = random(images * 3 * h * w, seed);
        let mut wt: Vec<f32> = random(c * 3 * p * p, seed + 1)
            .iter()
            .map(|v| v * 0.1)
            .collect();
        let tw = if f16 {
            let hw: Vec<half::f16> = wt.iter().map(|&v| half::f16::from_f32(v)).collect();
            wt = hw.iter().map(|v| v.to_f32()).collect();
            Tensor::from_f16(gpu, &[c, 3, p, p], &hw).unwrap()
        } else {
            Tensor::from_f32(gpu, &[c, 3, p, p], &wt).unwrap()
        };
        let tp = Tensor::from_f32(gpu, &[images, 3, h, w], &px).unwrap();
        let mut batch = gpu.batch();
        let out = patch_embed(&mut batch, &tp, &tw, p).unwrap();
        batch.submit().unwrap();
        assert_eq!(out.shape(), &[images, (h / p) * (w / p), c]);
        let got = pollster::block_on(out.to_f32(gpu)).unwrap();
        assert_close(
            &got,
            &conv_cpu(&px, images, h, w, &wt, c, p),
            1e-5,
            &format!("patch_embed {h}x{w} C {c}"),
        );
    }

    #[test]
    fn patch_embed_matches_direct_convolution_at_clip_geometry() {
        // Two 336x336 images, P = 14 (1152 patches, K = 588 not a multiple of the K tile);
        // C = 72 covers a full and a partial channel tile.
        check(2, 336, 336, 72, 14, false, 1);
    }

    #[test]
    fn patch_embed_matches_direct_convolution_on_small_odd_shapes() {
        // 2 x 3 patches, f16 weights, C = 5 (a mostly empty tile).
        check(1, 28, 42, 5, 14, true, 2);
        // Tiny patch, non-square image, two images.
        check(2, 6, 9, 3, 3, false, 3);
    }

    #[test]
    fn patch_embed_rejects_bad_shapes_and_dtypes() {
        let gpu = gpu();
        let px = Tensor::from_f32(gpu, &[1, 3, 28, 28], &vec![0.0; 3 * 28 * 28]).unwrap();
        let px_rgba = Tensor::from_f32(gpu, &[1, 4, 28, 28], &vec![0.0; 4 * 28 * 28]).unwrap();
        let w = Tensor::from_f32(gpu, &[8, 3, 14, 14], &vec![0.0; 8 * 588]).unwrap();
        let w_ids = Tensor::from_u32(gpu, &[8, 3, 14, 14], &vec![0; 8 * 588]).unwrap();
        let mut batch = gpu.batch();
        assert!(patch_embed(&mut batch, &px, &w, 14).is_ok());
        assert!(patch_embed(&mut batch, &px_rgba, &w, 14).is_err());
        assert!(patch_embed(&mut batch, &px, &w, 10).is_err()); // weight says 14
        assert!(patch_embed(&mut batch, &px, &w, 0).is_err());
        assert!(patch_embed(&mut batch, &px, &w_ids, 14).is_err());
        let px30 = Tensor::from_f32(gpu, &[1, 3, 30, 28], &vec![0.0; 3 * 30 * 28]).unwrap();
        assert!(patch_embed(&mut batch, &px30, &w, 14).is_err()); // 30 is not a multiple of 14
    }
}
