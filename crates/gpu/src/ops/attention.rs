//! Scaled dot-product attention with grouped-query heads, a KV cache of fixed capacity, and an
//! online (flash-attention style) f32 softmax that never materialises the score matrix.
//!
//! Two kernels (shaders/attention.wgsl): `attention_tiled` (one thread per query row, K/V tiles in
//! workgroup memory) for prefill and the vision tower, and flash-decoding `attention_split` +
//! `attention_combine` when a kv head has at most [`SPLIT_MAX_ROWS`] query rows (decode), so
//! that thousands of keys are spread over many workgroups instead of one per head.

use crate::error::{GpuError, Result, shape_err};
use crate::registry::PipelineKey;
use crate::{Batch, DType, Tensor, shader};

const SHADER: crate::registry::Shader = shader!("attention");
/// Must match ROWS_PER_WG in attention.wgsl.
const TILED_ROWS_PER_WG: usize = 64;
/// Must match MAX_ROWS and CHUNK in attention.wgsl.
const SPLIT_MAX_ROWS: usize = 8;
const SPLIT_CHUNK: usize = 128;
/// K/V tiles one `attention_tiled` invocation loops over per key chunk where the driver caps loop
/// iterations ([`crate::Gpu::loop_budget`]): on llvmpipe, rows went wrong past ~28 tiles.
const TILES_PER_CHUNK_UNDER_BUDGET: usize = 16;
/// Must match TILE_FLOATS in attention.wgsl: a K/V tile holds TILE_FLOATS / D keys.
const TILE_FLOATS: usize = 2048;
const COMBINE_WORKGROUP: u32 = 256;

/// Which keys a query row sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// Every valid key (`0..kv_len`).
    None,
    /// Query row `i` has absolute position `q_offset + i` and sees keys `0..=q_offset + i`.
    Causal { q_offset: usize },
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    tq: u32,
    hq: u32,
    hkv: u32,
    tcap: u32,
    kv_len: u32,
    causal: u32,
    q_offset: u32,
    group: u32,
    row_tiles: u32,
    chunks: u32,
    chunk_keys: u32,
    scale: f32,
}

fn head_dim_flag(d: usize) -> Option<&'static str> {
    match d {
        16 => Some("HEAD_DIM_16"),
        32 => Some("HEAD_DIM_32"),
        64 => Some("HEAD_DIM_64"),
        128 => Some("HEAD_DIM_128"),
        _ => None,
    }
}

fn dims4(op_arg: &str, t: &Tensor) -> Result<[usize; 4]> {
    if t.dtype() != DType::F32 {
        return Err(GpuError::Unsupported {
            op: "attention",
            what: format!("{:?} {op_arg}", t.dtype()),
        });
    }
    match *t.shape() {
        [b, s, h, d] => Ok([b, s, h, d]),
        ref s => Err(shape_err(
            "attention",
            format!("{op_arg} must be [B, T, H, D], got {s:?}"),
        )),
    }
}

/// Scaled dot-product attention, scale = head_dim^-0.5, softmax in f32.
/// q: `[B, Tq, Hq, D]`; k, v: `[B, Tcap, Hkv, D]` where only the first `kv_len` positions are
/// valid (a KV cache with capacity Tcap; the rest is never read); grouped-query: query head h
/// reads kv head `h / (Hq / Hkv)`. D must be 16, 32, 64 or 128. Returns `[B, Tq, Hq, D]`.
pub fn attention(
    batch: &mut Batch,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_len: usize,
    mask: Mask,
) -> Result<Tensor> {
    let [b, tq, hq, d] = dims4("q", q)?;
    let [kb, tcap, hkv, kd] = dims4("k", k)?;
    if v.shape() != k.shape() || v.dtype() != DType::F32 {
        return Err(shape_err(
            "attention",
            format!("v {:?} must match k {:?}", v.shape(), k.shape()),
        ));
    }
    if kb != b || kd != d {
        return Err(shape_err(
            "attention",
            format!(
                "q {:?} vs k {:?}: batch and head dim differ",
                q.shape(),
                k.shape()
            ),
        ));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(shape_err(
            "attention",
            format!("{hq} query heads are not a multiple of {hkv} kv heads"),
        ));
    }
    if kv_len == 0 || kv_len > tcap {
        return Err(shape_err(
            "attention",
            format!("kv_len {kv_len} must be in 1..={tcap}"),
        ));
    }
    let (causal, q_offset) = match mask {
        Mask::None => (false, 0),
        Mask::Causal { q_offset } => {
            if q_offset + tq > kv_len {
                return Err(shape_err(
                    "attention",
                    format!(
                        "causal queries at {q_offset}..{} need keys past kv_len {kv_len}",
                        q_offset + tq
                    ),
                ));
            }
            (true, q_offset)
        }
    };
    let flag = head_dim_flag(d).ok_or_else(|| GpuError::Unsupported {
        op: "attention",
        what: format!("head dim {d}"),
    })?;
    let gpu = batch.gpu();
    let out = Tensor::empty(gpu, q.shape(), DType::F32)?;
    if q.numel() == 0 {
        return Ok(out);
    }
    let group = hq / hkv;
    let rows = tq * group;
    let mut params = Params {
        batch: b as u32,
        tq: tq as u32,
        hq: hq as u32,
        hkv: hkv as u32,
        tcap: tcap as u32,
        kv_len: kv_len as u32,
        causal: causal as u32,
        q_offset: q_offset as u32,
        group: group as u32,
        row_tiles: 0,
        chunks: 1,
        chunk_keys: kv_len as u32,
        scale: (d as f32).powf(-0.5),
    };

    if rows > SPLIT_MAX_ROWS {
        let row_tiles = rows.div_ceil(TILED_ROWS_PER_WG);
        params.row_tiles = row_tiles as u32;
        let chunk_keys = TILES_PER_CHUNK_UNDER_BUDGET * (TILE_FLOATS / d);
        let key_chunks = match gpu.loop_budget() {
            Some(_) => kv_len.div_ceil(chunk_keys),
            None => 1,
        };
        let grid = gpu.grid((b * hkv * row_tiles * key_chunks) as u32);
        let key = PipelineKey::new(SHADER, "attention_tiled").flag("TILED").flag(flag);
        if key_chunks == 1 {
            batch.dispatch(
                &key,
                bytemuck::bytes_of(&params),
                &[q.binding(), k.binding(), v.binding(), out.binding()],
                grid,
            )?;
            return Ok(out);
        }
        params.chunks = key_chunks as u32;
        params.chunk_keys = chunk_keys as u32;
        let parts = b * hkv * key_chunks * rows;
        let part_out = Tensor::empty(gpu, &[parts, d], DType::F32)?;
        let part_stats = Tensor::empty(gpu, &[parts, 2], DType::F32)?;
        batch.dispatch(
            &key.flag("PARTIAL"),
            bytemuck::bytes_of(&params),
            &[
                q.binding(),
                k.binding(),
                v.binding(),
                part_out.binding(),
                part_stats.binding(),
            ],
            grid,
        )?;
        return combine(batch, &params, flag, &part_out, &part_stats, out);
    }

    let chunks = kv_len.div_ceil(SPLIT_CHUNK);
    params.chunks = chunks as u32;
    params.chunk_keys = SPLIT_CHUNK as u32;
    let parts = b * hkv * chunks * rows;
    let part_out = Tensor::empty(gpu, &[parts, d], DType::F32)?;
    let part_stats = Tensor::empty(gpu, &[parts, 2], DType::F32)?;
    batch.dispatch(
        &PipelineKey::new(SHADER, "attention_split")
            .flag("SPLIT")
            .flag(flag),
        bytemuck::bytes_of(&params),
        &[
            q.binding(),
            k.binding(),
            v.binding(),
            part_out.binding(),
            part_stats.binding(),
        ],
        gpu.grid((b * hkv * chunks) as u32),
    )?;
    combine(batch, &params, flag, &part_out, &part_stats, out)
}

/// Merges the per-chunk partials (max, sum, weighted values) of every query row into `out`.
fn combine(
    batch: &mut Batch,
    params: &Params,
    head_dim_flag: &'static str,
    part_out: &Tensor,
    part_stats: &Tensor,
    out: Tensor,
) -> Result<Tensor> {
    let grid = batch.gpu().grid((out.numel() as u32).div_ceil(COMBINE_WORKGROUP));
    batch.dispatch(
        &PipelineKey::new(SHADER, "attention_combine")
            .flag("COMBINE")
            .flag(head_dim_flag),
        bytemuck::bytes_of(params),
        &[part_out.binding(), part_stats.binding(), out.binding()],
        grid,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random};

    struct Case {
        b: usize,
        tq: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        tcap: usize,
        kv_len: usize,
        mask: Mask,
        /// Multiplies q and k (large values stress the softmax's stability).
        magnitude: f32,
    }

    /// Plain softmax(q k^T * scale) v in f64, reading only the first kv_len cache positions.
    fn attention_cpu(c: &Case, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (d, group) = (c.d, c.hq / c.hkv);
        let scale = (d as f64).powf(-0.5);
        let mut out = vec![0.0; q.len()];
        for b in 0..c.b {
            for t in 0..c.tq {
                let limit = match c.mask {
                    Mask::None => c.kv_len,
                    Mask::Causal { q_offset } => (q_offset + t + 1).min(c.kv_len),
                };
                for h in 0..c.hq {
                    let qi = ((b * c.tq + t) * c.hq + h) * d;
                    let kvi = |j: usize| ((b * c.tcap + j) * c.hkv + h / group) * d;
                    let scores: Vec<f64> = (0..limit)
                        .map(|j| {
                            (0..d)
                                .map(|x| q[qi + x] as f64 * k[kvi(j) + x] as f64)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for x in 0..d {
                        let o: f64 = (0..limit).map(|j| w[j] * v[kvi(j) + x] as f64).sum();
                        out[qi + x] = (o / sum) as f32;
                    }
                }
            }
        }
        out
    }

    /// Runs one case on the GPU with NaN in every cache position at or past kv_len.
    fn check(c: Case, tol: f32, seed: u64) {
        let gpu = gpu();
        let q: Vec<f32> = random(c.b * c.tq * c.hq * c.d, seed)
            .iter()
            .map(|x| x * c.magnitude)
            .collect();
        let kv_size = c.b * c.tcap * c.hkv * c.d;
        let mut k: Vec<f32> = random(kv_size, seed + 1)
            .iter()
            .map(|x| x * c.magnitude)
            .collect();
        let mut v = random(kv_size, seed + 2);
        for (i, (kx, vx)) in k.iter_mut().zip(&mut v).enumerate() {
            if (i / (c.hkv * c.d)) % c.tcap >= c.kv_len {
                *kx = f32::NAN;
                *vx = f32::NAN;
            }
        }
        let tq = Tensor::from_f32(gpu, &[c.b, c.tq, c.hq, c.d], &q).unwrap();
        let tk = Tensor::from_f32(gpu, &[c.b, c.tcap, c.hkv, c.d], &k).unwrap();
        let tv = Tensor::from_f32(gpu, &[c.b, c.tcap, c.hkv, c.d], &v).unwrap();
        let mut batch = gpu.batch();
        let out = attention(&mut batch, &tq, &tk, &tv, c.kv_len, c.mask).unwrap();
        batch.submit().unwrap();
        let got = pollster::block_on(out.to_f32(gpu)).unwrap();
        let what = format!(
            "attention b{} tq{} hq{}/hkv{} d{} kv {}/{} {:?} x{}",
            c.b, c.tq, c.hq, c.hkv, c.d, c.kv_len, c.tcap, c.mask, c.magnitude
        );
        assert_close(&got, &attention_cpu(&c, &q, &k, &v), tol, &what);
    }

    /// Positional shorthand for the test tables below.
    #[allow(clippy::too_many_arguments)]
    fn case(
        b: usize,
        tq: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        tcap: usize,
        kv_len: usize,
        mask: Mask,
    ) -> Case {
        Case {
            b,
            tq,
            hq,
            hkv,
            d,
            tcap,
            kv_len,
            mask,
            magnitude: 1.0,
        }
    }

    #[test]
    fn prefill_causal_with_head_ratios_1_to_8() {
        for (i, hkv) in [8, 4, 2, 1].into_iter().enumerate() {
            check(
                case(1, 37, 8, hkv, 16, 45, 37, Mask::Causal { q_offset: 0 }),
                2e-5,
                i as u64,
            );
        }
    }

    #[test]
    fn prefill_continuing_a_cache() {
        // Tq = 20 new tokens after 33 cached ones; D = 128; garbage past kv_len = 53.
        check(
            case(1, 20, 4, 2, 128, 64, 53, Mask::Causal { q_offset: 33 }),
            2e-5,
            10,
        );
        check(
            case(1, 29, 4, 1, 64, 100, 90, Mask::Causal { q_offset: 61 }),
            2e-5,
            11,
        );
    }

    /// Long prefills: on llvmpipe, whose invocations stop looping after 65535 iterations in
    /// total, these rows came out as zeros past ~28 key tiles until the keys were split into
    /// chunks (PARTIAL + combine); on other drivers they run in one pass. Also a chunk boundary
    /// that falls inside the causal window of a q_offset and NaN past kv_len.
    #[test]
    fn long_causal_prefill_at_head_dims_32_to_128() {
        for (tq, d) in [(600, 128), (1200, 64), (2000, 32)] {
            check(case(1, tq, 4, 2, d, 4096, tq, Mask::Causal { q_offset: 0 }), 2e-5, 40);
        }
        check(case(1, 300, 2, 1, 128, 1100, 1000, Mask::Causal { q_offset: 700 }), 2e-5, 41);
        check(case(2, 700, 2, 2, 64, 700, 700, Mask::None), 2e-5, 42);
    }

    #[test]
    fn unmasked_batches_like_the_vision_tower() {
        check(case(3, 70, 2, 2, 64, 70, 70, Mask::None), 2e-5, 20);
        check(case(2, 33, 3, 3, 32, 40, 33, Mask::None), 2e-5, 21);
    }

    #[test]
    fn decode_split_over_key_chunks() {
        // Tq = 1: flash-decoding path, 3 chunks with a partial one, NaN past kv_len.
        check(
            case(1, 1, 8, 2, 64, 320, 300, Mask::Causal { q_offset: 299 }),
            2e-5,
            30,
        );
        check(case(2, 1, 4, 4, 16, 140, 129, Mask::None), 2e-5, 31);
        check(
            case(1, 1, 8, 1, 128, 8, 5, Mask::Causal { q_offset: 4 }),
            2e-5,
            32,
        );
        // Few rows per kv head also take the split path: causal masking inside chunks, and a
        // chunk (keys 128..) that the first rows cannot see at all.
        check(
            case(1, 3, 2, 2, 16, 200, 131, Mask::Causal { q_offset: 126 }),
            2e-5,
            33,
        );
    }

    #[test]
    fn long_sequence_of_3000_keys() {
        check(
            case(1, 1, 2, 1, 16, 3072, 3001, Mask::Causal { q_offset: 3000 }),
            2e-5,
            40,
        );
        check(
            case(1, 40, 2, 1, 16, 3072, 3010, Mask::Causal { q_offset: 2970 }),
            2e-5,
            41,
        );
    }

    #[test]
    fn large_scores_stay_finite_and_correct() {
        // Scores reach thousands: exp would overflow without the running max. f32 scores carry
        // absolute errors of ~1e-3 at this size, hence the looser tolerance.
        for (c, seed) in [
            (
                case(1, 45, 2, 1, 64, 300, 260, Mask::Causal { q_offset: 215 }),
                50,
            ),
            (case(1, 1, 4, 2, 64, 300, 260, Mask::None), 51),
        ] {
            check(Case { magnitude: 30.0, ..c }, 5e-3, seed);
        }
    }

    #[test]
    fn attention_rejects_bad_input() {
        let gpu = gpu();
        let t = |shape: &[usize]| Tensor::empty(gpu, shape, DType::F32).unwrap();
        let (q, kv) = (t(&[1, 4, 4, 16]), t(&[1, 8, 2, 16]));
        let run = |q: &Tensor, k: &Tensor, v: &Tensor, kv_len: usize, mask: Mask| {
            attention(&mut gpu.batch(), q, k, v, kv_len, mask)
        };
        assert!(run(&q, &kv, &kv, 8, Mask::None).is_ok());
        assert!(run(&q, &kv, &kv, 9, Mask::None).is_err(), "kv_len past capacity");
        assert!(run(&q, &kv, &kv, 0, Mask::None).is_err(), "empty cache");
        assert!(
            run(&q, &kv, &kv, 6, Mask::Causal { q_offset: 3 }).is_err(),
            "queries past the cache"
        );
        assert!(
            run(&q, &t(&[1, 8, 3, 16]), &t(&[1, 8, 3, 16]), 8, Mask::None).is_err(),
            "4 % 3 heads"
        );
        assert!(
            run(&q, &kv, &t(&[1, 8, 2, 8]), 8, Mask::None).is_err(),
            "v differs from k"
        );
        assert!(
            run(&q, &t(&[2, 8, 2, 16]), &t(&[2, 8, 2, 16]), 8, Mask::None).is_err(),
            "batch"
        );
        assert!(run(&t(&[4, 4, 16]), &kv, &kv, 8, Mask::None).is_err(), "rank 3");
        let d48 = t(&[1, 4, 4, 48]);
        assert!(
            run(&d48, &t(&[1, 8, 2, 48]), &t(&[1, 8, 2, 48]), 8, Mask::None).is_err(),
            "head dim 48"
        );
        let half = Tensor::empty(gpu, &[1, 4, 4, 16], DType::F16).unwrap();
        assert!(run(&half, &kv, &kv, 8, Mask::None).is_err(), "f16 q");
    }
}
