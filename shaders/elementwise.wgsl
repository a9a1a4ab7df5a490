// Binary element-wise kernels over f32 activations. `b` repeats every `nb` elements, which
// broadcasts it over the leading dimensions of `a` (nb == n when the shapes are equal).

struct Params {
    n: u32,
    nb: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    out[i] = a[i] + b[i % p.nb];
}

// silu(a) * b with a = gate, b = up. For very negative a, exp(-a) overflows to +inf and the
// quotient is -0, which is the right limit.
@compute @workgroup_size(256)
fn silu_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let g = a[i];
    out[i] = g / (1.0 + exp(-g)) * b[i % p.nb];
}
