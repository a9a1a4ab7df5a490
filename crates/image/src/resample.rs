//! Port of Pillow 13 `src/libImaging/Resample.c`, BICUBIC filter on 8-bit images.
//!
//! The arithmetic follows the C code step by step: coefficients in f64 (same expression order, no
//! fused multiply-add, as in Pillow's x86-64 wheels), normalised to sum 1, converted to 22-bit fixed
//! point with round-half-away-from-zero, accumulated in i32 starting from 2^21, shifted and clipped to
//! 0..=255, with a uint8 image between the two separable passes.

use crate::Rgb8;

/// Fractional bits of the fixed-point coefficients: `32 - 8 - 2` in Pillow.
const PRECISION_BITS: u32 = 22;

/// Pillow's `bicubic_filter` with `a = -0.5`, written in the same operation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output position: the first input index and the fixed-point weights of the inputs from there.
struct Coefficients {
    /// `(first input index, number of taps)` per output position.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output position (only the first `taps` are used).
    weights: Vec<i32>,
    ksize: usize,
}

impl Coefficients {
    fn taps(&self, out: usize) -> (usize, &[i32]) {
        let (first, count) = self.bounds[out];
        (
            first,
            &self.weights[out * self.ksize..out * self.ksize + count],
        )
    }
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)` mapped onto `out_size`.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coefficients {
    const SUPPORT: f64 = 2.0;
    // Pillow passes the box edges as C floats; whole numbers below 2^24 convert exactly.
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut row = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero, as Rust's `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).max(0) as usize;
        let mut total = 0.0;
        for (x, w) in row.iter_mut().take(count).enumerate() {
            *w = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
            total += *w;
        }
        for (x, w) in row.iter().take(count).enumerate() {
            let w = if total != 0.0 { w / total } else { *w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin as usize, count));
    }
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift) and clamp to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over input rows `rows.start..rows.end`; the output has one row per input row.
fn resample_horizontal(
    src: &[u8],
    src_width: usize,
    rows: std::ops::Range<usize>,
    c: &Coefficients,
) -> Vec<u8> {
    let out_width = c.bounds.len();
    let mut out = Vec::with_capacity(rows.len() * out_width * 3);
    for y in rows {
        let line = &src[y * src_width * 3..(y + 1) * src_width * 3];
        for xx in 0..out_width {
            let (first, weights) = c.taps(xx);
            let mut acc = [ROUNDING; 3];
            for (i, &k) in weights.iter().enumerate() {
                let px = &line[(first + i) * 3..(first + i) * 3 + 3];
                for ch in 0..3 {
                    // Cannot overflow for bicubic weights (sum of |k| < 1.3 * 2^22); wrapping mirrors C anyway.
                    acc[ch] = acc[ch].wrapping_add(i32::from(px[ch]).wrapping_mul(k));
                }
            }
            out.extend(acc.map(clip8));
        }
    }
    out
}

/// Vertical pass: output row `yy` sums input rows `first + i` (indices relative to `src`).
fn resample_vertical(src: &[u8], width: usize, c: &Coefficients) -> Vec<u8> {
    let out_height = c.bounds.len();
    let row_len = width * 3;
    let mut out = Vec::with_capacity(out_height * row_len);
    let mut acc = vec![0i32; row_len];
    for yy in 0..out_height {
        let (first, weights) = c.taps(yy);
        acc.fill(ROUNDING);
        for (i, &k) in weights.iter().enumerate() {
            let line = &src[(first + i) * row_len..(first + i + 1) * row_len];
            for (a, &v) in acc.iter_mut().zip(line) {
                *a = a.wrapping_add(i32::from(v).wrapping_mul(k));
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

/// Resize like Pillow 13 `Image.resize((width, height), Image.BICUBIC)` on an RGB image.
///
/// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels
/// as the width (`H > height && H - height > 2 * (W - width)`), horizontal first otherwise; the two
/// orders round differently, so this matters for bit-exactness. A same-size resize is a copy. A zero
/// target side gives an empty image.
///
/// # Panics
/// If `img.data.len() != img.width * img.height * 3` (an inconsistent [`Rgb8`]).
pub fn resize_bicubic(img: &Rgb8, width: u32, height: u32) -> Rgb8 {
    let (in_w, in_h) = (img.width as usize, img.height as usize);
    assert_eq!(
        img.data.len(),
        in_w * in_h * 3,
        "Rgb8 data length does not match width * height * 3"
    );
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 {
        return Rgb8 {
            width,
            height,
            data: Vec::new(),
        };
    }
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    let horizontal_first =
        !(in_h > out_h && (in_h - out_h) as i64 > (in_w as i64 - out_w as i64) * 2);

    let data = match (need_horizontal, need_vertical) {
        (false, false) => img.data.clone(),
        (true, false) => {
            resample_horizontal(&img.data, in_w, 0..in_h, &precompute_coeffs(in_w, out_w))
        }
        (false, true) => resample_vertical(&img.data, in_w, &precompute_coeffs(in_h, out_h)),
        (true, true) if horizontal_first => {
            let mut vertical = precompute_coeffs(in_h, out_h);
            // Only the input rows the vertical pass reads go through the horizontal pass.
            let first_row = vertical.bounds[0].0;
            let (last_start, last_count) = vertical.bounds[out_h - 1];
            for bound in &mut vertical.bounds {
                bound.0 -= first_row;
            }
            let horizontal = precompute_coeffs(in_w, out_w);
            let temp = resample_horizontal(
                &img.data,
                in_w,
                first_row..last_start + last_count,
                &horizontal,
            );
            resample_vertical(&temp, out_w, &vertical)
        }
        (true, true) => {
            let temp = resample_vertical(&img.data, in_w, &precompute_coeffs(in_h, out_h));
            resample_horizontal(&temp, in_w, 0..out_h, &precompute_coeffs(in_w, out_w))
        }
    };
    Rgb8 {
        width,
        height,
        data,
    }
}
