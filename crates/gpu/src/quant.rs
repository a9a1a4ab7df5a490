//! Group-quantized weight layout, shared by the kernels, the converter and the loaders.
//!
//! A weight matrix `[rows, cols]` (PyTorch Linear layout `[out, in]`) with `cols % 32 == 0` is
//! cut along each row into groups of [`QUANT_GROUP`] = 32 values, each with one f16 scale.
//! - **Q8**: one signed byte per value, `w = q * scale`, `scale = max|w| / 127`. Bytes are
//!   row-major; read as u32 words, value `k` of a row sits in byte `k % 4` of word `k / 4`.
//! - **Q4**: one nibble per value, `w = (n - 8) * scale` (llama.cpp's Q4_0): `scale = m / -8`
//!   where `m` is the value of largest magnitude, so `m` maps exactly to nibble 0. Value `k` of a
//!   row sits in bits `4 * (k % 8)` of word `k / 8`.
//! - **Scales**: f16, row-major `[rows, cols / 32]`, two per u32 word (even index in the low half).
//!
//! The GPU reads this directly, so converted files store exactly these bytes.

use half::f16;

use crate::DType;

/// Values per quantization group.
pub const QUANT_GROUP: usize = 32;

/// A quantized matrix on the host, in the layout above.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    pub scales: Vec<f16>,
}

/// Whether a `[rows, cols]` matrix can be stored quantized.
pub fn quantizable(cols: usize) -> bool {
    cols % QUANT_GROUP == 0 && cols > 0
}

/// Quantizes a row-major f32 matrix to `dtype` (Q8 or Q4).
pub fn quantize(dtype: DType, rows: usize, cols: usize, w: &[f32]) -> QuantMatrix {
    assert!(dtype.is_quantized(), "quantize to {dtype:?}");
    assert!(quantizable(cols) && w.len() == rows * cols, "quantize {rows}x{cols}");
    let mut data = vec![0u8; dtype.data_bytes(rows * cols) as usize];
    let mut scales = Vec::with_capacity(rows * cols / QUANT_GROUP);
    for (g, group) in w.chunks_exact(QUANT_GROUP).enumerate() {
        let base = g * QUANT_GROUP;
        match dtype {
            DType::Q8 => {
                let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = f16::from_f32(amax / 127.0);
                let inv = if scale.to_f32() == 0.0 { 0.0 } else { 1.0 / scale.to_f32() };
                for (k, v) in group.iter().enumerate() {
                    data[base + k] = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
                }
                scales.push(scale);
            }
            DType::Q4 => {
                let m = group.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let scale = f16::from_f32(m / -8.0);
                let inv = if scale.to_f32() == 0.0 { 0.0 } else { 1.0 / scale.to_f32() };
                for (k, v) in group.iter().enumerate() {
                    let n = ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
                    data[(base + k) / 2] |= n << (4 * ((base + k) % 2));
                }
                scales.push(scale);
            }
            _ => unreachable!(),
        }
    }
    QuantMatrix { dtype, rows, cols, data, scales }
}

/// The f32 values a quantized matrix stands for (what the kernels compute with).
pub fn dequantize(q: &QuantMatrix) -> Vec<f32> {
    (0..q.rows * q.cols)
        .map(|i| {
            let scale = q.scales[i / QUANT_GROUP].to_f32();
            let v = match q.dtype {
                DType::Q8 => q.data[i] as i8 as f32,
                DType::Q4 => ((q.data[i / 2] >> (4 * (i % 2))) & 15) as f32 - 8.0,
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
        let w4: Vec<f32> = (0..32).map(|k| (k % 16) as f32 - 8.0).collect();
        let q4 = quantize(DType::Q4, 1, 32, &w4);
        assert_eq!(q4.scales[0].to_f32(), 1.0); // largest magnitude -8 -> scale 1
        // value k=1 (-7 -> nibble 1) is bits 4..8 of byte 0; value k=0 (-8 -> nibble 0) bits 0..4.
        assert_eq!(q4.data[0], 0x10);
        assert_eq!(dequantize(&q4), w4);
    }

    #[test]
    fn quantization_error_is_bounded() {
        let w: Vec<f32> = (0..4 * 64).map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0).collect();
        for dtype in [DType::Q8, DType::Q4] {
            let q = quantize(dtype, 4, 64, &w);
            let d = dequantize(&q);
            for (i, (a, b)) in w.iter().zip(&d).enumerate() {
                let step = q.scales[i / QUANT_GROUP].to_f32().abs();
                // Half a step, except that Q4's range -8..7 clips the opposite extreme by up to
                // one more step.
                let bound = if dtype == DType::Q4 { 1.0 } else { 0.5 } * step;
                assert!((a - b).abs() <= bound + 1e-3 * a.abs().max(1.0), "{dtype:?} {i}: {a} vs {b}");
            }
        }
    }
}
