//! The kernels of a planned decode step (shaders/decode.wgsl): one token, recorded once into a
//! [`crate::Plan`] and replayed per token. Each reads the token's position and cache length from a
//! [`StepUniform`] written before the replay, so nothing is recreated per token.
//!
//! - [`gemv`]: `y = W · x` for one row of x with 16-byte weight loads, x staged in workgroup
//!   memory, an optional RMSNorm folded into the staging ([`Norm`]) and an [`Epilogue`]: plain
//!   store, residual add, SiLU·mul of a `[gate; up]` matrix, or RoPE + KV-cache store of a
//!   `[q; k]` matrix with `v` beside it. Fusing these is what keeps a decoder layer at six
//!   dispatches (norm+qkv, attend, combine, o+residual, norm+gate/up, down+residual).
//! - [`attend`]: one query position against the cache (flash-decoding in chunks of 64 keys,
//!   merged by a second dispatch; 16-byte loads where a head's row is whole units).
//! - [`sample`]: the next token on the GPU (greedy or sampled), where the next step's embedding
//!   reads it.

use crate::context::{Binding, Uniform};
use crate::error::{GpuError, Result, shape_err};
use crate::registry::{PipelineKey, Shader};
use crate::{Batch, DType, Gpu, Tensor, shader};

const SHADER: Shader = shader!("decode");
/// Threads per GEMV workgroup and most lanes per row (see the shader).
const GEMV_THREADS: usize = 256;
const GEMV_MAX_LANES: usize = 32;
/// Keys per attention workgroup; the cache capacity must be a multiple of it.
pub const ATTEND_KEYS: usize = 64;
/// Query heads per kv head times head dim, at most (workgroup memory of `attend`).
const ATTEND_QMAX: usize = 2048;
const ATTEND_MAX_GROUP: usize = 8;
/// Head dims of `attend_units`: from where its workgroups have work enough to where they have
/// workgroup memory enough.
const ATTEND_UNITS_MIN_DIM: usize = 64;
const ATTEND_UNITS_MAX_DIM: usize = 256;

/// The per-token values every planned kernel reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Step {
    /// Position of the token being run (its keys and values go to this cache row).
    pub pos: u32,
    /// Keys the query attends to (`pos + 1`).
    pub kv_len: u32,
    /// Index of the token in the reply (the sampler's random stream).
    pub index: u32,
    pub pad: u32,
}

/// The uniform holding a [`Step`], rewritten before each replay of a plan.
pub struct StepUniform(Uniform);

impl StepUniform {
    pub fn new(gpu: &Gpu) -> Result<StepUniform> {
        Ok(StepUniform(Uniform::new(gpu, size_of::<Step>() as u64)?))
    }

    pub fn write(&self, gpu: &Gpu, step: Step) {
        self.0.write(gpu, bytemuck::bytes_of(&step));
    }

    fn binding(&self) -> Binding<'_> {
        self.0.binding()
    }
}

/// RMSNorm folded into a [`gemv`]'s input: `x * rsqrt(mean(x²) + eps) * weight`.
#[derive(Clone, Copy)]
pub struct Norm<'a> {
    pub weight: &'a Tensor,
    pub eps: f32,
}

/// What a [`gemv`] does with its results.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `y = W · x` (weights larger than a storage binding go in row windows).
    Store,
    /// `y += W · x`, in place (the residual stream).
    Residual,
    /// W is gate; `up` (same shape and format, packed in one buffer with it by [`Tensor::pack`]):
    /// `y[j] = silu(gate_j) · up_j`.
    SiluMul { up: &'a Tensor },
    /// W is q: RoPE at the step's position on q and k, q to `y` and k into `kv`; v into `kv`.
    Qkv(Qkv<'a>),
}

/// Whether a GEMV of `w` with `epilogue` reads Q4 weights (w, or the v of a QKV epilogue).
fn reads_q4(w: &Tensor, epilogue: &Epilogue) -> bool {
    w.dtype() == DType::Q4 || matches!(epilogue, Epilogue::Qkv(a) if a.v.dtype() == DType::Q4)
}

/// The attention geometry of an [`Epilogue::Qkv`].
#[derive(Clone, Copy)]
pub struct Qkv<'a> {
    /// The step's position (RoPE and the cache row written).
    pub step: &'a StepUniform,
    /// `[kv_heads · head_dim, K]` in q's format, packed in one buffer with q ([`Tensor::pack`]).
    pub k: &'a Tensor,
    /// `[kv_heads · head_dim, K]`, in any weight format.
    pub v: &'a Tensor,
    /// The layer's cache `[2, capacity, kv_heads, head_dim]` (keys, then values), F32 or F16.
    pub kv: &'a Tensor,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GemvParams {
    n: u32,
    k: u32,
    col0: u32,
    eps: f32,
    m: u32,
    q_rows: u32,
    kv_rows: u32,
    head_dim: u32,
    kv_heads: u32,
    capacity: u32,
    a_data: u32,
    a_scales: u32,
    b_data: u32,
    b_scales: u32,
    v_data: u32,
    v_scales: u32,
    pad: [u32; 4],
    inv_freq: [f32; 128],
}

fn format_flag(prefix: char, dtype: DType) -> &'static str {
    match (prefix, dtype) {
        ('W', DType::F32) => "W_F32",
        ('W', DType::F16) => "W_F16",
        ('W', DType::Q8) => "W_Q8",
        ('W', DType::Q6) => "W_Q6",
        ('W', _) => "W_Q4",
        (_, DType::F32) => "V_F32",
        (_, DType::F16) => "V_F16",
        (_, DType::Q8) => "V_Q8",
        (_, DType::Q6) => "V_Q6",
        _ => "V_Q4",
    }
}

/// Values one 16-byte load of the format holds; K must be a multiple.
fn unit(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 4,
        DType::F16 => 8,
        DType::Q8 => 16,
        _ => 32,
    }
}

/// Lanes per row of the GEMV for weights of `dtype` and rows of `k` values: one per 16-byte unit
/// of the row, as a power of two up to 32.
fn gemv_lanes(dtype: DType, k: usize) -> usize {
    (k / unit(dtype))
        .next_power_of_two()
        .clamp(1, GEMV_MAX_LANES)
}

/// Checks that `w` (`[N, K]`) can go through the decode GEMV; returns (N, K).
fn gemv_weights(what: &str, w: &Tensor, k: usize) -> Result<usize> {
    const OP: &str = "decode gemv";
    if !matches!(
        w.dtype(),
        DType::F32 | DType::F16 | DType::Q8 | DType::Q6 | DType::Q4
    ) {
        return Err(GpuError::Unsupported {
            op: OP,
            what: format!("{what} of dtype {:?}", w.dtype()),
        });
    }
    let (n, wk) = w
        .dims2()
        .map_err(|_| shape_err(OP, format!("{what} must be [N, K], got {:?}", w.shape())))?;
    if wk != k
        || !k.is_multiple_of(unit(w.dtype()))
        || !k.is_multiple_of(w.dtype().group_size().max(1))
    {
        return Err(shape_err(
            OP,
            format!(
                "{what} {:?} {:?} needs K = {k}, a multiple of {}",
                w.dtype(),
                w.shape(),
                unit(w.dtype())
            ),
        ));
    }
    Ok(n)
}

/// Whether [`gemv`] takes `w` for inputs of length `k` (else the caller keeps the general path).
pub fn gemv_supports(w: &Tensor, k: usize) -> bool {
    gemv_weights("w", w, k).is_ok()
}

/// Records `y (op)= W · norm(x)` for one row of x (see [`Epilogue`]). x: `[K]` or `[1, K]` F32;
/// y: F32 of the epilogue's length (N; m for SiluMul; q rows for Qkv).
pub fn gemv(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    norm: Option<Norm<'_>>,
    epilogue: Epilogue<'_>,
    y: &Tensor,
) -> Result<()> {
    let max_window_bytes = batch.gpu().max_binding();
    gemv_windowed(batch, x, w, norm, epilogue, y, max_window_bytes)
}

/// [`gemv`], a plain [`Epilogue::Store`] splitting w into row windows of at most
/// `max_window_bytes` each.
pub(crate) fn gemv_windowed(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    norm: Option<Norm<'_>>,
    epilogue: Epilogue<'_>,
    y: &Tensor,
    max_window_bytes: u64,
) -> Result<()> {
    const OP: &str = "decode gemv";
    let k = x.last_dim();
    if x.dtype() != DType::F32 || x.rows() != 1 || y.dtype() != DType::F32 {
        return Err(shape_err(
            OP,
            format!(
                "x {:?} and y {:?} must be one f32 row",
                x.shape(),
                y.shape()
            ),
        ));
    }
    let n = gemv_weights("w", w, k)?;
    if let Some(norm) = norm
        && (norm.weight.dtype() != DType::F32 || norm.weight.numel() != k)
    {
        return Err(shape_err(
            OP,
            format!(
                "norm weight must be f32 [{k}], got {:?}",
                norm.weight.shape()
            ),
        ));
    }
    let mut params = GemvParams {
        n: n as u32,
        k: k as u32,
        col0: 0,
        eps: norm.map_or(0.0, |n| n.eps),
        m: 0,
        q_rows: 0,
        kv_rows: 0,
        head_dim: 0,
        kv_heads: 0,
        capacity: 0,
        a_data: 0,
        a_scales: 0,
        b_data: 0,
        b_scales: 0,
        v_data: 0,
        v_scales: 0,
        pad: [0; 4],
        inv_freq: [0.0; 128],
    };
    let mut key = PipelineKey::new(SHADER, "gemv")
        .flag("GEMV")
        .flag(format_flag('W', w.dtype()))
        .flag_if(w.dtype().is_quantized(), "QUANT")
        .flag_if(norm.is_some(), "NORM");
    let want_y = |len: usize| {
        if y.numel() == len {
            Ok(())
        } else {
            Err(shape_err(
                OP,
                format!("y has {} values, want {len}", y.numel()),
            ))
        }
    };
    let quads = match epilogue {
        Epilogue::Store => {
            want_y(n)?;
            n.div_ceil(4)
        }
        Epilogue::Residual => {
            want_y(n)?;
            key = key.flag("RESIDUAL");
            n.div_ceil(4)
        }
        Epilogue::SiluMul { up } => {
            packed_with(w, up, "up")?;
            want_y(n)?;
            params.m = n as u32;
            (params.b_data, params.b_scales) = places(up);
            key = key.flag("SILU");
            n.div_ceil(2)
        }
        Epilogue::Qkv(a) => {
            let (q_rows, kv_rows) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
            let d = a.head_dim;
            if d == 0 || d % 4 != 0 || d > 256 || a.kv_heads == 0 || a.heads % a.kv_heads != 0 {
                return Err(shape_err(
                    OP,
                    format!("qkv needs head dim % 4 == 0 and <= 256 (got {d}) and whole groups"),
                ));
            }
            packed_with(w, a.k, "k")?;
            if n != q_rows || a.k.rows() != kv_rows || gemv_weights("v", a.v, k)? != kv_rows {
                return Err(shape_err(
                    OP,
                    format!(
                        "q {:?}, k {:?} and v {:?} do not match {} + {} heads of {d}",
                        w.shape(),
                        a.k.shape(),
                        a.v.shape(),
                        a.heads,
                        a.kv_heads
                    ),
                ));
            }
            (params.b_data, params.b_scales) = places(a.k);
            (params.v_data, params.v_scales) = places(a.v);
            let capacity = kv_capacity(a.kv, a.kv_heads, d)?;
            want_y(q_rows)?;
            params.q_rows = q_rows as u32;
            params.kv_rows = kv_rows as u32;
            params.head_dim = d as u32;
            params.kv_heads = a.kv_heads as u32;
            params.capacity = capacity as u32;
            // transformers' inv_freq = 1 / theta^(2i / d), computed in f32 as the rope op does.
            for i in 0..d / 2 {
                params.inv_freq[i] = 1.0 / a.rope_theta.powf((2 * i) as f32 / d as f32);
            }
            key = key
                .flag("QKV")
                .flag(format_flag('V', a.v.dtype()))
                .flag_if(a.kv.dtype() == DType::F16, "KV_F16");
            (q_rows + kv_rows) / 4 + kv_rows / 4
        }
    };
    let lanes = gemv_lanes(w.dtype(), k);
    let gpu = batch.gpu();
    let subgroup = gpu.subgroup_min_size();
    let key = key
        .constant("LANES", lanes as u32)
        .flag_if(subgroup.is_some(), "SUBGROUPS")
        .flag_if(
            subgroup.is_some_and(|s| lanes <= s as usize),
            "SUBGROUP_LANES",
        )
        .flag_if(gpu.gemv_pairs(), "PAIRS")
        .flag_if(gpu.q4_table() && reads_q4(w, &epilogue), "Q4_TABLE");
    let quads_per_workgroup = GEMV_THREADS / lanes;
    if !matches!(epilogue, Epilogue::Store | Epilogue::Residual) {
        // Two matrices in one buffer: bind all of it, with the places in the parameters.
        (params.a_data, params.a_scales) = places(w);
        let whole = crate::ops::matmul::whole_buffer(w);
        let uniform = batch.params(bytemuck::bytes_of(&params))?;
        let mut entries = vec![(0, uniform.binding()), (2, x.binding()), (3, whole)];
        entries.extend(w.dtype().is_quantized().then_some((4, whole)));
        entries.extend(norm.map(|n| (5, n.weight.binding())));
        if let Epilogue::Qkv(a) = epilogue {
            let v = crate::ops::matmul::whole_buffer(a.v);
            entries.extend([(1, a.step.binding()), (6, v), (8, a.kv.binding())]);
            entries.extend(a.v.dtype().is_quantized().then_some((7, v)));
        }
        entries.push((9, y.binding()));
        return batch.dispatch_entries(
            &key,
            &entries,
            gpu.grid(quads.div_ceil(quads_per_workgroup) as u32),
        );
    }
    // One matrix: in row windows where it exceeds a storage binding (a plain store only).
    let windows = match epilogue {
        Epilogue::Store => crate::ops::matmul::row_windows(gpu, w, k, max_window_bytes)?,
        _ => vec![(0, n)],
    };
    for (start, count) in windows {
        let (data, scales) = crate::ops::matmul::window_bindings(w, k, start, count);
        params.n = count as u32;
        params.col0 = start as u32;
        let uniform = batch.params(bytemuck::bytes_of(&params))?;
        let mut entries = vec![(0, uniform.binding()), (2, x.binding()), (3, data)];
        entries.extend(scales.map(|s| (4, s)));
        entries.extend(norm.map(|n| (5, n.weight.binding())));
        entries.push((9, y.binding()));
        let grid = gpu.grid(count.div_ceil(4).div_ceil(quads_per_workgroup) as u32);
        batch.dispatch_entries(&key, &entries, grid)?;
    }
    Ok(())
}

/// Checks that `other` is packed in `w`'s buffer with w's format and shape.
fn packed_with(w: &Tensor, other: &Tensor, what: &str) -> Result<()> {
    if !w.shares_buffer(other) || other.dtype() != w.dtype() || other.last_dim() != w.last_dim() {
        return Err(shape_err(
            "decode gemv",
            format!(
                "{what} {:?} {:?} must be packed with {:?} {:?} (Tensor::pack)",
                other.dtype(),
                other.shape(),
                w.dtype(),
                w.shape()
            ),
        ));
    }
    Ok(())
}

/// Where a tensor starts in its buffer: data in 16-byte units, scales in words.
fn places(t: &Tensor) -> (u32, u32) {
    let (data, scales) = t.offsets();
    ((data / 16) as u32, (scales / 4) as u32)
}

/// Capacity of a cache `[2, capacity, kv_heads, head_dim]` (a multiple of [`ATTEND_KEYS`]).
fn kv_capacity(kv: &Tensor, kv_heads: usize, head_dim: usize) -> Result<usize> {
    match *kv.shape() {
        [2, cap, h, d]
            if h == kv_heads
                && d == head_dim
                && cap % ATTEND_KEYS == 0
                && matches!(kv.dtype(), DType::F32 | DType::F16) =>
        {
            Ok(cap)
        }
        _ => Err(shape_err(
            "decode",
            format!(
                "the KV cache must be f32/f16 [2, capacity % {ATTEND_KEYS} == 0, {kv_heads}, {head_dim}], got {:?} {:?}",
                kv.dtype(),
                kv.shape()
            ),
        )),
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttendParams {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CombineParams {
    heads: u32,
    head_dim: u32,
    chunks: u32,
}

/// Whether [`attend`] takes this geometry.
pub fn attend_supports(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && heads / kv_heads <= ATTEND_MAX_GROUP
        && heads / kv_heads * head_dim <= ATTEND_QMAX
        && head_dim > 0
}

/// Attention of one query position `q` (`[heads · head_dim]` F32) against the first
/// `step.kv_len` positions of `kv` (see [`Qkv::kv`]), scale `head_dim^-0.5`. Returns
/// `[heads · head_dim]`.
pub fn attend(
    batch: &mut Batch,
    step: &StepUniform,
    q: &Tensor,
    kv: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    const OP: &str = "decode attend";
    let head_dim = q.numel() / heads.max(1);
    if !attend_supports(heads, kv_heads, head_dim)
        || q.dtype() != DType::F32
        || head_dim * heads != q.numel()
    {
        return Err(shape_err(
            OP,
            format!(
                "q {:?} with {heads} heads over {kv_heads} kv heads",
                q.shape()
            ),
        ));
    }
    let capacity = kv_capacity(kv, kv_heads, head_dim)?;
    let gpu = batch.gpu();
    let chunks = capacity / ATTEND_KEYS;
    let part_out = Tensor::empty(gpu, &[heads * chunks, head_dim], DType::F32)?;
    let part_stats = Tensor::empty(gpu, &[heads * chunks, 2], DType::F32)?;
    let out = Tensor::empty(gpu, q.shape(), DType::F32)?;
    let params = AttendParams {
        heads: heads as u32,
        kv_heads: kv_heads as u32,
        head_dim: head_dim as u32,
        capacity: capacity as u32,
        scale: (head_dim as f32).powf(-0.5),
    };
    let uniform = batch.params(bytemuck::bytes_of(&params))?;
    // Head dims of whole 16-byte rows from 64 up take `attend_units` (one workgroup per query
    // head and chunk, every load a unit); others the general kernel (one per kv head and chunk,
    // which shares a workgroup's fixed cost among the kv head's query heads: on llvmpipe, at
    // head dim 16 the per-head kernel was 1.7x slower, at 128 1.2x faster).
    let f16 = kv.dtype() == DType::F16;
    let by_units = head_dim.is_multiple_of(if f16 { 8 } else { 4 })
        && (ATTEND_UNITS_MIN_DIM..=ATTEND_UNITS_MAX_DIM).contains(&head_dim);
    let (key, groups) = if by_units {
        let key = PipelineKey::new(SHADER, "attend_units")
            .flag("UNITS")
            .flag_if(gpu.subgroup_min_size().is_some_and(|s| s >= 4), "SUBGROUPS");
        (key, heads * chunks)
    } else {
        (PipelineKey::new(SHADER, "attend"), kv_heads * chunks)
    };
    let key = key.flag("ATTEND").flag_if(f16, "KV_F16");
    let entries = [
        (0, uniform.binding()),
        (1, step.binding()),
        (2, q.binding()),
        (3, kv.binding()),
        (4, part_out.binding()),
        (5, part_stats.binding()),
    ];
    batch.dispatch_entries(&key, &entries, gpu.grid(groups as u32))?;
    let params = CombineParams {
        heads: heads as u32,
        head_dim: head_dim as u32,
        chunks: chunks as u32,
    };
    let uniform = batch.params(bytemuck::bytes_of(&params))?;
    let entries = [
        (0, uniform.binding()),
        (1, step.binding()),
        (2, part_out.binding()),
        (3, part_stats.binding()),
        (4, out.binding()),
    ];
    let key = PipelineKey::new(SHADER, "attend_combine").flag("COMBINE");
    batch.dispatch_entries(&key, &entries, gpu.grid(heads as u32))?;
    Ok(out)
}

/// How [`sample`] picks a token: transformers' logits processing (repetition penalty,
/// temperature, top-k, top-p), then a draw with a uniform number from `(seed, step.index)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the first largest penalised logit, as `torch.argmax`).
    pub temperature: f32,
    /// 0: all.
    pub top_k: u32,
    pub top_p: f32,
    /// 1: off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 0,
    };
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SampleParams {
    vocab: u32,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    penalty: f32,
    seed_lo: u32,
    seed_hi: u32,
    pad: u32,
}

/// The sampler's state on the GPU: its settings (rewritten per turn) and the set of ids the
/// repetition penalty applies to (the prompt's, then each picked token's).
pub struct SamplerState {
    params: Uniform,
    seen: Tensor,
    /// `[vocab, 2]`: each id's processed logit and its weight, written by the sampler itself.
    scratch: Tensor,
    vocab: usize,
}

impl SamplerState {
    pub fn new(gpu: &Gpu, vocab: usize) -> Result<SamplerState> {
        let words = vocab.div_ceil(32).max(1);
        Ok(SamplerState {
            params: Uniform::new(gpu, size_of::<SampleParams>() as u64)?,
            seen: Tensor::from_u32(gpu, &[words], &vec![0; words])?,
            scratch: Tensor::empty(gpu, &[vocab.max(1), 2], DType::F32)?,
            vocab,
        })
    }

    /// Sets the sampling of the next tokens and the ids seen so far (ids outside the vocabulary
    /// are ignored, as the host sampler ignores them).
    pub fn reset(&self, gpu: &Gpu, sampling: Sampling, seen: &[u32]) {
        let params = SampleParams {
            vocab: self.vocab as u32,
            temperature: sampling.temperature,
            top_k: sampling.top_k,
            top_p: sampling.top_p,
            penalty: sampling.repetition_penalty,
            seed_lo: sampling.seed as u32,
            seed_hi: (sampling.seed >> 32) as u32,
            pad: 0,
        };
        self.params.write(gpu, bytemuck::bytes_of(&params));
        let mut bits = vec![0u32; self.seen.numel()];
        for &id in seen.iter().filter(|&&id| (id as usize) < self.vocab) {
            bits[id as usize / 32] |= 1 << (id % 32);
        }
        gpu.write(self.seen.buffer(), 0, bytemuck::cast_slice(&bits));
    }
}

/// Picks the next token from `logits` (`[V]` or `[1, V]` F32) as `state` says, on the GPU (one
/// workgroup; top-k and top-p are cut without a sort: with a top-k of at most 256 a radix select
/// and top-p over those k ids, else binary searches over the whole vocabulary), and
/// writes it to `token[0]` (the next step's input) and `token[1]` (for the host).
pub fn sample(
    batch: &mut Batch,
    step: &StepUniform,
    state: &SamplerState,
    logits: &Tensor,
    token: &Tensor,
) -> Result<()> {
    if logits.dtype() != DType::F32
        || logits.rows() != 1
        || logits.last_dim() != state.vocab
        || token.dtype() != DType::U32
        || token.numel() < 2
    {
        return Err(shape_err(
            "sample",
            format!("logits {:?} and token {:?}", logits.shape(), token.shape()),
        ));
    }
    let key = PipelineKey::new(SHADER, "sample").flag("SAMPLE");
    let entries = [
        (0, state.params.binding()),
        (1, step.binding()),
        (2, logits.binding()),
        (3, token.binding()),
        (4, state.seen.binding()),
        (5, state.scratch.binding()),
    ];
    batch.dispatch_entries(&key, &entries, [1, 1, 1])
}

/// The GPU sampler's uniform number for `(seed, index)`, in [0, 1).
pub fn sample_uniform(seed: u64, index: u32) -> f32 {
    let mut h = (seed as u32) ^ index.wrapping_mul(0x9E37_79B9);
    h = (h ^ (h >> 16)).wrapping_mul(0x85EB_CA6B);
    h = (h ^ (seed >> 32) as u32 ^ (h >> 13)).wrapping_mul(0xC2B2_AE35);
    h ^= h >> 16;
    (h >> 8) as f32 / 16_777_216.0
}

/// The token [`sample`] picks, computed on the host with the same steps (its reference).
pub fn sample_reference(logits: &[f32], sampling: Sampling, seen: &[u32], index: u32) -> u32 {
    let seen: std::collections::HashSet<u32> = seen.iter().copied().collect();
    let z: Vec<f32> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let p = sampling.repetition_penalty;
            let l = if p != 1.0 && seen.contains(&(i as u32)) {
                if l > 0.0 { l / p } else { l * p }
            } else {
                l
            };
            if sampling.temperature > 0.0 {
                l / sampling.temperature
            } else {
                l
            }
        })
        .collect();
    // Order: logit descending, then index.
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    if sampling.temperature <= 0.0 {
        return order[0] as u32;
    }
    let m = z[order[0]];
    let k = if sampling.top_k > 0 {
        (sampling.top_k as usize).min(z.len())
    } else {
        z.len()
    };
    let mass = |i: usize| ((z[i] - m) as f64).exp();
    let total: f64 = order[..k].iter().map(|&i| mass(i)).sum();
    let mut keep = k;
    if sampling.top_p < 1.0 {
        let limit = sampling.top_p as f64 * total;
        let mut before = 0.0;
        keep = order[..k]
            .iter()
            .take_while(|&&i| {
                let kept = before < limit;
                before += mass(i);
                kept
            })
            .count()
            .max(1);
    }
    let mut kept: Vec<usize> = order[..keep].to_vec();
    kept.sort_unstable();
    let sum: f64 = kept.iter().map(|&i| mass(i)).sum();
    let goal = sample_uniform(sampling.seed, index) as f64 * sum;
    let mut acc = 0.0;
    for &i in &kept {
        acc += mass(i);
        if acc > goal {
            return i as u32;
        }
    }
    *kept.last().expect("one kept") as u32
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::testing::{assert_close, devices, gpu, random, weights};

    fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
        w.chunks(x.len())
            .map(|row| {
                row.iter()
                    .zip(x)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    /// norm.rs's RMSNorm in f64.
    fn rms_norm(x: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        x.iter()
            .zip(g)
            .map(|(v, g)| (*v as f64 * r * *g as f64) as f32)
            .collect()
    }

    fn run(gpu: &Gpu, build: impl FnOnce(&mut Batch, &StepUniform), step: Step) {
        let uniform = StepUniform::new(gpu).unwrap();
        let mut plan = gpu.plan();
        build(&mut plan, &uniform);
        let plan = plan.into_plan().unwrap();
        uniform.write(gpu, step);
        let mut batch = gpu.batch();
        batch.run(&plan).unwrap();
        batch.submit().unwrap();
    }

    const FORMATS: [DType; 5] = [DType::F32, DType::F16, DType::Q8, DType::Q6, DType::Q4];

    /// Every format, with and without the folded norm, over K spanning three staging chunks, and
    /// short rows (fewer lanes per row, many rows per workgroup) over several workgroups.
    #[test]
    fn gemv_store_residual_and_silu_match_cpu() {
        for (gpu, dtype) in devices().into_iter().flat_map(|g| FORMATS.map(|d| (g, d))) {
            for (n, k) in [(13, 64), (300, 128), (40, 4608)] {
                let (w, wf) = weights(gpu, dtype, n, k, n as u64 + k as u64);
                let x = random(k, 7);
                let g: Vec<f32> = random(k, 8).iter().map(|v| 1.0 + v / 2.0).collect();
                let tx = Tensor::from_f32(gpu, &[1, k], &x).unwrap();
                let tg = Tensor::from_f32(gpu, &[k], &g).unwrap();
                let base = random(n, 9);
                let store = Tensor::empty(gpu, &[1, n], DType::F32).unwrap();
                let residual = Tensor::from_f32(gpu, &[1, n], &base).unwrap();
                let act = Tensor::empty(gpu, &[1, n / 2], DType::F32).unwrap();
                let norm = Norm {
                    weight: &tg,
                    eps: 1e-5,
                };
                run(
                    gpu,
                    |b, _| {
                        gemv(b, &tx, &w, Some(norm), Epilogue::Store, &store).unwrap();
                        gemv(b, &tx, &w, None, Epilogue::Residual, &residual).unwrap();
                    },
                    Step::default(),
                );
                let what = format!("{dtype:?} {n}x{k} subgroups {:?}", gpu.subgroup_min_size());
                let tol = 2e-5 * (k as f32).sqrt();
                let normed = matvec(&wf, &rms_norm(&x, &g, 1e-5));
                assert_close(
                    &pollster::block_on(store.to_f32(gpu)).unwrap(),
                    &normed,
                    tol,
                    &format!("{what} norm store"),
                );
                let plus: Vec<f32> = matvec(&wf, &x)
                    .iter()
                    .zip(&base)
                    .map(|(a, b)| a + b)
                    .collect();
                assert_close(
                    &pollster::block_on(residual.to_f32(gpu)).unwrap(),
                    &plus,
                    tol,
                    &format!("{what} residual"),
                );
                // SiLU·mul of gate and up (n / 2 rows each) packed in one buffer.
                let m = n / 2;
                let (gate, gf) = weights(gpu, dtype, m, k, 3 + k as u64);
                let (up, uf) = weights(gpu, dtype, m, k, 4 + k as u64);
                let packed = Tensor::pack(gpu, &[&gate, &up]).unwrap();
                let up = &packed[1];
                run(
                    gpu,
                    |b, _| gemv(b, &tx, &packed[0], None, Epilogue::SiluMul { up }, &act).unwrap(),
                    Step::default(),
                );
                let (g, u) = (matvec(&gf, &x), matvec(&uf, &x));
                let want: Vec<f32> = (0..m)
                    .map(|j| g[j] / (1.0 + (-g[j]).exp()) * u[j])
                    .collect();
                assert_close(
                    &pollster::block_on(act.to_f32(gpu)).unwrap(),
                    &want,
                    tol,
                    &format!("{what} silu"),
                );
            }
        }
    }

    /// RoPE (rotate-half) of one head in f64 at angles `pos * inv_freq` (inv_freq in f32 as the op).
    fn rope(v: &mut [f32], pos: usize, theta: f32) {
        let d = v.len();
        for i in 0..d / 2 {
            let inv = 1.0 / theta.powf((2 * i) as f32 / d as f32);
            let a = (pos as f32 * inv) as f64;
            let (s, c) = a.sin_cos();
            let (lo, hi) = (v[i] as f64, v[i + d / 2] as f64);
            v[i] = (lo * c - hi * s) as f32;
            v[i + d / 2] = (hi * c + lo * s) as f32;
        }
    }

    fn kv_tensor(gpu: &Gpu, data: &[f32], shape: &[usize], dtype: DType) -> Tensor {
        match dtype {
            DType::F16 => {
                let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                Tensor::from_f16(gpu, shape, &h).unwrap()
            }
            _ => Tensor::from_f32(gpu, shape, data).unwrap(),
        }
    }

    fn round(v: &[f32], dtype: DType) -> Vec<f32> {
        match dtype {
            DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
            _ => v.to_vec(),
        }
    }

    /// q to y, k and v into the cache row `pos`, RoPE on q and k, the other cache rows untouched.
    #[test]
    fn qkv_epilogue_ropes_and_stores_the_cache_row() {
        for gpu in devices() {
            for (dtype, v_dtype, kv_dtype) in [
                (DType::F32, DType::F32, DType::F32),
                (DType::F16, DType::F16, DType::F16),
                (DType::Q4, DType::Q6, DType::F16),
                (DType::Q8, DType::Q8, DType::F32),
            ] {
                // K 2048: two units or more per lane in every format (PAIRS).
                for (heads, kv_heads, d, pos, k) in [
                    (4, 2, 12, 5, 128),
                    (8, 2, 128, 1000, 2048),
                    (2, 2, 8, 0, 128),
                ] {
                    let (q_rows, kv_rows, cap) = (heads * d, kv_heads * d, 1024);
                    let (q, qf) = weights(gpu, dtype, q_rows, k, d as u64);
                    let (kw, kf) = weights(gpu, dtype, kv_rows, k, d as u64 + 2);
                    let qk = Tensor::pack(gpu, &[&q, &kw]).unwrap();
                    let (v, vf) = weights(gpu, v_dtype, kv_rows, k, d as u64 + 1);
                    let wf: Vec<f32> = qf.iter().chain(&kf).copied().collect();
                    let x = random(k, 3);
                    let g: Vec<f32> = random(k, 4).iter().map(|v| 1.0 + v / 2.0).collect();
                    let cache = round(&random(2 * cap * kv_rows, 5), kv_dtype);
                    let tx = Tensor::from_f32(gpu, &[k], &x).unwrap();
                    let tg = Tensor::from_f32(gpu, &[k], &g).unwrap();
                    let kv = kv_tensor(gpu, &cache, &[2, cap, kv_heads, d], kv_dtype);
                    let y = Tensor::empty(gpu, &[q_rows], DType::F32).unwrap();
                    let theta = 10000.0;
                    run(
                        gpu,
                        |b, s| {
                            let qkv = Qkv {
                                step: s,
                                k: &qk[1],
                                v: &v,
                                kv: &kv,
                                heads,
                                kv_heads,
                                head_dim: d,
                                rope_theta: theta,
                            };
                            gemv(
                                b,
                                &tx,
                                &qk[0],
                                Some(Norm {
                                    weight: &tg,
                                    eps: 1e-6,
                                }),
                                Epilogue::Qkv(qkv),
                                &y,
                            )
                            .unwrap()
                        },
                        Step {
                            pos: pos as u32,
                            kv_len: pos as u32 + 1,
                            ..Default::default()
                        },
                    );
                    let xn = rms_norm(&x, &g, 1e-6);
                    let mut qk = matvec(&wf, &xn);
                    qk.chunks_mut(d).for_each(|head| rope(head, pos, theta));
                    let vv = matvec(&vf, &xn);
                    let mut want_cache = cache.clone();
                    want_cache[pos * kv_rows..(pos + 1) * kv_rows]
                        .copy_from_slice(&round(&qk[q_rows..], kv_dtype));
                    let vrow = (cap + pos) * kv_rows;
                    want_cache[vrow..vrow + kv_rows].copy_from_slice(&round(&vv, kv_dtype));
                    let what = format!(
                        "{dtype:?}/{v_dtype:?} kv {kv_dtype:?} {heads}x{kv_heads}x{d} pos {pos} \
                     subgroups {:?}",
                        gpu.subgroup_min_size()
                    );
                    let tol = 2e-5 * (k as f32).sqrt();
                    assert_close(
                        &pollster::block_on(y.to_f32(gpu)).unwrap(),
                        &qk[..q_rows],
                        tol,
                        &format!("{what}: q"),
                    );
                    let got = pollster::block_on(kv.to_f32(gpu)).unwrap();
                    // f16 rounding of a value within tol of the reference may land one step away.
                    let kv_tol = if kv_dtype == DType::F16 { 2e-3 } else { tol };
                    assert_close(&got, &want_cache, kv_tol, &format!("{what}: cache"));
                }
            }
        }
    }

    fn attend_cpu(
        q: &[f32],
        cache: &[f32],
        heads: usize,
        kv_heads: usize,
        cap: usize,
        kv_len: usize,
    ) -> Vec<f32> {
        let d = q.len() / heads;
        let group = heads / kv_heads;
        let mut out = vec![0.0; q.len()];
        for h in 0..heads {
            let kvh = h / group;
            let key = |j: usize| &cache[(j * kv_heads + kvh) * d..][..d];
            let value = |j: usize| &cache[((cap + j) * kv_heads + kvh) * d..][..d];
            let scores: Vec<f64> = (0..kv_len)
                .map(|j| {
                    key(j)
                        .iter()
                        .zip(&q[h * d..])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let total: f64 = w.iter().sum();
            for e in 0..d {
                out[h * d + e] =
                    ((0..kv_len).map(|j| w[j] * value(j)[e] as f64).sum::<f64>() / total) as f32;
            }
        }
        out
    }

    #[test]
    fn attend_matches_cpu_for_any_head_dim_and_length() {
        for gpu in devices() {
            attend_matches_cpu_on(gpu);
        }
    }

    fn attend_matches_cpu_on(gpu: &Gpu) {
        // Head dims from 64 of whole 16-byte rows (f32: multiples of 4, f16: of 8) take
        // `attend_units`, the others the general kernel.
        for kv_dtype in [DType::F32, DType::F16] {
            for (heads, kv_heads, d, cap, kv_len) in [
                (4, 1, 128, 128, 1),
                (8, 2, 12, 64, 40),
                (4, 4, 64, 256, 200),
                (32, 8, 128, 192, 129),
                (3, 3, 1, 64, 64),
                (7, 1, 256, 128, 77),
                (5, 5, 80, 128, 100),
                (4, 2, 96, 64, 64),
                (6, 3, 68, 128, 70),
                // 257 chunks: the merge's threads take two chunks or one.
                (2, 1, 64, 16448, 16441),
            ] {
                let q: Vec<f32> = random(heads * d, d as u64)
                    .iter()
                    .map(|v| v * 3.0)
                    .collect();
                let mut cache = round(&random(2 * cap * kv_heads * d, 11), kv_dtype);
                // Rows past kv_len must never be read.
                cache[kv_len * kv_heads * d..cap * kv_heads * d].fill(f32::NAN);
                cache[(cap + kv_len) * kv_heads * d..].fill(f32::NAN);
                let tq = Tensor::from_f32(gpu, &[heads * d], &q).unwrap();
                let kv = kv_tensor(gpu, &cache, &[2, cap, kv_heads, d], kv_dtype);
                let out = std::cell::RefCell::new(None);
                run(
                    gpu,
                    |b, s| {
                        *out.borrow_mut() = Some(attend(b, s, &tq, &kv, heads, kv_heads).unwrap())
                    },
                    Step {
                        pos: kv_len as u32 - 1,
                        kv_len: kv_len as u32,
                        ..Default::default()
                    },
                );
                let got = pollster::block_on(out.into_inner().unwrap().to_f32(gpu)).unwrap();
                let want = attend_cpu(&q, &cache, heads, kv_heads, cap, kv_len);
                assert_close(
                    &got,
                    &want,
                    1e-5,
                    &format!(
                        "{kv_dtype:?} {heads}/{kv_heads} d {d} len {kv_len} subgroups {:?}",
                        gpu.subgroup_min_size()
                    ),
                );
            }
        }
    }

    /// Runs the GPU sampler on `logits` for reply indices `0..draws`.
    fn gpu_samples(logits: &[f32], sampling: Sampling, seen: &[u32], draws: u32) -> Vec<u32> {
        let gpu = gpu();
        let v = logits.len();
        let tl = Tensor::from_f32(gpu, &[1, v], logits).unwrap();
        let token = Tensor::from_u32(gpu, &[2], &[7, 7]).unwrap();
        let state = SamplerState::new(gpu, v).unwrap();
        let step = StepUniform::new(gpu).unwrap();
        let mut plan = gpu.plan();
        sample(&mut plan, &step, &state, &tl, &token).unwrap();
        let plan = plan.into_plan().unwrap();
        (0..draws)
            .map(|index| {
                // The picked tokens join the penalised set: start from the same set each draw.
                state.reset(gpu, sampling, seen);
                step.write(
                    gpu,
                    Step {
                        index,
                        ..Default::default()
                    },
                );
                let mut batch = gpu.batch();
                batch.run(&plan).unwrap();
                batch.submit().unwrap();
                let t = pollster::block_on(token.to_u32(gpu)).unwrap();
                assert_eq!(t[0], t[1]);
                t[0]
            })
            .collect()
    }

    /// 64 draws of the GPU sampler equal its host reference's.
    #[track_caller]
    fn assert_samples_match_reference(logits: &[f32], sampling: Sampling, seen: &[u32]) {
        let want: Vec<u32> = (0..64)
            .map(|i| sample_reference(logits, sampling, seen, i))
            .collect();
        assert_eq!(
            gpu_samples(logits, sampling, seen, 64),
            want,
            "{sampling:?}"
        );
    }

    #[test]
    fn greedy_sample_takes_the_first_largest_penalised_logit() {
        let mut logits = random(32000, 3);
        logits[31999] = 5.0;
        logits[20001] = 5.0;
        assert_eq!(gpu_samples(&logits, Sampling::GREEDY, &[], 1), [20001]);
        // A penalty of 2 halves 20001's and 31999's logits; 300 (4.0) is then the largest.
        logits[300] = 4.0;
        let penalised = Sampling {
            repetition_penalty: 2.0,
            ..Sampling::GREEDY
        };
        assert_eq!(
            gpu_samples(&logits, penalised, &[20001, 31999, u32::MAX], 1),
            [300]
        );
    }

    /// The GPU sampler picks what its host reference picks with the same numbers, for top-k and
    /// top-p cuts through ties, penalties and plain temperature sampling.
    #[test]
    fn sampler_matches_its_reference() {
        let v = 3000;
        let mut logits: Vec<f32> = random(v, 5).iter().map(|x| x * 4.0).collect();
        // Ties at the top and around the cuts, in index order far apart.
        for i in [10, 500, 2999, 1200] {
            logits[i] = 4.5;
        }
        for i in [7, 70, 700] {
            logits[i] = 3.9;
        }
        let seen = [10, 70, 2500];
        for sampling in [
            Sampling {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 1,
            },
            Sampling {
                temperature: 0.7,
                top_k: 3,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 2,
            },
            Sampling {
                temperature: 0.7,
                top_k: 6,
                top_p: 1.0,
                repetition_penalty: 1.3,
                seed: 3,
            },
            Sampling {
                temperature: 1.3,
                top_k: 0,
                top_p: 0.5,
                repetition_penalty: 1.0,
                seed: 4,
            },
            Sampling {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.9,
                repetition_penalty: 1.1,
                seed: 5,
            },
            Sampling {
                temperature: 0.5,
                top_k: 0,
                top_p: 1e-6,
                repetition_penalty: 1.0,
                seed: 6,
            },
            // The most the top-k path gathers, and one more (the path that cuts the whole
            // vocabulary).
            Sampling {
                temperature: 2.0,
                top_k: 256,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 7,
            },
            Sampling {
                temperature: 2.0,
                top_k: 257,
                top_p: 0.8,
                repetition_penalty: 1.0,
                seed: 8,
            },
            Sampling {
                temperature: 3.0,
                top_k: 200,
                top_p: 0.8,
                repetition_penalty: 1.0,
                seed: 9,
            },
            // Top-p alone whose cut lies within the 256 most likely ids (0.5 above: below them).
            Sampling {
                temperature: 0.1,
                top_k: 0,
                top_p: 0.95,
                repetition_penalty: 1.0,
                seed: 10,
            },
        ] {
            assert_samples_match_reference(&logits, sampling, &seen);
        }
    }

    /// The cuts over the whole vocabulary (a top-k over 256; a top-p alone whose cut lies below
    /// the 256 most likely ids) through ties: 150 ids share the logit ranked 159th to 308th, and
    /// both cuts land among them.
    #[test]
    fn whole_vocabulary_cuts_match_the_reference_through_ties() {
        let v = 3000;
        let tie = 3.5;
        let mut logits: Vec<f32> = random(v, 21).iter().map(|x| x * 4.0).collect();
        for i in 0..150 {
            logits[(i * 19 + 3) % v] = tie;
        }
        let above = logits.iter().filter(|&&l| l > tie).count();
        assert!(
            above < 256 && above + 150 > 300,
            "{above} logits above the ties"
        );
        // Top-p alone that keeps the ids above the ties and 120 of them, at temperature 0.7.
        let mass = |l: f32| ((l as f64 - 4.0) / 0.7).exp();
        let total: f64 = logits.iter().map(|&l| mass(l)).sum();
        let kept = logits
            .iter()
            .filter(|&&l| l > tie)
            .map(|&l| mass(l))
            .sum::<f64>()
            + 119.5 * mass(tie);
        for sampling in [
            Sampling {
                temperature: 1.0,
                top_k: 270,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 11,
            },
            Sampling {
                temperature: 1.0,
                top_k: 300,
                top_p: 0.6,
                repetition_penalty: 1.0,
                seed: 12,
            },
            Sampling {
                temperature: 0.7,
                top_k: 0,
                top_p: (kept / total) as f32,
                repetition_penalty: 1.0,
                seed: 13,
            },
        ] {
            assert_samples_match_reference(&logits, sampling, &[]);
        }
    }

    /// A replayed plan creates nothing: no buffer, no bind group, one pass.
    #[test]
    fn replaying_a_plan_creates_nothing() {
        // A device of its own: the shared one counts the other tests' work too.
        let gpu = &Gpu::new_blocking().unwrap();
        let tl = Tensor::from_f32(gpu, &[1, 300], &random(300, 1)).unwrap();
        let token = Tensor::from_u32(gpu, &[2], &[0, 0]).unwrap();
        let step = StepUniform::new(gpu).unwrap();
        let state = SamplerState::new(gpu, 300).unwrap();
        let mut plan = gpu.plan();
        sample(&mut plan, &step, &state, &tl, &token).unwrap();
        sample(&mut plan, &step, &state, &tl, &token).unwrap();
        let plan = plan.into_plan().unwrap();
        let before = gpu.counters();
        step.write(gpu, Step::default());
        let mut batch = gpu.batch();
        batch.run(&plan).unwrap();
        batch.submit().unwrap();
        let used = gpu.counters() - before;
        assert_eq!((used.buffers_created, used.bind_groups_created), (0, 0));
        assert_eq!((used.dispatches, used.passes, used.submits), (2, 1, 1));
        assert_eq!(used.bytes_written, 16);
    }
}
