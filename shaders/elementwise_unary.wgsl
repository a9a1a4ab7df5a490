// Unary element-wise activations over f32.

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// CLIP's quick_gelu: x * sigmoid(1.702 x).
@compute @workgroup_size(256)
fn quick_gelu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let v = x[i];
    out[i] = v / (1.0 + exp(-1.702 * v));
}

// erf(a) for 0 <= a < 1 as a + a * Q(a^2): the exact leading term keeps the rounding error
// below one ulp. Q is a relative-minimax fit (degree 6 in a^2, max relative error 1.2e-9).
fn erf_small(a: f32) -> f32 {
    let s = a * a;
    let q = 0.12837916612625122 + s * (-0.3761262595653534 + s * (0.1128358542919159
        + s * (-0.026853816583752632 + s * (0.005188334733247757 + s * (-0.0008010247838683426
        + s * 7.854026625864208e-05)))));
    return a + a * q;
}

// erfc(a) for a >= 1 as exp(-a^2) * R(t), t = 1 / (1 + a/2); R is a relative-minimax fit
// (degree 8 in t over a in [1, 10], max relative error 5.6e-9). Underflows to 0 past a ~ 9.3.
fn erfc_large(a: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * a);
    let r = -4.1032544686459005e-06 + t * (0.2821994125843048 + t * (0.2809908092021942
        + t * (0.2529671788215637 + t * (0.1580420285463333 + t * (0.10534123331308365
        + t * (0.025062160566449165 + t * (-0.18504202365875244 + t * 0.08089161664247513)))))));
    return exp(-a * a) * r;
}

// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)). For x < 0, 1 + erf(z) = erfc(|z|) is computed
// directly, so the small negative tail keeps its relative accuracy instead of cancelling.
@compute @workgroup_size(256)
fn gelu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let v = x[i];
    let a = abs(v) * 0.70710678118654752;
    var one_plus_erf: f32;
    if (a < 1.0) {
        one_plus_erf = 1.0 + sign(v) * erf_small(a);
    } else if (v > 0.0) {
        one_plus_erf = 2.0 - erfc_large(a);
    } else {
        one_plus_erf = erfc_large(a);
    }
    out[i] = 0.5 * v * one_plus_erf;
}
