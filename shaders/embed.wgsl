// Row gathers: token embeddings (table F32 / F16 / Q8 / Q4) and f32 row gathers.
// variants: F32 | F16 | Q8 QUANT | Q4 QUANT
// One thread per output element. The table binding may be a window of rows
// [p.start, p.start + p.window); each dispatch writes only the outputs whose row falls inside
// its window, so the windows together cover every id. Ids >= p.vocab are clamped to the last
// row (the host validates ids before upload; the clamp only keeps a bad id from reading out of
// bounds).

struct Params {
    count: u32,
    d: u32,
    vocab: u32,
    start: u32,
    window: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
#if F32
@group(0) @binding(2) var<storage, read> table: array<f32>;
#else
@group(0) @binding(2) var<storage, read> table: array<u32>;
#endif
#if QUANT
@group(0) @binding(3) var<storage, read> scales: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
#else
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
#endif

// Element `idx` of the bound window (row-major, layouts as in tensor.rs / quant.rs).
fn load(idx: u32) -> f32 {
#if F32
    return table[idx];
#endif
#if F16
    return unpack2x16float(table[idx / 2u])[idx & 1u];
#endif
#if QUANT
    let group = idx / 32u;
    let scale = unpack2x16float(scales[group / 2u])[group & 1u];
#endif
#if Q8
    let q = extractBits(i32(table[idx / 4u]), 8u * (idx & 3u), 8u);
    return f32(q) * scale;
#endif
#if Q4
    let q = extractBits(table[idx / 8u], 4u * (idx & 7u), 4u);
    return (f32(q) - 8.0) * scale;
#endif
}

@compute @workgroup_size(256)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.count * p.d) {
        return;
    }
    let t = i / p.d;
    let c = i % p.d;
    let id = min(ids[t], p.vocab - 1u);
    if (id < p.start || id - p.start >= p.window) {
        return;
    }
    out[i] = load((id - p.start) * p.d + c);
}
