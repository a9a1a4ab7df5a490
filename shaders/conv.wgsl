// Patch embedding: Conv2d(3 -> C, kernel = stride = P, no bias) as a tiled matrix product
// out[m, n] = sum_k patch(m)[k] * weight[n, k], with m = image * patches + row * (W/P) + col and
// k = channel * P*P + ky * P + kx (the flattening of PyTorch's [C, 3, P, P] weight).
// Each 256-thread workgroup computes a TM x TN tile, staging KC-wide slices of both operands
// in workgroup memory; each thread owns 2 x 4 outputs.
// `#if F16`: the weight is f16, two per u32.

struct Params {
    m: u32,        // images * patches per image
    n: u32,        // output channels C
    k: u32,        // 3 * P * P
    size: u32,     // P
    h: u32,
    w: u32,
    cols: u32,     // W / P
    patches: u32,  // (H / P) * (W / P)
}

const TM: u32 = 32u;
const TN: u32 = 64u;
const KC: u32 = 16u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pixels: array<f32>;
#if F16
@group(0) @binding(2) var<storage, read> weight: array<u32>;
#else
@group(0) @binding(2) var<storage, read> weight: array<f32>;
#endif
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> a_tile: array<f32, 512>;   // [TM][KC]
var<workgroup> b_tile: array<f32, 1024>;  // [KC][TN]

fn load_weight(idx: u32) -> f32 {
#if F16
    return unpack2x16float(weight[idx / 2u])[idx & 1u];
#else
    return weight[idx];
#endif
}

// Element k of patch m's flattened [3, P, P] pixel block.
fn load_patch(m: u32, k: u32) -> f32 {
    let image = m / p.patches;
    let cell = m % p.patches;
    let py = (cell / p.cols) * p.size;
    let px = (cell % p.cols) * p.size;
    let pp = p.size * p.size;
    let channel = k / pp;
    let ky = (k % pp) / p.size;
    let kx = k % p.size;
    return pixels[((image * 3u + channel) * p.h + py + ky) * p.w + px + kx];
}

@compute @workgroup_size(16, 16)
fn patch_embed(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let m0 = wg.x * TM;
    let n0 = wg.y * TN;
    // Outputs (row lid3.y, columns lid3.x + 16 j) and (row lid3.y + 16, same columns), j = 0..3:
    // vectors whose components are named, not an array indexed by loop counters (NVIDIA Vulkan
    // puts those in local memory).
    var acc0 = vec4<f32>();
    var acc1 = vec4<f32>();
    for (var k0 = 0u; k0 < p.k; k0 += KC) {
        // Patch slice: consecutive threads read consecutive k (adjacent pixels of a patch row).
        for (var r = 0u; r < 2u; r++) {
            let e = lid + r * 256u;
            let m = m0 + e / KC;
            let k = k0 + e % KC;
            var v = 0.0;
            if (m < p.m && k < p.k) {
                v = load_patch(m, k);
            }
            a_tile[e] = v;
        }
        // Weight slice: consecutive threads read consecutive k of one output channel.
        for (var r = 0u; r < 4u; r++) {
            let e = lid + r * 256u;
            let n = n0 + e / KC;
            let kk = e % KC;
            var v = 0.0;
            if (n < p.n && k0 + kk < p.k) {
                v = load_weight(n * p.k + k0 + kk);
            }
            b_tile[kk * TN + e / KC] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KC; kk++) {
            let a0 = a_tile[lid3.y * KC + kk];
            let a1 = a_tile[(lid3.y + 16u) * KC + kk];
            let bb = kk * TN + lid3.x;
            let b = vec4<f32>(b_tile[bb], b_tile[bb + 16u], b_tile[bb + 32u], b_tile[bb + 48u]);
            acc0 += a0 * b;
            acc1 += a1 * b;
        }
        workgroupBarrier();
    }
    store_row(m0 + lid3.y, n0 + lid3.x, acc0);
    store_row(m0 + lid3.y + 16u, n0 + lid3.x, acc1);
}

// Outputs (m, n + 16 j) = v's component j, those inside the matrix.
fn store_row(m: u32, n: u32, v: vec4<f32>) {
    if (m >= p.m) {
        return;
    }
    if (n < p.n) {
        out[m * p.n + n] = v.x;
    }
    if (n + 16u < p.n) {
        out[m * p.n + n + 16u] = v.y;
    }
    if (n + 32u < p.n) {
        out[m * p.n + n + 32u] = v.z;
    }
    if (n + 48u < p.n) {
        out[m * p.n + n + 48u] = v.w;
    }
}
