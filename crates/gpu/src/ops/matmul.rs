//! Linear layers: `y = x · wᵀ (+ bias)` with f32 activations and weights in PyTorch Linear layout
//! `[N, K] = [out, in]`, stored as F32, F16 or group-quantized Q8 / Q6 / Q4 (dequantized in-shader).
//!
//! Two kernels (shaders/matmul.wgsl): a GEMV for few rows of x (where reading the weights is the
//! whole cost) and a tiled GEMM otherwise; one row without bias (decoding op by op) goes through
//! the planned decode step's GEMV ([`decode::gemv`]). Weights larger than one storage binding (a
//! 32064x4096 f32 `lm_head` is 525 MB) are processed in row windows, each writing its own column
//! range of the output.
//!
//! On a device with shader-f16 ([`crate::Gpu::has_f16`]) F16 weights go through the kernels'
//! `SHADER_F16` variants, which load them as `f16` and still multiply and accumulate in f32. Q8/Q4
//! have no such variant: an exact f16 dequantization needs `bitcast<vec2<f16>>(u32)`, which naga
//! does not implement yet (gfx-rs/wgpu#8896), and converting integers to f16 costs what
//! converting them to f32 does.

use bytemuck::Zeroable;

use crate::context::Binding;
use crate::error::{GpuError, Result, shape_err};
use crate::ops::decode::{self, Epilogue};
use crate::ops::elementwise::{add, quick_gelu, silu_mul};
use crate::registry::{PipelineKey, SHADER_F16, Shader};
use crate::{Batch, DType, GemmTile, Tensor, shader};

const SHADER: Shader = shader!("matmul");
/// Outputs per GEMV workgroup and the GEMM output tile, rows of x by columns (see the shader).
const GEMV_OUTPUTS_PER_WORKGROUP: u32 = 4;
const GEMM_TILE_M: u32 = 128;
const GEMM_TILE_N: u32 = 64;
/// Rows of x up to which [`LinearKernel::Auto`] picks the GEMV: one GEMV pass covers 8 rows (it
/// reads the weights once per 8 rows), and on llvmpipe the GEMV is 1.3x faster than the GEMM at
/// M = 8, 1.2x at 16 and 3x slower at 32 (`cargo bench -p llava-gpu --bench kernels` prints this
/// crossover for the adapter at hand; no discrete GPU has been measured yet).
pub const GEMV_MAX_ROWS: usize = 8;

/// What a linear layer does with `x · wᵀ + bias` before storing it. The GEMM applies it as it
/// stores its tiles (the shader's QUICK_GELU and RESIDUAL variants), so the projection itself
/// never goes through memory; the GEMVs store the projection and an elementwise op follows.
#[derive(Clone, Copy, Debug)]
pub enum LinearEpilogue<'a> {
    Store,
    /// CLIP's MLP activation, [`quick_gelu`].
    QuickGelu,
    /// A residual connection: `residual + (x · wᵀ + bias)`, residual shaped as the output.
    Residual(&'a Tensor),
}

/// Which kernel [`linear_with`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKernel {
    /// The decode GEMV ([`decode::gemv`]) for one row of x where it takes w and there is no
    /// bias, this GEMV for at most [`GEMV_MAX_ROWS`] rows, the GEMM otherwise.
    Auto,
    Gemv,
    Gemm,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    y_stride: u32,
    col0: u32,
    /// [`linear_silu_mul`] and [`linear_qkv`]: where gate and up, or q, k and v, start in their
    /// buffer, data and scales in words.
    a_data: u32,
    a_scales: u32,
    b_data: u32,
    b_scales: u32,
    v_data: u32,
    v_scales: u32,
    /// [`linear_qkv`]: rows of q and of k, and where k and v start in y (f32 elements).
    q_rows: u32,
    kv_rows: u32,
    k_out: u32,
    v_out: u32,
    /// [`linear_qkv`] with biases: where the biases of q, k and v start in their buffer (f32
    /// elements).
    q_bias: u32,
    k_bias: u32,
    v_bias: u32,
}

/// `y = x · wᵀ (+ bias)`. x: `[.., K]` f32; w: `[N, K]` of F32 | F16 | Q8 | Q6 | Q4; bias: `[N]` F32.
/// Returns `[.., N]` f32.
pub fn linear(batch: &mut Batch, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_with(batch, x, w, bias, LinearKernel::Auto)
}

/// [`linear`] with an explicit kernel choice (for benchmarks and tests).
pub fn linear_with(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    kernel: LinearKernel,
) -> Result<Tensor> {
    let max_window_bytes = batch.gpu().max_binding();
    let store = LinearEpilogue::Store;
    linear_windowed(batch, x, w, bias, kernel, store, max_window_bytes)
}

/// `quick_gelu(x · wᵀ + bias)`, CLIP's `fc1` and activation (see [`LinearEpilogue`]).
pub fn linear_quick_gelu(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    linear_then(batch, x, w, bias, LinearEpilogue::QuickGelu)
}

/// `residual + (x · wᵀ + bias)`, a projection back into the residual stream (see
/// [`LinearEpilogue`]). residual: f32 shaped as the output, `[.., N]`.
pub fn linear_residual(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    linear_then(batch, x, w, bias, LinearEpilogue::Residual(residual))
}

/// [`linear`] followed by `epilogue`.
fn linear_then(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    epilogue: LinearEpilogue,
) -> Result<Tensor> {
    let max_window_bytes = batch.gpu().max_binding();
    let kernel = LinearKernel::Auto;
    linear_windowed(batch, x, w, bias, kernel, epilogue, max_window_bytes)
}

/// [`linear_with`] followed by `epilogue`, splitting w into row windows of at most
/// `max_window_bytes` each.
pub(crate) fn linear_windowed(
    batch: &mut Batch,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    kernel: LinearKernel,
    epilogue: LinearEpilogue,
    max_window_bytes: u64,
) -> Result<Tensor> {
    const OP: &str = "linear";
    let (n, k) = check_shapes(x, w, bias)?;
    let out_shape = with_last_dim(x, n);
    if let LinearEpilogue::Residual(r) = epilogue
        && (r.dtype() != DType::F32 || r.shape() != out_shape)
    {
        return Err(shape_err(
            OP,
            format!(
                "residual must be f32 {out_shape:?}, got {:?} {:?}",
                r.dtype(),
                r.shape()
            ),
        ));
    }
    let m = x.rows();
    let gemv = match kernel {
        LinearKernel::Auto => m <= GEMV_MAX_ROWS,
        LinearKernel::Gemv => true,
        LinearKernel::Gemm => false,
    };
    if gemv && !matches!(epilogue, LinearEpilogue::Store) {
        // The GEMVs store the projection; the epilogue follows as its elementwise op.
        let y = linear_windowed(
            batch,
            x,
            w,
            bias,
            kernel,
            LinearEpilogue::Store,
            max_window_bytes,
        )?;
        return match epilogue {
            LinearEpilogue::Store => Ok(y),
            LinearEpilogue::QuickGelu => quick_gelu(batch, &y),
            LinearEpilogue::Residual(r) => add(batch, r, &y),
        };
    }
    let y = batch.tensor(&out_shape, DType::F32)?;
    if m == 0 || n == 0 {
        return Ok(y);
    }

    // One row without bias (decoding op by op): the decode step's GEMV, which reads each staged
    // x vector once for four weight rows; this GEMV covers up to 8 rows of x at once.
    if kernel == LinearKernel::Auto && m == 1 && bias.is_none() && decode::gemv_supports(w, k) {
        decode::gemv_windowed(batch, x, w, None, Epilogue::Store, &y, max_window_bytes)?;
        return Ok(y);
    }
    let entry = if gemv {
        "gemv"
    } else {
        gemm_entry(batch.gpu(), k)
    };
    let key = pipeline_key(batch.gpu(), entry, w.dtype())
        .flag_if(bias.is_some(), "BIAS")
        .flag_if(matches!(epilogue, LinearEpilogue::QuickGelu), "QUICK_GELU")
        .flag_if(matches!(epilogue, LinearEpilogue::Residual(_)), "RESIDUAL");
    let (m32, n32, k32) = u32_sizes(OP, m, n, k)?;

    let align = batch.gpu().limits().min_storage_buffer_offset_alignment as u64;
    let rows_per_window = window_rows(n, k, row_bytes(w, k), align, max_window_bytes)?;
    let mut start = 0;
    while start < n {
        let count = rows_per_window.min(n - start);
        let (w_data, w_scales) = window_bindings(w, k, start, count);
        let params = Params {
            m: m32,
            n: count as u32,
            k: k32,
            y_stride: n32,
            col0: start as u32,
            ..Params::zeroed()
        };
        let mut buffers = vec![x.binding(), w_data, y.binding()];
        buffers.extend(w_scales);
        buffers.extend(bias.map(Tensor::binding));
        let workgroups = if gemv {
            batch
                .gpu()
                .grid((count as u32).div_ceil(GEMV_OUTPUTS_PER_WORKGROUP))
        } else {
            gemm_grid(batch.gpu(), OP, (count as u32).div_ceil(GEMM_TILE_N), m32)?
        };
        if let LinearEpilogue::Residual(r) = epilogue {
            // The residual has binding 6 whichever of scales and bias come before it.
            let uniform = batch.params(bytemuck::bytes_of(&params))?;
            let mut entries = vec![(0, uniform.binding())];
            entries.extend((1..).zip(buffers));
            entries.push((6, r.binding()));
            batch.dispatch_entries(&key, &entries, workgroups)?;
        } else {
            batch.dispatch(&key, bytemuck::bytes_of(&params), &buffers, workgroups)?;
        }
        start += count;
    }
    Ok(y)
}

/// `silu(x · gateᵀ) * (x · upᵀ)`, Llama's gated MLP before `down_proj`. x: `[.., K]` f32; gate
/// and up: `[N, K]` of one format. Returns `[.., N]` f32.
///
/// Where gate and up share one buffer ([`Tensor::pack`]) and x has more rows than the GEMV takes,
/// one GEMM computes both and applies the activation to its tiles (the shader's SILU variant):
/// neither projection goes through memory, and the tiles of x are read once for both. Otherwise
/// two [`linear`]s and [`silu_mul`].
pub fn linear_silu_mul(
    batch: &mut Batch,
    x: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "linear silu_mul";
    let (n, k) = check_shapes(x, gate, None)?;
    if up.dtype() != gate.dtype() || up.shape() != gate.shape() {
        return Err(shape_err(
            OP,
            format!(
                "up {:?} {:?} must match gate {:?} {:?}",
                up.dtype(),
                up.shape(),
                gate.dtype(),
                gate.shape()
            ),
        ));
    }
    let m = x.rows();
    if m <= GEMV_MAX_ROWS || !one_binding(batch.gpu(), &[gate, up]) {
        let gate = linear(batch, x, gate, None)?;
        let up = linear(batch, x, up, None)?;
        return silu_mul(batch, &gate, &up);
    }
    let (m32, n32, k32) = u32_sizes(OP, m, n, k)?;
    let y = batch.tensor(&with_last_dim(x, n), DType::F32)?;
    let ((a_data, a_scales), (b_data, b_scales)) = (words(gate), words(up));
    let params = Params {
        m: m32,
        n: n32,
        k: k32,
        y_stride: n32,
        a_data,
        a_scales,
        b_data,
        b_scales,
        ..Params::zeroed()
    };
    let whole = whole_buffer(gate);
    let mut buffers = vec![x.binding(), whole, y.binding()];
    buffers.extend(gate.dtype().is_quantized().then_some(whole));
    let key = pipeline_key(batch.gpu(), gemm_entry(batch.gpu(), k), gate.dtype()).flag("SILU");
    // A tile's 64 rows of w are 32 rows of gate and the same 32 of up.
    let grid = gemm_grid(batch.gpu(), OP, n32.div_ceil(GEMM_TILE_N / 2), m32)?;
    batch.dispatch(&key, bytemuck::bytes_of(&params), &buffers, grid)?;
    Ok(y)
}

/// `(x · qᵀ + bq, x · kᵀ + bk, x · vᵀ + bv)`, attention's input projections. x: `[.., K]` f32; q:
/// `[Nq, K]`; k and v: `[Nkv, K]`; biases (CLIP has them, Llama not) f32 `[Nq]`, `[Nkv]`, `[Nkv]`.
/// Returns `[.., Nq]`, `[.., Nkv]` and `[.., Nkv]` f32.
///
/// Where q, k and v share one buffer ([`Tensor::pack`]) and one format (or Q4 with v in Q6), the
/// biases share another, and x has more rows than the GEMV takes, one GEMM computes all three (the
/// shader's QKV variant, its output columns going to three tensors in one buffer): one dispatch
/// whose grid the small k and v also fill. Otherwise three [`linear`]s.
pub fn linear_qkv(
    batch: &mut Batch,
    x: &Tensor,
    [q, k, v]: [&Tensor; 3],
    bias: Option<[&Tensor; 3]>,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "linear qkv";
    let [bq, bk, bv] = bias.map_or([None; 3], |b| b.map(Some));
    let (q_rows, kd) = check_shapes(x, q, bq)?;
    let (kv_rows, _) = check_shapes(x, k, bk)?;
    check_shapes(x, v, bv)?;
    if v.shape() != k.shape() {
        return Err(shape_err(
            OP,
            format!("v {:?} must match k {:?}", v.shape(), k.shape()),
        ));
    }
    // One format, or Q4 with v in Q6 (what the converter's Q4 writes).
    let formats = k.dtype() == q.dtype()
        && (v.dtype() == q.dtype() || (q.dtype() == DType::Q4 && v.dtype() == DType::Q6));
    let m = x.rows();
    let packed =
        one_binding(batch.gpu(), &[q, k, v]) && bias.is_none_or(|b| one_binding(batch.gpu(), &b));
    if m <= GEMV_MAX_ROWS || !formats || !packed {
        return Ok((
            linear(batch, x, q, bq)?,
            linear(batch, x, k, bk)?,
            linear(batch, x, v, bv)?,
        ));
    }
    let n = q_rows + 2 * kv_rows;
    let (m32, n32, k32) = u32_sizes(OP, m, n, kd)?;
    // q, k and v in one buffer, each from a storage-offset boundary: the kernel stores every
    // output column without branching on where it goes.
    let align = batch.gpu().storage_align();
    let q_bytes = ((m * q_rows * 4) as u64).next_multiple_of(align);
    let kv_bytes = ((m * kv_rows * 4) as u64).next_multiple_of(align);
    let y = batch.tensor(&[((q_bytes + 2 * kv_bytes) / 4) as usize], DType::F32)?;
    let yq = y.view(0, &with_last_dim(x, q_rows));
    let yk = y.view(q_bytes, &with_last_dim(x, kv_rows));
    let yv = y.view(q_bytes + kv_bytes, &with_last_dim(x, kv_rows));
    let element = |bytes: u64| {
        u32::try_from(bytes / 4).map_err(|_| shape_err(OP, "outputs exceed u32 indexing"))
    };
    let ((a_data, a_scales), (b_data, b_scales), (v_data, v_scales)) =
        (words(q), words(k), words(v));
    let [q_bias, k_bias, v_bias] = bias.map_or([0; 3], |b| b.map(|t| words(t).0));
    let params = Params {
        m: m32,
        n: n32,
        k: k32,
        a_data,
        a_scales,
        b_data,
        b_scales,
        v_data,
        v_scales,
        q_rows: q_rows as u32,
        kv_rows: kv_rows as u32,
        k_out: element(q_bytes)?,
        v_out: element(q_bytes + kv_bytes)?,
        q_bias,
        k_bias,
        v_bias,
        ..Params::zeroed()
    };
    let whole = whole_buffer(q);
    let mut buffers = vec![x.binding(), whole, y.binding()];
    buffers.extend(q.dtype().is_quantized().then_some(whole));
    buffers.extend(bias.map(|[bq, ..]| whole_buffer(bq)));
    let key = pipeline_key(batch.gpu(), gemm_entry(batch.gpu(), kd), q.dtype())
        .flag("QKV")
        .flag_if(bias.is_some(), "BIAS")
        .flag_if(v.dtype() != q.dtype(), "V_Q6")
        .flag_if(v.dtype() != q.dtype(), "Q6_CODES");
    let grid = gemm_grid(batch.gpu(), OP, n32.div_ceil(GEMM_TILE_N), m32)?;
    batch.dispatch(&key, bytemuck::bytes_of(&params), &buffers, grid)?;
    Ok((yq, yk, yv))
}

/// Whether `tensors` share one buffer ([`Tensor::pack`]) that fits one storage binding, with
/// element indices within u32.
fn one_binding(gpu: &crate::Gpu, tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.shares_buffer(tensors[0]) && t.numel() as u64 <= u32::MAX as u64)
        && tensors[0].buffer().size() <= gpu.max_binding()
}

/// All of the buffer of `t` (a binding for tensors packed in one buffer).
pub(crate) fn whole_buffer(t: &Tensor) -> Binding<'_> {
    Binding {
        buffer: t.buffer(),
        offset: 0,
        size: t.buffer().size(),
    }
}

/// Where `t` starts in its buffer: data and scales in words.
fn words(t: &Tensor) -> (u32, u32) {
    let (data, scales) = t.offsets();
    ((data / 4) as u32, (scales / 4) as u32)
}

/// The shape of x with its last dimension `n`.
fn with_last_dim(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("x has rank >= 1") = n;
    shape
}

/// K from which `GemmTile::Auto` takes the wide tile. Below it the tile fills and stores outweigh
/// the inner loop that the wide tile speeds up: on llvmpipe the bundled model's GEMMs (K = 32 to
/// 128) ran 1.3-1.5x slower wide, while 577x256x1024 ran 1.2x faster (q4 28 vs 34 ms).
const WIDE_GEMM_MIN_K: usize = 256;

/// Whether a GEMM over rows of `k` values takes the 16x8 tile on a device with `tile`.
fn gemm_is_wide(tile: GemmTile, k: usize) -> bool {
    match tile {
        GemmTile::Narrow => false,
        GemmTile::Wide => true,
        GemmTile::Auto => k >= WIDE_GEMM_MIN_K,
    }
}

/// The GEMM entry point for rows of `k` values: `gemm_wide` or `gemm` (both cover
/// GEMM_TILE_M x GEMM_TILE_N outputs per workgroup).
fn gemm_entry(gpu: &crate::Gpu, k: usize) -> &'static str {
    if gemm_is_wide(gpu.gemm_tile(), k) {
        "gemm_wide"
    } else {
        "gemm"
    }
}

/// The kernel `entry` for weights of `dtype` (without BIAS or SILU).
fn pipeline_key(gpu: &crate::Gpu, entry: &'static str, dtype: DType) -> PipelineKey {
    PipelineKey::new(SHADER, entry)
        .flag(match dtype {
            DType::F32 => "W_F32",
            DType::F16 => "W_F16",
            DType::Q8 => "W_Q8",
            DType::Q6 => "W_Q6",
            _ => "W_Q4",
        })
        .flag_if(dtype.is_quantized(), "QUANT")
        .flag_if(matches!(dtype, DType::Q6 | DType::Q4), "NIBBLE_WORDS")
        .flag_if(dtype == DType::Q6, "Q6_CODES")
        .flag_if(dtype == DType::F16 && gpu.has_f16(), SHADER_F16)
}

/// (M, N, K) as u32, where the kernels' element indices of x, y and w stay within u32.
fn u32_sizes(op: &'static str, m: usize, n: usize, k: usize) -> Result<(u32, u32, u32)> {
    let too_big = |what: &str| shape_err(op, format!("{what} exceeds u32 indexing"));
    let m32 = u32::try_from(m).map_err(|_| too_big("rows of x"))?;
    let k32 = u32::try_from(k).map_err(|_| too_big("K"))?;
    let n32 = u32::try_from(n).map_err(|_| too_big("N"))?;
    if (m as u64) * (n as u64) > u32::MAX as u64 || (m as u64) * (k as u64) > u32::MAX as u64 {
        return Err(too_big("x or y"));
    }
    Ok((m32, n32, k32))
}

/// The GEMM grid for `col_tiles` tiles of columns and M rows of x.
fn gemm_grid(gpu: &crate::Gpu, op: &'static str, col_tiles: u32, m: u32) -> Result<[u32; 3]> {
    let grid = [col_tiles, m.div_ceil(GEMM_TILE_M), 1];
    let max = gpu.limits().max_compute_workgroups_per_dimension;
    if grid[0] > max || grid[1] > max {
        return Err(shape_err(
            op,
            format!("GEMM grid {grid:?} exceeds {max} workgroups"),
        ));
    }
    Ok(grid)
}

/// Checks dtypes and shapes; returns (N, K).
fn check_shapes(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize)> {
    const OP: &str = "linear";
    if x.dtype() != DType::F32 || x.rank() == 0 {
        return Err(shape_err(
            OP,
            format!("x must be f32 [.., K], got {:?} {:?}", x.dtype(), x.shape()),
        ));
    }
    if !matches!(
        w.dtype(),
        DType::F32 | DType::F16 | DType::Q8 | DType::Q6 | DType::Q4
    ) {
        return Err(GpuError::Unsupported {
            op: OP,
            what: format!("weights of dtype {:?}", w.dtype()),
        });
    }
    let (n, k) = w
        .dims2()
        .map_err(|_| shape_err(OP, format!("w must be [N, K], got {:?}", w.shape())))?;
    if x.last_dim() != k {
        return Err(shape_err(
            OP,
            format!(
                "x {:?} has K = {} but w {:?} has K = {k}",
                x.shape(),
                x.last_dim(),
                w.shape()
            ),
        ));
    }
    let group = w.dtype().group_size();
    if w.dtype().is_quantized() && (k % group != 0 || w.scales_binding().is_none()) {
        return Err(shape_err(
            OP,
            format!(
                "{:?} w {:?} needs K % {group} == 0 and scales",
                w.dtype(),
                w.shape()
            ),
        ));
    }
    if let Some(b) = bias
        && (b.dtype() != DType::F32 || b.shape() != [n])
    {
        return Err(shape_err(
            OP,
            format!(
                "bias must be f32 [{n}], got {:?} {:?}",
                b.dtype(),
                b.shape()
            ),
        ));
    }
    Ok((n, k))
}

/// Bytes of one weight row in the main buffer and in the scales buffer (0 unless quantized).
fn row_bytes(w: &Tensor, k: usize) -> (u64, u64) {
    let scales = if w.dtype().is_quantized() {
        (k / w.dtype().group_size()) as u64 * 2
    } else {
        0
    };
    (w.dtype().data_bytes(k), scales)
}

/// Rows per window: all of w if it fits in `max_window_bytes` (and the kernels' u32 element
/// indices), else the largest multiple of the row count whose data and scales offsets land on
/// the storage-offset alignment.
fn window_rows(
    n: usize,
    k: usize,
    (data_row, scales_row): (u64, u64),
    align: u64,
    max_window_bytes: u64,
) -> Result<usize> {
    // Element indices n * K + c (and one past) stay below 2^31 in every window.
    let max_window_bytes = max_window_bytes.min(data_row * ((1u64 << 31) / k as u64));
    if data_row * n as u64 <= max_window_bytes {
        return Ok(n);
    }
    let align = align.max(1);
    let rows_to_align = |row: u64| if row == 0 { 1 } else { align / gcd(align, row) };
    let step = lcm(rows_to_align(data_row), rows_to_align(scales_row));
    let rows = max_window_bytes / data_row / step * step;
    if rows == 0 {
        return Err(GpuError::TooLarge {
            bytes: step * data_row,
            limit: max_window_bytes,
            what: "weight row window",
        });
    }
    Ok(rows as usize)
}

/// Row windows `(start, count)` of w (`[N, K]`), each within one storage binding.
pub(crate) fn row_windows(
    gpu: &crate::Gpu,
    w: &Tensor,
    k: usize,
    max_window_bytes: u64,
) -> Result<Vec<(usize, usize)>> {
    let n = w.rows();
    let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
    let step = window_rows(n, k, row_bytes(w, k), align, max_window_bytes)?;
    Ok((0..n)
        .step_by(step.max(1))
        .map(|start| (start, step.min(n - start)))
        .collect())
}

/// Bindings of rows `start..start + count` of w (and of their quantization scales).
pub(crate) fn window_bindings(
    w: &Tensor,
    k: usize,
    start: usize,
    count: usize,
) -> (Binding<'_>, Option<Binding<'_>>) {
    let (data_row, scales_row) = row_bytes(w, k);
    let data = w.binding();
    let data = Binding {
        buffer: data.buffer,
        offset: data.offset + start as u64 * data_row,
        size: (count as u64 * data_row).max(4),
    };
    let scales = w.scales_binding().map(|s| Binding {
        buffer: s.buffer,
        offset: s.offset + start as u64 * scales_row,
        size: count as u64 * scales_row,
    });
    (data, scales)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::Gpu;
    use crate::testing::{browser_like_gpu, devices, gpu, random, weights};

    /// `x · wᵀ + bias` in f64 over row-major `x: [m, k]`, `w: [n, k]`.
    fn reference(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
                y[i * n + j] = (dot + bias.map_or(0.0, |b| b[j] as f64)) as f32;
            }
        }
        y
    }

    /// Asserts |got - want| <= 2e-5 * sqrt(K) * max(1, |want|): rounding of K f32 products of
    /// values in [-1, 1] grows like sqrt(K), while a dropped or repeated term moves a result by
    /// ~0.3 on average.
    #[track_caller]
    fn assert_matches(got: &[f32], want: &[f32], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let tol = 2e-5 * (k as f32).sqrt();
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * w.abs().max(1.0),
                "{what}: element {i}: got {g}, want {w}"
            );
        }
    }

    /// Runs `linear` on fresh random data on each of [`devices`] and compares with the CPU
    /// reference. The f16 variants read the same f16 values and multiply and add them in f32 in
    /// the same order, so they are held to the same tolerance.
    fn check(
        dtype: DType,
        lead: &[usize],
        k: usize,
        n: usize,
        with_bias: bool,
        kernel: LinearKernel,
        window: u64,
    ) {
        for gpu in devices() {
            check_on(gpu, dtype, lead, k, n, with_bias, kernel, window);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_on(
        gpu: &Gpu,
        dtype: DType,
        lead: &[usize],
        k: usize,
        n: usize,
        with_bias: bool,
        kernel: LinearKernel,
        window: u64,
    ) {
        let m: usize = lead.iter().product();
        let seed = (m * 1_000_003 + k * 1009 + n) as u64;
        let x = random(m * k, seed);
        let (tw, w) = weights(gpu, dtype, n, k, seed + 1);
        let b = random(n, seed + 2);
        let x_shape: Vec<usize> = lead.iter().copied().chain([k]).collect();
        let tx = Tensor::from_f32(gpu, &x_shape, &x).unwrap();
        let tb = Tensor::from_f32(gpu, &[n], &b).unwrap();
        let bias = with_bias.then_some(&tb);
        let mut batch = gpu.batch();
        let y = linear_windowed(
            &mut batch,
            &tx,
            &tw,
            bias,
            kernel,
            LinearEpilogue::Store,
            window,
        )
        .unwrap();
        batch.submit().unwrap();
        let mut want_shape = x_shape.clone();
        *want_shape.last_mut().unwrap() = n;
        assert_eq!(y.shape(), want_shape);
        let got = pollster::block_on(y.to_f32(gpu)).unwrap();
        let want = reference(&x, &w, with_bias.then_some(&b[..]), m, k, n);
        let what = format!(
            "{dtype:?} {lead:?}x{k}x{n} bias={with_bias} {kernel:?} window={window} f16={}",
            gpu.has_f16()
        );
        assert_matches(&got, &want, k, &what);
    }

    const KERNELS: [LinearKernel; 2] = [LinearKernel::Gemv, LinearKernel::Gemm];

    #[test]
    fn f32_weights_match_cpu_for_ragged_shapes() {
        for kernel in KERNELS {
            for (m, k, n) in [
                (1, 3, 5),
                (1, 37, 129),
                (2, 37, 7),
                (9, 64, 65),
                (65, 37, 130),
                (3, 1, 2),
            ] {
                check(DType::F32, &[m], k, n, m % 2 == 1, kernel, u64::MAX);
            }
        }
    }

    #[test]
    fn auto_kernel_handles_decode_and_prefill_sizes() {
        check(
            DType::F32,
            &[1],
            256,
            384,
            true,
            LinearKernel::Auto,
            u64::MAX,
        );
        check(
            DType::F32,
            &[300],
            256,
            384,
            true,
            LinearKernel::Auto,
            u64::MAX,
        );
        check(
            DType::F16,
            &[77],
            96,
            200,
            false,
            LinearKernel::Auto,
            u64::MAX,
        );
    }

    /// The kernels (entry point and flags) that `run` dispatched on `profiled`, a device opened
    /// with `profile`.
    fn kernels_run(profiled: &Gpu, run: impl FnOnce(&mut Batch) -> Result<Tensor>) -> Vec<String> {
        let mut batch = profiled.batch();
        let y = run(&mut batch).unwrap();
        batch.submit().unwrap();
        pollster::block_on(y.to_f32(profiled)).unwrap();
        let times = profiled
            .take_profile()
            .expect("llvmpipe has timestamp queries");
        times.into_iter().map(|t| t.kernel).collect()
    }

    /// One row of x without bias runs through the decode GEMV (four weight rows per thread), in
    /// every format and in row windows; with a bias or more rows it does not.
    #[test]
    fn one_row_without_bias_takes_the_decode_gemv() {
        for dtype in [DType::F32, DType::F16, DType::Q8, DType::Q6, DType::Q4] {
            for window in [u64::MAX, 8192] {
                check(dtype, &[1], 256, 300, false, LinearKernel::Auto, window);
            }
        }
        // Without subgroups, whose flags the names would carry where the adapter has them.
        let profiled = Gpu::with_options_blocking(crate::GpuOptions {
            profile: true,
            subgroups: false,
            ..Default::default()
        })
        .unwrap();
        let (k, n) = (256, 300);
        let (tw, _) = weights(&profiled, DType::Q4, n, k, 5);
        let tb = Tensor::from_f32(&profiled, &[n], &random(n, 6)).unwrap();
        let kernels = |m: usize, bias: Option<&Tensor>| -> Vec<String> {
            let tx = Tensor::from_f32(&profiled, &[m, k], &random(m * k, 7)).unwrap();
            kernels_run(&profiled, |batch| linear(batch, &tx, &tw, bias))
        };
        // The decode shader's variants carry the GEMV flag; matmul.wgsl's `gemv` does not.
        assert_eq!(kernels(1, None), ["gemv GEMV QUANT W_Q4"]);
        assert_eq!(kernels(1, Some(&tb)), ["gemv BIAS NIBBLE_WORDS QUANT W_Q4"]);
        assert_eq!(kernels(2, None), ["gemv NIBBLE_WORDS QUANT W_Q4"]);
    }

    /// The automatic tile: wide only where the adapter has the registers and K is long enough.
    #[test]
    fn auto_gemm_tile_goes_by_adapter_type_and_k() {
        use wgpu::DeviceType;
        for (device_type, tile) in [
            (DeviceType::Cpu, GemmTile::Auto),
            (DeviceType::DiscreteGpu, GemmTile::Auto),
            (DeviceType::IntegratedGpu, GemmTile::Narrow),
            (DeviceType::VirtualGpu, GemmTile::Narrow),
            (DeviceType::Other, GemmTile::Narrow),
        ] {
            assert_eq!(
                GemmTile::Auto.for_adapter(device_type),
                tile,
                "{device_type:?}"
            );
            for forced in [GemmTile::Narrow, GemmTile::Wide] {
                assert_eq!(forced.for_adapter(device_type), forced);
            }
        }
        assert!(!gemm_is_wide(GemmTile::Auto, 128));
        assert!(gemm_is_wide(GemmTile::Auto, 256));
        assert!(gemm_is_wide(GemmTile::Wide, 32));
        assert!(!gemm_is_wide(GemmTile::Narrow, 4096));
        // Which kernel ran, from the profiler's names, where the adapter takes `Auto` (llvmpipe).
        let profiled = Gpu::with_options_blocking(crate::GpuOptions {
            profile: true,
            ..Default::default()
        })
        .unwrap();
        if profiled.gemm_tile() != GemmTile::Auto {
            return;
        }
        for (k, entry) in [(128, "gemm"), (256, "gemm_wide")] {
            let tx = Tensor::from_f32(&profiled, &[20, k], &random(20 * k, 1)).unwrap();
            let (tw, _) = weights(&profiled, DType::F32, 16, k, 2);
            let names = kernels_run(&profiled, |batch| {
                linear_with(batch, &tx, &tw, None, LinearKernel::Gemm)
            });
            assert_eq!(names, [format!("{entry} W_F32")], "K = {k}");
        }
    }

    /// Guards the tests above: where the adapter offers shader-f16 they ran both paths, and on
    /// llvmpipe (a CPU adapter) both GEMM tiles.
    #[test]
    fn f16_option_decides_the_device_feature_and_the_variants() {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        };
        let adapter = pollster::block_on(instance.request_adapter(&options)).unwrap();
        let offered = adapter.features().contains(wgpu::Features::SHADER_F16);
        assert_eq!(
            gpu().has_f16(),
            offered && std::env::var("LLAVA_NO_F16").as_deref() != Ok("1")
        );
        // The shared device runs every GEMM on the wide tile, the browser-like one on the 8x8.
        assert_eq!(gpu().gemm_tile(), GemmTile::Wide);
        let plain = browser_like_gpu();
        assert_eq!(plain.gemm_tile(), GemmTile::Narrow);
        assert!(!plain.has_f16());
        assert!(
            !plain
                .device()
                .features()
                .contains(wgpu::Features::SHADER_F16)
        );
        // The f16 variant is refused with an error on a device without the feature.
        let key = PipelineKey::new(SHADER, "gemv")
            .flag("W_F16")
            .flag(SHADER_F16);
        assert!(matches!(
            plain.pipeline(&key),
            Err(GpuError::Unsupported { .. })
        ));
    }

    #[test]
    fn f16_weights_match_cpu_including_odd_k() {
        for kernel in KERNELS {
            for (m, k, n) in [
                (1, 3, 5),
                (1, 37, 33),
                (4, 37, 66),
                (17, 3, 9),
                (70, 40, 70),
            ] {
                check(DType::F16, &[m], k, n, true, kernel, u64::MAX);
            }
        }
    }

    #[test]
    fn quantized_weights_match_dequantized_cpu() {
        for dtype in [DType::Q8, DType::Q6, DType::Q4] {
            // K in whole groups: one, three, two and five of them; M past one GEMM tile (128).
            let g = dtype.group_size();
            for kernel in KERNELS {
                for (m, k, n) in [
                    (1, g, 3),
                    (1, 3 * g, 67),
                    (3, 2 * g, 5),
                    (66, 5 * g, 70),
                    (150, 2 * g, 70),
                ] {
                    check(dtype, &[m], k, n, m != 3, kernel, u64::MAX);
                }
            }
        }
    }

    /// Every Q8, Q6 and Q4 code dequantizes to exactly its value in each kernel (the shaders
    /// make floats of codes by their bits, and Q4's code book by a rounded polynomial): row r of
    /// w holds code r in all 64 places with scale 1, so with x all ones each output of row r is
    /// 64 times the code's value, exactly.
    #[test]
    fn every_code_is_exact_in_every_kernel() {
        use crate::quant::{QuantMatrix, dequantize};
        let k = 64;
        // Row r holds code r in every place, with scale 1: Q8's bytes, Q6's low nibbles and
        // high bit pairs, Q4's nibbles.
        let matrix = |dtype: DType, codes: usize, row: &dyn Fn(u8) -> Vec<u8>| QuantMatrix {
            dtype,
            rows: codes,
            cols: k,
            data: (0..codes).flat_map(|r| row(r as u8)).collect(),
            scales: vec![f16::ONE; codes * k / dtype.group_size()],
        };
        let matrices = [
            matrix(DType::Q8, 256, &|r| vec![r; k]),
            matrix(DType::Q6, 64, &|r| {
                let (lo, hi) = (r & 15, r >> 4);
                [vec![lo | lo << 4; k / 2], vec![hi * 0x55; k / 4]].concat()
            }),
            matrix(DType::Q4, 16, &|r| vec![r | r << 4; k / 2]),
        ];
        for q in &matrices {
            // The CPU's values, summed over the row (exact: integers below 2^24).
            let values = dequantize(q);
            let row: Vec<f32> = values.chunks(k).map(|r| r.iter().sum()).collect();
            assert_eq!(row.len(), q.rows);
            for gpu in devices() {
                let tw = Tensor::from_quant(gpu, q).unwrap();
                // One row through the decode GEMV (Auto), one and three through the others.
                for (m, kernel) in [
                    (1, LinearKernel::Auto),
                    (1, LinearKernel::Gemv),
                    (3, LinearKernel::Gemv),
                    (1, LinearKernel::Gemm),
                    (3, LinearKernel::Gemm),
                ] {
                    let tx = Tensor::from_f32(gpu, &[m, k], &vec![1.0; m * k]).unwrap();
                    let mut batch = gpu.batch();
                    let y = linear_with(&mut batch, &tx, &tw, None, kernel).unwrap();
                    batch.submit().unwrap();
                    let got = pollster::block_on(y.to_f32(gpu)).unwrap();
                    assert_eq!(
                        got,
                        row.repeat(m),
                        "{:?}, {m} rows, {kernel:?}, f16={}",
                        q.dtype,
                        gpu.has_f16()
                    );
                }
            }
        }
    }

    #[test]
    fn leading_dimensions_are_flattened() {
        for kernel in KERNELS {
            check(DType::F32, &[2, 3], 37, 11, true, kernel, u64::MAX);
            check(DType::Q4, &[2, 3], 64, 11, false, kernel, u64::MAX);
        }
    }

    #[test]
    fn windowed_weights_match_unwindowed_reference() {
        for kernel in KERNELS {
            // f32 K = 64: 256-byte rows, windows of 3 rows -> 3 + 3 + 3 + 1.
            check(DType::F32, &[5], 64, 10, true, kernel, 3 * 256);
            // f16 odd K = 37: 74-byte rows align every 128 rows -> 128 + 128 + 44.
            check(DType::F16, &[3], 37, 300, true, kernel, 128 * 74);
            // Q8 K = 64: the 4-byte scale rows align every 64 rows -> 64 + 64 + 22.
            check(DType::Q8, &[2], 64, 150, true, kernel, 64 * 64);
            // Q6 K = 128: 96-byte rows (8-row step), 4-byte scale rows (64-row step) -> 64 + 64 + 22.
            check(DType::Q6, &[4], 128, 150, true, kernel, 64 * 96 + 100);
            // Q4 K = 256: 128-byte rows, 8-byte scale rows -> windows of 32 rows.
            check(DType::Q4, &[70], 256, 100, false, kernel, 32 * 128 + 100);
        }
    }

    #[test]
    fn window_size_follows_offset_alignment_and_index_range() {
        // f16 K = 37: 74-byte rows land on 256 bytes every 128 rows.
        let f16_rows = (74, 0);
        assert_eq!(window_rows(300, 37, f16_rows, 256, u64::MAX).unwrap(), 300);
        assert_eq!(
            window_rows(300, 37, f16_rows, 256, 2 * 128 * 74 + 73).unwrap(),
            256
        );
        assert!(matches!(
            window_rows(300, 37, f16_rows, 256, 127 * 74),
            Err(GpuError::TooLarge { .. })
        ));
        // Q8 K = 64: the 4-byte scale rows, not the 64-byte value rows, set the step of 64.
        assert_eq!(window_rows(1000, 64, (64, 4), 256, 100 * 64).unwrap(), 64);
        // Q4 K = 4096 fits any binding here, but element indices must stay below 2^31.
        assert_eq!(
            window_rows(1 << 20, 4096, (2048, 128), 256, u64::MAX).unwrap(),
            1 << 19
        );
    }

    /// `silu(x · gateᵀ) * (x · upᵀ)` in f64 over row-major `x: [m, k]`, `gate`/`up`: `[n, k]`.
    fn silu_mul_reference(
        x: &[f32],
        gate: &[f32],
        up: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let g = reference(x, gate, None, m, k, n);
        let u = reference(x, up, None, m, k, n);
        g.iter()
            .zip(&u)
            .map(|(&g, &u)| (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32)
            .collect()
    }

    /// Packed gate and up with more rows than the GEMV takes run as one GEMM (one dispatch, no
    /// projection written); unpacked ones and few rows take two linears and silu_mul (three). Both
    /// match the CPU, in every format, with N not a multiple of the tile's 32 gate rows and odd K.
    #[test]
    fn gate_and_up_in_one_gemm_match_silu_of_both() {
        for dtype in [DType::F32, DType::F16, DType::Q8, DType::Q6, DType::Q4] {
            let k = if dtype.is_quantized() {
                2 * dtype.group_size()
            } else {
                37
            };
            for gpu in devices() {
                for (m, n, pack, dispatches) in [
                    (150, 70, true, 1),
                    (9, 33, true, 1),
                    (150, 70, false, 3),
                    (8, 70, true, 3),
                ] {
                    let seed = (m * 7919 + n * 31 + k) as u64;
                    let x = random(m * k, seed);
                    let (tg, g) = weights(gpu, dtype, n, k, seed + 1);
                    let (tu, u) = weights(gpu, dtype, n, k, seed + 2);
                    let (tg, tu) = if pack {
                        let mut pair = Tensor::pack(gpu, &[&tg, &tu]).unwrap();
                        let tu = pair.pop().unwrap();
                        (pair.pop().unwrap(), tu)
                    } else {
                        (tg, tu)
                    };
                    let tx = Tensor::from_f32(gpu, &[m, k], &x).unwrap();
                    let mut plan = gpu.plan();
                    let y = linear_silu_mul(&mut plan, &tx, &tg, &tu).unwrap();
                    let plan = plan.into_plan().unwrap();
                    let what = format!("{dtype:?} {m}x{k}x{n} packed={pack} f16={}", gpu.has_f16());
                    assert_eq!(plan.dispatches(), dispatches, "{what}: dispatches");
                    let mut batch = gpu.batch();
                    batch.run(&plan).unwrap();
                    batch.submit().unwrap();
                    assert_eq!(y.shape(), [m, n]);
                    let got = pollster::block_on(y.to_f32(gpu)).unwrap();
                    assert_matches(&got, &silu_mul_reference(&x, &g, &u, m, k, n), k, &what);
                }
            }
        }
    }

    /// Packed q, k and v (and packed biases) with more rows than the GEMV takes run as one GEMM
    /// (one dispatch); unpacked ones and few rows take three linears. All match the CPU in every
    /// format, with q and k/v boundaries inside a 64-column tile and odd K.
    #[test]
    fn q_k_and_v_in_one_gemm_match_three_linears() {
        for dtype in [DType::F32, DType::F16, DType::Q8, DType::Q6, DType::Q4] {
            let k = if dtype.is_quantized() {
                2 * dtype.group_size()
            } else {
                37
            };
            for gpu in devices() {
                // Q4 also with v in Q6 (the converter's Q4), and F16 with v in F32 (no fused kernel).
                let v_dtype = match dtype {
                    DType::Q4 => DType::Q6,
                    DType::F16 => DType::F32,
                    d => d,
                };
                // Biases: none, packed in one buffer, or apart.
                for (m, q_rows, kv_rows, pack, v_dtype, bias, dispatches) in [
                    (150, 48, 24, true, dtype, None, 1),
                    (9, 64, 64, true, dtype, None, 1),
                    (150, 48, 24, false, dtype, None, 3),
                    (8, 48, 24, true, dtype, None, 3),
                    (
                        150,
                        48,
                        24,
                        true,
                        v_dtype,
                        None,
                        if dtype == DType::F16 { 3 } else { 1 },
                    ),
                    (
                        150,
                        48,
                        24,
                        true,
                        v_dtype,
                        Some(true),
                        if dtype == DType::F16 { 3 } else { 1 },
                    ),
                    (9, 64, 64, true, dtype, Some(false), 3),
                ] {
                    let seed = (m * 7919 + q_rows * 31 + kv_rows + k) as u64;
                    let x = random(m * k, seed);
                    let (tq, q) = weights(gpu, dtype, q_rows, k, seed + 1);
                    let (tk, kw) = weights(gpu, dtype, kv_rows, k, seed + 2);
                    let (tv, v) = weights(gpu, v_dtype, kv_rows, k, seed + 3);
                    let (tq, tk, tv) = if pack {
                        let mut all = Tensor::pack(gpu, &[&tq, &tk, &tv]).unwrap();
                        let tv = all.pop().unwrap();
                        let tk = all.pop().unwrap();
                        (all.pop().unwrap(), tk, tv)
                    } else {
                        (tq, tk, tv)
                    };
                    let biases =
                        [(q_rows, 4), (kv_rows, 5), (kv_rows, 6)].map(|(n, s)| random(n, seed + s));
                    let tb = biases
                        .each_ref()
                        .map(|b| Tensor::from_f32(gpu, &[b.len()], b).unwrap());
                    let tb = match bias {
                        Some(true) => Tensor::pack(gpu, &tb.each_ref())
                            .unwrap()
                            .try_into()
                            .unwrap(),
                        _ => tb,
                    };
                    let tx = Tensor::from_f32(gpu, &[m, k], &x).unwrap();
                    let mut plan = gpu.plan();
                    let (yq, yk, yv) =
                        linear_qkv(&mut plan, &tx, [&tq, &tk, &tv], bias.map(|_| tb.each_ref()))
                            .unwrap();
                    let plan = plan.into_plan().unwrap();
                    let what = format!(
                        "{dtype:?} (v {v_dtype:?}) {m}x{k} q {q_rows} kv {kv_rows} packed={pack} bias packed={bias:?} f16={}",
                        gpu.has_f16()
                    );
                    assert_eq!(plan.dispatches(), dispatches, "{what}: dispatches");
                    let mut batch = gpu.batch();
                    batch.run(&plan).unwrap();
                    batch.submit().unwrap();
                    for ((y, w, n, name), b) in [
                        (yq, &q, q_rows, "q"),
                        (yk, &kw, kv_rows, "k"),
                        (yv, &v, kv_rows, "v"),
                    ]
                    .into_iter()
                    .zip(&biases)
                    {
                        assert_eq!(y.shape(), [m, n]);
                        let got = pollster::block_on(y.to_f32(gpu)).unwrap();
                        assert_matches(
                            &got,
                            &reference(&x, w, bias.map(|_| &b[..]), m, k, n),
                            k,
                            &format!("{what} {name}"),
                        );
                    }
                }
            }
        }
    }

    /// QUICK_GELU and RESIDUAL: with more rows than the GEMV takes the GEMM applies them as it
    /// stores (one dispatch per row window), with fewer an elementwise op follows the GEMV (two);
    /// every format, with and without bias, in row windows, against the f64 CPU.
    #[test]
    fn gemm_epilogues_match_the_projection_then_the_op() {
        for dtype in [DType::F32, DType::F16, DType::Q8, DType::Q6, DType::Q4] {
            let k = if dtype.is_quantized() {
                2 * dtype.group_size()
            } else {
                37
            };
            let n = 150;
            // Windows of 128 rows (a multiple of every format's alignment step here): 128 + 22.
            let window = 128 * row_bytes(&weights(gpu(), dtype, 1, k, 0).0, k).0;
            for gpu in devices() {
                for (m, with_bias, max_window, dispatches) in [
                    (150, true, u64::MAX, 1),
                    (150, false, u64::MAX, 1),
                    (9, true, window, 2),
                    (5, true, u64::MAX, 2),
                ] {
                    let seed = (m * 7919 + n * 31 + k) as u64;
                    let x = random(m * k, seed);
                    let (tw, w) = weights(gpu, dtype, n, k, seed + 1);
                    let b = random(n, seed + 2);
                    let r = random(m * n, seed + 3);
                    let tx = Tensor::from_f32(gpu, &[m, k], &x).unwrap();
                    let tb = Tensor::from_f32(gpu, &[n], &b).unwrap();
                    let tr = Tensor::from_f32(gpu, &[m, n], &r).unwrap();
                    let bias = with_bias.then_some(&tb);
                    let projection = reference(&x, &w, with_bias.then_some(&b[..]), m, k, n);
                    let quick_gelu = |v: f32| (v as f64 / (1.0 + (-1.702 * v as f64).exp())) as f32;
                    let cases = [
                        (
                            LinearEpilogue::QuickGelu,
                            projection
                                .iter()
                                .map(|&v| quick_gelu(v))
                                .collect::<Vec<_>>(),
                        ),
                        (
                            LinearEpilogue::Residual(&tr),
                            projection.iter().zip(&r).map(|(p, r)| p + r).collect(),
                        ),
                    ];
                    for (epilogue, want) in cases {
                        let what = format!(
                            "{dtype:?} {m}x{k}x{n} bias={with_bias} {epilogue:?} window={max_window} f16={}",
                            gpu.has_f16()
                        );
                        let mut plan = gpu.plan();
                        let y = linear_windowed(
                            &mut plan,
                            &tx,
                            &tw,
                            bias,
                            LinearKernel::Auto,
                            epilogue,
                            max_window,
                        )
                        .unwrap();
                        let plan = plan.into_plan().unwrap();
                        assert_eq!(plan.dispatches(), dispatches, "{what}: dispatches");
                        let mut batch = gpu.batch();
                        batch.run(&plan).unwrap();
                        batch.submit().unwrap();
                        assert_eq!(y.shape(), [m, n]);
                        let got = pollster::block_on(y.to_f32(gpu)).unwrap();
                        assert_matches(&got, &want, k, &what);
                    }
                }
            }
        }
        // The residual must have the output's shape.
        let gpu = gpu();
        let x = Tensor::from_f32(gpu, &[9, 4], &random(36, 1)).unwrap();
        let w = Tensor::from_f32(gpu, &[3, 4], &random(12, 2)).unwrap();
        let r = Tensor::from_f32(gpu, &[9, 4], &random(36, 3)).unwrap();
        let mut batch = gpu.batch();
        let err = linear_residual(&mut batch, &x, &w, None, &r).unwrap_err();
        assert!(
            err.to_string().contains("residual must be f32 [9, 3]"),
            "{err}"
        );
    }

    #[test]
    fn fused_projections_must_match() {
        let gpu = gpu();
        let x = Tensor::from_f32(gpu, &[9, 4], &random(36, 1)).unwrap();
        let gate = Tensor::from_f32(gpu, &[3, 4], &random(12, 2)).unwrap();
        let up = Tensor::from_f32(gpu, &[2, 4], &random(8, 3)).unwrap();
        let up_f16 = Tensor::from_f16(gpu, &[3, 4], &[half::f16::ONE; 12]).unwrap();
        let mut batch = gpu.batch();
        for up in [&up, &up_f16] {
            let err = linear_silu_mul(&mut batch, &x, &gate, up).unwrap_err();
            assert!(
                matches!(
                    err,
                    GpuError::Shape {
                        op: "linear silu_mul",
                        ..
                    }
                ),
                "{err}"
            );
        }
        // k and v of different shapes.
        let v3 = Tensor::from_f32(gpu, &[3, 4], &random(12, 4)).unwrap();
        let err = linear_qkv(&mut batch, &x, [&gate, &up, &v3], None).unwrap_err();
        assert!(
            matches!(
                err,
                GpuError::Shape {
                    op: "linear qkv",
                    ..
                }
            ),
            "{err}"
        );
        batch.submit().unwrap();
    }

    /// Every variant passes naga's front end and validator (what wgpu runs natively; browsers run
    /// their own, stricter, compilers on the same text).
    #[test]
    fn every_variant_validates() {
        for weights in ["W_F32", "W_F16", "W_Q8", "W_Q6", "W_Q4"] {
            for with_bias in [false, true] {
                for f16 in [false, weights == "W_F16"] {
                    let mut flags = vec![weights];
                    flags.extend(
                        ["W_Q8", "W_Q6", "W_Q4"]
                            .contains(&weights)
                            .then_some("QUANT"),
                    );
                    flags.extend(
                        ["W_Q6", "W_Q4"]
                            .contains(&weights)
                            .then_some("NIBBLE_WORDS"),
                    );
                    flags.extend((weights == "W_Q6").then_some("Q6_CODES"));
                    flags.extend(with_bias.then_some("BIAS"));
                    flags.extend(f16.then_some(SHADER_F16));
                    let source = crate::registry::preprocess(SHADER.source, &flags).unwrap();
                    let module = naga::front::wgsl::parse_str(&source)
                        .unwrap_or_else(|e| panic!("{flags:?}: {}", e.emit_to_string(&source)));
                    // unpack2x16float needs this capability in naga; every WebGPU device has it.
                    // `f16` values need SHADER_FLOAT16 (the shader-f16 feature).
                    let mut caps = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
                    caps.set(naga::valid::Capabilities::SHADER_FLOAT16, f16);
                    naga::valid::Validator::new(Default::default(), caps)
                        .validate(&module)
                        .unwrap_or_else(|e| panic!("{flags:?}: {}", e.emit_to_string(&source)));
                }
            }
        }
    }

    #[test]
    fn rejects_bad_shapes_and_dtypes() {
        let gpu = gpu();
        let x = Tensor::from_f32(gpu, &[2, 4], &random(8, 1)).unwrap();
        let w = Tensor::from_f32(gpu, &[3, 4], &random(12, 2)).unwrap();
        let w_k5 = Tensor::from_f32(gpu, &[3, 5], &random(15, 3)).unwrap();
        let w_3d = Tensor::from_f32(gpu, &[1, 3, 4], &random(12, 2)).unwrap();
        let w_u32 = Tensor::from_u32(gpu, &[3, 4], &[0; 12]).unwrap();
        let b2 = Tensor::from_f32(gpu, &[2], &[0.0; 2]).unwrap();
        let b3_f16 = Tensor::from_f16(gpu, &[3], &[f16::ZERO; 3]).unwrap();
        let x_f16 = Tensor::from_f16(gpu, &[2, 4], &[f16::ZERO; 8]).unwrap();
        let mut batch = gpu.batch();
        let is_shape = |r: Result<Tensor>| matches!(r, Err(GpuError::Shape { op: "linear", .. }));
        assert!(is_shape(linear(&mut batch, &x, &w_k5, None)));
        assert!(is_shape(linear(&mut batch, &x, &w_3d, None)));
        assert!(is_shape(linear(&mut batch, &x, &w, Some(&b2))));
        assert!(is_shape(linear(&mut batch, &x, &w, Some(&b3_f16))));
        assert!(is_shape(linear(&mut batch, &x_f16, &w, None)));
        assert!(matches!(
            linear(&mut batch, &x, &w_u32, None),
            Err(GpuError::Unsupported { .. })
        ));
        batch.submit().unwrap();
    }
}
