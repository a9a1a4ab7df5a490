//! libjpeg-turbo's accurate integer IDCT (`jidctint.c`, `jpeg_idct_islow`, 8-bit samples), with
//! dequantisation and its post-IDCT range limiting.
//!
//! Arithmetic follows the C code with a 64-bit `JLONG`: products and sums in `i64`, the `(int)`
//! casts before storing to the workspace and before masking with `RANGE_MASK` truncate to `i32`.

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;

const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

/// `RANGE_MASK` for 8-bit samples: the IDCT output is masked to 10 bits before the table lookup.
const RANGE_MASK: i32 = 0x3ff;

/// Rounding right shift (`DESCALE`).
#[inline]
fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// The post-IDCT part of libjpeg's `sample_range_limit` table (`prepare_range_limit_table`, starting
/// at `CENTERJSAMPLE`), indexed by the masked IDCT output: it adds 128 and clamps for outputs in
/// -512..=511, and wraps around (bogus but in range) beyond that, as libjpeg does for corrupt data.
#[inline]
pub(super) fn range_limit(index: i32) -> u8 {
    match index & RANGE_MASK {
        i @ 0..=127 => (i + 128) as u8,
        128..=511 => 255,
        512..=895 => 0,
        i => (i - 896) as u8,
    }
}

/// The even and odd halves shared by both passes: returns the eight outputs before descaling, with
/// `x0..x7` the (dequantised or pass-1) inputs of one column or row.
#[inline]
fn butterfly(x: [i64; 8]) -> [i64; 8] {
    // Even part.
    let z1 = (x[2] + x[6]) * FIX_0_541196100;
    let tmp2 = z1 + x[6] * -FIX_1_847759065;
    let tmp3 = z1 + x[2] * FIX_0_765366865;
    let tmp0 = (x[0] + x[4]) << CONST_BITS;
    let tmp1 = (x[0] - x[4]) << CONST_BITS;
    let (tmp10, tmp13) = (tmp0 + tmp3, tmp0 - tmp3);
    let (tmp11, tmp12) = (tmp1 + tmp2, tmp1 - tmp2);
    // Odd part.
    let (t0, t1, t2, t3) = (x[7], x[5], x[3], x[1]);
    let z1 = t0 + t3;
    let z2 = t1 + t2;
    let z3 = t0 + t2;
    let z4 = t1 + t3;
    let z5 = (z3 + z4) * FIX_1_175875602;
    let t0 = t0 * FIX_0_298631336;
    let t1 = t1 * FIX_2_053119869;
    let t2 = t2 * FIX_3_072711026;
    let t3 = t3 * FIX_1_501321110;
    let z1 = z1 * -FIX_0_899976223;
    let z2 = z2 * -FIX_2_562915447;
    let z3 = z3 * -FIX_1_961570560 + z5;
    let z4 = z4 * -FIX_0_390180644 + z5;
    let t0 = t0 + z1 + z3;
    let t1 = t1 + z2 + z4;
    let t2 = t2 + z2 + z3;
    let t3 = t3 + z1 + z4;
    [
        tmp10 + t3,
        tmp11 + t2,
        tmp12 + t1,
        tmp13 + t0,
        tmp13 - t0,
        tmp12 - t1,
        tmp11 - t2,
        tmp10 - t3,
    ]
}

/// Dequantises `coefs` (natural order) with `quant` and writes the 8x8 samples to `out` (rows
/// `stride` bytes apart).
pub(super) fn idct_islow(coefs: &[i16; 64], quant: &[u16; 64], out: &mut [u8], stride: usize) {
    let mut workspace = [0i32; 64];
    // Pass 1: columns, results scaled up by 2^PASS1_BITS.
    for col in 0..8 {
        // DEQUANTIZE: JCOEF times the multiplier, an int product (it always fits in 32 bits).
        let input: [i64; 8] = std::array::from_fn(|row| {
            i64::from(coefs[row * 8 + col]) * i64::from(quant[row * 8 + col])
        });
        if input[1..].iter().all(|&v| v == 0) {
            let dc = (input[0] << PASS1_BITS) as i32;
            (0..8).for_each(|row| workspace[row * 8 + col] = dc);
            continue;
        }
        let out = butterfly(input);
        for row in 0..8 {
            workspace[row * 8 + col] = descale(out[row], CONST_BITS - PASS1_BITS) as i32;
        }
    }
    // Pass 2: rows, descaled by the pass-1 factor and the 8 of the two 1-D IDCTs.
    for row in 0..8 {
        let ws = &workspace[row * 8..row * 8 + 8];
        let dest = &mut out[row * stride..row * stride + 8];
        if ws[1..].iter().all(|&v| v == 0) {
            dest.fill(range_limit(descale(i64::from(ws[0]), PASS1_BITS + 3) as i32));
            continue;
        }
        let result = butterfly(std::array::from_fn(|i| i64::from(ws[i])));
        for (d, v) in dest.iter_mut().zip(result) {
            *d = range_limit(descale(v, CONST_BITS + PASS1_BITS + 3) as i32);
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

    #[test]
    fn range_limit_clamps_then_wraps_like_libjpeg() {
        assert_eq!(range_limit(-128), 0);
        assert_eq!(range_limit(0), 128);
        assert_eq!(range_limit(127), 255);
        assert_eq!(range_limit(300), 255);
        assert_eq!(range_limit(511), 255);
        assert_eq!(range_limit(-129), 0);
        assert_eq!(range_limit(-512), 0);
        // Beyond 10 bits the mask wraps: 512 reads the "negative" half, 1024 is 0 again.
        assert_eq!(range_limit(512), 0);
        assert_eq!(range_limit(1024), 128);
        assert_eq!(range_limit(-513), 255);
    }
}
