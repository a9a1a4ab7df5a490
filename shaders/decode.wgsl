// The planned decode step (one token, M = 1): fused GEMVs, the attention of one query position,
// and the sampler. Every kernel here reads the per-token values (position, cache length) from the
// `step` uniform, which is rewritten before each replay, so the step is recorded once per chat.
// variants: GEMV W_F32 | GEMV W_F16 | GEMV W_Q8 QUANT | GEMV W_Q6 QUANT | GEMV W_Q4 QUANT | GEMV W_F32 NORM | GEMV W_F16 NORM | GEMV W_Q8 QUANT NORM | GEMV W_Q6 QUANT NORM | GEMV W_Q4 QUANT NORM | GEMV W_F32 RESIDUAL | GEMV W_F16 RESIDUAL | GEMV W_Q8 QUANT RESIDUAL | GEMV W_Q6 QUANT RESIDUAL | GEMV W_Q4 QUANT RESIDUAL | GEMV W_F32 NORM SILU | GEMV W_F16 NORM SILU | GEMV W_Q8 QUANT NORM SILU | GEMV W_Q6 QUANT NORM SILU | GEMV W_Q4 QUANT NORM SILU | GEMV W_F32 NORM QKV V_F32 | GEMV W_F16 NORM QKV V_F16 | GEMV W_Q8 QUANT NORM QKV V_Q8 | GEMV W_Q4 QUANT NORM QKV V_Q6 | GEMV W_Q4 QUANT NORM QKV V_Q4 | GEMV W_F16 NORM QKV V_F16 KV_F16 | GEMV W_Q4 QUANT NORM QKV V_Q6 KV_F16 | GEMV W_Q8 QUANT NORM QKV V_Q8 KV_F16 | GEMV W_Q4 QUANT NORM SUBGROUPS | GEMV W_Q4 QUANT NORM SUBGROUPS SUBGROUP_LANES | GEMV W_F16 RESIDUAL SUBGROUPS SUBGROUP_LANES | GEMV W_Q8 QUANT NORM SILU SUBGROUPS SUBGROUP_LANES | GEMV W_Q4 QUANT NORM QKV V_Q6 KV_F16 SUBGROUPS SUBGROUP_LANES | GEMV W_F32 NORM QKV V_F32 SUBGROUPS | GEMV W_Q4 QUANT NORM PAIRS | GEMV W_Q6 QUANT RESIDUAL PAIRS | GEMV W_F32 PAIRS | GEMV W_Q8 QUANT NORM SILU SUBGROUPS SUBGROUP_LANES PAIRS | GEMV W_F16 NORM QKV V_F16 KV_F16 PAIRS | GEMV W_Q4 QUANT NORM QKV V_Q6 KV_F16 SUBGROUPS SUBGROUP_LANES PAIRS | GEMV W_Q8 QUANT NORM QKV V_Q8 PAIRS | GEMV W_Q4 QUANT Q4_TABLE | GEMV W_Q4 QUANT NORM SILU Q4_TABLE | GEMV W_Q4 QUANT RESIDUAL SUBGROUPS SUBGROUP_LANES PAIRS Q4_TABLE | GEMV W_Q4 QUANT NORM QKV V_Q6 KV_F16 SUBGROUPS SUBGROUP_LANES PAIRS Q4_TABLE | GEMV W_Q4 QUANT NORM QKV V_Q4 Q4_TABLE | ATTEND | ATTEND KV_F16 | ATTEND UNITS | ATTEND UNITS KV_F16 | ATTEND UNITS SUBGROUPS | ATTEND UNITS KV_F16 SUBGROUPS | COMBINE | SAMPLE
//
// GEMV (`gemv`): y = W · x for one row of x, W `[N, K]` in the layout of tensor.rs / quant.rs.
// Rows go in quads of four: LANES threads share a quad (32, or fewer where a row has fewer 16-byte
// units: a short row would leave most lanes idle), so a workgroup computes 256 / LANES quads. A
// thread reads its quad's four rows 16 bytes at a time (one "unit": 32 values of Q4/Q6, 16 of Q8,
// 8 of F16, 4 of F32) against x staged in workgroup memory, 2048 values at a time, each staged
// vector read once for the four rows (with PAIRS, two units of each row per step, so that eight
// loads are in flight). A quad's lanes are summed for the epilogue by subgroup
// shuffles (SUBGROUP_LANES: the device has subgroups of at least LANES) or through workgroup memory:
// - default: y[col0 + row] = acc (rows in windows of a larger matrix start at col0);
// - RESIDUAL: y[row] += acc (o_proj and down_proj add into the residual stream in place);
// - SILU: `w` holds gate and up (m rows each), y[j] = silu(gate_j) * up_j;
// - QKV: `w` holds q and k (format W_*), `w_v` holds v (format V_*): RoPE on q and k, q to `y`,
//   k and v into the layer's KV cache at the step's position (f32, or f16 with KV_F16).
// Two matrices in one binding sit at the offsets a_* and b_* of Params (tensor.rs, Tensor::pack).
// NORM folds the RMSNorm before the matrix into the staging of x (x * rsqrt(mean(x^2) + eps) * g,
// summed as norm.wgsl sums it, so the normalised values are the same, or with SUBGROUPS by
// subgroups, which rounds differently). Q4_TABLE (GPUs): Q4 code book values are read from a
// table in workgroup memory instead of computed (the same values: see q4_table).
//
// ATTEND + COMBINE (`attend_units` with UNITS, else `attend`; then `attend_combine`): attention of
// the step's query against the first kv_len cached keys, split into chunks of 64 keys per
// workgroup (flash-decoding), then merged. UNITS: head dims whose rows are whole 16-byte units.
//
// SAMPLE (`sample`): the next token from the logits, on the GPU, written where the next step's
// embedding reads it and where the host reads it back.

struct Step {
    // Position of the token being run (its keys and values go to this cache row).
    pos: u32,
    // Keys the query attends to (pos + 1).
    kv_len: u32,
    // Index of this token in the reply (the sampler's random stream).
    index: u32,
    pad: u32,
}

@group(0) @binding(1) var<uniform> step: Step;

#if GEMV
struct Params {
    // Rows of W (of this window), K, and the first output column of this window.
    n: u32,
    k: u32,
    col0: u32,
    eps: f32,
    // SILU: m, the rows of gate. QKV: rows of q, of k (and of v), head dim, kv heads, capacity.
    m: u32,
    q_rows: u32,
    kv_rows: u32,
    head_dim: u32,
    kv_heads: u32,
    capacity: u32,
    // Where the matrices start in the bound buffers, data in 16-byte units and scales in words:
    // a = the main matrix (q under QKV, gate under SILU), b = k or up, v = QKV's v.
    a_data: u32,
    a_scales: u32,
    b_data: u32,
    b_scales: u32,
    v_data: u32,
    v_scales: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
    pad3: u32,
    // QKV: RoPE's inverse frequencies, inv_freq[i] = inv_freq[i / 4][i % 4].
    inv_freq: array<vec4<f32>, 32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;
#if QUANT
@group(0) @binding(4) var<storage, read> scales: array<u32>;
#endif
#if NORM
@group(0) @binding(5) var<storage, read> norm_weight: array<f32>;
#endif
#if QKV
#if V_Q8
@group(0) @binding(6) var<storage, read> w_v: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> scales_v: array<u32>;
#endif
#if V_Q6
@group(0) @binding(6) var<storage, read> w_v: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> scales_v: array<u32>;
#endif
#if V_Q4
@group(0) @binding(6) var<storage, read> w_v: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> scales_v: array<u32>;
#endif
#if V_F16
@group(0) @binding(6) var<storage, read> w_v: array<vec4<u32>>;
#endif
#if V_F32
@group(0) @binding(6) var<storage, read> w_v: array<vec4<u32>>;
#endif
// [2, capacity, kv_heads, head_dim]: keys, then values.
#if KV_F16
@group(0) @binding(8) var<storage, read_write> kv: array<u32>;
#else
@group(0) @binding(8) var<storage, read_write> kv: array<f32>;
#endif
#endif
@group(0) @binding(9) var<storage, read_write> y: array<f32>;

const WG: u32 = 256u;
// Lanes per row (a power of two from 1 to 32, set by decode.rs); a thread computes the four rows
// of one quad, so a workgroup computes QUADS quads.
override LANES: u32 = 32u;
override QUADS: u32 = WG / LANES;
const XCHUNK: u32 = 2048u;

var<workgroup> xs: array<vec4<f32>, 512>; // XCHUNK / 4
var<workgroup> norm_sums: array<f32, WG>;
#if !SUBGROUP_LANES
// The lanes' sums, lane-major with a row of QUADS + 1 (lane l of quad q at l * (QUADS + 1) + q):
// the QUADS threads that add them up read consecutive vectors, and a quad's lanes write vectors
// (QUADS + 1) * 16 bytes apart, so neither side has two threads on one bank where the vectors
// could spread. Quad-major, the readers were LANES * 16 bytes apart: all on the same banks.
var<workgroup> partial: array<vec4<f32>, 288>; // WG + 32 >= LANES * (QUADS + 1)
#endif
fn f16_scale(words: u32, g: u32) -> f32 {
    let pair = unpack2x16float(words);
    return select(pair.x, pair.y, (g & 1u) == 1u);
}

// Dot products of four rows' 16-byte units u0..u3 with the xs from `xb` (a count of values, a
// multiple of 4), unscaled where the format has scales. Each staged x vector is read once for
// the four rows: llvmpipe reads workgroup memory lane by lane, and on GPUs these reads are the Q4
// GEMV's other limit beside the weights. Words of a unit are named (u.x .. u.w), never indexed
// by a loop counter: a dynamically indexed vector can end up in local memory (NVIDIA Vulkan),
// which made the Q8/Q4 GEMVs several times slower than F16.
fn dots_f32(u0: vec4<u32>, u1: vec4<u32>, u2: vec4<u32>, u3: vec4<u32>, xb: u32) -> vec4<f32> {
    let x = xs[xb / 4u];
    return vec4<f32>(
        dot(bitcast<vec4<f32>>(u0), x),
        dot(bitcast<vec4<f32>>(u1), x),
        dot(bitcast<vec4<f32>>(u2), x),
        dot(bitcast<vec4<f32>>(u3), x),
    );
}

fn f16_unit(u: vec4<u32>, x0: vec4<f32>, x1: vec4<f32>) -> f32 {
    return dot(vec4<f32>(unpack2x16float(u.x), unpack2x16float(u.y)), x0)
        + dot(vec4<f32>(unpack2x16float(u.z), unpack2x16float(u.w)), x1);
}

fn dots_f16(u0: vec4<u32>, u1: vec4<u32>, u2: vec4<u32>, u3: vec4<u32>, xb: u32) -> vec4<f32> {
    let x0 = xs[xb / 4u];
    let x1 = xs[xb / 4u + 1u];
    return vec4<f32>(f16_unit(u0, x0, x1), f16_unit(u1, x0, x1), f16_unit(u2, x0, x1), f16_unit(u3, x0, x1));
}

// One word of four signed bytes against x.
fn q8_word(word: u32, x: vec4<f32>) -> f32 {
    let q = vec4<f32>(vec4<i32>(
        bitcast<i32>(word << 24u),
        bitcast<i32>(word << 16u),
        bitcast<i32>(word << 8u),
        bitcast<i32>(word),
    ) >> vec4<u32>(24u));
    return dot(q, x);
}

// Word k of the four rows' units (`words`) against xs[b].
fn q8_words(words: vec4<u32>, b: u32) -> vec4<f32> {
    let x = xs[b];
    return vec4<f32>(q8_word(words.x, x), q8_word(words.y, x), q8_word(words.z, x), q8_word(words.w, x));
}

fn dots_q8(u0: vec4<u32>, u1: vec4<u32>, u2: vec4<u32>, u3: vec4<u32>, xb: u32) -> vec4<f32> {
    let b = xb / 4u;
    return q8_words(vec4<u32>(u0.x, u1.x, u2.x, u3.x), b) + q8_words(vec4<u32>(u0.y, u1.y, u2.y, u3.y), b + 1u)
        + q8_words(vec4<u32>(u0.z, u1.z, u2.z, u3.z), b + 2u) + q8_words(vec4<u32>(u0.w, u1.w, u2.w, u3.w), b + 3u);
}

// quant.rs Q4_VALUES for four codes n (< 16): the degree-4 polynomial closest to the code book in
// the maximum norm (coefficients by linear programming), rounded. In f32, fused or not, it is off
// by at most 0.433, never near a half, so the rounding (under any tie rule) gives the code book
// exactly (tested: matmul.rs, every_code_is_exact_in_every_kernel). Per value an OR, a
// subtraction (n becomes a float by its bits: 2^23 + n, less 2^23), four fma and a round: seven
// operations, where the lookup it replaces took ten or more (three selects, a bit-field extract at
// a computed offset) and converted an integer to float. A dynamically indexed code book can end up
// in local memory (NVIDIA Vulkan), and one in workgroup memory cost llvmpipe a gather per nibble.
// The same function as matmul.wgsl's (shaders have no includes).
fn q4_values(n: vec4<u32>) -> vec4<f32> {
    let t = bitcast<vec4<f32>>(n | vec4<u32>(0x4b000000u)) - 8388608.0;
    let p = fma(fma(fma(fma(vec4<f32>(0.0015860428), t, vec4<f32>(0.03108644)), t, vec4<f32>(-1.371927)), t, vec4<f32>(24.17383)), t, vec4<f32>(-126.56701));
    return round(p);
}

#if Q4_TABLE
// The code book in workgroup memory, as 32 interleaved copies (value n of copy c at 32 n + c),
// filled by each workgroup from q4_values: thread t reads copy t % 32, so 32 consecutive threads
// (a warp, or any subgroup of at most 32) each read their own bank whatever their nibbles. A value
// then costs a load from workgroup memory and an add of the copy where q4_values takes an OR, a
// subtraction, four fma and a round: on GPUs whose workgroup memory serves 32 lanes a clock next
// to 128 float lanes (NVIDIA, AMD), about twice the values per clock. Not on CPU adapters, where
// each such load is a gather (decode.rs, Gpu::q4_table).
var<workgroup> q4_table: array<f32, 512>;
var<private> q4_copy: u32;

fn q4_table_values(n: vec4<u32>) -> vec4<f32> {
    let at = n * 32u + q4_copy;
    return vec4<f32>(q4_table[at.x], q4_table[at.y], q4_table[at.z], q4_table[at.w]);
}
#endif

// One word of eight nibbles (code book indices) against x0, x1.
fn q4_word(word: u32, x0: vec4<f32>, x1: vec4<f32>) -> f32 {
    let lo = (vec4(word) >> vec4(0u, 4u, 8u, 12u)) & vec4(15u);
    let hi = (vec4(word) >> vec4(16u, 20u, 24u, 28u)) & vec4(15u);
#if Q4_TABLE
    return dot(q4_table_values(lo), x0) + dot(q4_table_values(hi), x1);
#else
    return dot(q4_values(lo), x0) + dot(q4_values(hi), x1);
#endif
}

fn q4_words(words: vec4<u32>, b: u32) -> vec4<f32> {
    let x0 = xs[b];
    let x1 = xs[b + 1u];
    return vec4<f32>(q4_word(words.x, x0, x1), q4_word(words.y, x0, x1), q4_word(words.z, x0, x1), q4_word(words.w, x0, x1));
}

fn dots_q4(u0: vec4<u32>, u1: vec4<u32>, u2: vec4<u32>, u3: vec4<u32>, xb: u32) -> vec4<f32> {
    let b = xb / 4u;
    return q4_words(vec4<u32>(u0.x, u1.x, u2.x, u3.x), b) + q4_words(vec4<u32>(u0.y, u1.y, u2.y, u3.y), b + 2u)
        + q4_words(vec4<u32>(u0.z, u1.z, u2.z, u3.z), b + 4u) + q4_words(vec4<u32>(u0.w, u1.w, u2.w, u3.w), b + 6u);
}

// One word of eight low nibbles with their eight high bit pairs (the low 16 bits of `hw`).
fn q6_word(word: u32, hw: u32, x0: vec4<f32>, x1: vec4<f32>) -> f32 {
    let w4 = vec4<u32>(word);
    let h4 = vec4<u32>(hw);
    let lo = ((w4 >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u))
        | (((h4 >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u)) << vec4<u32>(4u));
    let hi = ((w4 >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u))
        | (((h4 >> vec4<u32>(8u, 10u, 12u, 14u)) & vec4<u32>(3u)) << vec4<u32>(4u));
    // Floats by their bits, as q4_values' codes: 2^23 + code, less 2^23 + 32 (an OR where a
    // conversion was, which NVIDIA runs at an eighth of the float rate).
    return dot(bitcast<vec4<f32>>(lo | vec4<u32>(0x4b000000u)) - 8388640.0, x0)
        + dot(bitcast<vec4<f32>>(hi | vec4<u32>(0x4b000000u)) - 8388640.0, x1);
}

fn q6_words(words: vec4<u32>, highs: vec4<u32>, b: u32) -> vec4<f32> {
    let x0 = xs[b];
    let x1 = xs[b + 1u];
    return vec4<f32>(
        q6_word(words.x, highs.x, x0, x1),
        q6_word(words.y, highs.y, x0, x1),
        q6_word(words.z, highs.z, x0, x1),
        q6_word(words.w, highs.w, x0, x1),
    );
}

// `h0`..`h3` hold each unit's 32 high bit pairs (two words).
fn dots_q6(
    u0: vec4<u32>, u1: vec4<u32>, u2: vec4<u32>, u3: vec4<u32>,
    h0: vec2<u32>, h1: vec2<u32>, h2: vec2<u32>, h3: vec2<u32>, xb: u32,
) -> vec4<f32> {
    let b = xb / 4u;
    let first = vec4<u32>(h0.x, h1.x, h2.x, h3.x);
    let second = vec4<u32>(h0.y, h1.y, h2.y, h3.y);
    return q6_words(vec4<u32>(u0.x, u1.x, u2.x, u3.x), first, b)
        + q6_words(vec4<u32>(u0.y, u1.y, u2.y, u3.y), first >> vec4<u32>(16u), b + 2u)
        + q6_words(vec4<u32>(u0.z, u1.z, u2.z, u3.z), second, b + 4u)
        + q6_words(vec4<u32>(u0.w, u1.w, u2.w, u3.w), second >> vec4<u32>(16u), b + 6u);
}

// A Q6 row is K / 8 nibble words, then K / 16 words of high bit pairs (quant.rs): the two words
// of a unit's high bit pairs start at word h (even), within the 16 bytes hw = w[h / 4].
fn q6_high(hw: vec4<u32>, h: u32) -> vec2<u32> {
    return select(hw.xy, hw.zw, (h & 2u) != 0u);
}

// Values per unit and bits per value of the main matrix's format (a row is K * W_BITS / 128 units).
#if W_F32
const W_UNIT: u32 = 4u;
const W_BITS: u32 = 32u;
#endif
#if W_F16
const W_UNIT: u32 = 8u;
const W_BITS: u32 = 16u;
#endif
#if W_Q8
const W_UNIT: u32 = 16u;
const W_BITS: u32 = 8u;
const W_GROUP: u32 = 32u;
#endif
#if W_Q6
const W_UNIT: u32 = 32u;
const W_BITS: u32 = 6u;
const W_GROUP: u32 = 64u;
#endif
#if W_Q4
const W_UNIT: u32 = 32u;
const W_BITS: u32 = 4u;
const W_GROUP: u32 = 64u;
#endif

#if QUANT
// Scale of unit c of each row (rows, with their matrices' scales at sc).
fn unit_scales_w(rows: vec4<u32>, sc: vec4<u32>, c: u32) -> vec4<f32> {
    let g = (rows * p.k + c * W_UNIT) / W_GROUP;
    let at = sc + g / 2u;
    return vec4<f32>(
        f16_scale(scales[at.x], g.x),
        f16_scale(scales[at.y], g.y),
        f16_scale(scales[at.z], g.z),
        f16_scale(scales[at.w], g.w),
    );
}
#endif

// Unit `c` (of a row's K / W_UNIT) of four rows `rows` of the matrices starting at units `data`
// (with scales at `sc`) in w, dotted with xs from `xb`.
fn units_w(rows: vec4<u32>, data: vec4<u32>, sc: vec4<u32>, c: u32, xb: u32) -> vec4<f32> {
    let start = data + rows * (p.k * W_BITS / 128u);
    let u0 = w[start.x + c];
    let u1 = w[start.y + c];
    let u2 = w[start.z + c];
    let u3 = w[start.w + c];
#if W_F32
    return dots_f32(u0, u1, u2, u3, xb);
#endif
#if W_F16
    return dots_f16(u0, u1, u2, u3, xb);
#endif
#if W_Q8
    return unit_scales_w(rows, sc, c) * dots_q8(u0, u1, u2, u3, xb);
#endif
#if W_Q4
    return unit_scales_w(rows, sc, c) * dots_q4(u0, u1, u2, u3, xb);
#endif
#if W_Q6
    let h = 4u * start + p.k / 8u + 2u * c;
    let h0 = q6_high(w[h.x / 4u], h.x);
    let h1 = q6_high(w[h.y / 4u], h.y);
    let h2 = q6_high(w[h.z / 4u], h.z);
    let h3 = q6_high(w[h.w / 4u], h.w);
    return unit_scales_w(rows, sc, c) * dots_q6(u0, u1, u2, u3, h0, h1, h2, h3, xb);
#endif
}

#if QKV
#if V_F32
const V_UNIT: u32 = 4u;
const V_BITS: u32 = 32u;
#endif
#if V_F16
const V_UNIT: u32 = 8u;
const V_BITS: u32 = 16u;
#endif
#if V_Q8
const V_UNIT: u32 = 16u;
const V_BITS: u32 = 8u;
const V_GROUP: u32 = 32u;
#endif
#if V_Q6
const V_UNIT: u32 = 32u;
const V_BITS: u32 = 6u;
const V_GROUP: u32 = 64u;
#endif
#if V_Q4
const V_UNIT: u32 = 32u;
const V_BITS: u32 = 4u;
const V_GROUP: u32 = 64u;
#endif

#if !V_F32
#if !V_F16
fn unit_scales_v(rows: vec4<u32>, c: u32) -> vec4<f32> {
    let g = (rows * p.k + c * V_UNIT) / V_GROUP;
    let at = p.v_scales + g / 2u;
    return vec4<f32>(
        f16_scale(scales_v[at.x], g.x),
        f16_scale(scales_v[at.y], g.y),
        f16_scale(scales_v[at.z], g.z),
        f16_scale(scales_v[at.w], g.w),
    );
}
#endif
#endif

// As units_w, for four rows of w_v.
fn units_v(rows: vec4<u32>, c: u32, xb: u32) -> vec4<f32> {
    let start = p.v_data + rows * (p.k * V_BITS / 128u);
    let u0 = w_v[start.x + c];
    let u1 = w_v[start.y + c];
    let u2 = w_v[start.z + c];
    let u3 = w_v[start.w + c];
#if V_F32
    return dots_f32(u0, u1, u2, u3, xb);
#endif
#if V_F16
    return dots_f16(u0, u1, u2, u3, xb);
#endif
#if V_Q8
    return unit_scales_v(rows, c) * dots_q8(u0, u1, u2, u3, xb);
#endif
#if V_Q4
    return unit_scales_v(rows, c) * dots_q4(u0, u1, u2, u3, xb);
#endif
#if V_Q6
    let h = 4u * start + p.k / 8u + 2u * c;
    let h0 = q6_high(w_v[h.x / 4u], h.x);
    let h1 = q6_high(w_v[h.y / 4u], h.y);
    let h2 = q6_high(w_v[h.z / 4u], h.z);
    let h3 = q6_high(w_v[h.w / 4u], h.w);
    return unit_scales_v(rows, c) * dots_q6(u0, u1, u2, u3, h0, h1, h2, h3, xb);
#endif
}
#endif

// Which row slot `slot` (0..4) of quad `quad` computes: (row in its matrix, matrix: 0 = a,
// 1 = b, 2 = v, valid).
fn quad_row(quad: u32, slot: u32) -> vec3<u32> {
#if SILU
    // Outputs 2 quad and 2 quad + 1: their gate rows, then their up rows.
    let j = 2u * quad + (slot & 1u);
    return vec3<u32>(j, slot >> 1u, u32(j < p.m));
#else
#if QKV
    // q and k heads in quads (i, i + 1, i + D/2, i + 1 + D/2) for RoPE; then v in fours.
    let per_head = p.head_dim / 4u;
    let qk_quads = (p.q_rows + p.kv_rows) / 4u;
    if (quad < qk_quads) {
        let head = quad / per_head;
        let i = 2u * (quad % per_head) + (slot & 1u) + (slot >> 1u) * (p.head_dim / 2u);
        let row = head * p.head_dim + i;
        if (row < p.q_rows) {
            return vec3<u32>(row, 0u, 1u);
        }
        return vec3<u32>(row - p.q_rows, 1u, 1u);
    }
    let row = 4u * (quad - qk_quads) + slot;
    return vec3<u32>(row, 2u, u32(row < p.kv_rows));
#else
    let row = 4u * quad + slot;
    return vec3<u32>(row, 0u, u32(row < p.n));
#endif
#endif
}

#if QKV
// RoPE (rope.wgsl's sin/cos, so q and k equal the rope kernel's).
const FOUR_OVER_PI: f32 = 1.2732395447351628;
const PI4_A: f32 = 0.78515625;
const PI4_B: f32 = 2.4187564849853515625e-4;
const PI4_C: f32 = 3.77489497744594108e-8;

fn sin_cos(a: f32) -> vec2<f32> {
    var j = u32(a * FOUR_OVER_PI);
    j += j & 1u;
    let y = f32(j);
    let r = ((a - y * PI4_A) - y * PI4_B) - y * PI4_C;
    let z = r * r;
    let s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r;
    let c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z
        - 0.5 * z + 1.0;
    switch ((j >> 1u) & 3u) {
        case 0u: { return vec2(s, c); }
        case 1u: { return vec2(c, -s); }
        case 2u: { return vec2(-s, -c); }
        default: { return vec2(-c, s); }
    }
}

// Stores values e and e + 1 of the KV cache (element index e even).
fn store_kv(e: u32, a: f32, b: f32) {
#if KV_F16
    kv[e / 2u] = pack2x16float(vec2<f32>(a, b));
#else
    kv[e] = a;
    kv[e + 1u] = b;
#endif
}
#endif

// Writes the four results of quad `quad` (slot order of quad_row).
fn epilogue(quad: u32, v: vec4<f32>) {
#if SILU
    let j = 2u * quad;
    if (j < p.m) {
        y[j] = v.x / (1.0 + exp(-v.x)) * v.z;
    }
    if (j + 1u < p.m) {
        y[j + 1u] = v.y / (1.0 + exp(-v.y)) * v.w;
    }
#else
#if QKV
    let per_head = p.head_dim / 4u;
    let qk_quads = (p.q_rows + p.kv_rows) / 4u;
    let kv_row = step.pos * p.kv_rows;
    if (quad < qk_quads) {
        let head = quad / per_head;
        let i = 2u * (quad % per_head);
        let half = p.head_dim / 2u;
        let f = f32(step.pos);
        let sc0 = sin_cos(f * p.inv_freq[i / 4u][i % 4u]);
        let sc1 = sin_cos(f * p.inv_freq[(i + 1u) / 4u][(i + 1u) % 4u]);
        let lo = vec2<f32>(v.x * sc0.y - v.z * sc0.x, v.y * sc1.y - v.w * sc1.x);
        let hi = vec2<f32>(v.z * sc0.y + v.x * sc0.x, v.w * sc1.y + v.y * sc1.x);
        let e = head * p.head_dim + i;
        if (e < p.q_rows) {
            y[e] = lo.x;
            y[e + 1u] = lo.y;
            y[e + half] = hi.x;
            y[e + half + 1u] = hi.y;
        } else {
            let k = kv_row + e - p.q_rows;
            store_kv(k, lo.x, lo.y);
            store_kv(k + half, hi.x, hi.y);
        }
        return;
    }
    let row = 4u * (quad - qk_quads);
    if (row < p.kv_rows) {
        let e = p.capacity * p.kv_rows + kv_row + row;
        store_kv(e, v.x, v.y);
        store_kv(e + 2u, v.z, v.w);
    }
#else
    for (var s = 0u; s < 4u; s++) {
        let row = 4u * quad + s;
        if (row < p.n) {
#if RESIDUAL
            y[row] += v[s];
#else
            y[p.col0 + row] = v[s];
#endif
        }
    }
#endif
#endif
}

@compute @workgroup_size(256)
fn gemv(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
#if SUBGROUPS
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
#endif
) {
    let group = wg.x + wg.y * nwg.x;
    let lane = lid % LANES;
    let quad = group * QUADS + lid / LANES;
    let r0 = quad_row(quad, 0u);
    let r1 = quad_row(quad, 1u);
    let r2 = quad_row(quad, 2u);
    let r3 = quad_row(quad, 3u);
    // Rows past the end read row 0 and are not stored; a quad is all of v or none of it.
    let valid = vec4<u32>(r0.z, r1.z, r2.z, r3.z) != vec4<u32>(0u);
    let rows = select(vec4<u32>(0u), vec4<u32>(r0.x, r1.x, r2.x, r3.x), valid);
    let of_b = vec4<u32>(r0.y, r1.y, r2.y, r3.y) == vec4<u32>(1u);
    let data = select(vec4<u32>(p.a_data), vec4<u32>(p.b_data), of_b);
    let sc = select(vec4<u32>(p.a_scales), vec4<u32>(p.b_scales), of_b);
    let is_v = r0.y == 2u;
#if NORM
    // Strided per thread, as norm.wgsl's sum.
    var sq = 0.0;
    for (var i = lid; i < p.k; i += WG) {
        sq += x[i] * x[i];
    }
#if SUBGROUPS
    // One sum per subgroup, then each thread adds the subgroups' sums in the same order: one
    // barrier where the tree below takes nine.
    let sg_sq = subgroupAdd(sq);
    if (sg_lane == 0u) {
        norm_sums[sg_id] = sg_sq;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var s = 0u; s < sg_count; s++) {
        total += norm_sums[s];
    }
#else
    // A pairwise tree, as norm.wgsl's.
    norm_sums[lid] = sq;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            norm_sums[lid] += norm_sums[lid + s];
        }
        workgroupBarrier();
    }
    let total = norm_sums[0];
#endif
    let rms = inverseSqrt(total / f32(p.k) + p.eps);
#endif
#if Q4_TABLE
    // The barrier before the first staging of x orders these stores before every read.
    q4_copy = lid % 32u;
    for (var i = lid; i < 512u; i += WG) {
        q4_table[i] = q4_values(vec4<u32>(i / 32u)).x;
    }
#endif
    var acc = vec4<f32>(0.0);
    for (var c0 = 0u; c0 < p.k; c0 += XCHUNK) {
        let len = min(XCHUNK, p.k - c0);
        workgroupBarrier();
        for (var i = lid; i < len / 4u; i += WG) {
            let e = c0 + 4u * i;
            let v = vec4<f32>(x[e], x[e + 1u], x[e + 2u], x[e + 3u]);
#if NORM
            xs[i] = v * rms * vec4<f32>(norm_weight[e], norm_weight[e + 1u], norm_weight[e + 2u], norm_weight[e + 3u]);
#else
            xs[i] = v;
#endif
        }
        workgroupBarrier();
        if (any(valid) && !is_v) {
            let units = len / W_UNIT;
            var c = lane;
#if PAIRS
            // Two units a step, so that both units' loads are in flight together; added in the
            // order of one at a time.
            for (; c + LANES < units; c += 2u * LANES) {
                let first = units_w(rows, data, sc, c0 / W_UNIT + c, c * W_UNIT);
                let second = units_w(rows, data, sc, c0 / W_UNIT + c + LANES, (c + LANES) * W_UNIT);
                acc += first;
                acc += second;
            }
#endif
            for (; c < units; c += LANES) {
                acc += units_w(rows, data, sc, c0 / W_UNIT + c, c * W_UNIT);
            }
        }
#if QKV
        if (any(valid) && is_v) {
            let units = len / V_UNIT;
            var c = lane;
#if PAIRS
            for (; c + LANES < units; c += 2u * LANES) {
                let first = units_v(rows, c0 / V_UNIT + c, c * V_UNIT);
                let second = units_v(rows, c0 / V_UNIT + c + LANES, (c + LANES) * V_UNIT);
                acc += first;
                acc += second;
            }
#endif
            for (; c < units; c += LANES) {
                acc += units_v(rows, c0 / V_UNIT + c, c * V_UNIT);
            }
        }
#endif
    }
#if SUBGROUP_LANES
    // A quad's LANES lanes are consecutive invocations in one subgroup (LANES is at most the
    // device's smallest subgroup, and subgroups are runs of consecutive invocation indices, as on
    // every driver we know): a butterfly of shuffles sums them, with no barrier.
    var sum = acc;
    for (var m = LANES / 2u; m > 0u; m >>= 1u) {
        sum += subgroupShuffleXor(sum, m);
    }
    if (lane == 0u) {
        epilogue(quad, sum);
    }
#else
    partial[lane * (QUADS + 1u) + lid / LANES] = acc;
    workgroupBarrier();
    if (lid < QUADS) {
        var sum = vec4<f32>(0.0);
        for (var l = 0u; l < LANES; l++) {
            sum += partial[l * (QUADS + 1u) + lid];
        }
        epilogue(group * QUADS + lid, sum);
    }
#endif
}
#endif

#if ATTEND
struct AttendParams {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> a: AttendParams;
// Per (head, chunk): head_dim weighted value sums, and (max, sum) of the chunk's scores.
@group(0) @binding(4) var<storage, read_write> part_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> part_stats: array<vec2<f32>>;

const KEYS: u32 = 64u;
const MASKED: f32 = -3.0e38;

#if UNITS
// q: [heads, head_dim] in fours; the cache (as in the QKV epilogue) in 16-byte units of 8 halves
// (KV_F16) or 4 floats.
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> kv: array<vec4<u32>>;

#if KV_F16
const UNIT: u32 = 8u;
#else
const UNIT: u32 = 4u;
#endif
// Most slices of the value sums (256 threads over a row's units): four keys per thread, one round
// of loads, and few slices to add up.
const SLICES: u32 = KEYS / 4u;

#if !SUBGROUPS
var<workgroup> lane_dots: array<f32, 256>;
#endif
var<workgroup> scores: array<f32, KEYS>;
var<workgroup> probs: array<f32, KEYS>;
var<workgroup> slice_sums: array<f32, 2048>; // [slice][head_dim], slices * units <= 256

// Unit `u` of the query row starting at q[qb] times the 16-byte unit `k` of a key.
fn unit_dot(qb: u32, u: u32, k: vec4<u32>) -> f32 {
#if KV_F16
    let a = q[qb + 2u * u];
    let b = q[qb + 2u * u + 1u];
    let lo = dot(a.xy, unpack2x16float(k.x)) + dot(a.zw, unpack2x16float(k.y));
    let hi = dot(b.xy, unpack2x16float(k.z)) + dot(b.zw, unpack2x16float(k.w));
    return lo + hi;
#else
    return dot(q[qb + u], bitcast<vec4<f32>>(k));
#endif
}

// Workgroup (query head, chunk), head dims whose rows are whole 16-byte units: the chunk's scores,
// their softmax statistics and the unnormalised weighted sum of values, with four barriers. Each
// phase has every thread issue its loads together (four per thread for head dim 128 in f16)
// instead of a chain: four lanes per key for the scores, then (unit column, key slice) threads for
// the values, whose slices are summed through workgroup memory. A kv head's K/V are read by its
// query heads' workgroups, from cache after the first.
@compute @workgroup_size(256)
fn attend_units(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let index = wg.x + wg.y * nwg.x;
    let chunks = a.capacity / KEYS;
    let h = index / chunks;
    let chunk = index % chunks;
    let k0 = chunk * KEYS;
    if (h >= a.heads || k0 >= step.kv_len) {
        return;
    }
    let d = a.head_dim;
    let units = d / UNIT;
    let kvh = h / (a.heads / a.kv_heads);
    let keys = min(KEYS, step.kv_len - k0);
    let qb = h * d / 4u;
    // Scores: thread (key j, lane) takes units lane, lane + 4, ... of key j, four at a time
    // (indices past the row clamped and their products dropped, so the loads need no branch).
    let j = lid / 4u;
    let lane = lid % 4u;
    let kb = ((k0 + min(j, keys - 1u)) * a.kv_heads + kvh) * units;
    var s = 0.0;
    for (var u = lane; u < units; u += 16u) {
        let last = units - 1u;
        let k_0 = kv[kb + u];
        let k_1 = kv[kb + min(u + 4u, last)];
        let k_2 = kv[kb + min(u + 8u, last)];
        let k_3 = kv[kb + min(u + 12u, last)];
        s += unit_dot(qb, u, k_0);
        s += select(0.0, unit_dot(qb, u + 4u, k_1), u + 4u < units);
        s += select(0.0, unit_dot(qb, u + 8u, k_2), u + 8u < units);
        s += select(0.0, unit_dot(qb, u + 12u, k_3), u + 12u < units);
    }
#if SUBGROUPS
    // A key's four lanes are consecutive invocations of one subgroup (subgroups of at least
    // four): two shuffles add them in the order of the path below.
    var dot = s + subgroupShuffleXor(s, 1u);
    dot += subgroupShuffleXor(dot, 2u);
    if (lane == 0u) {
        scores[j] = select(MASKED, dot * a.scale, j < keys);
    }
#else
    lane_dots[lid] = s;
    workgroupBarrier();
    if (lid < KEYS) {
        let b = 4u * lid;
        let dot = (lane_dots[b] + lane_dots[b + 1u]) + (lane_dots[b + 2u] + lane_dots[b + 3u]);
        scores[lid] = select(MASKED, dot * a.scale, lid < keys);
    }
#endif
    workgroupBarrier();
    // Each key's weight exp(score - max): every thread of the first 64 reads the 64 scores (one
    // barrier, where a tree takes six).
    var m = MASKED;
    if (lid < KEYS) {
        for (var i = 0u; i < KEYS; i++) {
            m = max(m, scores[i]);
        }
        probs[lid] = exp(scores[lid] - m);
    }
    workgroupBarrier();
    let part = h * chunks + chunk;
    if (lid == 0u) {
        var l = 0.0;
        for (var i = 0u; i < keys; i++) {
            l += probs[i];
        }
        part_stats[part] = vec2<f32>(m, l);
    }
    // Values: thread (unit column c, slice) sums keys slice, slice + slices, ... four at a time
    // (keys past the chunk clamped to its last, weight 0).
    let slices = min(256u / units, SLICES);
    let c = lid % units;
    let slice = lid / units;
    // Unit c of the chunk's first value row, and the units from one key's row to the next.
    let vb = (a.capacity + k0) * a.kv_heads * units + kvh * units + c;
    let stride = a.kv_heads * units;
    var lo = vec4<f32>();
#if KV_F16
    var hi = vec4<f32>();
#endif
    if (slice < slices) {
        for (var i = slice; i < keys; i += 4u * slices) {
            let i1 = min(i + slices, keys - 1u);
            let i2 = min(i + 2u * slices, keys - 1u);
            let i3 = min(i + 3u * slices, keys - 1u);
            let v_0 = kv[vb + i * stride];
            let v_1 = kv[vb + i1 * stride];
            let v_2 = kv[vb + i2 * stride];
            let v_3 = kv[vb + i3 * stride];
            let p = vec4<f32>(
                probs[i],
                select(0.0, probs[i1], i + slices < keys),
                select(0.0, probs[i2], i + 2u * slices < keys),
                select(0.0, probs[i3], i + 3u * slices < keys),
            );
#if KV_F16
            lo += p.x * vec4<f32>(unpack2x16float(v_0.x), unpack2x16float(v_0.y))
                + p.y * vec4<f32>(unpack2x16float(v_1.x), unpack2x16float(v_1.y))
                + p.z * vec4<f32>(unpack2x16float(v_2.x), unpack2x16float(v_2.y))
                + p.w * vec4<f32>(unpack2x16float(v_3.x), unpack2x16float(v_3.y));
            hi += p.x * vec4<f32>(unpack2x16float(v_0.z), unpack2x16float(v_0.w))
                + p.y * vec4<f32>(unpack2x16float(v_1.z), unpack2x16float(v_1.w))
                + p.z * vec4<f32>(unpack2x16float(v_2.z), unpack2x16float(v_2.w))
                + p.w * vec4<f32>(unpack2x16float(v_3.z), unpack2x16float(v_3.w));
#else
            lo += p.x * bitcast<vec4<f32>>(v_0) + p.y * bitcast<vec4<f32>>(v_1)
                + p.z * bitcast<vec4<f32>>(v_2) + p.w * bitcast<vec4<f32>>(v_3);
#endif
        }
        let e = slice * d + c * UNIT;
        slice_sums[e] = lo.x;
        slice_sums[e + 1u] = lo.y;
        slice_sums[e + 2u] = lo.z;
        slice_sums[e + 3u] = lo.w;
#if KV_F16
        slice_sums[e + 4u] = hi.x;
        slice_sums[e + 5u] = hi.y;
        slice_sums[e + 6u] = hi.z;
        slice_sums[e + 7u] = hi.w;
#endif
    }
    workgroupBarrier();
    if (lid < d) {
        var sum = 0.0;
        for (var t = 0u; t < slices; t++) {
            sum += slice_sums[t * d + lid];
        }
        part_out[part * d + lid] = sum;
    }
}
#else
// q: [heads, head_dim]; kv as in the QKV epilogue.
@group(0) @binding(2) var<storage, read> q: array<f32>;
#if KV_F16
@group(0) @binding(3) var<storage, read> kv: array<u32>;
#else
@group(0) @binding(3) var<storage, read> kv: array<f32>;
#endif

// Query heads per kv head times head dim, at most.
const QMAX: u32 = 2048u;

var<workgroup> qs: array<f32, QMAX>;
var<workgroup> probs: array<f32, 512>; // [group (<= 8)][KEYS]
var<workgroup> lane_dots: array<f32, 256>;

fn cached(e: u32) -> f32 {
#if KV_F16
    let pair = unpack2x16float(kv[e / 2u]);
    return select(pair.x, pair.y, (e & 1u) == 1u);
#else
    return kv[e];
#endif
}

// Workgroup (kv head, chunk): scores of the chunk's keys for the kv head's query heads, their
// softmax statistics and the unnormalised weighted sum of values. Four lanes share a key (each a
// strided quarter of the head dim) and the value sums take eight keys per step, so that every
// thread has several loads in flight instead of one long chain of dependent ones.
@compute @workgroup_size(256)
fn attend(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let index = wg.x + wg.y * nwg.x;
    let chunks = a.capacity / KEYS;
    let kvh = index / chunks;
    let chunk = index % chunks;
    let k0 = chunk * KEYS;
    if (kvh >= a.kv_heads || k0 >= step.kv_len) {
        return;
    }
    let d = a.head_dim;
    let group = a.heads / a.kv_heads;
    let keys = min(KEYS, step.kv_len - k0);
    for (var i = lid; i < group * d; i += 256u) {
        qs[i] = q[kvh * group * d + i] * a.scale;
    }
    workgroupBarrier();
    // Thread (key j, lane): dims lane, lane + 4, ... of key j, for each query head in turn.
    let j = lid / 4u;
    let lane = lid % 4u;
    let kb = ((k0 + j) * a.kv_heads + kvh) * d;
    for (var r = 0u; r < group; r++) {
        var s = 0.0;
        if (j < keys) {
            for (var e = lane; e < d; e += 4u) {
                s += qs[r * d + e] * cached(kb + e);
            }
        }
        lane_dots[lid] = s;
        workgroupBarrier();
        if (lane == 0u) {
            let dot = (lane_dots[lid] + lane_dots[lid + 1u]) + (lane_dots[lid + 2u] + lane_dots[lid + 3u]);
            probs[r * KEYS + j] = select(MASKED, dot, j < keys);
        }
        workgroupBarrier();
    }
    let part = (kvh * group) * chunks + chunk;
    if (lid < group) {
        var m = MASKED;
        for (var i = 0u; i < keys; i++) {
            m = max(m, probs[lid * KEYS + i]);
        }
        var l = 0.0;
        for (var i = 0u; i < keys; i++) {
            let e = exp(probs[lid * KEYS + i] - m);
            probs[lid * KEYS + i] = e;
            l += e;
        }
        part_stats[part + lid * chunks] = vec2<f32>(m, l);
    }
    workgroupBarrier();
    let values = a.capacity * a.kv_heads * d;
    let stride = a.kv_heads * d;
    for (var o = lid; o < group * d; o += 256u) {
        let r = o / d;
        let e = o % d;
        let pr = r * KEYS;
        let vb = values + (k0 * a.kv_heads + kvh) * d + e;
        var acc = vec4<f32>();
        var i = 0u;
        for (; i + 8u <= keys; i += 8u) {
            let v = vb + i * stride;
            acc += vec4<f32>(probs[pr + i], probs[pr + i + 1u], probs[pr + i + 2u], probs[pr + i + 3u])
                * vec4<f32>(cached(v), cached(v + stride), cached(v + 2u * stride), cached(v + 3u * stride));
            acc += vec4<f32>(probs[pr + i + 4u], probs[pr + i + 5u], probs[pr + i + 6u], probs[pr + i + 7u])
                * vec4<f32>(cached(v + 4u * stride), cached(v + 5u * stride), cached(v + 6u * stride), cached(v + 7u * stride));
        }
        for (; i < keys; i++) {
            acc.x += probs[pr + i] * cached(vb + i * stride);
        }
        part_out[(part + r * chunks) * d + e] = (acc.x + acc.y) + (acc.z + acc.w);
    }
}
#endif
#endif

#if COMBINE
struct CombineParams {
    heads: u32,
    head_dim: u32,
    chunks: u32,
}

@group(0) @binding(0) var<uniform> c: CombineParams;
@group(0) @binding(2) var<storage, read> part_out: array<f32>;
@group(0) @binding(3) var<storage, read> part_stats: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// attend's KEYS.
const KEYS_PER_CHUNK: u32 = 64u;

var<workgroup> stats: array<vec2<f32>, 256>;

// Softmax statistics (max, sum of exp(score - max)) of two sets of scores, as one set's.
fn merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// Workgroup h: merges head h's chunks that hold keys. Each thread merges the statistics of every
// 256th chunk, a pairwise tree over the threads that have chunks gives the head's (one tree,
// log2 of the chunks deep), then each output sums its chunks four at a time.
@compute @workgroup_size(256)
fn attend_combine(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let h = wg.x;
    let used = (step.kv_len + KEYS_PER_CHUNK - 1u) / KEYS_PER_CHUNK;
    let first = h * c.chunks;
    var own = vec2<f32>(-3.0e38, 0.0);
    for (var k = lid; k < used; k += 256u) {
        own = merge(own, part_stats[first + k]);
    }
    stats[lid] = own;
    workgroupBarrier();
    for (var s = min(256u, 1u << firstLeadingBit(max(used, 1u) * 2u - 1u)) / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            stats[lid] = merge(stats[lid], stats[lid + s]);
        }
        workgroupBarrier();
    }
    let m = stats[0].x;
    let den = stats[0].y;
    for (var e = lid; e < c.head_dim; e += 256u) {
        let pb = first * c.head_dim + e;
        var num = vec4<f32>();
        var k = 0u;
        for (; k + 4u <= used; k += 4u) {
            let w = exp(vec4<f32>(part_stats[first + k].x, part_stats[first + k + 1u].x,
                                  part_stats[first + k + 2u].x, part_stats[first + k + 3u].x) - m);
            num += w * vec4<f32>(part_out[pb + k * c.head_dim], part_out[pb + (k + 1u) * c.head_dim],
                                 part_out[pb + (k + 2u) * c.head_dim], part_out[pb + (k + 3u) * c.head_dim]);
        }
        for (; k < used; k++) {
            num.x += exp(part_stats[first + k].x - m) * part_out[pb + k * c.head_dim];
        }
        out[h * c.head_dim + e] = ((num.x + num.y) + (num.z + num.w)) / den;
    }
}
#endif

#if SAMPLE
struct SampleParams {
    vocab: u32,
    // 0: greedy (the first largest penalised logit); else logits are divided by it.
    temperature: f32,
    // Keep the top_k most likely (0: all) ...
    top_k: u32,
    // ... then the smallest set, in order of probability, whose mass reaches top_p.
    top_p: f32,
    // transformers' repetition penalty on the ids marked in `seen` (1: off).
    penalty: f32,
    seed_lo: u32,
    seed_hi: u32,
}

@group(0) @binding(0) var<uniform> sp: SampleParams;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
// [0]: the token the next step embeds; [1]: the same, for the host to read back.
@group(0) @binding(3) var<storage, read_write> token: array<u32>;
// Bit i: id i was seen (prompt and reply so far); the picked token is added.
@group(0) @binding(4) var<storage, read_write> seen: array<u32>;
// Per id: (z, exp(z - max z)), computed once so that the searches below only read them. Thread
// lid writes and reads ids lid, lid + 256, ...; the draw, which reads others, waits for them.
@group(0) @binding(5) var<storage, read_write> zp: array<vec2<f32>>;

const NONE: u32 = 0xffffffffu;
var<workgroup> red_a: array<f32, 256>;
var<workgroup> red_b: array<u32, 256>;

fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return i != NONE && (bi == NONE || v > bv || (v == bv && i < bi));
}

// Logit i after the repetition penalty (and the temperature where there is one).
fn z(i: u32) -> f32 {
    var l = logits[i];
    if (sp.penalty != 1.0 && (seen[i / 32u] & (1u << (i % 32u))) != 0u) {
        l = select(l * sp.penalty, l / sp.penalty, l > 0.0);
    }
    if (sp.temperature > 0.0) {
        l = l / sp.temperature;
    }
    return l;
}

// Order-preserving key of a float (larger value, larger key).
fn key(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn sum_f32(lid: u32, v: f32) -> f32 {
    workgroupBarrier();
    red_a[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_a[lid] += red_a[lid + s];
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red_a[0]);
}

fn sum_u32(lid: u32, v: u32) -> u32 {
    workgroupBarrier();
    red_b[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red_b[lid] += red_b[lid + s];
        }
        workgroupBarrier();
    }
    return workgroupUniformLoad(&red_b[0]);
}

// A uniform number in [0, 1) from (seed, index) (generate.rs `gpu_uniform` is the same).
fn uniform01(index: u32) -> f32 {
    var h = sp.seed_lo ^ (index * 0x9E3779B9u);
    h = (h ^ (h >> 16u)) * 0x85EBCA6Bu;
    h = (h ^ sp.seed_hi ^ (h >> 13u)) * 0xC2B2AE35u;
    h = h ^ (h >> 16u);
    return f32(h >> 8u) / 16777216.0;
}

// A cut (t, b) keeps the tokens of key > t and those of key t below index b: a prefix of the
// tokens ordered by logit (descending), then index.
fn kept(i: u32, kz: u32, cut: vec2<u32>) -> bool {
    return kz > cut.x || (kz == cut.x && i < cut.y);
}

// Picks the next token (one workgroup). Greedy: the first largest penalised logit. Sampling:
// transformers' order (penalty, temperature, top-k, top-p), the cuts found without a sort, then a
// draw over the kept tokens in index order. A top-k of at most CANDIDATES, and a top-p without
// top-k whose cut lies within the CANDIDATES most likely ids, take sample_candidates; otherwise
// the top-k and top-p cuts are binary searches over the keys of the whole vocabulary.
@compute @workgroup_size(256)
fn sample(@builtin(local_invocation_index) lid: u32) {
    let v = sp.vocab;
    let index = step.index;
    var bv = 0.0;
    var bi = NONE;
    for (var i = lid; i < v; i += 256u) {
        let l = z(i);
        if (sp.temperature > 0.0) {
            zp[i].x = l;
        }
        if (bi == NONE || l > bv) {
            bv = l;
            bi = i;
        }
    }
    red_a[lid] = bv;
    red_b[lid] = bi;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s && beats(red_a[lid + s], red_b[lid + s], red_a[lid], red_b[lid])) {
            red_a[lid] = red_a[lid + s];
            red_b[lid] = red_b[lid + s];
        }
        workgroupBarrier();
    }
    // Uniform loads: the cuts below loop on values derived from them, with barriers inside.
    let best = workgroupUniformLoad(&red_b[0]);
    let m = workgroupUniformLoad(&red_a[0]);
    var picked = best;
    // (token, 1) where the few most likely ids decide it, else (best, 0).
    var gathered = vec2<u32>(best, 0u);
    let top_k = sp.top_k > 0u && sp.top_k < v;
    if (sp.temperature > 0.0 && ((top_k && sp.top_k <= CANDIDATES) || (!top_k && sp.top_p < 1.0))) {
        gathered = sample_candidates(lid, m, best, top_k);
        picked = gathered.x;
    }
    if (sp.temperature > 0.0 && gathered.y == 0u) {
        for (var i = lid; i < v; i += 256u) {
            zp[i].y = exp(zp[i].x - m);
        }
        // Everything kept: the cut below every key.
        var cut = vec2<u32>(0u, 0u);
        if (sp.top_k > 0u && sp.top_k < v) {
            // The largest t with #(key >= t) >= k, then the ties that fill up to k.
            var lo = 0u;
            var hi = 0xffffffffu;
            while (lo < hi) {
                let mid = hi - (hi - lo) / 2u;
                var c = 0u;
                for (var i = lid; i < v; i += 256u) {
                    c += u32(key(zp[i].x) >= mid);
                }
                if (sum_u32(lid, c) >= sp.top_k) {
                    lo = mid;
                } else {
                    hi = mid - 1u;
                }
            }
            var above = 0u;
            for (var i = lid; i < v; i += 256u) {
                above += u32(key(zp[i].x) > lo);
            }
            cut = tie_cut(lid, lo, sp.top_k - sum_u32(lid, above));
        }
        if (sp.top_p < 1.0) {
            var mass = 0.0;
            for (var i = lid; i < v; i += 256u) {
                mass += select(0.0, zp[i].y, kept(i, key(zp[i].x), cut));
            }
            let limit = sp.top_p * sum_f32(lid, mass);
            // The smallest t with mass(key > t) < limit (within the top-k set).
            var lo = 0u;
            var hi = 0xffffffffu;
            while (lo < hi) {
                let mid = lo + (hi - lo) / 2u;
                var above = 0.0;
                for (var i = lid; i < v; i += 256u) {
                    let kz = key(zp[i].x);
                    above += select(0.0, zp[i].y, kz > mid && kept(i, kz, cut));
                }
                if (sum_f32(lid, above) < limit) {
                    hi = mid;
                } else {
                    lo = mid + 1u;
                }
            }
            var above = 0.0;
            for (var i = lid; i < v; i += 256u) {
                let kz = key(zp[i].x);
                above += select(0.0, zp[i].y, kz > lo && kept(i, kz, cut));
            }
            // Tokens of key lo (mass q each, in index order) are kept while the mass before them
            // is below the limit: the first ceil(rest / q).
            let rest = limit - sum_f32(lid, above);
            let q = exp(unkey(lo) - m);
            let ties = tie_cut(lid, lo, u32(min(ceil(rest / q), f32(v))));
            // Within the top-k cut, tighter of the two.
            if (ties.x > cut.x || (ties.x == cut.x && ties.y < cut.y)) {
                cut = ties;
            }
        }
        // Draw over the kept tokens in index order: each thread sums a contiguous range.
        storageBarrier();
        let per = (v + 255u) / 256u;
        let first = lid * per;
        let last = min(first + per, v);
        var mass = 0.0;
        for (var i = first; i < last; i++) {
            mass += select(0.0, zp[i].y, kept(i, key(zp[i].x), cut));
        }
        workgroupBarrier();
        red_a[lid] = mass;
        workgroupBarrier();
        if (lid == 0u) {
            var total = 0.0;
            for (var t = 0u; t < 256u; t++) {
                total += red_a[t];
            }
            let goal = uniform01(index) * total;
            var acc = 0.0;
            var choice = best;
            for (var t = 0u; t < 256u; t++) {
                if (acc + red_a[t] > goal && red_a[t] > 0.0) {
                    let s = t * per;
                    let e = min(s + per, v);
                    for (var i = s; i < e; i++) {
                        if (kept(i, key(zp[i].x), cut)) {
                            choice = i;
                            acc += zp[i].y;
                            if (acc > goal) {
                                break;
                            }
                        }
                    }
                    break;
                }
                acc += red_a[t];
            }
            red_b[0] = choice;
        }
        workgroupBarrier();
        picked = red_b[0];
    }
    if (lid == 0u) {
        token[0] = picked;
        token[1] = picked;
        seen[picked / 32u] |= 1u << (picked % 32u);
    }
}

// The few most likely ids (the top-k, k <= CANDIDATES, or without top-k the CANDIDATES most
// likely): seven passes over the logits (eight for top-p without top-k) where the path above,
// which cuts the whole vocabulary by binary searches, takes about a hundred (32 per search, 15 per
// tie cut). The same cuts: the k-th largest key t found a byte at a time (radix select: how many
// keys under the bytes found so far have each value of the next byte), the ids above t and the
// first ties of t gathered in index order, then top-p and the draw over those k ids alone. Top-p
// without top-k needs the mass of the whole vocabulary, and gives up (returns (best, 0)) where
// the ids above t do not reach its limit: its cut then lies below them.
const CANDIDATES: u32 = 256u;

var<workgroup> byte_counts: array<atomic<u32>, 256>;
var<workgroup> chosen: vec2<u32>;
// Per thread: (ids above t, ties of t) in its range of ids, then the offsets of its first kept id
// and of its first tie.
var<workgroup> range_counts: array<vec2<u32>, 256>;
var<workgroup> cand_id: array<u32, CANDIDATES>;
var<workgroup> cand_key: array<u32, CANDIDATES>;
var<workgroup> cand_mass: array<f32, CANDIDATES>;
var<workgroup> top_p_key: atomic<u32>;

// The mass of the first k candidates whose key is above `t`, summed in index order.
fn candidate_mass_above(k: u32, t: u32) -> f32 {
    var mass = 0.0;
    for (var j = 0u; j < k; j++) {
        mass += select(0.0, cand_mass[j], cand_key[j] > t);
    }
    return mass;
}

// `top_k`: the top-k applies (0 < top_k < vocab); else top-p alone.
fn sample_candidates(lid: u32, m: f32, best: u32, top_k: bool) -> vec2<u32> {
    let v = sp.vocab;
    let k = select(min(v, CANDIDATES), sp.top_k, top_k);
    // t: the largest key with #(key >= t) >= k; need: its ties that are kept (k less those above).
    var t = 0u;
    var found = 0u;
    var need = k;
    for (var b = 0u; b < 4u; b++) {
        let shift = 24u - 8u * b;
        atomicStore(&byte_counts[lid], 0u);
        workgroupBarrier();
        for (var i = lid; i < v; i += 256u) {
            let kz = key(zp[i].x);
            if ((kz & found) == t) {
                atomicAdd(&byte_counts[(kz >> shift) & 0xffu], 1u);
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            // The byte of the need-th largest key under the bytes found, from the top.
            var above = 0u;
            var d = 255u;
            loop {
                let c = atomicLoad(&byte_counts[d]);
                if (above + c >= need || d == 0u) {
                    break;
                }
                above += c;
                d -= 1u;
            }
            chosen = vec2<u32>(d, need - above);
        }
        let pick = workgroupUniformLoad(&chosen);
        t |= pick.x << shift;
        found |= 0xffu << shift;
        need = pick.y;
    }
    // The kept ids in index order: each thread counts those of a contiguous range (written by
    // other threads: the storage barrier), thread 0 turns the counts into offsets, each thread
    // writes its own.
    storageBarrier();
    let per = (v + 255u) / 256u;
    let first = min(lid * per, v);
    let last = min(first + per, v);
    var n = vec2<u32>(0u);
    for (var i = first; i < last; i++) {
        let kz = key(zp[i].x);
        n += vec2<u32>(u32(kz > t), u32(kz == t));
    }
    range_counts[lid] = n;
    workgroupBarrier();
    if (lid == 0u) {
        var kept = 0u;
        var tied = 0u;
        for (var r = 0u; r < 256u; r++) {
            let c = range_counts[r];
            range_counts[r] = vec2<u32>(kept, tied);
            kept += c.x + min(c.y, need - min(need, tied));
            tied += c.y;
        }
    }
    workgroupBarrier();
    var at = range_counts[lid];
    for (var i = first; i < last; i++) {
        let kz = key(zp[i].x);
        if ((kz > t || (kz == t && at.y < need)) && at.x < CANDIDATES) {
            cand_id[at.x] = i;
            cand_key[at.x] = kz;
            at.x++;
        }
        at.y += u32(kz == t);
    }
    workgroupBarrier();
    if (lid < k) {
        cand_mass[lid] = exp(zp[cand_id[lid]].x - m);
    }
    if (lid == 0u) {
        atomicStore(&top_p_key, NONE);
    }
    workgroupBarrier();
    // Top-p: the smallest key t_p with mass(key > t_p) < limit (each candidate's mass above it
    // summed in index order), then the first of t_p's ties while the mass before them is below
    // the limit. Without top-p everything is kept.
    var limit = 0.0;
    if (sp.top_p < 1.0) {
        var total = 0.0;
        if (!top_k) {
            var mass = 0.0;
            for (var i = lid; i < v; i += 256u) {
                mass += exp(zp[i].x - m);
            }
            total = sum_f32(lid, mass);
        }
        let own = cand_key[min(lid, k - 1u)];
        var above = 0.0;
        for (var j = 0u; j < k; j++) {
            let w = cand_mass[j];
            if (top_k) {
                total += w;
            }
            above += select(0.0, w, cand_key[j] > own);
        }
        limit = sp.top_p * total;
        if (lid < k && above < limit) {
            atomicMin(&top_p_key, own);
        }
    }
    workgroupBarrier();
    if (lid == 0u) {
        var cut = vec2<u32>(0u, NONE);
        // Top-p without top-k: whether the ids above t reach the limit (then the cut is among
        // the candidates), unless they are the whole vocabulary.
        let inside = top_k || k == v || candidate_mass_above(k, t) >= limit;
        if (sp.top_p < 1.0) {
            let tp = atomicLoad(&top_p_key);
            let q = exp(unkey(tp) - m);
            cut = vec2<u32>(tp, u32(min(ceil((limit - candidate_mass_above(k, tp)) / q), f32(v))));
        }
        // The draw over the kept candidates in index order (a tie of cut.x is kept while fewer
        // than cut.y of them come before it).
        var total = 0.0;
        var tied = 0u;
        for (var j = 0u; j < k; j++) {
            let kz = cand_key[j];
            if (kz > cut.x || (kz == cut.x && tied < cut.y)) {
                total += cand_mass[j];
            }
            tied += u32(kz == cut.x);
        }
        let goal = uniform01(step.index) * total;
        var acc = 0.0;
        var choice = best;
        tied = 0u;
        for (var j = 0u; j < k; j++) {
            let kz = cand_key[j];
            if (kz > cut.x || (kz == cut.x && tied < cut.y)) {
                choice = cand_id[j];
                acc += cand_mass[j];
                if (acc > goal) {
                    break;
                }
            }
            tied += u32(kz == cut.x);
        }
        chosen = select(vec2<u32>(best, 0u), vec2<u32>(choice, 1u), inside);
    }
    return workgroupUniformLoad(&chosen);
}

// The float of a key.
fn unkey(k: u32) -> f32 {
    return bitcast<f32>(select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u));
}

// The cut (t, b) that keeps the first `need` tokens of key t in index order: the largest b with
// at most `need` of them below it.
fn tie_cut(lid: u32, t: u32, need: u32) -> vec2<u32> {
    var lo = 0u;
    var hi = sp.vocab;
    while (lo < hi) {
        let mid = hi - (hi - lo) / 2u;
        var c = 0u;
        for (var i = lid; i < mid; i += 256u) {
            c += u32(key(zp[i].x) == t);
        }
        if (sum_u32(lid, c) <= need) {
            lo = mid;
        } else {
            hi = mid - 1u;
        }
    }
    return vec2<u32>(t, lo);
}
#endif
