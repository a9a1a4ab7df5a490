// Row gathers: token embeddings (table F32 / F16 / Q8 / Q6 / Q4) and f32 row gathers.
// variants: F32 | F16 | Q8 QUANT | Q6 QUANT | Q4 QUANT
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

#if Q4
// quant.rs Q4_VALUES: nibble n stands for Q4_VALUES[n] * scale.
const Q4_VALUES = array<f32, 16>(-127.0, -104.0, -83.0, -65.0, -49.0, -35.0, -22.0, -10.0, 1.0, 13.0, 25.0, 38.0,
                                 53.0, 69.0, 89.0, 113.0);
#endif

// Element `idx` of the bound window (row-major, layouts as in tensor.rs / quant.rs).
fn load(idx: u32) -> f32 {
#if F32
    return table[idx];
#endif
#if F16
    return unpack2x16float(table[idx / 2u])[idx & 1u];
#endif
#if Q8
    let group = idx / 32u;
#endif
#if Q6
    let group = idx / 64u;
#endif
#if Q4
    let group = idx / 64u;
#endif
#if QUANT
    let scale = unpack2x16float(scales[group / 2u])[group & 1u];
#endif
#if Q8
    let q = extractBits(i32(table[idx / 4u]), 8u * (idx & 3u), 8u);
    return f32(q) * scale;
#endif
#if Q6
    // Rows of d values: d / 8 words of low nibbles, then d / 16 words of high bit pairs.
    let row = idx / p.d;
    let col = idx % p.d;
    let base = row * (3u * p.d / 16u);
    let lo = extractBits(table[base + col / 8u], 4u * (col & 7u), 4u);
    let hi = extractBits(table[base + p.d / 8u + col / 16u], 2u * (col & 15u), 2u);
    return (f32(lo | (hi << 4u)) - 32.0) * scale;
#endif
#if Q4
    let q = extractBits(table[idx / 8u], 4u * (idx & 7u), 4u);
    return Q4_VALUES[q] * scale;
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
