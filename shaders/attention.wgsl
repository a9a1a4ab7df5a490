// variants: TILED HEAD_DIM_16 | TILED PARTIAL HEAD_DIM_16 | SPLIT HEAD_DIM_16 | COMBINE HEAD_DIM_16 | TILED HEAD_DIM_32 | TILED PARTIAL HEAD_DIM_32 | SPLIT HEAD_DIM_32 | COMBINE HEAD_DIM_32 | TILED HEAD_DIM_64 | TILED PARTIAL HEAD_DIM_64 | SPLIT HEAD_DIM_64 | COMBINE HEAD_DIM_64 | TILED HEAD_DIM_128 | TILED PARTIAL HEAD_DIM_128 | SPLIT HEAD_DIM_128 | COMBINE HEAD_DIM_128
// Scaled dot-product attention over f32 activations with an online (flash-attention) softmax:
// a running max and sum per query row, so no [Tq, Tk] score matrix and no overflow.
//
// q, out: [B, Tq, Hq, D]; k, v: [B, Tcap, Hkv, D] of which positions < kv_len are valid (the
// rest is never read). Query head h reads kv head h / group. The query rows that share a kv head,
// (t, g) for t < Tq and g < group, are numbered r = t * group + g, so one workgroup serves all the
// query heads of a kv head and reads each K/V tile once for them.
//
// Entry points:
// - attention_tiled: one thread per query row, 64 rows per workgroup, K/V tiles in workgroup
//   memory (prefill, vision tower). With PARTIAL, each workgroup also takes only one chunk of
//   the keys and writes an unnormalised partial like attention_split, which attention_combine
//   merges: for drivers that cap the loop iterations of an invocation (llvmpipe).
// - attention_split + attention_combine: flash-decoding for few rows (decode, Tq = 1): each
//   workgroup scores one chunk of keys for all rows of a kv head and writes an unnormalised partial
//   (max, sum, weighted values); the combine pass merges the chunks.

struct Params {
    batch: u32,
    tq: u32,
    hq: u32,
    hkv: u32,
    tcap: u32,
    kv_len: u32,
    causal: u32,
    q_offset: u32,
    group: u32,
    // attention_tiled: row tiles per (b, kv head).
    row_tiles: u32,
    // Key chunks per (b, kv head) and keys per chunk (attention_tiled with PARTIAL, split,
    // combine).
    chunks: u32,
    chunk_keys: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

#if HEAD_DIM_16
const D: u32 = 16u;
#endif
#if HEAD_DIM_32
const D: u32 = 32u;
#endif
#if HEAD_DIM_64
const D: u32 = 64u;
#endif
#if HEAD_DIM_128
const D: u32 = 128u;
#endif

// Stands for a masked score; far below any real one, finite so that differences stay defined.
const MASKED: f32 = -3.0e38;

// Exclusive end of the keys query position t may see.
fn key_limit(t: u32) -> u32 {
    if (p.causal != 0u) {
        return min(p.kv_len, p.q_offset + t + 1u);
    }
    return p.kv_len;
}

fn kv_index(b: u32, j: u32, kvh: u32) -> u32 {
    return ((b * p.tcap + j) * p.hkv + kvh) * D;
}

fn q_index(b: u32, r: u32, kvh: u32) -> u32 {
    let t = r / p.group;
    let h = kvh * p.group + r % p.group;
    return ((b * p.tq + t) * p.hq + h) * D;
}

#if TILED
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
#if PARTIAL
// As attention_split's: [B, Hkv, chunks, rows, D] and [B, Hkv, chunks, rows] (max, sum).
@group(0) @binding(4) var<storage, read_write> part_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> part_stats: array<vec2<f32>>;
#else
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
#endif

const ROWS_PER_WG: u32 = 64u;
// Floats per K (and V) tile: two tiles take 16 KiB, WebGPU's default workgroup memory.
const TILE_FLOATS: u32 = 2048u;
const BK: u32 = TILE_FLOATS / D;

var<workgroup> k_tile: array<f32, TILE_FLOATS>;
var<workgroup> v_tile: array<f32, TILE_FLOATS>;

@compute @workgroup_size(64)
fn attention_tiled(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let wg_index = wg.x + wg.y * nwg.x;
    if (wg_index >= p.batch * p.hkv * p.row_tiles * p.chunks) {
        return;
    }
    let chunk = wg_index % p.chunks;
    let tile = (wg_index / p.chunks) % p.row_tiles;
    let bh = wg_index / (p.chunks * p.row_tiles);
    let kvh = bh % p.hkv;
    let b = bh / p.hkv;
    let rows = p.tq * p.group;
    let r = tile * ROWS_PER_WG + lid;
    let is_row = r < rows;
    // Idle threads work on the last row (results dropped) so that all reach the barriers.
    let row = min(r, rows - 1u);
    let last_row = min(tile * ROWS_PER_WG + ROWS_PER_WG, rows) - 1u;
    // This workgroup's keys: begin..end (the whole cache unless PARTIAL splits it).
    let begin = chunk * p.chunk_keys;
    let end = min(key_limit(last_row / p.group), begin + p.chunk_keys);
    let limit = min(key_limit(row / p.group), end);

    var qr: array<f32, D>;
    var acc: array<f32, D>;
    let qb = q_index(b, row, kvh);
    for (var d = 0u; d < D; d++) {
        qr[d] = q[qb + d] * p.scale;
        acc[d] = 0.0;
    }
    var m = MASKED;
    var l = 0.0;
    var s: array<f32, BK>;

    for (var k0 = begin; k0 < end; k0 += BK) {
        // The previous tile must be consumed before it is overwritten.
        workgroupBarrier();
        for (var i = lid; i < TILE_FLOATS; i += ROWS_PER_WG) {
            let j = k0 + i / D;
            var kx = 0.0;
            var vx = 0.0;
            // Positions past the valid cache may hold anything (NaN): never read them.
            if (j < end) {
                let idx = kv_index(b, j, kvh) + i % D;
                kx = k[idx];
                vx = v[idx];
            }
            k_tile[i] = kx;
            v_tile[i] = vx;
        }
        workgroupBarrier();

        var tile_max = m;
        for (var j = 0u; j < BK; j++) {
            var dot = 0.0;
            for (var d = 0u; d < D; d++) {
                dot += qr[d] * k_tile[j * D + d];
            }
            s[j] = select(MASKED, dot, k0 + j < limit);
            tile_max = max(tile_max, s[j]);
        }
        let alpha = exp(m - tile_max);
        m = tile_max;
        l *= alpha;
        for (var j = 0u; j < BK; j++) {
            let pj = select(0.0, exp(s[j] - m), k0 + j < limit);
            s[j] = pj;
            l += pj;
        }
        for (var d = 0u; d < D; d++) {
            var a = acc[d] * alpha;
            for (var j = 0u; j < BK; j++) {
                a += s[j] * v_tile[j * D + d];
            }
            acc[d] = a;
        }
    }

    if (is_row) {
#if PARTIAL
        let part_row = bh * p.chunks + chunk;
        part_stats[part_row * rows + r] = vec2(m, l);
        for (var d = 0u; d < D; d++) {
            part_out[(part_row * rows + r) * D + d] = acc[d];
        }
#else
        let inv = 1.0 / l;
        for (var d = 0u; d < D; d++) {
            out[qb + d] = acc[d] * inv;
        }
#endif
    }
}
#endif

#if SPLIT
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
// [B, Hkv, chunks, rows, D] weighted value sums and [B, Hkv, chunks, rows] (max, sum) pairs.
@group(0) @binding(4) var<storage, read_write> part_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> part_stats: array<vec2<f32>>;

// Keys per workgroup (one per thread while scoring).
const CHUNK: u32 = 128u;
// Most query rows per kv head the split kernel serves.
const MAX_ROWS: u32 = 8u;

var<workgroup> q_rows: array<f32, MAX_ROWS * D>;
var<workgroup> probs: array<f32, MAX_ROWS * CHUNK>;

@compute @workgroup_size(128)
fn attention_split(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let wg_index = wg.x + wg.y * nwg.x;
    if (wg_index >= p.batch * p.hkv * p.chunks) {
        return;
    }
    let chunk = wg_index % p.chunks;
    let bh = wg_index / p.chunks;
    let kvh = bh % p.hkv;
    let b = bh / p.hkv;
    let rows = p.tq * p.group;
    let k0 = chunk * CHUNK;
    let n_keys = min(CHUNK, p.kv_len - k0);

    for (var i = lid; i < rows * D; i += CHUNK) {
        q_rows[i] = q[q_index(b, i / D, kvh) + i % D] * p.scale;
    }
    workgroupBarrier();

    // Scores: thread lid takes key k0 + lid for every row.
    if (lid < n_keys) {
        var kr: array<f32, D>;
        let kb = kv_index(b, k0 + lid, kvh);
        for (var d = 0u; d < D; d++) {
            kr[d] = k[kb + d];
        }
        for (var r = 0u; r < rows; r++) {
            var dot = 0.0;
            for (var d = 0u; d < D; d++) {
                dot += q_rows[r * D + d] * kr[d];
            }
            probs[r * CHUNK + lid] = select(MASKED, dot, k0 + lid < key_limit(r / p.group));
        }
    }
    workgroupBarrier();

    // Row statistics: thread r scans its row's scores and turns them into exp(s - max).
    let part_row = bh * p.chunks + chunk;
    if (lid < rows) {
        var m = MASKED;
        for (var j = 0u; j < n_keys; j++) {
            m = max(m, probs[lid * CHUNK + j]);
        }
        var l = 0.0;
        for (var j = 0u; j < n_keys; j++) {
            let s = probs[lid * CHUNK + j];
            let pj = select(0.0, exp(s - m), s != MASKED);
            probs[lid * CHUNK + j] = pj;
            l += pj;
        }
        part_stats[part_row * rows + lid] = vec2(m, l);
    }
    workgroupBarrier();

    for (var i = lid; i < rows * D; i += CHUNK) {
        let r = i / D;
        let d = i % D;
        var a = 0.0;
        for (var j = 0u; j < n_keys; j++) {
            a += probs[r * CHUNK + j] * v[kv_index(b, k0 + j, kvh) + d];
        }
        part_out[part_row * rows * D + i] = a;
    }
}
#endif

#if COMBINE
@group(0) @binding(1) var<storage, read> part_out: array<f32>;
@group(0) @binding(2) var<storage, read> part_stats: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn attention_combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * 256u;
    if (e >= p.batch * p.tq * p.hq * D) {
        return;
    }
    let d = e % D;
    let h = (e / D) % p.hq;
    let t = (e / (D * p.hq)) % p.tq;
    let b = e / (D * p.hq * p.tq);
    let kvh = h / p.group;
    let rows = p.tq * p.group;
    let r = t * p.group + h % p.group;
    let first = (b * p.hkv + kvh) * p.chunks;
    var m = MASKED;
    for (var c = 0u; c < p.chunks; c++) {
        m = max(m, part_stats[(first + c) * rows + r].x);
    }
    var num = 0.0;
    var den = 0.0;
    for (var c = 0u; c < p.chunks; c++) {
        let st = part_stats[(first + c) * rows + r];
        // Chunks a row cannot see have max MASKED and weight exp(MASKED - m) = 0.
        let w = exp(st.x - m);
        num += w * part_out[((first + c) * rows + r) * D + d];
        den += w * st.y;
    }
    out[e] = num / den;
}
#endif
