// Bandwidth probe (benchmarks only): every thread streams a grid-strided share of `data` with
// 16-byte loads and writes its sum, so that the loads cannot be dropped. What a kernel that only
// reads weights (a decode step) can reach on this GPU.

struct Params {
    // vec4 elements of data.
    len: u32,
    // Threads in the whole grid.
    threads: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> data: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> sums: array<f32>;

@compute @workgroup_size(256)
fn read_all(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 256u;
    if (t >= p.threads) {
        return;
    }
    var acc = vec4<f32>(0.0);
    for (var i = t; i < p.len; i += p.threads) {
        acc += data[i];
    }
    sums[t] = acc.x + acc.y + acc.z + acc.w;
}
