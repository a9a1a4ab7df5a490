//! Scaled dot-product attention with grouped-query heads, a KV cache of fixed capacity in f32 or
//! f16, and an online (flash-attention style) f32 softmax that never materialises the score
//! matrix. Any head dim from 1 to [`MAX_HEAD_DIM`].
//!
//! Two kernels (shaders/attention.wgsl): `attention_tiled` (flash attention: a few threads per
//! query row, each owning a slice of the head dim, K/V tiles in workgroup memory, the lanes' dots
//! summed by subgroup shuffles where the device has subgroups) for prefill and the vision tower,
//! or its `attention_rows` form where each thread takes several query rows, which share each K/V
//! read (head dims of at most 16 that are multiples of 4, four rows per thread; head dims whose
//! lanes own whole vectors, as 64 and 128, two rows per thread); and
//! flash-decoding `attention_split` + `attention_combine` when a kv head has at most
//! [`SPLIT_MAX_ROWS`] query rows (decode), so that thousands of keys are spread over many
//! workgroups instead of one per head. [`kv_store`] appends rows to a cache in its dtype.

use crate::error::{GpuError, Result, shape_err};
use crate::registry::PipelineKey;
use crate::{Batch, DType, Tensor, shader};

const SHADER: crate::registry::Shader = shader!("attention");
/// The largest head dim the kernels take (must match MAX_D in attention.wgsl).
pub const MAX_HEAD_DIM: usize = 256;
/// Must match THREADS, TILE_FLOATS, BK_MAX and W_MAX in attention.wgsl (the SUBGROUPS ones
/// where the lanes of a row sum their dots by shuffles).
const TILED_THREADS: usize = 256;
const TILE_FLOATS: usize = 1024;
const TILE_MAX_KEYS: usize = 8;
const SUBGROUP_TILE_FLOATS: usize = 2048;
const SUBGROUP_TILE_MAX_KEYS: usize = 32;
const MAX_DIMS_PER_THREAD: usize = 16;
/// Query rows per thread of `attention_rows` (its QR) with one lane per row and with several; most
/// keys per tile.
const ROWS_PER_THREAD: usize = 4;
const ROWS_PER_THREAD_OF_LANES: usize = 2;
const ROWS_MAX_KEYS: usize = 64;
/// Must match MAX_ROWS and CHUNK in attention.wgsl.
const SPLIT_MAX_ROWS: usize = 8;
const SPLIT_CHUNK: usize = 128;
const COMBINE_WORKGROUP: u32 = 256;
const STORE_WORKGROUP: u32 = 256;

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

/// How `attention_tiled` splits the work at head dim `d`.
#[derive(Clone, Copy, Debug)]
struct TiledShape {
    /// Threads per query row (a power of two) and head-dim values each owns.
    lanes: usize,
    dims_per_lane: usize,
    /// Keys per K/V tile.
    tile_keys: usize,
    /// Whether the lanes of a row sum their dots by subgroup shuffles (`SUBGROUPS`).
    subgroups: bool,
    /// Query rows per thread: in `attention_rows` (head dims that are multiples of 4 with one
    /// lane per row, or whose lanes own whole vectors), [`ROWS_PER_THREAD`] or
    /// with several lanes [`ROWS_PER_THREAD_OF_LANES`]; 1 in `attention_tiled`.
    rows_per_thread: usize,
}

impl TiledShape {
    /// The shape at head dim `d` on a device whose subgroups have at least `subgroup_min_size`
    /// invocations, where it has subgroups.
    fn new(d: usize, subgroup_min_size: Option<u32>) -> TiledShape {
        let lanes = d.div_ceil(MAX_DIMS_PER_THREAD).next_power_of_two();
        let dims_per_lane = d.div_ceil(lanes);
        // A row's lanes are consecutive invocations, so a subgroup of at least `lanes` holds
        // them; the kernels' tiles then take the partial dots' workgroup memory too (keys
        // weighed eight at a time in `attention_tiled`).
        let in_subgroup = subgroup_min_size.is_some_and(|s| lanes <= s as usize);
        let rows = dims_per_lane.is_multiple_of(4) && lanes * dims_per_lane == d;
        // `attention_rows` with one lane per row has nothing to shuffle.
        let subgroups = in_subgroup && !(rows && lanes == 1);
        let tile_floats = if subgroups {
            SUBGROUP_TILE_FLOATS
        } else {
            TILE_FLOATS
        };
        TiledShape {
            lanes,
            dims_per_lane,
            tile_keys: if rows && lanes > 1 && !subgroups {
                // The lanes' dots go through the partial array: two rows' per key.
                TILE_MAX_KEYS / ROWS_PER_THREAD_OF_LANES
            } else if rows {
                (tile_floats / d).min(ROWS_MAX_KEYS) / 4 * 4
            } else if subgroups {
                match (SUBGROUP_TILE_FLOATS / d).min(SUBGROUP_TILE_MAX_KEYS) {
                    keys if keys > 8 => keys / 8 * 8,
                    keys => keys,
                }
            } else {
                (TILE_FLOATS / d).min(TILE_MAX_KEYS)
            },
            subgroups,
            rows_per_thread: match (rows, lanes) {
                (false, _) => 1,
                (true, 1) => ROWS_PER_THREAD,
                (true, _) => ROWS_PER_THREAD_OF_LANES,
            },
        }
    }

    fn rows_per_workgroup(&self) -> usize {
        TILED_THREADS / self.lanes * self.rows_per_thread
    }

    /// An upper bound of the loop iterations one invocation runs per K/V tile (every loop of the
    /// tile body, as if none were unrolled), for drivers that cap them.
    fn loop_iterations_per_tile(&self, d: usize) -> usize {
        let (bk, w) = (self.tile_keys, self.dims_per_lane);
        if self.rows_per_thread > 1 {
            // The tile load (a vec4 per step), then keys four at a time, each row's shuffles or,
            // without subgroups, the dots' stores (a step per four keys) and each row's sum.
            let sums = if self.subgroups || self.lanes == 1 {
                self.rows_per_thread * self.lanes.ilog2() as usize
            } else {
                1 + self.rows_per_thread * self.lanes
            };
            return 1 + (bk * d).div_ceil(4 * TILED_THREADS) + bk / 4 * (1 + sums);
        }
        // Tile loads: vec4 steps of four elements each; then per eight keys, their dots and sums
        // over the lanes, and the values.
        let load = (bk * d).div_ceil(4 * TILED_THREADS) * 5;
        let eights = bk.div_ceil(8);
        let keys = eights * 8;
        1 + load + keys * (w + 1) + keys * (self.lanes + 1) + keys + eights * (1 + w * 9)
    }
}

fn dims4(op_arg: &str, t: &Tensor) -> Result<[usize; 4]> {
    match *t.shape() {
        [b, s, h, d] => Ok([b, s, h, d]),
        ref s => Err(shape_err(
            "attention",
            format!("{op_arg} must be [B, T, H, D], got {s:?}"),
        )),
    }
}

/// Scaled dot-product attention, scale = head_dim^-0.5, softmax in f32.
/// q: `[B, Tq, Hq, D]` f32; k, v: `[B, Tcap, Hkv, D]`, both f32 or both f16, where only the first
/// `kv_len` positions are valid (a KV cache with capacity Tcap; the rest is never read);
/// grouped-query: query head h reads kv head `h / (Hq / Hkv)`. D is 1 to [`MAX_HEAD_DIM`].
/// Returns `[B, Tq, Hq, D]` f32.
pub fn attention(
    batch: &mut Batch,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_len: usize,
    mask: Mask,
) -> Result<Tensor> {
    attention_in_chunks(batch, q, k, v, kv_len, mask, None)
}

/// [`attention`], where the tiled kernels split the keys into chunks of at most `chunk_tiles`
/// K/V tiles (as under a loop budget) when it is given; tests reach the chunked path with it.
fn attention_in_chunks(
    batch: &mut Batch,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_len: usize,
    mask: Mask,
    chunk_tiles: Option<usize>,
) -> Result<Tensor> {
    let [b, tq, hq, d] = dims4("q", q)?;
    let [kb, tcap, hkv, kd] = dims4("k", k)?;
    if q.dtype() != DType::F32 {
        return Err(GpuError::Unsupported {
            op: "attention",
            what: format!("{:?} q (q must be F32)", q.dtype()),
        });
    }
    if !matches!(k.dtype(), DType::F32 | DType::F16) {
        return Err(GpuError::Unsupported {
            op: "attention",
            what: format!("{:?} k (k and v must be F32 or F16)", k.dtype()),
        });
    }
    if v.shape() != k.shape() || v.dtype() != k.dtype() {
        return Err(shape_err(
            "attention",
            format!(
                "v {:?} {:?} must match k {:?} {:?}",
                v.shape(),
                v.dtype(),
                k.shape(),
                k.dtype()
            ),
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
    if d == 0 || d > MAX_HEAD_DIM {
        return Err(shape_err(
            "attention",
            format!("head dim {d} must be in 1..={MAX_HEAD_DIM}"),
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
    let gpu = batch.gpu();
    let out = batch.tensor(q.shape(), DType::F32)?;
    if q.numel() == 0 {
        return Ok(out);
    }
    let kv_f16 = k.dtype() == DType::F16;
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
        let shape = TiledShape::new(d, gpu.subgroup_min_size());
        let row_tiles = rows.div_ceil(shape.rows_per_workgroup());
        params.row_tiles = row_tiles as u32;
        // Under a loop budget, each workgroup takes a chunk of whole tiles within half of it.
        let budget_tiles = gpu
            .loop_budget()
            .map(|budget| (budget as usize / 2 / shape.loop_iterations_per_tile(d)).max(1));
        let chunk_keys = [budget_tiles, chunk_tiles]
            .into_iter()
            .flatten()
            .min()
            .map(|tiles| tiles.max(1) * shape.tile_keys);
        let key_chunks = chunk_keys.map_or(1, |c| kv_len.div_ceil(c));
        let grid = gpu.grid((b * hkv * row_tiles * key_chunks) as u32);
        let rows_kernel = shape.rows_per_thread > 1;
        let entry = if rows_kernel {
            "attention_rows"
        } else {
            "attention_tiled"
        };
        let key = PipelineKey::new(SHADER, entry)
            .flag("TILED")
            .flag_if(rows_kernel, "ROWS")
            .flag_if(shape.subgroups, "SUBGROUPS")
            .flag_if(kv_f16, "KV_F16")
            .constant("D", d as u32)
            .constant("LANES", shape.lanes as u32)
            .constant("W", shape.dims_per_lane as u32)
            .constant("BK", shape.tile_keys as u32)
            .constant(
                "VEC4",
                (d % 4 == 0 && shape.dims_per_lane.is_multiple_of(4)) as u32,
            );
        let key = if rows_kernel {
            key.constant("QR", shape.rows_per_thread as u32)
        } else {
            key
        };
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
        params.chunk_keys = chunk_keys.unwrap_or(kv_len) as u32;
        let parts = b * hkv * key_chunks * rows;
        let part_out = batch.tensor(&[parts, d], DType::F32)?;
        let part_stats = batch.tensor(&[parts, 2], DType::F32)?;
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
        return combine(batch, &params, d, &part_out, &part_stats, out);
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
            .flag_if(kv_f16, "KV_F16")
            .constant("D", d as u32),
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
    combine(batch, &params, d, &part_out, &part_stats, out)
}

/// Merges the per-chunk partials (max, sum, weighted values) of every query row into `out`.
fn combine(
    batch: &mut Batch,
    params: &Params,
    d: usize,
    part_out: &Tensor,
    part_stats: &Tensor,
    out: Tensor,
) -> Result<Tensor> {
    let grid = batch
        .gpu()
        .grid((out.numel() as u32).div_ceil(COMBINE_WORKGROUP));
    batch.dispatch(
        &PipelineKey::new(SHADER, "attention_combine")
            .flag("COMBINE")
            .constant("D", d as u32),
        bytemuck::bytes_of(params),
        &[part_out.binding(), part_stats.binding(), out.binding()],
        grid,
    )?;
    Ok(out)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StoreParams {
    count: u32,
    start: u32,
}

/// Writes `rows`, the f32 keys or values of T new tokens (`[T, Hkv, D]` or `[T, Hkv * D]`), into
/// `cache` (`[1, capacity, Hkv, D]`, F32 or F16) at positions `pos..pos + T`, converting to the
/// cache's dtype (f16 rounds to nearest even). The rest of the cache is left as it is.
pub fn kv_store(batch: &mut Batch, rows: &Tensor, cache: &Tensor, pos: usize) -> Result<()> {
    let (capacity, row) = match *cache.shape() {
        [1, capacity, hkv, d] if hkv * d > 0 => (capacity, hkv * d),
        ref s => {
            return Err(shape_err(
                "kv_store",
                format!("cache must be [1, capacity, Hkv, D] with Hkv, D > 0, got {s:?}"),
            ));
        }
    };
    if rows.dtype() != DType::F32 {
        return Err(GpuError::Unsupported {
            op: "kv_store",
            what: format!("{:?} rows (rows must be F32)", rows.dtype()),
        });
    }
    let last = rows.last_dim();
    let hd = cache.shape()[3];
    let t = rows.numel() / row;
    if !rows.numel().is_multiple_of(row) || !(last == hd || last == row) || t == 0 {
        return Err(shape_err(
            "kv_store",
            format!(
                "rows {:?} must be [T, Hkv, D] or [T, Hkv * D] for cache {:?}, T >= 1",
                rows.shape(),
                cache.shape()
            ),
        ));
    }
    if pos + t > capacity {
        return Err(shape_err(
            "kv_store",
            format!(
                "positions {pos}..{} exceed the cache capacity {capacity}",
                pos + t
            ),
        ));
    }
    match cache.dtype() {
        DType::F32 => {
            let bytes = (row * 4) as u64;
            batch.copy(
                rows.binding(),
                cache.binding().slice(pos as u64 * bytes, t as u64 * bytes),
            );
            Ok(())
        }
        DType::F16 => {
            let (start, count) = (pos * row, t * row);
            let words = (start + count).div_ceil(2) - start / 2;
            let params = StoreParams {
                count: count as u32,
                start: start as u32,
            };
            let grid = batch.gpu().grid((words as u32).div_ceil(STORE_WORKGROUP));
            batch.dispatch(
                &PipelineKey::new(SHADER, "kv_store").flag("KV_STORE_F16"),
                bytemuck::bytes_of(&params),
                &[rows.binding(), cache.binding()],
                grid,
            )
        }
        dtype => Err(GpuError::Unsupported {
            op: "kv_store",
            what: format!("{dtype:?} cache (the cache must be F32 or F16)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, devices, gpu, random};

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
        /// The dtype K and V are stored in (the reference reads the same rounded values).
        kv_dtype: DType,
        /// K/V tiles per key chunk of the tiled kernels (PARTIAL + combine), where given.
        chunk_tiles: Option<usize>,
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

    /// Runs one case on both test devices (the tiled kernel's lanes summing their dots by
    /// subgroup shuffles on the first, through workgroup memory on the second) with NaN in every
    /// cache position at or past kv_len.
    fn check(c: Case, tol: f32, seed: u64) {
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
        // The reference reads the values the cache holds.
        let stored =
            |x: &[f32]| -> Vec<half::f16> { x.iter().map(|&e| half::f16::from_f32(e)).collect() };
        if c.kv_dtype == DType::F16 {
            k = stored(&k).iter().map(|&e| f32::from(e)).collect();
            v = stored(&v).iter().map(|&e| f32::from(e)).collect();
        }
        let want = attention_cpu(&c, &q, &k, &v);
        let kv_shape = [c.b, c.tcap, c.hkv, c.d];
        for gpu in devices() {
            let upload = |x: &[f32]| match c.kv_dtype {
                DType::F32 => Tensor::from_f32(gpu, &kv_shape, x).unwrap(),
                DType::F16 => Tensor::from_f16(gpu, &kv_shape, &stored(x)).unwrap(),
                dtype => panic!("no {dtype:?} cache"),
            };
            let tq = Tensor::from_f32(gpu, &[c.b, c.tq, c.hq, c.d], &q).unwrap();
            let (tk, tv) = (upload(&k), upload(&v));
            let mut batch = gpu.batch();
            let out =
                attention_in_chunks(&mut batch, &tq, &tk, &tv, c.kv_len, c.mask, c.chunk_tiles)
                    .unwrap();
            batch.submit().unwrap();
            let got = pollster::block_on(out.to_f32(gpu)).unwrap();
            let what = format!(
                "attention b{} tq{} hq{}/hkv{} d{} kv {}/{} {:?} x{} {:?} subgroups {:?}",
                c.b,
                c.tq,
                c.hq,
                c.hkv,
                c.d,
                c.kv_len,
                c.tcap,
                c.mask,
                c.magnitude,
                c.kv_dtype,
                gpu.subgroup_min_size()
            );
            assert_close(&got, &want, tol, &what);
        }
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
            kv_dtype: DType::F32,
            chunk_tiles: None,
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
            check(
                case(1, tq, 4, 2, d, 4096, tq, Mask::Causal { q_offset: 0 }),
                2e-5,
                40,
            );
        }
        check(
            case(
                1,
                300,
                2,
                1,
                128,
                1100,
                1000,
                Mask::Causal { q_offset: 700 },
            ),
            2e-5,
            41,
        );
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
            check(
                Case {
                    magnitude: 30.0,
                    ..c
                },
                5e-3,
                seed,
            );
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
        assert!(
            run(&q, &kv, &kv, 9, Mask::None).is_err(),
            "kv_len past capacity"
        );
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
        assert!(
            run(&t(&[4, 4, 16]), &kv, &kv, 8, Mask::None).is_err(),
            "rank 3"
        );
        let d257 = t(&[1, 4, 4, 257]);
        let err = run(
            &d257,
            &t(&[1, 8, 2, 257]),
            &t(&[1, 8, 2, 257]),
            8,
            Mask::None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("head dim 257 must be in 1..=256"),
            "{err}"
        );
        let half = |shape: &[usize]| Tensor::empty(gpu, shape, DType::F16).unwrap();
        assert!(
            run(&half(&[1, 4, 4, 16]), &kv, &kv, 8, Mask::None).is_err(),
            "f16 q"
        );
        let half_kv = half(&[1, 8, 2, 16]);
        assert!(
            run(&q, &half_kv, &half_kv, 8, Mask::None).is_ok(),
            "f16 k and v"
        );
        assert!(
            run(&q, &half_kv, &kv, 8, Mask::None).is_err(),
            "f16 k with f32 v"
        );
        let ids = Tensor::empty(gpu, &[1, 8, 2, 16], DType::U32).unwrap();
        assert!(run(&q, &ids, &ids, 8, Mask::None).is_err(), "u32 k and v");
    }

    /// Head dims off the old 16/32/64/128 list, from one value per head to 256: uneven lanes
    /// (20, 80, 96), one thread per row (1, 8, 12), 16 lanes (256); causal and not, GQA, the
    /// tiled path (prefill) and the split path (decode).
    #[test]
    fn every_head_dim_causal_and_not_with_gqa() {
        for (i, d) in [1, 8, 12, 20, 80, 96, 128, 256].into_iter().enumerate() {
            let seed = 100 + 10 * i as u64;
            check(
                case(1, 37, 4, 2, d, 50, 45, Mask::Causal { q_offset: 8 }),
                2e-5,
                seed,
            );
            check(case(2, 21, 3, 1, d, 30, 21, Mask::None), 2e-5, seed + 1);
            check(
                case(1, 1, 6, 2, d, 200, 150, Mask::Causal { q_offset: 149 }),
                2e-5,
                seed + 2,
            );
            check(case(1, 2, 2, 2, d, 140, 131, Mask::None), 2e-5, seed + 3);
        }
    }

    /// Every head dim from 1 to 40 and a few odd ones up to 255, small, through the tiled path
    /// (and its lane splits that leave high lanes without dims, e.g. 130 = 15 lanes of 9).
    #[test]
    fn head_dims_1_to_40_and_odd_ones_to_255() {
        for d in (1..=40).chain([47, 63, 65, 127, 129, 130, 200, 255]) {
            check(
                case(1, 10, 2, 1, d, 24, 20, Mask::Causal { q_offset: 10 }),
                2e-5,
                d as u64,
            );
        }
    }

    /// `attention_rows` (head dims 4 to 16, multiples of 4; four rows per thread, 1024 per
    /// workgroup): two row tiles of which the last is partial and ends inside a thread's four
    /// rows, keys in chunks of a few tiles (PARTIAL + combine) or whole, f32 and f16 caches.
    #[test]
    fn four_rows_per_thread_at_small_head_dims() {
        let chunked = |c: Case, tiles| Case {
            chunk_tiles: Some(tiles),
            ..c
        };
        check(
            chunked(
                case(1, 701, 4, 2, 16, 720, 701, Mask::Causal { q_offset: 0 }),
                3,
            ),
            2e-5,
            70,
        );
        check(
            case(1, 701, 4, 2, 16, 720, 701, Mask::Causal { q_offset: 0 }),
            2e-5,
            71,
        );
        check(
            Case {
                kv_dtype: DType::F16,
                ..chunked(case(2, 301, 2, 1, 8, 320, 301, Mask::None), 2)
            },
            2e-5,
            72,
        );
        check(
            chunked(
                case(1, 90, 6, 3, 12, 200, 190, Mask::Causal { q_offset: 100 }),
                1,
            ),
            2e-5,
            73,
        );
        check(case(3, 50, 2, 2, 4, 50, 50, Mask::None), 2e-5, 74);
    }

    /// `attention_rows` with several lanes per row (two rows per thread; their dots summed by
    /// shuffles on the device with subgroups, through workgroup memory on the other): head dims
    /// whose lanes own 16 or 12 dims, a partial last row tile, key chunks (PARTIAL: the stats
    /// come from one lane), f16 K/V and a continued cache.
    #[test]
    fn rows_of_several_lanes_at_head_dims_48_to_128() {
        let chunked = |c: Case, tiles| Case {
            chunk_tiles: Some(tiles),
            ..c
        };
        check(
            chunked(
                case(1, 301, 4, 2, 64, 320, 301, Mask::Causal { q_offset: 0 }),
                2,
            ),
            2e-5,
            80,
        );
        check(
            Case {
                kv_dtype: DType::F16,
                ..chunked(
                    case(2, 130, 2, 1, 128, 200, 190, Mask::Causal { q_offset: 60 }),
                    1,
                )
            },
            2e-5,
            81,
        );
        check(case(1, 77, 3, 3, 96, 77, 77, Mask::None), 2e-5, 82);
        check(
            case(1, 50, 2, 1, 48, 60, 50, Mask::Causal { q_offset: 0 }),
            2e-5,
            83,
        );
    }

    /// Long prefills at odd head dims: under llvmpipe's loop budget these split the keys into
    /// chunks (PARTIAL + combine), with a chunk boundary inside the causal window.
    #[test]
    fn long_prefill_at_odd_head_dims() {
        check(
            case(1, 900, 2, 1, 12, 1000, 900, Mask::Causal { q_offset: 0 }),
            2e-5,
            60,
        );
        check(
            case(1, 200, 2, 2, 96, 1200, 1100, Mask::Causal { q_offset: 900 }),
            2e-5,
            61,
        );
        check(case(1, 300, 1, 1, 256, 300, 300, Mask::None), 2e-5, 62);
    }

    /// K/V stored as f16 (as a KV cache may be): the reference reads the same rounded values, so
    /// the tolerance is the f32 one. Tiled, chunked and split paths, even and odd head dims.
    #[test]
    fn f16_keys_and_values() {
        let f16 = |c: Case| Case {
            kv_dtype: DType::F16,
            ..c
        };
        for (i, d) in [64, 128, 12, 7].into_iter().enumerate() {
            let seed = 200 + 10 * i as u64;
            check(
                f16(case(1, 33, 4, 2, d, 60, 50, Mask::Causal { q_offset: 17 })),
                2e-5,
                seed,
            );
            check(
                f16(case(
                    1,
                    1,
                    4,
                    1,
                    d,
                    300,
                    257,
                    Mask::Causal { q_offset: 256 },
                )),
                2e-5,
                seed + 1,
            );
            check(
                f16(case(2, 17, 1, 1, d, 17, 17, Mask::None)),
                2e-5,
                seed + 2,
            );
        }
        check(
            f16(case(
                1,
                700,
                2,
                1,
                64,
                800,
                700,
                Mask::Causal { q_offset: 0 },
            )),
            2e-5,
            250,
        );
    }

    /// Runs kv_store of `t` rows at `pos` into a cache filled with a marker and checks every
    /// element: the rows (rounded like the cache's dtype) at pos.., the marker elsewhere.
    fn check_store(dtype: DType, capacity: usize, hkv: usize, d: usize, pos: usize, t: usize) {
        let gpu = gpu();
        let row = hkv * d;
        let marker = -7.25f32;
        let rows = random(t * row, (pos * 31 + d) as u64);
        let shape = [1, capacity, hkv, d];
        let cache = match dtype {
            DType::F32 => Tensor::from_f32(gpu, &shape, &vec![marker; capacity * row]).unwrap(),
            _ => Tensor::from_f16(
                gpu,
                &shape,
                &vec![half::f16::from_f32(marker); capacity * row],
            )
            .unwrap(),
        };
        let src = Tensor::from_f32(gpu, &[t, hkv, d], &rows).unwrap();
        let mut batch = gpu.batch();
        kv_store(&mut batch, &src, &cache, pos).unwrap();
        batch.submit().unwrap();
        let got = pollster::block_on(cache.to_f32(gpu)).unwrap();
        let round = |x: f32| match dtype {
            DType::F32 => x,
            _ => f32::from(half::f16::from_f32(x)),
        };
        for (i, &g) in got.iter().enumerate() {
            let want = match i.checked_sub(pos * row) {
                Some(j) if j < t * row => round(rows[j]),
                _ => marker,
            };
            assert_eq!(
                g, want,
                "kv_store {dtype:?} cap {capacity} hkv {hkv} d {d} pos {pos} t {t}: element {i}"
            );
        }
    }

    #[test]
    fn kv_store_writes_rows_at_a_position_in_the_cache_dtype() {
        for dtype in [DType::F32, DType::F16] {
            check_store(dtype, 10, 2, 8, 3, 4);
            // Odd rows (Hkv * D = 5): rows start and end inside an f16 word whose other half
            // belongs to a neighbouring position and must survive.
            check_store(dtype, 9, 1, 5, 3, 1);
            check_store(dtype, 9, 1, 5, 4, 3);
            check_store(dtype, 7, 1, 5, 0, 7);
            check_store(dtype, 600, 3, 7, 11, 513);
        }
    }

    #[test]
    fn kv_store_rejects_bad_input() {
        let gpu = gpu();
        let cache = Tensor::empty(gpu, &[1, 8, 2, 4], DType::F16).unwrap();
        let rows = |shape: &[usize], dtype| Tensor::empty(gpu, shape, dtype).unwrap();
        let store = |src: &Tensor, cache: &Tensor, pos| kv_store(&mut gpu.batch(), src, cache, pos);
        assert!(store(&rows(&[3, 2, 4], DType::F32), &cache, 5).is_ok());
        assert!(store(&rows(&[3, 8], DType::F32), &cache, 5).is_ok());
        let err = store(&rows(&[3, 2, 4], DType::F32), &cache, 6).unwrap_err();
        assert!(
            err.to_string()
                .contains("positions 6..9 exceed the cache capacity 8"),
            "{err}"
        );
        assert!(
            store(&rows(&[3, 2, 4], DType::F16), &cache, 0).is_err(),
            "f16 rows"
        );
        assert!(
            store(&rows(&[3, 3, 4], DType::F32), &cache, 0).is_err(),
            "3 kv heads"
        );
        assert!(
            store(&rows(&[0, 2, 4], DType::F32), &cache, 0).is_err(),
            "no rows"
        );
        assert!(
            store(
                &rows(&[3, 2, 4], DType::F32),
                &rows(&[8, 2, 4], DType::F32),
                0
            )
            .is_err(),
            "rank 3 cache"
        );
        let ids = rows(&[1, 8, 2, 4], DType::U32);
        assert!(
            store(&rows(&[3, 2, 4], DType::F32), &ids, 0).is_err(),
            "u32 cache"
        );
    }
}
