//! libjpeg-turbo's accurate integer IDCT (`jpeg_idct_islow`, 8-bit samples) with dequantisation,
//! in the arithmetic of its x86-64 SIMD kernels (`jidctint-sse2.asm` / `jidctint-avx2.asm`), which
//! Pillow's x86-64 builds run.
//!
//! For every block whose intermediate values fit in 16 bits (all files an encoder produces) this is
//! exactly `jidctint.c`: same constants (`CONST_BITS` 13, `PASS1_BITS` 2), same rounding. They part
//! only for crafted, huge coefficients, where the SIMD code wraps the dequantised products and
//! `in0 + in4`-style sums to 16 bits, saturates each pass's output to 16 bits and clamps the result,
//! while the C code works in wider integers and wraps through its 10-bit `RANGE_MASK` table; the
//! SIMD behaviour is what Pillow returns there (tests/fixtures/jpeg/huge_coefficients_*.jpg).

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;

const FIX_0_298631336: i32 = 2446;
const FIX_0_390180644: i32 = 3196;
const FIX_0_541196100: i32 = 4433;
const FIX_0_765366865: i32 = 6270;
const FIX_0_899976223: i32 = 7373;
const FIX_1_175875602: i32 = 9633;
const FIX_1_501321110: i32 = 12299;
const FIX_1_847759065: i32 = 15137;
const FIX_1_961570560: i32 = 16069;
const FIX_2_053119869: i32 = 16819;
const FIX_2_562915447: i32 = 20995;
const FIX_3_072711026: i32 = 25172;

/// `pmaddwd`: two 16x16-bit products summed in 32 bits.
#[inline]
fn madd(a: i16, ca: i32, b: i16, cb: i32) -> i32 {
    (i32::from(a) * ca).wrapping_add(i32::from(b) * cb)
}

/// One 1-D IDCT of eight 16-bit inputs, descaled by `shift` with rounding and saturated to 16 bits
/// (`packssdw`). The multiplications are regrouped as in the SIMD code (`z1 = (z2 + z3) * c` folded
/// into two products), which is exact; the 16-bit sums wrap as `paddw` does.
#[inline]
fn pass(x: [i16; 8], shift: u32) -> [i16; 8] {
    // Even part.
    let tmp3 = madd(
        x[2],
        FIX_0_541196100 + FIX_0_765366865,
        x[6],
        FIX_0_541196100,
    );
    let tmp2 = madd(
        x[2],
        FIX_0_541196100,
        x[6],
        FIX_0_541196100 - FIX_1_847759065,
    );
    let tmp0 = i32::from(x[0].wrapping_add(x[4])) << CONST_BITS;
    let tmp1 = i32::from(x[0].wrapping_sub(x[4])) << CONST_BITS;
    let (tmp10, tmp13) = (tmp0.wrapping_add(tmp3), tmp0.wrapping_sub(tmp3));
    let (tmp11, tmp12) = (tmp1.wrapping_add(tmp2), tmp1.wrapping_sub(tmp2));
    // Odd part: z5 = (z3 + z4) * c3 folded into z3 and z4.
    let (sum37, sum15) = (x[3].wrapping_add(x[7]), x[1].wrapping_add(x[5]));
    let z3 = madd(
        sum37,
        FIX_1_175875602 - FIX_1_961570560,
        sum15,
        FIX_1_175875602,
    );
    let z4 = madd(
        sum37,
        FIX_1_175875602,
        sum15,
        FIX_1_175875602 - FIX_0_390180644,
    );
    let odd0 = madd(
        x[7],
        FIX_0_298631336 - FIX_0_899976223,
        x[1],
        -FIX_0_899976223,
    )
    .wrapping_add(z3);
    let odd3 = madd(
        x[7],
        -FIX_0_899976223,
        x[1],
        FIX_1_501321110 - FIX_0_899976223,
    )
    .wrapping_add(z4);
    let odd1 = madd(
        x[5],
        FIX_2_053119869 - FIX_2_562915447,
        x[3],
        -FIX_2_562915447,
    )
    .wrapping_add(z4);
    let odd2 = madd(
        x[5],
        -FIX_2_562915447,
        x[3],
        FIX_3_072711026 - FIX_2_562915447,
    )
    .wrapping_add(z3);
    let round = 1i32 << (shift - 1);
    let out =
        |v: i32| (v.wrapping_add(round) >> shift).clamp(i16::MIN.into(), i16::MAX.into()) as i16;
    [
        out(tmp10.wrapping_add(odd3)),
        out(tmp11.wrapping_add(odd2)),
        out(tmp12.wrapping_add(odd1)),
        out(tmp13.wrapping_add(odd0)),
        out(tmp13.wrapping_sub(odd0)),
        out(tmp12.wrapping_sub(odd1)),
        out(tmp11.wrapping_sub(odd2)),
        out(tmp10.wrapping_sub(odd3)),
    ]
}

/// Dequantises `coefs` (natural order) with `quant` and writes the 8x8 samples to `out` (rows
/// `stride` bytes apart).
pub(super) fn idct_islow(coefs: &[i16; 64], quant: &[u16; 64], out: &mut [u8], stride: usize) {
    // pmullw: the low 16 bits of each product.
    let dequantised: [i16; 64] = std::array::from_fn(|i| coefs[i].wrapping_mul(quant[i] as i16));
    let mut workspace = [[0i16; 8]; 8]; // [column][row]
    if coefs[8..].iter().all(|&c| c == 0) {
        // No AC coefficient in any row below the first: every column is flat (psllw wraps).
        for (col, ws) in workspace.iter_mut().enumerate() {
            ws.fill(dequantised[col].wrapping_shl(PASS1_BITS));
        }
    } else {
        for (col, ws) in workspace.iter_mut().enumerate() {
            *ws = pass(
                std::array::from_fn(|row| dequantised[row * 8 + col]),
                CONST_BITS - PASS1_BITS,
            );
        }
    }
    for row in 0..8 {
        let samples = pass(
            std::array::from_fn(|col| workspace[col][row]),
            CONST_BITS + PASS1_BITS + 3,
        );
        // packsswb then + CENTERJSAMPLE: clamp to -128..=127 and shift to 0..=255.
        for (d, v) in out[row * stride..row * stride + 8].iter_mut().zip(samples) {
            *d = (v.clamp(-128, 127) + 128) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A float IDCT of the dequantised block, level-shifted and clamped like a decoder's output.
    fn float_idct(coefs: &[i16; 64], quant: &[u16; 64]) -> [f64; 64] {
        let c = |u: usize| {
            if u == 0 {
                std::f64::consts::FRAC_1_SQRT_2
            } else {
                1.0
            }
        };
        std::array::from_fn(|i| {
            let (y, x) = (i / 8, i % 8);
            let mut sum = 0.0;
            for v in 0..8 {
                for u in 0..8 {
                    let f = f64::from(coefs[v * 8 + u]) * f64::from(quant[v * 8 + u]);
                    sum += c(u)
                        * c(v)
                        * f
                        * ((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI / 16.0).cos()
                        * ((2 * y + 1) as f64 * v as f64 * std::f64::consts::PI / 16.0).cos();
                }
            }
            (sum / 4.0 + 128.0).clamp(0.0, 255.0)
        })
    }

    #[test]
    fn dc_only_block_is_flat_with_libjpeg_rounding() {
        let mut coefs = [0i16; 64];
        let quant = [1u16; 64];
        // DC 100 -> pass 1 gives 400, pass 2 descales by 5 bits: (400 + 16) >> 5 = 13, + 128.
        coefs[0] = 100;
        let mut out = [0u8; 64];
        idct_islow(&coefs, &quant, &mut out, 8);
        assert!(out.iter().all(|&v| v == 141), "{out:?}");
        // -100: (-400 + 16) >> 5 = -12 (arithmetic shift), 128 - 12.
        coefs[0] = -100;
        idct_islow(&coefs, &quant, &mut out, 8);
        assert!(out.iter().all(|&v| v == 116), "{out:?}");
    }

    #[test]
    fn matches_a_float_idct_within_one_level() {
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (state >> 16) as i32
        };
        for _ in 0..200 {
            let quant: [u16; 64] = std::array::from_fn(|_| (next() % 8 + 1) as u16);
            let coefs: [i16; 64] = std::array::from_fn(|i| {
                let range = if i == 0 { 120 } else { 12 };
                (next() % (2 * range + 1) - range) as i16
            });
            let mut out = [0u8; 64];
            idct_islow(&coefs, &quant, &mut out, 8);
            let reference = float_idct(&coefs, &quant);
            for (got, want) in out.iter().zip(reference) {
                assert!((f64::from(*got) - want).abs() <= 1.0, "{got} vs {want}");
            }
        }
    }
}
