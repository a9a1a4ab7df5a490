//! Chroma upsampling (libjpeg-turbo `jdsample.c`, fancy upsampling on) and YCbCr -> RGB
//! (`jdcolor.c`), one output row at a time.

/// How one component is brought to full resolution, chosen as `jinit_upsampler` does with
/// `do_fancy_upsampling` on and no IDCT scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Upsampling {
    /// Already full size (`fullsize_upsample`).
    Full,
    /// 2:1 horizontal triangle filter (`h2v1_fancy_upsample`).
    H2V1Fancy,
    /// 2:1 vertical triangle filter (`h1v2_fancy_upsample`).
    H1V2Fancy,
    /// 2:1 in both directions (`h2v2_fancy_upsample`).
    H2V2Fancy,
    /// Pixel replication by integral factors (`h2v1_upsample`, `h2v2_upsample`, `int_upsample`).
    Replicate { h: usize, v: usize },
}

impl Upsampling {
    /// `h_expand`/`v_expand` are `max_samp / samp` (both exact); `downsampled_width` is the
    /// component's width in samples. The fancy 2h filters need more than two input columns.
    pub(super) fn select(h_expand: usize, v_expand: usize, downsampled_width: usize) -> Self {
        match (h_expand, v_expand) {
            (1, 1) => Self::Full,
            (2, 1) if downsampled_width > 2 => Self::H2V1Fancy,
            (1, 2) => Self::H1V2Fancy,
            (2, 2) if downsampled_width > 2 => Self::H2V2Fancy,
            (h, v) => Self::Replicate { h, v },
        }
    }
}

/// A decoded component plane: `width` x `height` real samples at the start of rows `stride` apart.
pub(super) struct Plane<'a> {
    pub samples: &'a [u8],
    pub stride: usize,
    pub width: usize,
    pub height: usize,
}

impl Plane<'_> {
    /// Row `y`, clamped to the real rows: libjpeg's context rows above the first row and below the
    /// last one repeat the edge row (`jdmainct.c` `make_funny_pointers` / `set_bottom_pointers`).
    fn row(&self, y: isize) -> &[u8] {
        let y = y.clamp(0, self.height as isize - 1) as usize;
        &self.samples[y * self.stride..y * self.stride + self.width]
    }
}

/// Writes output row `y` of `plane` upsampled with `method` to `out` (the image width).
pub(super) fn upsample_row(plane: &Plane, method: Upsampling, y: usize, out: &mut [u8]) {
    let width = out.len();
    match method {
        Upsampling::Full => out.copy_from_slice(&plane.row(y as isize)[..width]),
        Upsampling::Replicate { h, v } => {
            let row = plane.row((y / v) as isize);
            for (x, o) in out.iter_mut().enumerate() {
                *o = row[x / h];
            }
        }
        Upsampling::H2V1Fancy => {
            let row = plane.row(y as isize);
            // Output pixels sit 1/4 and 3/4 between input centres; the bias alternates 1, 2.
            triangle_pairs(
                out,
                row.len(),
                |i| u32::from(row[i]),
                |near, far| (near + far + 1) >> 2,
                |near, far| (near + far + 2) >> 2,
            );
        }
        Upsampling::H1V2Fancy => {
            let (near, far, bias) = vertical_neighbours(plane, y);
            for (x, o) in out.iter_mut().enumerate() {
                *o = ((3 * u32::from(near[x]) + u32::from(far[x]) + bias) >> 2) as u8;
            }
        }
        Upsampling::H2V2Fancy => {
            let (near, far, _) = vertical_neighbours(plane, y);
            // Column sums 3 * nearer + further row, then the same horizontally; biases 8 and 7.
            let column_sum = |i: usize| 3 * u32::from(near[i]) + u32::from(far[i]);
            triangle_pairs(
                out,
                near.len(),
                column_sum,
                |n, f| (n + f + 8) >> 4,
                |n, f| (n + f + 7) >> 4,
            );
        }
    }
}

/// Horizontal 2:1 triangle filter over `count` inputs given by `input`: output `2i` is
/// `left(3 * input(i), input(i - 1))`, output `2i + 1` is `right(3 * input(i), input(i + 1))`, with
/// the neighbour indices clamped to the row (the edge columns are replicated).
#[inline]
fn triangle_pairs(
    out: &mut [u8],
    count: usize,
    input: impl Fn(usize) -> u32,
    left: impl Fn(u32, u32) -> u32,
    right: impl Fn(u32, u32) -> u32,
) {
    let mut previous = input(0);
    let mut this = previous;
    for (i, pair) in out.chunks_mut(2).enumerate() {
        let next = input((i + 1).min(count - 1));
        pair[0] = left(3 * this, previous) as u8;
        if let Some(second) = pair.get_mut(1) {
            *second = right(3 * this, next) as u8;
        }
        previous = this;
        this = next;
    }
}

/// For a 2:1 vertical filter: the nearer input row of output row `y`, the further one (above for
/// even `y`, below for odd), and h1v2's rounding bias (1 above, 2 below).
fn vertical_neighbours<'a>(plane: &'a Plane, y: usize) -> (&'a [u8], &'a [u8], u32) {
    let near = (y / 2) as isize;
    if y.is_multiple_of(2) {
        (plane.row(near), plane.row(near - 1), 1)
    } else {
        (plane.row(near), plane.row(near + 1), 2)
    }
}

/// `build_ycc_rgb_table`: fixed-point YCbCr -> RGB with 16 fraction bits.
pub(super) struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i64; 256],
    cb_g: [i64; 256],
}

impl YccTables {
    pub(super) fn new() -> Self {
        const SCALEBITS: u32 = 16;
        const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
        let fix = |x: f64| (x * f64::from(1u32 << SCALEBITS) + 0.5) as i64;
        let centred = |i: usize| i as i64 - 128;
        Self {
            cr_r: std::array::from_fn(|i| {
                ((fix(1.40200) * centred(i) + ONE_HALF) >> SCALEBITS) as i32
            }),
            cb_b: std::array::from_fn(|i| {
                ((fix(1.77200) * centred(i) + ONE_HALF) >> SCALEBITS) as i32
            }),
            cr_g: std::array::from_fn(|i| -fix(0.71414) * centred(i)),
            cb_g: std::array::from_fn(|i| -fix(0.34414) * centred(i) + ONE_HALF),
        }
    }

    /// `ycc_rgb_convert` for one row into interleaved RGB.
    pub(super) fn convert(&self, y: &[u8], cb: &[u8], cr: &[u8], out: &mut [u8]) {
        let clamp = |v: i32| v.clamp(0, 255) as u8;
        for (((o, &y), &cb), &cr) in out.chunks_exact_mut(3).zip(y).zip(cb).zip(cr) {
            let (y, cb, cr) = (i32::from(y), usize::from(cb), usize::from(cr));
            o[0] = clamp(y + self.cr_r[cr]);
            o[1] = clamp(y + ((self.cb_g[cb] + self.cr_g[cr]) >> 16) as i32);
            o[2] = clamp(y + self.cb_b[cb]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(samples: &[u8], width: usize, height: usize) -> Plane<'_> {
        Plane {
            samples,
            stride: width,
            width,
            height,
        }
    }

    #[test]
    fn h2v1_fancy_matches_hand_computed_triangle_filter() {
        let samples = [10u8, 20, 60];
        let mut out = [0u8; 6];
        upsample_row(&plane(&samples, 3, 1), Upsampling::H2V1Fancy, 0, &mut out);
        // Edges copy the end samples; inside: (3*near + far + 1 or 2) >> 2.
        // x=1: (30+20+2)>>2=13, x=2: (60+10+1)>>2=17, x=3: (60+60+2)>>2=30, x=4: (180+20+1)>>2=50.
        assert_eq!(out, [10, 13, 17, 30, 50, 60]);
    }

    #[test]
    fn h2v2_fancy_uses_rows_above_and_below() {
        // Rows: [0, 40, 80] and [100, 140, 180].
        let samples = [0u8, 40, 80, 100, 140, 180];
        let p = plane(&samples, 3, 2);
        let mut out = [0u8; 5];
        // Output row 1 is the lower half of input row 0: far row is row 1.
        upsample_row(&p, Upsampling::H2V2Fancy, 1, &mut out);
        // Column sums 3*row0 + row1: [100, 260, 420].
        // x=0: (4*100+7)>>4 ... first column even: (3*100+100+8)>>4 = 25; x=1: (300+260+7)>>4 = 35;
        // x=2: (780+100+8)>>4 = 55; x=3: (780+420+7)>>4 = 75; x=4: (1260+260+8)>>4 = 95.
        assert_eq!(out, [25, 35, 55, 75, 95]);
        // Output row 0 at the top edge: the row above repeats row 0, so column sums are 4*row0.
        upsample_row(&p, Upsampling::H2V2Fancy, 0, &mut out);
        assert_eq!(out, [0, 10, 30, 50, 70]);
    }

    #[test]
    fn narrow_components_fall_back_to_replication() {
        assert_eq!(
            Upsampling::select(2, 2, 2),
            Upsampling::Replicate { h: 2, v: 2 }
        );
        assert_eq!(Upsampling::select(2, 2, 3), Upsampling::H2V2Fancy);
        assert_eq!(Upsampling::select(1, 2, 1), Upsampling::H1V2Fancy);
        assert_eq!(
            Upsampling::select(4, 1, 50),
            Upsampling::Replicate { h: 4, v: 1 }
        );
    }

    #[test]
    fn ycc_to_rgb_matches_jdcolor_constants() {
        let tables = YccTables::new();
        let mut out = [0u8; 9];
        tables.convert(&[128, 0, 255], &[128, 255, 0], &[128, 255, 0], &mut out);
        // Neutral grey stays grey. Y=0, Cb=Cr=255 (x=127): R = round(1.402*127) = 178,
        // G = (-22554*127 - 46802*127 + 32768) >> 16 = -134 -> 0, B = round(1.772*127) = 225.
        // Y=255, Cb=Cr=0 (x=-128): R = 255-179 = 76, G = 255 + 135 -> 255, B = 255-227 = 28.
        assert_eq!(out, [128, 128, 128, 178, 0, 225, 76, 255, 28]);
    }
}
