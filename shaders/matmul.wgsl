// Linear layers: y = x · wᵀ (+ bias). x: [M, K] f32, w: [N, K] (PyTorch Linear layout), y: [M, .] f32.
// variants: W_F32 | W_F32 BIAS | W_F16 | W_F16 BIAS | W_Q8 QUANT | W_Q8 QUANT BIAS | W_Q6 Q6_CODES QUANT NIBBLE_WORDS | W_Q6 Q6_CODES QUANT NIBBLE_WORDS BIAS | W_Q4 QUANT NIBBLE_WORDS | W_Q4 QUANT NIBBLE_WORDS BIAS | W_F16 SHADER_F16 | W_F16 SHADER_F16 BIAS | W_F32 SILU | W_F16 SILU | W_F16 SHADER_F16 SILU | W_Q8 QUANT SILU | W_Q6 Q6_CODES QUANT NIBBLE_WORDS SILU | W_Q4 QUANT NIBBLE_WORDS SILU | W_F32 QKV | W_F16 QKV | W_F16 SHADER_F16 QKV | W_Q8 QUANT QKV | W_Q6 Q6_CODES QUANT NIBBLE_WORDS QKV | W_Q4 QUANT NIBBLE_WORDS QKV | W_Q4 QUANT NIBBLE_WORDS QKV V_Q6 Q6_CODES | W_F32 QKV BIAS | W_F16 QKV BIAS | W_F16 SHADER_F16 QKV BIAS | W_Q8 QUANT QKV BIAS | W_Q6 Q6_CODES QUANT NIBBLE_WORDS QKV BIAS | W_Q4 QUANT NIBBLE_WORDS QKV BIAS | W_Q4 QUANT NIBBLE_WORDS QKV V_Q6 Q6_CODES BIAS | W_F32 QUICK_GELU | W_F32 QUICK_GELU BIAS | W_F16 QUICK_GELU | W_F16 QUICK_GELU BIAS | W_F16 SHADER_F16 QUICK_GELU | W_F16 SHADER_F16 QUICK_GELU BIAS | W_Q8 QUANT QUICK_GELU | W_Q8 QUANT QUICK_GELU BIAS | W_Q6 Q6_CODES QUANT NIBBLE_WORDS QUICK_GELU | W_Q6 Q6_CODES QUANT NIBBLE_WORDS QUICK_GELU BIAS | W_Q4 QUANT NIBBLE_WORDS QUICK_GELU | W_Q4 QUANT NIBBLE_WORDS QUICK_GELU BIAS | W_F32 RESIDUAL | W_F32 RESIDUAL BIAS | W_F16 RESIDUAL | W_F16 RESIDUAL BIAS | W_F16 SHADER_F16 RESIDUAL | W_F16 SHADER_F16 RESIDUAL BIAS | W_Q8 QUANT RESIDUAL | W_Q8 QUANT RESIDUAL BIAS | W_Q6 Q6_CODES QUANT NIBBLE_WORDS RESIDUAL | W_Q6 Q6_CODES QUANT NIBBLE_WORDS RESIDUAL BIAS | W_Q4 QUANT NIBBLE_WORDS RESIDUAL | W_Q4 QUANT NIBBLE_WORDS RESIDUAL BIAS
//
// Flags: exactly one of W_F32 / W_F16 / W_Q8 / W_Q6 / W_Q4 picks the weight layout (see tensor.rs
// and quant.rs); QUANT is set with W_Q8 / W_Q6 / W_Q4 (adds the f16 scales buffer), NIBBLE_WORDS
// with W_Q6 / W_Q4 (the GEMV reads eight values per word of nibbles); BIAS adds the bias.
// SHADER_F16 (with W_F16; devices with shader-f16; registry.rs adds `enable f16;`) reads the
// weights as vec2<f16> and keeps the GEMM's weight tile in f16. Products and sums stay f32: x is
// f32, and rounding it to f16 alone would move a dot product by ~2e-4 of its size.
// `w` may be a window of rows of a larger weight: output column j of this dispatch is written to
// column `col0 + j` of y (row stride `y_stride`), with bias `bias[col0 + j]`.
// SILU (gemm only, no BIAS): `w` and `scales` are one buffer holding Llama's gate and up
// projections (N rows each, from the words in Params), and y = silu(x · gateᵀ) * (x · upᵀ).
// QKV (gemm only): `w` and `scales` are one buffer holding q, k and v of one format (or
// v in Q6 under W_Q4 with V_Q6), N is q_rows + 2 kv_rows, and output columns go to q, k and v,
// each [M, rows], in y from 0, k_out and v_out. Q6_CODES (with W_Q6 or V_Q6) adds the Q6 decoder.
// With BIAS, `bias` holds the biases of q, k and v from q_bias, k_bias and v_bias.
// QUICK_GELU (gemm only): y = quick_gelu(x · wᵀ + bias), CLIP's MLP activation.
// RESIDUAL (gemm only): y = residual + (x · wᵀ + bias), a residual connection; `residual` is laid
// out as y.
//
// Entry points: `gemv` (few rows of x: one workgroup reduces 4 outputs, 64 lanes each) and
// `gemm` / `gemm_wide` (128x64 output tiles through workgroup memory, 8x8 or 16x8 outputs per
// thread).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    y_stride: u32,
    col0: u32,
    // SILU and QKV: where the matrices start in the bound buffer, data and scales in words:
    // gate (a) and up (b), or q (a), k (b) and v.
    a_data: u32,
    a_scales: u32,
    b_data: u32,
    b_scales: u32,
    v_data: u32,
    v_scales: u32,
    // QKV: rows of q and of k (and of v), and where k and v start in y.
    q_rows: u32,
    kv_rows: u32,
    k_out: u32,
    v_out: u32,
    // QKV with BIAS: where the biases of q, k and v start in `bias`.
    q_bias: u32,
    k_bias: u32,
    v_bias: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
#if W_F32
@group(0) @binding(2) var<storage, read> w: array<f32>;
#endif
#if W_F16
#if SHADER_F16
@group(0) @binding(2) var<storage, read> w: array<vec2<f16>>;
#else
@group(0) @binding(2) var<storage, read> w: array<u32>;
#endif
#endif
#if QUANT
@group(0) @binding(2) var<storage, read> w: array<u32>;
#endif
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
#if QUANT
@group(0) @binding(4) var<storage, read> scales: array<u32>;
#if BIAS
@group(0) @binding(5) var<storage, read> bias: array<f32>;
#endif
#else
#if BIAS
@group(0) @binding(4) var<storage, read> bias: array<f32>;
#endif
#endif
#if RESIDUAL
@group(0) @binding(6) var<storage, read> residual: array<f32>;
#endif

fn bias_at(col: u32) -> f32 {
#if BIAS
    return bias[col];
#else
    return 0.0;
#endif
}

#if W_Q8
const GROUP: u32 = 32u;
#endif
#if W_Q6
const GROUP: u32 = 64u;
#endif
#if W_Q4
const GROUP: u32 = 64u;
#endif

#if QUANT
// f16 scale of the quantization group of element e of the matrix whose scales start at word
// `scales0` (two per word, even index in the low half).
fn scale_at(scales0: u32, e: u32) -> f32 {
    let g = e / GROUP;
    let pair = unpack2x16float(scales[scales0 + g / 2u]);
    return select(pair.x, pair.y, (g & 1u) == 1u);
}
#endif

#if W_Q8
// The four signed bytes of a word.
fn q8_values(word: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>(
        bitcast<i32>(word << 24u),
        bitcast<i32>(word << 16u),
        bitcast<i32>(word << 8u),
        bitcast<i32>(word),
    ) >> vec4<u32>(24u));
}
#endif

#if W_Q4
// quant.rs Q4_VALUES for four codes n (< 16) by a polynomial, rounded: see decode.wgsl's q4_values
// (the same function; shaders have no includes).
fn q4_values(n: vec4<u32>) -> vec4<f32> {
    let t = bitcast<vec4<f32>>(n | vec4<u32>(0x4b000000u)) - 8388608.0;
    let p = fma(fma(fma(fma(vec4<f32>(0.0015860428), t, vec4<f32>(0.03108644)), t, vec4<f32>(-1.371927)), t, vec4<f32>(24.17383)), t, vec4<f32>(-126.56701));
    return round(p);
}

// Values 8 c8 .. 8 c8 + 7 of row n of the matrix starting at word `data0`, unscaled.
fn eight_values(data0: u32, n: u32, c8: u32) -> mat2x4<f32> {
    let word = vec4<u32>(w[data0 + n * p.k / 8u + c8]);
    return mat2x4<f32>(q4_values((word >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)),
                       q4_values((word >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u)));
}
#endif

#if Q6_CODES
// Q6 rows of K values: K / 8 words of low nibbles, then K / 16 words of high bit pairs.
fn q6_row_words() -> u32 {
    return 3u * p.k / 16u;
}

// Values 8 c8 .. 8 c8 + 7 of row n of the matrix starting at word `data0`, unscaled.
fn q6_eight_values(data0: u32, n: u32, c8: u32) -> mat2x4<f32> {
    let row = data0 + n * q6_row_words();
    let word = vec4<u32>(w[row + c8]);
    let high = vec4<u32>(w[row + p.k / 8u + c8 / 2u] >> (16u * (c8 & 1u)));
    let lo = ((word >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u))
        | (((high >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u)) << vec4<u32>(4u));
    let hi = ((word >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u))
        | (((high >> vec4<u32>(8u, 10u, 12u, 14u)) & vec4<u32>(3u)) << vec4<u32>(4u));
    // Floats by their bits, as q4_values' codes: 2^23 + code, less 2^23 + 32 (see decode.wgsl).
    return mat2x4<f32>(bitcast<vec4<f32>>(lo | vec4<u32>(0x4b000000u)) - 8388640.0,
                       bitcast<vec4<f32>>(hi | vec4<u32>(0x4b000000u)) - 8388640.0);
}
#endif

#if W_Q6
fn eight_values(data0: u32, n: u32, c8: u32) -> mat2x4<f32> {
    return q6_eight_values(data0, n, c8);
}
#endif

#if !QUANT
// Element (n, c) of the F32 or F16 matrix starting at word `data0`, as f32 (the GEMM dequantizes
// Q8/Q6/Q4 a word at a time, load_w_tile).
fn w_at(data0: u32, n: u32, c: u32) -> f32 {
    let e = n * p.k + c;
#if W_F32
    return w[data0 + e];
#endif
#if W_F16
#if SHADER_F16
    let pair = w[data0 + e / 2u];
    return f32(select(pair.x, pair.y, (e & 1u) == 1u));
#else
    let pair = unpack2x16float(w[data0 + e / 2u]);
    return select(pair.x, pair.y, (e & 1u) == 1u);
#endif
#endif
}
#endif

// Four consecutive values of row m of x from column c.
fn x4(m: u32, c: u32) -> vec4<f32> {
    let b = m * p.k + c;
    return vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]);
}

// ---------------------------------------------------------------------------------------------
// GEMV: 256 threads = GEMV_OUTS outputs x GEMV_LANES lanes. Each lane walks its row of w with
// stride GEMV_LANES, once per row of x for up to GEMV_M rows (the weights come from memory once
// and from cache for the other rows), then the lanes reduce through workgroup memory.

const GEMV_LANES: u32 = 64u;
const GEMV_OUTS: u32 = 4u;
const GEMV_M: u32 = 8u;
const GEMV_THREADS: u32 = 256u;

var<workgroup> partial: array<f32, 2048>; // GEMV_M * GEMV_THREADS

@compute @workgroup_size(256)
fn gemv(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lane = lid % GEMV_LANES;
    let j = (wg.x + wg.y * nwg.x) * GEMV_OUTS + lid / GEMV_LANES;
    let in_range = j < p.n;
    let jk = j * p.k;
    for (var m0 = 0u; m0 < p.m; m0 += GEMV_M) {
        let rows = min(GEMV_M, p.m - m0);
        // One row of x at a time, its sum in a scalar: an array of sums indexed by the row would
        // go to local memory (NVIDIA Vulkan). The weights of this workgroup's outputs stay in
        // cache across the rows.
        for (var i = 0u; i < rows; i++) {
            let xrow = (m0 + i) * p.k;
            var acc = 0.0;
            if (in_range) {
#if W_F32
                for (var c = lane; c < p.k; c += GEMV_LANES) {
                    acc += w[jk + c] * x[xrow + c];
                }
#endif
#if W_F16
                // Rows of odd K start or end mid-word: skip the halves that belong to the neighbours.
                let last = (jk + p.k - 1u) / 2u;
                for (var wi = jk / 2u + lane; wi <= last; wi += GEMV_LANES) {
#if SHADER_F16
                    let pair = vec2<f32>(w[wi]);
#else
                    let pair = unpack2x16float(w[wi]);
#endif
                    let e = 2u * wi;
                    if (e >= jk) {
                        acc += pair.x * x[xrow + e - jk];
                    }
                    if (e + 1u < jk + p.k) {
                        acc += pair.y * x[xrow + e + 1u - jk];
                    }
                }
#endif
#if W_Q8
                // K % 32 == 0, so rows start on a word and a word never straddles a group.
                for (var c4 = lane; c4 < p.k / 4u; c4 += GEMV_LANES) {
                    let word = w[jk / 4u + c4];
                    acc += scale_at(0u, jk + 4u * c4) * dot(q8_values(word), x4(m0 + i, 4u * c4));
                }
#endif
#if NIBBLE_WORDS
                for (var c8 = lane; c8 < p.k / 8u; c8 += GEMV_LANES) {
                    let v = eight_values(0u, j, c8);
                    acc += scale_at(0u, jk + 8u * c8) * (dot(v[0], x4(m0 + i, 8u * c8)) + dot(v[1], x4(m0 + i, 8u * c8 + 4u)));
                }
#endif
            }
            partial[i * GEMV_THREADS + lid] = acc;
        }
        workgroupBarrier();
        for (var stride = GEMV_LANES / 2u; stride > 0u; stride /= 2u) {
            if (lane < stride) {
                for (var i = 0u; i < rows; i++) {
                    partial[i * GEMV_THREADS + lid] += partial[i * GEMV_THREADS + lid + stride];
                }
            }
            workgroupBarrier();
        }
        if (in_range && lane == 0u) {
            for (var i = 0u; i < rows; i++) {
                y[(m0 + i) * p.y_stride + p.col0 + j] = partial[i * GEMV_THREADS + lid] + bias_at(p.col0 + j);
            }
        }
        // The next pass overwrites `partial`.
        workgroupBarrier();
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM: a workgroup computes a TILE_M x TILE block of y. In `gemm` an 8x16 workgroup's thread
// (tx, ty) owns rows ty + 16 i (i < 8) and columns tx + 8 j (j < 8); in `gemm_wide` an 8x8
// workgroup's thread owns rows ty + 8 i (i < 16) and the same columns. Both tiles keep K innermost,
// so a thread reads four K values of a row or column as one vec4: 16 vec4 tile reads per 256
// multiply-adds, or 24 per 512 in `gemm_wide` (llvmpipe pays per read, GPUs in shared-memory
// bandwidth), for ~100 or ~180 registers per thread (matmul.rs picks by GemmTile and K). The
// four column vectors are transposed in registers and multiplied in with fma over K: four fma
// per four outputs and four K values (a dot product and an add took five). Lanes of one ty read
// the same x vector (a broadcast); rows of both tiles are padded to STRIDE vectors so that the
// eight lanes of a 128-byte access hit distinct banks. The accumulators are separate variables:
// an array indexed by a loop counter can go to local memory (NVIDIA Vulkan). Tiles are
// zero-filled past M, N and K, so no size needs to be a multiple.

const TILE_M: u32 = 128u;
const TILE: u32 = 64u;
const TILE_K: u32 = 16u;
const K4: u32 = 4u; // TILE_K / 4: vectors per tile row
const STRIDE: u32 = 5u; // K4 + 1

// f16 weights stay f16 in the w tile (exact, half the workgroup memory traffic); dequantized
// Q8/Q6/Q4 values need f32 (q * scale has more than 11 significant bits).
#if W_F16
#if SHADER_F16
alias WTile = vec4<f16>;
#else
alias WTile = vec4<f32>;
#endif
#else
alias WTile = vec4<f32>;
#endif

var<workgroup> x_tile: array<vec4<f32>, 640>; // [TILE_M][STRIDE]
var<workgroup> w_tile: array<WTile, 320>; // [TILE][STRIDE]

// Values c .. c + 3 of row `row` of x, zero past M and K.
fn x_tile_vector(row: u32, c: u32) -> vec4<f32> {
    if (row >= p.m) {
        return vec4<f32>();
    }
    if (c + 3u < p.k) {
        return x4(row, c);
    }
    let b = row * p.k;
    var v = vec4<f32>();
    if (c < p.k) {
        v.x = x[b + c];
    }
    if (c + 1u < p.k) {
        v.y = x[b + c + 1u];
    }
    if (c + 2u < p.k) {
        v.z = x[b + c + 2u];
    }
    return v;
}

// Row i of the w tile: whether it is inside w, its row of its matrix and the words where that
// matrix's data and scales start. With SILU the first half of the tile holds rows
// n0 .. n0 + TILE / 2 of gate, the second half the same rows of up; with QKV, tile row i is output
// column n0 + i of q, k and v side by side.
struct TileRow {
    inside: bool,
    // QKV: a row of v (V_Q6: in Q6 under W_Q4).
    is_v: bool,
    n: u32,
    data: u32,
    scales: u32,
}

fn tile_row(n0: u32, i: u32) -> TileRow {
#if SILU
    if (i < TILE / 2u) {
        return TileRow(n0 + i < p.n, false, n0 + i, p.a_data, p.a_scales);
    }
    return TileRow(n0 + i - TILE / 2u < p.n, false, n0 + i - TILE / 2u, p.b_data, p.b_scales);
#else
#if QKV
    let c = n0 + i;
    if (c < p.q_rows) {
        return TileRow(true, false, c, p.a_data, p.a_scales);
    }
    if (c < p.q_rows + p.kv_rows) {
        return TileRow(true, false, c - p.q_rows, p.b_data, p.b_scales);
    }
    return TileRow(c < p.n, true, c - p.q_rows - p.kv_rows, p.v_data, p.v_scales);
#else
    return TileRow(n0 + i < p.n, false, n0 + i, 0u, 0u);
#endif
#endif
}

// Fills w_tile with K values k0 .. k0 + TILE_K of the tile's rows (tile_row), zero past N and K.
fn load_w_tile(t: u32, threads: u32, n0: u32, k0: u32) {
#if QUANT
    // K is a multiple of the group (32 or 64), so a tile never passes K and the values of one
    // word share one scale.
#if NIBBLE_WORDS
    // Each thread 8 values (one word of nibbles) of tile row idx / 2.
    for (var slot = 0u; slot < 2u * TILE / threads; slot++) {
        let idx = t + threads * slot;
        let i = idx / 2u;
        let h = idx % 2u;
        let r = tile_row(n0, i);
        var v = mat2x4<f32>();
        if (r.inside) {
            let c = k0 + 8u * h;
#if V_Q6
            if (r.is_v) {
                v = q6_eight_values(r.data, r.n, c / 8u);
            } else {
                v = eight_values(r.data, r.n, c / 8u);
            }
            v *= scale_at(r.scales, r.n * p.k + c);
#else
            v = eight_values(r.data, r.n, c / 8u) * scale_at(r.scales, r.n * p.k + c);
#endif
        }
        w_tile[i * STRIDE + 2u * h] = v[0];
        w_tile[i * STRIDE + 2u * h + 1u] = v[1];
    }
#endif
#if W_Q8
    // Each thread 4 values (one word of bytes) of tile row idx / 4.
    for (var slot = 0u; slot < K4 * TILE / threads; slot++) {
        let idx = t + threads * slot;
        let i = idx / K4;
        let q = idx % K4;
        let r = tile_row(n0, i);
        var v = vec4<f32>();
        if (r.inside) {
            let e = r.n * p.k + k0 + 4u * q;
            let word = w[r.data + e / 4u];
            v = q8_values(word) * scale_at(r.scales, e);
        }
        w_tile[i * STRIDE + q] = v;
    }
#endif
#else
    // Each thread 4 values of tile row idx / 4.
    for (var slot = 0u; slot < K4 * TILE / threads; slot++) {
        let idx = t + threads * slot;
        let i = idx / K4;
        let q = idx % K4;
        let r = tile_row(n0, i);
        let c = k0 + 4u * q;
        var v = vec4<f32>();
        if (r.inside) {
            // Constant component indices keep v in registers.
            if (c < p.k) {
                v.x = w_at(r.data, r.n, c);
            }
            if (c + 1u < p.k) {
                v.y = w_at(r.data, r.n, c + 1u);
            }
            if (c + 2u < p.k) {
                v.z = w_at(r.data, r.n, c + 2u);
            }
            if (c + 3u < p.k) {
                v.w = w_at(r.data, r.n, c + 3u);
            }
        }
        w_tile[i * STRIDE + q] = WTile(v);
    }
#endif
}

// Writes output column c of row `row` (+ bias, then QUICK_GELU or RESIDUAL): to y, or with QKV to
// q, k or v.
fn store_y(row: u32, c: u32, v: f32) {
#if QKV
    // Selects, not branches: a store under a branch costs all three paths on llvmpipe.
    let is_k = c >= p.q_rows;
    let is_v = c >= p.q_rows + p.kv_rows;
    let start = select(select(0u, p.k_out, is_k), p.v_out, is_v);
    let first = select(select(0u, p.q_rows, is_k), p.q_rows + p.kv_rows, is_v);
#if BIAS
    let b = bias[select(select(p.q_bias, p.k_bias, is_k), p.v_bias, is_v) + c - first];
#else
    let b = 0.0;
#endif
    y[start + row * select(p.q_rows, p.kv_rows, is_k) + c - first] = v + b;
#else
    let i = row * p.y_stride + p.col0 + c;
    let out = v + bias_at(p.col0 + c);
#if QUICK_GELU
    // elementwise_unary.wgsl's quick_gelu.
    y[i] = out / (1.0 + exp(-1.702 * out));
#else
#if RESIDUAL
    y[i] = residual[i] + out;
#else
    y[i] = out;
#endif
#endif
#endif
}

// Writes columns col + 8 j of row `row` from acc[j] where inside y.
fn store_gemm_row(row: u32, col: u32, acc: vec4<f32>) {
    if (row >= p.m) {
        return;
    }
    if (col < p.n) {
        store_y(row, col, acc.x);
    }
    if (col + 8u < p.n) {
        store_y(row, col + 8u, acc.y);
    }
    if (col + 16u < p.n) {
        store_y(row, col + 16u, acc.z);
    }
    if (col + 24u < p.n) {
        store_y(row, col + 24u, acc.w);
    }
}

// silu(gate) * up as elementwise.wgsl's silu_mul computes it.
fn silu_mul(gate: vec4<f32>, up: vec4<f32>) -> vec4<f32> {
    return gate / (1.0 + exp(-gate)) * up;
}

// The first output column of workgroup column `wg_x` (with SILU a tile holds TILE / 2 outputs).
fn tile_n0(wg_x: u32) -> u32 {
#if SILU
    return wg_x * TILE / 2u;
#else
    return wg_x * TILE;
#endif
}

// Writes a thread's row `row` from its accumulators a (tile columns tx + 8 j) and b (tx + 32 + 8 j;
// with SILU the up values of a's gate values).
fn store_thread_row(row: u32, col: u32, a: vec4<f32>, b: vec4<f32>) {
#if SILU
    store_gemm_row(row, col, silu_mul(a, b));
#else
    store_gemm_row(row, col, a);
    store_gemm_row(row, col + 32u, b);
#endif
}

// acc + the dot products of x with four weight columns, as multiply-adds over K: `bt` is the
// transpose of the columns (bt[k] holds the four columns' values at k).
fn mac(acc: vec4<f32>, xv: vec4<f32>, bt: mat4x4<f32>) -> vec4<f32> {
    return fma(bt[3], vec4<f32>(xv.w), fma(bt[2], vec4<f32>(xv.z),
           fma(bt[1], vec4<f32>(xv.y), fma(bt[0], vec4<f32>(xv.x), acc))));
}

// Four columns of the w tile from row `row` on, eight rows apart.
fn w_columns(row: u32, q: u32) -> mat4x4<f32> {
    let b = row * STRIDE + q;
    return mat4x4<f32>(vec4<f32>(w_tile[b]), vec4<f32>(w_tile[b + 8u * STRIDE]),
                       vec4<f32>(w_tile[b + 16u * STRIDE]), vec4<f32>(w_tile[b + 24u * STRIDE]));
}

// Fills both tiles for K values k0 .. k0 + TILE_K with `threads` threads, then waits for them.
// (Loop counts are constants once inlined: unrolled, and outside llvmpipe's loop budget.)
fn fill_tiles(t: u32, threads: u32, row0: u32, n0: u32, k0: u32) {
    // Four consecutive threads cover one row's K-slice.
    for (var slot = 0u; slot < K4 * TILE_M / threads; slot++) {
        let idx = t + threads * slot;
        let i = idx / K4;
        let q = idx % K4;
        x_tile[i * STRIDE + q] = x_tile_vector(row0 + i, k0 + 4u * q);
    }
    load_w_tile(t, threads, n0, k0);
    workgroupBarrier();
}

@compute @workgroup_size(8, 16)
fn gemm(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    let row0 = wg.y * TILE_M;
    let n0 = tile_n0(wg.x);
    // a_i: row ty + 16 i, tile columns tx + 8 j (j < 4); b_i: the same row, tile columns
    // tx + 32 + 8 j (with SILU the up values of a_i's gate values).
    var a0 = vec4<f32>();
    var a1 = vec4<f32>();
    var a2 = vec4<f32>();
    var a3 = vec4<f32>();
    var a4 = vec4<f32>();
    var a5 = vec4<f32>();
    var a6 = vec4<f32>();
    var a7 = vec4<f32>();
    var b0 = vec4<f32>();
    var b1 = vec4<f32>();
    var b2 = vec4<f32>();
    var b3 = vec4<f32>();
    var b4 = vec4<f32>();
    var b5 = vec4<f32>();
    var b6 = vec4<f32>();
    var b7 = vec4<f32>();
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        fill_tiles(t, 128u, row0, n0, k0);
        for (var q = 0u; q < K4; q++) {
            let wl = transpose(w_columns(lid.x, q));
            let wh = transpose(w_columns(lid.x + 32u, q));
            let xb = lid.y * STRIDE + q;
            var xv = x_tile[xb];
            a0 = mac(a0, xv, wl);
            b0 = mac(b0, xv, wh);
            xv = x_tile[xb + 16u * STRIDE];
            a1 = mac(a1, xv, wl);
            b1 = mac(b1, xv, wh);
            xv = x_tile[xb + 32u * STRIDE];
            a2 = mac(a2, xv, wl);
            b2 = mac(b2, xv, wh);
            xv = x_tile[xb + 48u * STRIDE];
            a3 = mac(a3, xv, wl);
            b3 = mac(b3, xv, wh);
            xv = x_tile[xb + 64u * STRIDE];
            a4 = mac(a4, xv, wl);
            b4 = mac(b4, xv, wh);
            xv = x_tile[xb + 80u * STRIDE];
            a5 = mac(a5, xv, wl);
            b5 = mac(b5, xv, wh);
            xv = x_tile[xb + 96u * STRIDE];
            a6 = mac(a6, xv, wl);
            b6 = mac(b6, xv, wh);
            xv = x_tile[xb + 112u * STRIDE];
            a7 = mac(a7, xv, wl);
            b7 = mac(b7, xv, wh);
        }
        workgroupBarrier();
    }
    let row = row0 + lid.y;
    let col = n0 + lid.x;
    store_thread_row(row, col, a0, b0);
    store_thread_row(row + 16u, col, a1, b1);
    store_thread_row(row + 32u, col, a2, b2);
    store_thread_row(row + 48u, col, a3, b3);
    store_thread_row(row + 64u, col, a4, b4);
    store_thread_row(row + 80u, col, a5, b5);
    store_thread_row(row + 96u, col, a6, b6);
    store_thread_row(row + 112u, col, a7, b7);
}

@compute @workgroup_size(8, 8)
fn gemm_wide(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    let row0 = wg.y * TILE_M;
    let n0 = tile_n0(wg.x);
    // a_i: row ty + 8 i, tile columns tx + 8 j (j < 4); b_i: the same row, tile columns
    // tx + 32 + 8 j (with SILU the up values of a_i's gate values).
    var a0 = vec4<f32>();
    var a1 = vec4<f32>();
    var a2 = vec4<f32>();
    var a3 = vec4<f32>();
    var a4 = vec4<f32>();
    var a5 = vec4<f32>();
    var a6 = vec4<f32>();
    var a7 = vec4<f32>();
    var a8 = vec4<f32>();
    var a9 = vec4<f32>();
    var a10 = vec4<f32>();
    var a11 = vec4<f32>();
    var a12 = vec4<f32>();
    var a13 = vec4<f32>();
    var a14 = vec4<f32>();
    var a15 = vec4<f32>();
    var b0 = vec4<f32>();
    var b1 = vec4<f32>();
    var b2 = vec4<f32>();
    var b3 = vec4<f32>();
    var b4 = vec4<f32>();
    var b5 = vec4<f32>();
    var b6 = vec4<f32>();
    var b7 = vec4<f32>();
    var b8 = vec4<f32>();
    var b9 = vec4<f32>();
    var b10 = vec4<f32>();
    var b11 = vec4<f32>();
    var b12 = vec4<f32>();
    var b13 = vec4<f32>();
    var b14 = vec4<f32>();
    var b15 = vec4<f32>();
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        fill_tiles(t, 64u, row0, n0, k0);
        for (var q = 0u; q < K4; q++) {
            let wl = transpose(w_columns(lid.x, q));
            let wh = transpose(w_columns(lid.x + 32u, q));
            let xb = lid.y * STRIDE + q;
            var xv = x_tile[xb];
            a0 = mac(a0, xv, wl);
            b0 = mac(b0, xv, wh);
            xv = x_tile[xb + 8u * STRIDE];
            a1 = mac(a1, xv, wl);
            b1 = mac(b1, xv, wh);
            xv = x_tile[xb + 16u * STRIDE];
            a2 = mac(a2, xv, wl);
            b2 = mac(b2, xv, wh);
            xv = x_tile[xb + 24u * STRIDE];
            a3 = mac(a3, xv, wl);
            b3 = mac(b3, xv, wh);
            xv = x_tile[xb + 32u * STRIDE];
            a4 = mac(a4, xv, wl);
            b4 = mac(b4, xv, wh);
            xv = x_tile[xb + 40u * STRIDE];
            a5 = mac(a5, xv, wl);
            b5 = mac(b5, xv, wh);
            xv = x_tile[xb + 48u * STRIDE];
            a6 = mac(a6, xv, wl);
            b6 = mac(b6, xv, wh);
            xv = x_tile[xb + 56u * STRIDE];
            a7 = mac(a7, xv, wl);
            b7 = mac(b7, xv, wh);
            xv = x_tile[xb + 64u * STRIDE];
            a8 = mac(a8, xv, wl);
            b8 = mac(b8, xv, wh);
            xv = x_tile[xb + 72u * STRIDE];
            a9 = mac(a9, xv, wl);
            b9 = mac(b9, xv, wh);
            xv = x_tile[xb + 80u * STRIDE];
            a10 = mac(a10, xv, wl);
            b10 = mac(b10, xv, wh);
            xv = x_tile[xb + 88u * STRIDE];
            a11 = mac(a11, xv, wl);
            b11 = mac(b11, xv, wh);
            xv = x_tile[xb + 96u * STRIDE];
            a12 = mac(a12, xv, wl);
            b12 = mac(b12, xv, wh);
            xv = x_tile[xb + 104u * STRIDE];
            a13 = mac(a13, xv, wl);
            b13 = mac(b13, xv, wh);
            xv = x_tile[xb + 112u * STRIDE];
            a14 = mac(a14, xv, wl);
            b14 = mac(b14, xv, wh);
            xv = x_tile[xb + 120u * STRIDE];
            a15 = mac(a15, xv, wl);
            b15 = mac(b15, xv, wh);
        }
        workgroupBarrier();
    }
    let row = row0 + lid.y;
    let col = n0 + lid.x;
    store_thread_row(row, col, a0, b0);
    store_thread_row(row + 8u, col, a1, b1);
    store_thread_row(row + 16u, col, a2, b2);
    store_thread_row(row + 24u, col, a3, b3);
    store_thread_row(row + 32u, col, a4, b4);
    store_thread_row(row + 40u, col, a5, b5);
    store_thread_row(row + 48u, col, a6, b6);
    store_thread_row(row + 56u, col, a7, b7);
    store_thread_row(row + 64u, col, a8, b8);
    store_thread_row(row + 72u, col, a9, b9);
    store_thread_row(row + 80u, col, a10, b10);
    store_thread_row(row + 88u, col, a11, b11);
    store_thread_row(row + 96u, col, a12, b12);
    store_thread_row(row + 104u, col, a13, b13);
    store_thread_row(row + 112u, col, a14, b14);
    store_thread_row(row + 120u, col, a15, b15);
}
