//! Group-quantized weight layout, shared by the kernels, the converter and the loaders.
//!
//! A weight matrix `[rows, cols]` (PyTorch Linear layout `[out, in]`) is cut along each row into
//! groups of [`DType::group_size`] values (Q8: 32, Q6 and Q4: 64), each with one f16 scale.
//! - **Q8**: one signed byte per value, `w = q * scale`, `scale = max|w| / 127`. Bytes are
//!   row-major; read as u32 words, value `k` of a row sits in byte `k % 4` of word `k / 4`.
//! - **Q6**: six bits per value, `w = (n - 32) * scale` with `scale = m / -32`, `m` the value of
//!   largest magnitude (so `m` maps exactly to `n = 0`). A row of `K` values is `K / 8` words of
//!   low nibbles (value `k` in bits `4 * (k % 8)` of word `k / 8`) followed by `K / 16` words of
//!   high bit pairs (value `k` in bits `2 * (k % 16)` of word `K / 8 + k / 16`): `3K / 4` bytes.
//! - **Q4**: one nibble per value from a non-uniform code book, `w = Q4_VALUES[n] * scale`
//!   (llama.cpp's IQ4_NL values, denser near zero where Gaussian-like weights are). The scale is
//!   the best of a few candidates by squared error (see [`quantize`]). Value `k` of a row sits in
//!   bits `4 * (k % 8)` of word `k / 8`.
//! - **Scales**: f16, row-major `[rows, cols / group]`, two per u32 word (even index in the low half).
//!
//! The GPU reads this directly, so converted files store exactly these bytes. Why these formats
//! and groups: docs/converted-format.md, "Quality".

use half::f16;

use crate::DType;

/// Q4's code book: nibble `n` stands for `Q4_VALUES[n] * scale`.
pub const Q4_VALUES: [f32; 16] = [
    -127., -104., -83., -65., -49., -35., -22., -10., 1., 13., 25., 38., 53., 69., 89., 113.,
];

/// Midpoints of consecutive Q4 codes: a value goes to the nearest code, the lower one on a midpoint.
const Q4_MIDPOINTS: [f32; 15] = [
    -115.5, -93.5, -74., -57., -42., -28.5, -16., -4.5, 7., 19., 31.5, 45.5, 61., 79., 101.,
];

/// The Q4 scales tried for a group: its value of largest magnitude over each of these (mapping
/// it to the lowest code, or to the highest, or a little inside them); the one with the smallest
/// squared error wins, the first on ties.
const Q4_SCALE_DIVISORS: [f32; 6] = [-131., -129., -127., 109., 111., 113.];

/// A quantized matrix on the host, in the layout above.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    pub scales: Vec<f16>,
}

/// Whether a `[rows, cols]` matrix can be stored as `dtype` (a quantized dtype).
pub fn quantizable(dtype: DType, cols: usize) -> bool {
    dtype.is_quantized() && cols > 0 && cols.is_multiple_of(dtype.group_size())
}

/// The value of largest magnitude (the first of equal magnitudes).
fn largest(values: &[f32]) -> f32 {
    values
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

fn inverse(scale: f16) -> f32 {
    if scale.to_f32() == 0.0 {
        0.0
    } else {
        1.0 / scale.to_f32()
    }
}

/// The Q4 code of each value of `scaled` (values over the scale): the number of midpoints below
/// it. Branch-free over whole groups so that it vectorizes.
fn q4_codes(scaled: &[f32; Q4_GROUP], codes: &mut [u8; Q4_GROUP]) {
    codes.fill(0);
    for mid in Q4_MIDPOINTS {
        for (code, &y) in codes.iter_mut().zip(scaled) {
            *code += (mid < y) as u8;
        }
    }
}

const Q4_GROUP: usize = 64;

/// The Q4 codes and scale of one group: the candidate scale with the smallest squared error.
fn quantize_q4_group(values: &[f32], codes: &mut [u8; Q4_GROUP]) -> f16 {
    let m = largest(values);
    let mut best = (f64::INFINITY, f16::ZERO);
    let (mut scaled, mut trial) = ([0f32; Q4_GROUP], [0u8; Q4_GROUP]);
    for divisor in Q4_SCALE_DIVISORS {
        let scale = f16::from_f32(m / divisor);
        let (s, inv) = (scale.to_f32(), inverse(scale));
        for (y, &v) in scaled.iter_mut().zip(values) {
            *y = v * inv;
        }
        q4_codes(&scaled, &mut trial);
        // Four running sums (value k into sum k % 4), so that the loop vectorizes.
        let mut sums = [0f64; 4];
        for (c, v) in trial.chunks_exact(4).zip(values.chunks_exact(4)) {
            for lane in 0..4 {
                let diff = (Q4_VALUES[c[lane] as usize] * s - v[lane]) as f64;
                sums[lane] += diff * diff;
            }
        }
        let error = (sums[0] + sums[1]) + (sums[2] + sums[3]);
        if error < best.0 {
            best = (error, scale);
            *codes = trial;
        }
    }
    best.1
}

/// Where value `col` of row `row` of a Q6 matrix with `cols` columns keeps its low nibble (byte,
/// shift) and its high bit pair (byte, shift).
fn q6_position(cols: usize, row: usize, col: usize) -> ((usize, usize), (usize, usize)) {
    let row_start = row * cols * 3 / 4;
    (
        (row_start + col / 2, 4 * (col % 2)),
        (row_start + cols / 2 + col / 4, 2 * (col % 4)),
    )
}

/// Quantizes a row-major f32 matrix to `dtype` (Q8, Q6 or Q4). Natively, large matrices are
/// cut into row blocks quantized on all cores (Q4's scale search makes it ~30 M values/s a core).
pub fn quantize(dtype: DType, rows: usize, cols: usize, w: &[f32]) -> QuantMatrix {
    assert!(
        quantizable(dtype, cols) && w.len() == rows * cols,
        "quantize {rows}x{cols} to {dtype:?}"
    );
    let (group, row_bytes) = (dtype.group_size(), dtype.data_bytes(cols) as usize);
    let mut data = vec![0u8; rows * row_bytes];
    let mut scales = vec![f16::ZERO; rows * cols / group];
    let block = rows.div_ceil(threads_for(rows * cols)).max(1);
    let blocks = w
        .chunks(block * cols)
        .zip(data.chunks_mut(block * row_bytes))
        .zip(scales.chunks_mut(block * cols / group));
    if block >= rows {
        blocks.for_each(|((w, data), scales)| quantize_rows(dtype, cols, w, data, scales));
    } else {
        std::thread::scope(|scope| {
            for ((w, data), scales) in blocks {
                scope.spawn(move || quantize_rows(dtype, cols, w, data, scales));
            }
        });
    }
    QuantMatrix {
        dtype,
        rows,
        cols,
        data,
        scales,
    }
}

/// Threads to quantize `values` values with: all cores natively from a million values on, one
/// in the browser (wasm has no threads here).
fn threads_for(values: usize) -> usize {
    if cfg!(target_arch = "wasm32") || values < 1 << 20 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Quantizes whole rows: `w` holds them, `data` and `scales` receive their bytes and scales.
fn quantize_rows(dtype: DType, cols: usize, w: &[f32], data: &mut [u8], scales: &mut [f16]) {
    let group = dtype.group_size();
    let mut codes = [0u8; Q4_GROUP];
    for ((g, values), scale) in w.chunks_exact(group).enumerate().zip(scales) {
        let base = g * group;
        *scale = match dtype {
            DType::Q8 => {
                let scale = f16::from_f32(values.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0);
                let inv = inverse(scale);
                for (k, v) in values.iter().enumerate() {
                    data[base + k] = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                }
                scale
            }
            DType::Q6 => {
                let scale = f16::from_f32(largest(values) / -32.0);
                let inv = inverse(scale);
                let (row, col0) = (base / cols, base % cols);
                for (k, v) in values.iter().enumerate() {
                    let n = ((v * inv).round().clamp(-32.0, 31.0) + 32.0) as u8;
                    let ((lo, lo_shift), (hi, hi_shift)) = q6_position(cols, row, col0 + k);
                    data[lo] |= (n & 15) << lo_shift;
                    data[hi] |= (n >> 4) << hi_shift;
                }
                scale
            }
            DType::Q4 => {
                let scale = quantize_q4_group(values, &mut codes);
                for (k, code) in codes.iter().enumerate() {
                    data[(base + k) / 2] |= code << (4 * ((base + k) % 2));
                }
                scale
            }
            d => unreachable!("quantize to {d:?}"),
        };
    }
}

/// The f32 values a quantized matrix stands for (what the kernels compute with).
pub fn dequantize(q: &QuantMatrix) -> Vec<f32> {
    let group = q.dtype.group_size();
    (0..q.rows * q.cols)
        .map(|i| {
            let scale = q.scales[i / group].to_f32();
            let v = match q.dtype {
                DType::Q8 => q.data[i] as i8 as f32,
                DType::Q6 => {
                    let ((lo, lo_shift), (hi, hi_shift)) =
                        q6_position(q.cols, i / q.cols, i % q.cols);
                    let n = (q.data[lo] >> lo_shift) & 15 | ((q.data[hi] >> hi_shift) & 3) << 4;
                    n as f32 - 32.0
                }
                DType::Q4 => Q4_VALUES[((q.data[i / 2] >> (4 * (i % 2))) & 15) as usize],
                d => unreachable!("dequantize {d:?}"),
            };
            v * scale
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibble_and_byte_positions_match_the_documented_layout() {
        // One row of 32 with max |w| = 127, so the Q8 scale is exactly 1.
        let mut w: Vec<f32> = (0..32).map(|k| k as f32 - 16.0).collect();
        w[0] = -127.0;
        let q8 = quantize(DType::Q8, 1, 32, &w);
        assert_eq!(q8.scales, [f16::ONE]);
        // Value 1 sits in byte 1 of word 0 (little-endian).
        assert_eq!(q8.data[1] as i8, -15);
        assert_eq!(dequantize(&q8), w);

        // Q4: a group holding every code once (times 4) and -127 first: the scale -127 / -127 = 1
        // reproduces it exactly, so the search keeps it.
        let w4: Vec<f32> = (0..64).map(|k| Q4_VALUES[k % 16]).collect();
        let q4 = quantize(DType::Q4, 1, 64, &w4);
        assert_eq!(q4.scales[0].to_f32(), 1.0);
        // value k=1 (code 1) is bits 4..8 of byte 0; value k=0 (code 0) bits 0..4.
        assert_eq!(q4.data[0], 0x10);
        assert_eq!(q4.data[7], 0xfe);
        assert_eq!(dequantize(&q4), w4);

        // Q6 with max |w| = 32 (scale 1), two rows of 64: row 1 starts at byte 48, its high bit
        // pairs at byte 48 + 32.
        let w6: Vec<f32> = (0..128).map(|i| ((i * 5) % 64) as f32 - 32.0).collect();
        let q6 = quantize(DType::Q6, 2, 64, &w6);
        assert_eq!(q6.scales, [f16::from_f32(1.0); 2]);
        assert_eq!(dequantize(&q6), w6);
        // Row 1, value 1: i = 65 -> (325 % 64) = 5 -> n = 5: low nibble 5 in bits 4..8 of byte
        // 48, high bits 0 in bits 2..4 of byte 80. Value 7: i = 71 -> 35 -> n = 35 = 0b10_0011.
        assert_eq!(q6.data[48] >> 4, 5);
        assert_eq!((q6.data[80] >> 2) & 3, 0);
        assert_eq!(q6.data[51] >> 4, 3);
        assert_eq!((q6.data[81] >> 6) & 3, 2);
    }

    #[test]
    fn q4_picks_the_scale_with_the_smallest_error() {
        let w: Vec<f32> = (0..64)
            .map(|i| (((i * 7919) % 211) as f32 / 50.0 - 2.0) * 0.02)
            .collect();
        let q = quantize(DType::Q4, 1, 64, &w);
        let error = |d: &[f32]| {
            w.iter()
                .zip(d)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
        };
        let got = error(&dequantize(&q));
        // Every candidate scale, each value to its nearest code: none does better.
        let m = largest(&w);
        for divisor in Q4_SCALE_DIVISORS {
            let s = f16::from_f32(m / divisor).to_f32();
            let nearest: Vec<f32> = w
                .iter()
                .map(|&v| {
                    let c = (0..16).min_by(|&a, &b| {
                        (Q4_VALUES[a] * s - v)
                            .abs()
                            .total_cmp(&(Q4_VALUES[b] * s - v).abs())
                    });
                    Q4_VALUES[c.unwrap()] * s
                })
                .collect();
            assert!(
                got <= error(&nearest) * (1.0 + 1e-9),
                "divisor {divisor}: {got} > {}",
                error(&nearest)
            );
        }
    }

    #[test]
    fn row_blocks_on_threads_give_the_bytes_of_one_row_at_a_time() {
        let (rows, cols) = (1000, 1088); // over a million values: quantized on all cores
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 2003) as f32 / 1000.0 - 1.0)
            .collect();
        for dtype in [DType::Q8, DType::Q6, DType::Q4] {
            let whole = quantize(dtype, rows, cols, &w);
            let (mut data, mut scales) = (Vec::new(), Vec::new());
            for row in w.chunks(cols) {
                let q = quantize(dtype, 1, cols, row);
                data.extend(q.data);
                scales.extend(q.scales);
            }
            assert!(whole.data == data && whole.scales == scales, "{dtype:?}");
        }
    }

    #[test]
    fn quantization_error_is_bounded() {
        let w: Vec<f32> = (0..4 * 64)
            .map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0)
            .collect();
        for dtype in [DType::Q8, DType::Q6, DType::Q4] {
            let q = quantize(dtype, 4, 64, &w);
            let d = dequantize(&q);
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                let step = q.scales[i / dtype.group_size()].to_f32().abs();
                // Half a step, except that Q6's range -32..31 clips the opposite extreme by up
                // to one more step. Q4: codes are up to 24 steps apart (89 to 113), and the
                // largest scale tried (m / -131) leaves +131 steps to the top code 113.
                let bound = match dtype {
                    DType::Q8 => 0.5,
                    DType::Q6 => 1.0,
                    _ => 18.0,
                } * step;
                assert!(
                    (a - b).abs() <= bound + 1e-3 * a.abs().max(1.0),
                    "{dtype:?} {i}: {a} vs {b}"
                );
            }
        }
    }
}
