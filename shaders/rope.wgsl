// Rotary position embedding, rotate-half convention: for i < D/2 and position pos,
//   out[i]       = x[i] * cos(a) - x[i + D/2] * sin(a)
//   out[i + D/2] = x[i + D/2] * cos(a) + x[i] * sin(a),   a = f32(pos) * inv_freq[i]
// like transformers (angle as an f32 product, inv_freq computed on the host in f32).
//
// WGSL's sin/cos are only specified within [-pi, pi] and angles reach the position (thousands of
// radians), so sin/cos are computed here: Cody-Waite reduction by pi/4 with pi/4 split in three
// (the first two parts have few bits, so their products with the octant are exact) and the
// Cephes single-precision polynomials; the error stays below 1e-7 for angles up to 8192 and below
// 2e-6 up to 131072.

struct Params {
    rows: u32,      // B * T * H
    heads: u32,
    seq: u32,       // T
    half_dim: u32,  // D / 2
    pos_offset: u32,
    // inv_freq[i] is inv_freq[i / 4][i % 4] (uniform arrays need a 16-byte stride).
    inv_freq: array<vec4<f32>, 32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const FOUR_OVER_PI: f32 = 1.2732395447351628;
const PI4_A: f32 = 0.78515625;
const PI4_B: f32 = 2.4187564849853515625e-4;
const PI4_C: f32 = 3.77489497744594108e-8;

// (sin(a), cos(a)) for a >= 0.
fn sin_cos(a: f32) -> vec2<f32> {
    // Octant, rounded up to even so that the remainder lies in [-pi/4, pi/4].
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

@compute @workgroup_size(256)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.half_dim) {
        return;
    }
    let row = idx / p.half_dim;
    let i = idx % p.half_dim;
    let t = (row / p.heads) % p.seq;
    let angle = f32(p.pos_offset + t) * p.inv_freq[i / 4u][i % 4u];
    let sc = sin_cos(angle);
    let lo = row * 2u * p.half_dim + i;
    let hi = lo + p.half_dim;
    let x_lo = x[lo];
    let x_hi = x[hi];
    out[lo] = x_lo * sc.y - x_hi * sc.x;
    out[hi] = x_hi * sc.y + x_lo * sc.x;
}
