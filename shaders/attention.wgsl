// variants: TILED | TILED PARTIAL | TILED SUBGROUPS | TILED PARTIAL SUBGROUPS | TILED KV_F16 SUBGROUPS | TILED PARTIAL KV_F16 SUBGROUPS | SPLIT | COMBINE | TILED KV_F16 | TILED PARTIAL KV_F16 | SPLIT KV_F16 | KV_STORE_F16 | TILED ROWS | TILED ROWS PARTIAL | TILED ROWS KV_F16 | TILED ROWS PARTIAL KV_F16 | TILED ROWS SUBGROUPS | TILED ROWS PARTIAL SUBGROUPS | TILED ROWS KV_F16 SUBGROUPS | TILED ROWS PARTIAL KV_F16 SUBGROUPS
// Scaled dot-product attention over f32 queries with an online (flash-attention) softmax: a
// running max and sum per query row, so no [Tq, Tk] score matrix and no overflow. K/V are f32 or,
// with KV_F16, f16 (two halves per u32 word, read with unpack2x16float: no device feature needed).
//
// q, out: [B, Tq, Hq, D]; k, v: [B, Tcap, Hkv, D] of which positions < kv_len are valid (the
// rest is never read). Query head h reads kv head h / group. The query rows that share a kv head,
// (t, g) for t < Tq and g < group, are numbered r = t * group + g, so one workgroup serves all the
// query heads of a kv head and reads each K/V tile once for them.
//
// The head dim D (1..=256) is an override constant, so every head dim gets its own pipeline with
// constant loop bounds.
//
// Entry points:
// - attention_tiled: flash attention for prefill and the vision tower. LANES threads share a
//   query row, each owning a slice of W <= 16 dims of q and of the output (registers stay small at
//   any D); K/V tiles of BK keys go through workgroup memory, the lanes' partial dot products are
//   summed there (with SUBGROUPS, by shuffles among the row's consecutive invocations instead,
//   which leaves the workgroup memory to tiles of up to 32 keys). With PARTIAL, each workgroup
//   also takes only one chunk of the keys and writes an unnormalised partial like
//   attention_split, which attention_combine merges: for drivers that cap the loop iterations of
//   an invocation (llvmpipe).
// - attention_rows (TILED ROWS): attention_tiled for head dims of at most 16 that are multiples
//   of 4 (four query rows per thread) or whose lanes own whole vectors (two rows per thread):
//   each K/V read from workgroup memory serves several rows (see its section).
// - attention_split + attention_combine: flash-decoding for few rows (decode, Tq = 1): each
//   workgroup scores one chunk of keys for all rows of a kv head and writes an unnormalised partial
//   (max, sum, weighted values); the combine pass merges the chunks.
// - kv_store (KV_STORE_F16): writes f32 rows into an f16 cache at a position.

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

override D: u32 = 64u;

// Stands for a masked score; far below any real one, finite so that differences stay defined.
const MASKED: f32 = -3.0e38;

#if !KV_STORE_F16
@group(0) @binding(0) var<uniform> p: Params;

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
#endif

#if !COMBINE
#if !KV_STORE_F16
@group(0) @binding(1) var<storage, read> q: array<f32>;
#if KV_F16
@group(0) @binding(2) var<storage, read> k: array<u32>;
@group(0) @binding(3) var<storage, read> v: array<u32>;

fn k_at(e: u32) -> f32 {
    return unpack2x16float(k[e >> 1u])[e & 1u];
}
fn v_at(e: u32) -> f32 {
    return unpack2x16float(v[e >> 1u])[e & 1u];
}
#else
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;

fn k_at(e: u32) -> f32 {
    return k[e];
}
fn v_at(e: u32) -> f32 {
    return v[e];
}
#endif
#endif
#endif

#if TILED
#if PARTIAL
// As attention_split's: [B, Hkv, chunks, rows, D] and [B, Hkv, chunks, rows] (max, sum).
@group(0) @binding(4) var<storage, read_write> part_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> part_stats: array<vec2<f32>>;
#else
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
#endif

const THREADS: u32 = 256u;
// Floats per K (and V) tile and most keys per tile: the tiles and the partial dot products
// (THREADS * 8) take 16 KiB, WebGPU's default workgroup memory. With SUBGROUPS the lanes of a row
// (consecutive invocations) sum their dots by shuffles, so the tiles take all of it.
#if SUBGROUPS
const TILE_FLOATS: u32 = 2048u;
const BK_MAX: u32 = 32u;
#else
const TILE_FLOATS: u32 = 1024u;
const BK_MAX: u32 = 8u;
#endif
// Most head-dim values one thread owns.
const W_MAX: u32 = 16u;
// Threads per query row (a power of two, at least D / W_MAX), dims per thread (ceil(D / LANES))
// and keys per tile (min(BK_MAX, TILE_FLOATS / D), a multiple of 8 where over 8: the keys are
// weighed eight at a time); set by the host. VEC4 (D and W multiples of
// 4) reads the tiles a vec4 at a time: several times fewer loads where each is costly (llvmpipe
// loads lane by lane).
override LANES: u32 = 4u;
override W: u32 = 16u;
override BK: u32 = 16u;
override VEC4: bool = true;

// Tiles of BK keys of D floats, four floats per element.
var<workgroup> k_tile: array<vec4<f32>, TILE_FLOATS / 4u>;
var<workgroup> v_tile: array<vec4<f32>, TILE_FLOATS / 4u>;
#if !SUBGROUPS
// Float j * THREADS + thread: a lane's dot product of its q slice with key j of the tile.
var<workgroup> partial: array<vec4<f32>, THREADS * BK_MAX / 4u>;
#endif

@compute @workgroup_size(256)
fn attention_tiled(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let wg_index = wg.x + wg.y * nwg.x;
    if (wg_index >= p.batch * p.hkv * p.row_tiles * p.chunks) {
        return;
    }
    let rows_per_wg = THREADS / LANES;
    let chunk = wg_index % p.chunks;
    let tile = (wg_index / p.chunks) % p.row_tiles;
    let bh = wg_index / (p.chunks * p.row_tiles);
    let kvh = bh % p.hkv;
    let b = bh / p.hkv;
    let rows = p.tq * p.group;
    let slot = lid / LANES;
    let lane = lid % LANES;
    let r = tile * rows_per_wg + slot;
    let is_row = r < rows;
    // Idle threads work on the last row (results dropped) so that all reach the barriers.
    let row = min(r, rows - 1u);
    let last_row = min(tile * rows_per_wg + rows_per_wg, rows) - 1u;
    // This workgroup's keys: begin..end (the whole cache unless PARTIAL splits it).
    let begin = chunk * p.chunk_keys;
    let end = min(key_limit(last_row / p.group), begin + p.chunk_keys);
    let limit = min(key_limit(row / p.group), end);

    // This lane's dims: d0..d0 + wn (a constant W when LANES divides D; high lanes may own none).
    let d0 = min(lane * W, D);
    let wn = select(min(W, D - d0), W, LANES * W == D);
    let qb = q_index(b, row, kvh) + d0;
    // VEC4: the lane's q slice and output sums are four vectors each (W <= 16), the tile's scores
    // two (BK <= 8), all separate variables: arrays indexed by loop counters can go to local
    // memory (NVIDIA Vulkan). Other head dims keep arrays.
    var q0 = vec4(0.0);
    var q1 = vec4(0.0);
    var q2 = vec4(0.0);
    var q3 = vec4(0.0);
    var a0 = vec4(0.0);
    var a1 = vec4(0.0);
    var a2 = vec4(0.0);
    var a3 = vec4(0.0);
    var qr: array<f32, W_MAX>;
    var acc: array<f32, W_MAX>;
    if (VEC4) {
        q0 = q4_at(qb);
        if (W > 4u) {
            q1 = q4_at(qb + 4u);
        }
        if (W > 8u) {
            q2 = q4_at(qb + 8u);
        }
        if (W > 12u) {
            q3 = q4_at(qb + 12u);
        }
    } else {
        for (var w = 0u; w < wn; w++) {
            qr[w] = q[qb + w] * p.scale;
        }
    }
    var m = MASKED;
    var l = 0.0;

    for (var k0 = begin; k0 < end; k0 += BK) {
        // The previous tile and its partial dots must be consumed before they are overwritten.
        workgroupBarrier();
        for (var i4 = lid; i4 < (BK * D + 3u) / 4u; i4 += THREADS) {
            // Four elements by name, not a vector indexed by a loop counter (NVIDIA Vulkan puts
            // those in local memory).
            let e0 = tile_kv(4u * i4, k0, end, b, kvh);
            let e1 = tile_kv(4u * i4 + 1u, k0, end, b, kvh);
            let e2 = tile_kv(4u * i4 + 2u, k0, end, b, kvh);
            let e3 = tile_kv(4u * i4 + 3u, k0, end, b, kvh);
            k_tile[i4] = vec4(e0.x, e1.x, e2.x, e3.x);
            v_tile[i4] = vec4(e0.y, e1.y, e2.y, e3.y);
        }
        workgroupBarrier();

#if !SUBGROUPS
        for (var j = 0u; j < BK; j++) {
            let pi = j * THREADS + lid;
            partial[pi / 4u][pi % 4u] = lane_dot(j * D + d0, wn, q0, q1, q2, q3, &qr);
        }
        workgroupBarrier();
#endif

        // Keys j8..j8 + 7 of the tile at a time (one step where BK <= 8).
        for (var j8 = 0u; j8 < BK; j8 += 8u) {
#if SUBGROUPS
            let dots0 = vec4(lane_dot(j8 * D + d0, wn, q0, q1, q2, q3, &qr),
                             lane_dot((j8 + 1u) * D + d0, wn, q0, q1, q2, q3, &qr),
                             lane_dot((j8 + 2u) * D + d0, wn, q0, q1, q2, q3, &qr),
                             lane_dot((j8 + 3u) * D + d0, wn, q0, q1, q2, q3, &qr));
            let dots1 = vec4(lane_dot((j8 + 4u) * D + d0, wn, q0, q1, q2, q3, &qr),
                             lane_dot((j8 + 5u) * D + d0, wn, q0, q1, q2, q3, &qr),
                             lane_dot((j8 + 6u) * D + d0, wn, q0, q1, q2, q3, &qr),
                             lane_dot((j8 + 7u) * D + d0, wn, q0, q1, q2, q3, &qr));
            let s0 = scores4(row_sum(dots0), j8, k0, limit);
            let s1 = scores4(row_sum(dots1), j8 + 4u, k0, limit);
#else
            // Every lane of a row sums the same partials, so all keep identical softmax statistics.
            let first_lane = slot * LANES;
            let s0 = vec4(row_score(0u, k0, limit, first_lane), row_score(1u, k0, limit, first_lane),
                          row_score(2u, k0, limit, first_lane), row_score(3u, k0, limit, first_lane));
            let s1 = vec4(row_score(4u, k0, limit, first_lane), row_score(5u, k0, limit, first_lane),
                          row_score(6u, k0, limit, first_lane), row_score(7u, k0, limit, first_lane));
#endif
            let tile_max = max(m, max(max(max(s0.x, s0.y), max(s0.z, s0.w)), max(max(s1.x, s1.y), max(s1.z, s1.w))));
            let alpha = exp(m - tile_max);
            m = tile_max;
            // Masked keys (and keys past the tile) weigh 0.
            let p0 = select(vec4(0.0), exp(s0 - m), s0 != vec4(MASKED));
            let p1 = select(vec4(0.0), exp(s1 - m), s1 != vec4(MASKED));
            l = l * alpha + p0.x + p0.y + p0.z + p0.w + p1.x + p1.y + p1.z + p1.w;
            if (VEC4) {
                let t = (j8 * D + d0) / 4u;
                a0 = weigh_values(a0 * alpha, p0, p1, t);
                if (W > 4u) {
                    a1 = weigh_values(a1 * alpha, p0, p1, t + 1u);
                }
                if (W > 8u) {
                    a2 = weigh_values(a2 * alpha, p0, p1, t + 2u);
                }
                if (W > 12u) {
                    a3 = weigh_values(a3 * alpha, p0, p1, t + 3u);
                }
            } else {
                for (var w = 0u; w < wn; w++) {
                    var a = acc[w] * alpha;
                    for (var j = 0u; j < min(BK, 8u); j++) {
                        let e = (j8 + j) * D + d0 + w;
                        a += score_of(p0, p1, j) * v_tile[e / 4u][e % 4u];
                    }
                    acc[w] = a;
                }
            }
        }
    }

    if (is_row) {
#if PARTIAL
        let part_row = (bh * p.chunks + chunk) * rows + r;
        if (lane == 0u) {
            part_stats[part_row] = vec2(m, l);
        }
        let ob = part_row * D + d0;
        let scale = 1.0;
#else
        let ob = qb;
        let scale = 1.0 / l;
#endif
        if (VEC4) {
            store4(ob, a0 * scale);
            if (W > 4u) {
                store4(ob + 4u, a1 * scale);
            }
            if (W > 8u) {
                store4(ob + 8u, a2 * scale);
            }
            if (W > 12u) {
                store4(ob + 12u, a3 * scale);
            }
        } else {
            for (var w = 0u; w < wn; w++) {
#if PARTIAL
                part_out[ob + w] = acc[w] * scale;
#else
                out[ob + w] = acc[w] * scale;
#endif
            }
        }
    }
}

// K and V of element i of the tile of keys from k0 (0 past the tile and past `end`).
fn tile_kv(i: u32, k0: u32, end: u32, b: u32, kvh: u32) -> vec2<f32> {
    let j = k0 + i / D;
    // Positions past the valid cache may hold anything (NaN): never read them.
    if (i >= BK * D || j >= end) {
        return vec2(0.0);
    }
    let idx = kv_index(b, j, kvh) + i % D;
    return vec2(k_at(idx), v_at(idx));
}

// This lane's dot product of its q slice (q0..q3, or qr where not VEC4) with the tile's K from
// element e0.
fn lane_dot(e0: u32, wn: u32, q0: vec4<f32>, q1: vec4<f32>, q2: vec4<f32>, q3: vec4<f32>,
            qr: ptr<function, array<f32, W_MAX>>) -> f32 {
    if (VEC4) {
        let t = e0 / 4u;
        var dot4 = q0 * k_tile[t];
        if (W > 4u) {
            dot4 += q1 * k_tile[t + 1u];
        }
        if (W > 8u) {
            dot4 += q2 * k_tile[t + 2u];
        }
        if (W > 12u) {
            dot4 += q3 * k_tile[t + 3u];
        }
        return dot4.x + dot4.y + dot4.z + dot4.w;
    }
    var dot = 0.0;
    for (var w = 0u; w < wn; w++) {
        let e = e0 + w;
        dot += (*qr)[w] * k_tile[e / 4u][e % 4u];
    }
    return dot;
}

// The sums of four dots over the LANES consecutive invocations of a row, in every one of them:
// each pairwise step adds the same two values in each lane, so all lanes of a row keep identical
// softmax statistics. Without SUBGROUPS, only for one lane per row.
fn row_sum(dots: vec4<f32>) -> vec4<f32> {
    var s = dots;
#if SUBGROUPS
    for (var x = 1u; x < LANES; x <<= 1u) {
        s += subgroupShuffleXor(s, x);
    }
#endif
    return s;
}

#if SUBGROUPS

// Scores of keys j..j + 3 of the tile (BK is a multiple of 8 here), MASKED for keys the row may
// not see.
fn scores4(dots: vec4<f32>, j: u32, k0: u32, limit: u32) -> vec4<f32> {
    return select(vec4(MASKED), dots, vec4(k0 + j) + vec4(0u, 1u, 2u, 3u) < vec4(limit));
}
#endif

// Four consecutive values of q from `e`, scaled.
fn q4_at(e: u32) -> vec4<f32> {
    return vec4(q[e], q[e + 1u], q[e + 2u], q[e + 3u]) * p.scale;
}

#if !SUBGROUPS
// The score of key j of the tile for the row whose lanes start at `first_lane`: the sum of its
// lanes' partial dots, or MASKED for keys the row may not see and keys past the tile.
fn row_score(j: u32, k0: u32, limit: u32, first_lane: u32) -> f32 {
    var dot = 0.0;
    let p0 = j * THREADS + first_lane;
    if (LANES >= 4u) {
        var dot4 = vec4(0.0);
        for (var x = 0u; x < LANES / 4u; x++) {
            dot4 += partial[p0 / 4u + x];
        }
        dot = dot4.x + dot4.y + dot4.z + dot4.w;
    } else {
        for (var x = 0u; x < LANES; x++) {
            dot += partial[(p0 + x) / 4u][(p0 + x) % 4u];
        }
    }
    return select(MASKED, dot, j < BK && k0 + j < limit);
}
#endif

// Weight j of the tile (p0 holds keys 0..3, p1 keys 4..7).
fn score_of(p0: vec4<f32>, p1: vec4<f32>, j: u32) -> f32 {
    let v = select(p0, p1, j >= 4u);
    let c = j % 4u;
    return select(select(v.x, v.y, c == 1u), select(v.z, v.w, c == 3u), c >= 2u);
}

// `a` plus the tile's values at vec4 column t weighted by p0, p1 (keys past BK are skipped: the
// tile holds nothing there).
fn weigh_values(a: vec4<f32>, p0: vec4<f32>, p1: vec4<f32>, t: u32) -> vec4<f32> {
    let st = D / 4u;
    var s = a + p0.x * v_tile[t];
    if (BK > 1u) {
        s += p0.y * v_tile[t + st];
    }
    if (BK > 2u) {
        s += p0.z * v_tile[t + 2u * st];
    }
    if (BK > 3u) {
        s += p0.w * v_tile[t + 3u * st];
    }
    if (BK > 4u) {
        s += p1.x * v_tile[t + 4u * st];
    }
    if (BK > 5u) {
        s += p1.y * v_tile[t + 5u * st];
    }
    if (BK > 6u) {
        s += p1.z * v_tile[t + 6u * st];
    }
    if (BK > 7u) {
        s += p1.w * v_tile[t + 7u * st];
    }
    return s;
}

fn store4(e: u32, v: vec4<f32>) {
#if PARTIAL
    part_out[e] = v.x;
    part_out[e + 1u] = v.y;
    part_out[e + 2u] = v.z;
    part_out[e + 3u] = v.w;
#else
    out[e] = v.x;
    out[e + 1u] = v.y;
    out[e + 2u] = v.z;
    out[e + 3u] = v.w;
#endif
}

#if ROWS
// attention_rows: the TILED variant for head dims a row's LANES lanes split into whole vectors of
// W <= W_MAX dims: D of at most 16 that is a multiple of 4 (one lane per row, QR = 4), or any
// D = LANES * W with W a multiple of 4 (64, 96, 128...; QR = 2), the lanes' dots summed by
// shuffles with SUBGROUPS, else through `partial` (a third barrier per tile, BK * QR <= BK_MAX).
// Each thread takes QR query rows, so each K/V vector read from workgroup memory serves QR rows
// (llvmpipe reads workgroup memory lane by lane; GPUs issue fewer loads per multiply); the scores
// stay in registers (two barriers per tile with one lane or shuffles); a tile holds BK keys (a
// multiple of 4), taken four at a time with one softmax rescale per four.
override QR: u32 = 4u;

// A query row's slice: its q (scaled) and output sums as four vectors (dims past W stay 0), its
// running max and sum, and the keys it may see.
struct Row {
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
    a0: vec4<f32>,
    a1: vec4<f32>,
    a2: vec4<f32>,
    a3: vec4<f32>,
    m: f32,
    l: f32,
    limit: u32,
}

// One key's (or value's) W floats of a lane's slice from a tile, as four vectors.
struct Vec16 {
    x0: vec4<f32>,
    x1: vec4<f32>,
    x2: vec4<f32>,
    x3: vec4<f32>,
}

fn load_row(b: u32, kvh: u32, row: u32, end: u32, d0: u32) -> Row {
    let qb = q_index(b, row, kvh) + d0;
    var r = Row(q4_at(qb), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0),
                MASKED, 0.0, min(key_limit(row / p.group), end));
    if (W > 4u) {
        r.q1 = q4_at(qb + 4u);
    }
    if (W > 8u) {
        r.q2 = q4_at(qb + 8u);
    }
    if (W > 12u) {
        r.q3 = q4_at(qb + 12u);
    }
    return r;
}

// Key j's slice from vector t0 of the tile's first key on.
fn k16(j: u32, t0: u32) -> Vec16 {
    let t = j * (D / 4u) + t0;
    var x = Vec16(k_tile[t], vec4(0.0), vec4(0.0), vec4(0.0));
    if (W > 4u) {
        x.x1 = k_tile[t + 1u];
    }
    if (W > 8u) {
        x.x2 = k_tile[t + 2u];
    }
    if (W > 12u) {
        x.x3 = k_tile[t + 3u];
    }
    return x;
}

fn v16(j: u32, t0: u32) -> Vec16 {
    let t = j * (D / 4u) + t0;
    var x = Vec16(v_tile[t], vec4(0.0), vec4(0.0), vec4(0.0));
    if (W > 4u) {
        x.x1 = v_tile[t + 1u];
    }
    if (W > 8u) {
        x.x2 = v_tile[t + 2u];
    }
    if (W > 12u) {
        x.x3 = v_tile[t + 3u];
    }
    return x;
}

fn score(r: Row, x: Vec16) -> f32 {
    return dot(r.q0, x.x0) + dot(r.q1, x.x1) + dot(r.q2, x.x2) + dot(r.q3, x.x3);
}

// Key x's dots with up to QR rows (component i: row i's lane dot).
fn key_dots(x: Vec16, r0: Row, r1: Row, r2: Row, r3: Row) -> vec4<f32> {
    if (QR > 2u) {
        return vec4(score(r0, x), score(r1, x), score(r2, x), score(r3, x));
    }
    return vec4(score(r0, x), score(r1, x), 0.0, 0.0);
}

// Keys j..j + 3 of the tile dotted with this lane's slice of up to QR rows (column i: row i's
// dots). Each key's K is read once for all of the thread's rows and then dropped (few registers
// live).
fn tile_dots(j: u32, t0: u32, r0: Row, r1: Row, r2: Row, r3: Row) -> mat4x4<f32> {
    return transpose(mat4x4(key_dots(k16(j, t0), r0, r1, r2, r3),
                            key_dots(k16(j + 1u, t0), r0, r1, r2, r3),
                            key_dots(k16(j + 2u, t0), r0, r1, r2, r3),
                            key_dots(k16(j + 3u, t0), r0, r1, r2, r3)));
}

#if !SUBGROUPS
// The sums over a row's LANES lanes of their dots in `partial` vector row `pr` (see
// attention_rows), for the row of thread `lid`.
fn lane_sums(pr: u32, lid: u32) -> vec4<f32> {
    let first = pr * THREADS + lid / LANES * LANES;
    var s = partial[first];
    for (var x = 1u; x < LANES; x++) {
        s += partial[first + x];
    }
    return s;
}
#endif

// Row `row` takes keys `key`..`key + 3` (its lane dots with them: `dots`) into its softmax:
// returns their weights (0 past its limit) and rescales its sums, which the caller then adds the
// weighted values to.
fn weigh4(row: ptr<function, Row>, key: u32, dots: vec4<f32>) -> vec4<f32> {
    var r = *row;
    let seen = vec4(key) + vec4(0u, 1u, 2u, 3u) < vec4(r.limit);
    let s = select(vec4(MASKED), row_sum(dots), seen);
    let m = max(r.m, max(max(s.x, s.y), max(s.z, s.w)));
    let alpha = exp(r.m - m);
    let w = select(vec4(0.0), exp(s - m), seen);
    r.m = m;
    r.l = r.l * alpha + w.x + w.y + w.z + w.w;
    r.a0 *= alpha;
    r.a1 *= alpha;
    r.a2 *= alpha;
    r.a3 *= alpha;
    *row = r;
    return w;
}

// Adds value x with weight w to row `row`'s sums.
fn add_value(row: ptr<function, Row>, w: f32, x: Vec16) {
    (*row).a0 += w * x.x0;
    (*row).a1 += w * x.x1;
    (*row).a2 += w * x.x2;
    (*row).a3 += w * x.x3;
}

// Adds four values (keys of weights w0 for row r0, w1 for r1...) to up to QR rows: each value is
// read from workgroup memory once for all of them.
fn add_values(r0: ptr<function, Row>, r1: ptr<function, Row>, r2: ptr<function, Row>,
              r3: ptr<function, Row>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>,
              j: u32, t0: u32) {
    let x0 = v16(j, t0);
    add_value(r0, w0.x, x0);
    add_value(r1, w1.x, x0);
    if (QR > 2u) {
        add_value(r2, w2.x, x0);
        add_value(r3, w3.x, x0);
    }
    let x1 = v16(j + 1u, t0);
    add_value(r0, w0.y, x1);
    add_value(r1, w1.y, x1);
    if (QR > 2u) {
        add_value(r2, w2.y, x1);
        add_value(r3, w3.y, x1);
    }
    let x2 = v16(j + 2u, t0);
    add_value(r0, w0.z, x2);
    add_value(r1, w1.z, x2);
    if (QR > 2u) {
        add_value(r2, w2.z, x2);
        add_value(r3, w3.z, x2);
    }
    let x3 = v16(j + 3u, t0);
    add_value(r0, w0.w, x3);
    add_value(r1, w1.w, x3);
    if (QR > 2u) {
        add_value(r2, w2.w, x3);
        add_value(r3, w3.w, x3);
    }
}

// Four consecutive K (or V) values from element `e` (a multiple of 4) of the cache.
fn k4_at(e: u32) -> vec4<f32> {
#if KV_F16
    return vec4(unpack2x16float(k[e >> 1u]), unpack2x16float(k[(e >> 1u) + 1u]));
#else
    return vec4(k[e], k[e + 1u], k[e + 2u], k[e + 3u]);
#endif
}

fn v4_at(e: u32) -> vec4<f32> {
#if KV_F16
    return vec4(unpack2x16float(v[e >> 1u]), unpack2x16float(v[(e >> 1u) + 1u]));
#else
    return vec4(v[e], v[e + 1u], v[e + 2u], v[e + 3u]);
#endif
}

// Writes row `row`'s slice of the normalised output (or, with PARTIAL, its unnormalised partial,
// and from lane 0 its stats).
fn store_row(r: Row, b: u32, kvh: u32, bh: u32, chunk: u32, row: u32, d0: u32) {
#if PARTIAL
    let part_row = (bh * p.chunks + chunk) * p.tq * p.group + row;
    if (d0 == 0u) {
        part_stats[part_row] = vec2(r.m, r.l);
    }
    let ob = part_row * D + d0;
    let scale = 1.0;
#else
    let ob = q_index(b, row, kvh) + d0;
    let scale = 1.0 / r.l;
#endif
    store4(ob, r.a0 * scale);
    if (W > 4u) {
        store4(ob + 4u, r.a1 * scale);
    }
    if (W > 8u) {
        store4(ob + 8u, r.a2 * scale);
    }
    if (W > 12u) {
        store4(ob + 12u, r.a3 * scale);
    }
}

@compute @workgroup_size(256)
fn attention_rows(
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
    let slots = THREADS / LANES;
    let tile_first = tile * slots * QR;
    let last_row = min(tile_first + slots * QR, rows) - 1u;
    // This workgroup's keys: begin..end (the whole cache unless PARTIAL splits it).
    let begin = chunk * p.chunk_keys;
    let end = min(key_limit(last_row / p.group), begin + p.chunk_keys);
    // This lane's dims: d0..d0 + W (vector t0 of a key on).
    let d0 = (lid % LANES) * W;
    let t0 = d0 / 4u;
    // Rows past the last repeat it (results dropped), so that every thread reaches the barriers.
    let first = tile_first + lid / LANES * QR;
    var r0 = load_row(b, kvh, min(first, rows - 1u), end, d0);
    var r1 = load_row(b, kvh, min(first + 1u, rows - 1u), end, d0);
    var r2 = r1;
    var r3 = r1;
    if (QR > 2u) {
        r2 = load_row(b, kvh, min(first + 2u, rows - 1u), end, d0);
        r3 = load_row(b, kvh, min(first + 3u, rows - 1u), end, d0);
    }
    // The keys any of this thread's rows may see (its last row sees the most); with several lanes
    // per row, every key of the tile (the lanes' shuffles want the whole subgroup).
    var seen = select(r1.limit, r3.limit, QR > 2u);
    if (LANES > 1u) {
        seen = end;
    }

    for (var k0 = begin; k0 < end; k0 += BK) {
        // The previous tile must be consumed before it is overwritten.
        workgroupBarrier();
        for (var i4 = lid; i4 < BK * D / 4u; i4 += THREADS) {
            let j = k0 + i4 / (D / 4u);
            var kx = vec4(0.0);
            var vx = vec4(0.0);
            // Positions past the valid cache may hold anything (NaN): never read them.
            if (j < end) {
                let e = kv_index(b, j, kvh) + (i4 % (D / 4u)) * 4u;
                kx = k4_at(e);
                vx = v4_at(e);
            }
            k_tile[i4] = kx;
            v_tile[i4] = vx;
        }
        workgroupBarrier();

#if !SUBGROUPS
        if (LANES > 1u) {
            // No shuffles: every lane's dots with the tile's keys go through workgroup memory
            // (vector (j / 4 * QR + i) * THREADS + thread: row i's dots with keys j..j + 3).
            for (var j = 0u; j < BK; j += 4u) {
                let dots = tile_dots(j, t0, r0, r1, r2, r3);
                partial[(j / 4u * QR) * THREADS + lid] = dots[0];
                partial[(j / 4u * QR + 1u) * THREADS + lid] = dots[1];
            }
            workgroupBarrier();
        }
#endif
        let n = min(BK, seen - min(k0, seen));
        for (var j = 0u; j < n; j += 4u) {
#if SUBGROUPS
            let dots = tile_dots(j, t0, r0, r1, r2, r3);
#else
            var dots: mat4x4<f32>;
            if (LANES > 1u) {
                // Two rows per thread here; all lanes of a row add the same partials in the same
                // order, so they keep identical softmax statistics.
                dots[0] = lane_sums(j / 4u * QR, lid);
                dots[1] = lane_sums(j / 4u * QR + 1u, lid);
            } else {
                dots = tile_dots(j, t0, r0, r1, r2, r3);
            }
#endif
            let w0 = weigh4(&r0, k0 + j, dots[0]);
            let w1 = weigh4(&r1, k0 + j, dots[1]);
            var w2 = vec4(0.0);
            var w3 = vec4(0.0);
            if (QR > 2u) {
                w2 = weigh4(&r2, k0 + j, dots[2]);
                w3 = weigh4(&r3, k0 + j, dots[3]);
            }
            add_values(&r0, &r1, &r2, &r3, w0, w1, w2, w3, j, t0);
        }
    }

    if (first < rows) {
        store_row(r0, b, kvh, bh, chunk, first, d0);
    }
    if (first + 1u < rows) {
        store_row(r1, b, kvh, bh, chunk, first + 1u, d0);
    }
    if (QR > 2u && first + 2u < rows) {
        store_row(r2, b, kvh, bh, chunk, first + 2u, d0);
    }
    if (QR > 2u && first + 3u < rows) {
        store_row(r3, b, kvh, bh, chunk, first + 3u, d0);
    }
}
#endif
#endif

#if SPLIT
// [B, Hkv, chunks, rows, D] weighted value sums and [B, Hkv, chunks, rows] (max, sum) pairs.
@group(0) @binding(4) var<storage, read_write> part_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> part_stats: array<vec2<f32>>;

// Keys per workgroup (one per thread while scoring).
const CHUNK: u32 = 128u;
// Most query rows per kv head the split kernel serves, and the largest head dim.
const MAX_ROWS: u32 = 8u;
const MAX_D: u32 = 256u;

var<workgroup> q_rows: array<f32, MAX_ROWS * MAX_D>;
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

    // Scores: thread lid takes key k0 + lid for every row, reading each key value once.
    if (lid < n_keys) {
        var dots: array<f32, MAX_ROWS>;
        let kb = kv_index(b, k0 + lid, kvh);
        for (var d = 0u; d < D; d++) {
            let kx = k_at(kb + d);
            for (var r = 0u; r < rows; r++) {
                dots[r] += q_rows[r * D + d] * kx;
            }
        }
        for (var r = 0u; r < rows; r++) {
            probs[r * CHUNK + lid] = select(MASKED, dots[r], k0 + lid < key_limit(r / p.group));
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
            a += probs[r * CHUNK + j] * v_at(kv_index(b, k0 + j, kvh) + d);
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

#if KV_STORE_F16
struct StoreParams {
    // Elements to write and the cache element they start at.
    count: u32,
    start: u32,
}
@group(0) @binding(0) var<uniform> sp: StoreParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cache: array<u32>;

// One thread per cache word that the rows touch. A word shared with an element outside
// start..start + count (an odd start or end) keeps that half: no other thread writes the word.
@compute @workgroup_size(256)
fn kv_store(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let end = sp.start + sp.count;
    let word = sp.start / 2u + gid.x + gid.y * nwg.x * 256u;
    if (word * 2u >= end) {
        return;
    }
    var pair = vec2(0.0);
    var keep = 0u;
    for (var half = 0u; half < 2u; half++) {
        let e = word * 2u + half;
        if (e >= sp.start && e < end) {
            pair[half] = src[e - sp.start];
        } else {
            keep |= 0xffffu << (16u * half);
        }
    }
    // The kept half's bits are copied, not round-tripped through f32.
    cache[word] = (pack2x16float(pair) & ~keep) | (cache[word] & keep);
}
#endif
