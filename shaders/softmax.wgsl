// Softmax over the last dimension of f32 rows: one workgroup per row, max and sum reduced in
// workgroup memory, exp(x - max) so that large inputs cannot overflow.

struct Params {
    rows: u32,
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
var<workgroup> scratch: array<f32, WG>;

// Tree reduction of `scratch` (max when `take_max`, else sum); every thread gets the result.
fn reduce(lid: u32, value: f32, take_max: bool) -> f32 {
    scratch[lid] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            let other = scratch[lid + stride];
            scratch[lid] = select(scratch[lid] + other, max(scratch[lid], other), take_max);
        }
        workgroupBarrier();
    }
    let result = scratch[0];
    // Nobody may overwrite scratch[0] before all threads have read it.
    workgroupBarrier();
    return result;
}

@compute @workgroup_size(256)
fn softmax(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wg.x + wg.y * nwg.x;
    // Uniform per workgroup, so returning here keeps the barriers uniform.
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var m = -3.0e38;
    for (var i = lid; i < p.n; i += WG) {
        m = max(m, x[base + i]);
    }
    m = reduce(lid, m, true);
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        s += exp(x[base + i] - m);
    }
    s = reduce(lid, s, false);
    let inv = 1.0 / s;
    for (var i = lid; i < p.n; i += WG) {
        out[base + i] = exp(x[base + i] - m) * inv;
    }
}
