// Row normalisations over the last dimension. LANES threads share a row (a power of two up to
// 256, picked from D so that each thread takes about 16 values), so a 256-thread workgroup
// covers 256 / LANES rows: short rows (CLIP's 32-wide test tower, or any D below 4096) keep every
// thread busy and pay for log2(LANES) reduction steps instead of eight.
// `#if LAYER`: LayerNorm with weight and bias; otherwise RMSNorm with weight only.

struct Params {
    rows: u32,
    d: u32,
    eps: f32,
}

const WG: u32 = 256u;
override LANES: u32 = 256u;
override ROWS: u32 = WG / LANES;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
#if LAYER
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
#else
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
#endif

var<workgroup> partial_a: array<f32, WG>;
var<workgroup> partial_b: array<f32, WG>;

// Sums `a` and `b` over the LANES threads of this thread's row (pairwise tree, so the rounding
// error grows with log2 of the row length, not linearly). Every thread of the workgroup calls it.
fn row_sum2(lid: u32, a: f32, b: f32) -> vec2<f32> {
    partial_a[lid] = a;
    partial_b[lid] = b;
    workgroupBarrier();
    let lane = lid % LANES;
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            partial_a[lid] += partial_a[lid + s];
            partial_b[lid] += partial_b[lid + s];
        }
        workgroupBarrier();
    }
    let first = lid - lane;
    let total = vec2<f32>(partial_a[first], partial_b[first]);
    // Nobody may overwrite the partials before every thread has read the total.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn norm(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.x + wg.y * nwg.x) * ROWS + lid / LANES;
    // Threads past the last row still take part in the barriers; they read and write nothing.
    let n = select(0u, p.d, row < p.rows);
    let lane = lid % LANES;
    let base = row * p.d;
    let d = f32(p.d);
#if LAYER
    // Corrected two-pass mean/variance: a first mean m0, then the sums of (x - m0) and
    // (x - m0)^2. The mean is kept as m0 + delta, never rounded into one f32, so rows with a
    // large mean and a tiny spread (mean 1000, std 1e-2) normalise accurately.
    var sum = 0.0;
    for (var i = lane; i < n; i += LANES) {
        sum += x[base + i];
    }
    let m0 = row_sum2(lid, sum, 0.0).x / d;
    var dev = 0.0;
    var dev2 = 0.0;
    for (var i = lane; i < n; i += LANES) {
        let c = x[base + i] - m0;
        dev += c;
        dev2 += c * c;
    }
    let sums = row_sum2(lid, dev, dev2);
    let delta = sums.x / d;
    let variance = max(sums.y / d - delta * delta, 0.0);
    let rstd = inverseSqrt(variance + p.eps);
    for (var i = lane; i < n; i += LANES) {
        out[base + i] = ((x[base + i] - m0) - delta) * rstd * weight[i] + bias[i];
    }
#else
    var sum2 = 0.0;
    for (var i = lane; i < n; i += LANES) {
        let v = x[base + i];
        sum2 += v * v;
    }
    let rms = inverseSqrt(row_sum2(lid, sum2, 0.0).x / d + p.eps);
    for (var i = lane; i < n; i += LANES) {
        out[base + i] = x[base + i] * rms * weight[i];
    }
#endif
}
