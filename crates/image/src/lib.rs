//! LLaVA-NeXT (LLaVA-1.6) "AnyRes" image preprocessing on the CPU, bit-exact with transformers 5
//! `LlavaNextImageProcessor` on its PIL backend (Pillow 13).
//!
//! Pipeline ([`preprocess`]): pick the best grid resolution ([`select_best_resolution`]), resize
//! keeping the aspect ratio with Pillow's BICUBIC ([`resize_bicubic`]), zero-pad to the grid
//! resolution, cut `tile_size` tiles row-major, prepend an overview (the whole image resized to one
//! tile without keeping the aspect ratio), rescale by 1/255 and normalise with the CLIP mean/std.
//! [`image_token_count`] and [`unpad_layout`] give the number of `<image>` tokens and the part of
//! the feature grid that `unpad_image` keeps.
//!
//! Input: [`decode`] (PNG, JPEG, WebP, GIF first frame) or [`from_pixels`] (raw L/LA/RGB/RGBA),
//! both converting to RGB as transformers 5 does: transparency is alpha-composited onto white with
//! Pillow's integer arithmetic. EXIF orientation is NOT applied, because transformers does not apply
//! it either: a photo stored sideways with an orientation tag is processed sideways.
//!
//! Exactness: PNG (every bit depth and colour type, palettes, tRNS), GIF, WebP and JPEG decode to
//! the same bytes as Pillow 13, and everything after decoding is bit-exact. JPEG goes through this
//! crate's port of libjpeg-turbo's decoding path (the accurate integer IDCT in the arithmetic of
//! its x86-64 SIMD kernels, block smoothing, `jdsample` fancy upsampling, `jdcolor`, libjpeg's
//! handling of damaged data) for 8-bit Huffman-coded baseline/extended/progressive files with 1 or
//! 3 components; lossless and CMYK files fall back to zune-jpeg and are not exact; arithmetic-coded
//! files are refused. A JPEG whose data runs out is refused as truncated, as Pillow does.
//!
//! Limits: images with zero pixels, a side over [`MAX_SIDE`] (16384) or more than [`MAX_PIXELS`]
//! (50 megapixels) are refused with an [`ImageError`]; [`decode`] checks this from the header before
//! allocating the pixel buffer.
//!
//! Pure Rust without threads, so it builds for `wasm32-unknown-unknown`.

mod decode;
mod jpeg;
mod resample;

pub use decode::{decode, from_pixels};
pub use resample::resize_bicubic;

use decode::check_size;

/// Longest accepted image side, in pixels.
pub const MAX_SIDE: u32 = 16384;
/// Largest accepted image area, in pixels (50 megapixels).
pub const MAX_PIXELS: u64 = 50_000_000;
/// Largest accepted encoded image, in bytes (256 MiB: an uncompressed 50-megapixel RGBA PNG fits).
pub const MAX_ENCODED_BYTES: u64 = 256 << 20;
/// Most tiles a grid pinpoint may cut an image into (LLaVA-1.6 uses at most 3).
pub const MAX_TILES: u32 = 64;
/// Most pixels [`preprocess`] may produce for one image (the overview plus every tile of the
/// largest pinpoint): 16 Mi pixels, 192 MiB of f32 values. Bounds the work a config can ask for.
pub const MAX_PREPROCESSED_PIXELS: u64 = 1 << 24;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved `[r, g, b]` (HWC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Preprocessing settings (the `preprocessor_config.json` fields that matter).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    /// Side of a tile and of the overview, `crop_size` (336 for LLaVA-1.6).
    pub tile_size: u32,
    /// Vision-tower patch side (14): a tile gives `(tile_size / patch_size)^2` features.
    pub patch_size: u32,
    /// `image_grid_pinpoints`, each `[height, width]`, multiples of `tile_size`.
    pub grid_pinpoints: Vec<[u32; 2]>,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageConfig {
    /// LLaVA-1.6: CLIP ViT-L/14-336 tiles and the five published pinpoints.
    // The mean/std digits are verbatim from preprocessor_config.json.
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        Self {
            tile_size: 336,
            patch_size: 14,
            grid_pinpoints: vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

impl ImageConfig {
    /// Checks that tiles split evenly into patches and every pinpoint into tiles.
    pub fn validate(&self) -> Result<(), ImageError> {
        let bad = |why: String| Err(ImageError::BadConfig(why));
        if self.tile_size == 0
            || self.patch_size == 0
            || !self.tile_size.is_multiple_of(self.patch_size)
        {
            return bad(format!(
                "tile_size {} must be a positive multiple of patch_size {}",
                self.tile_size, self.patch_size
            ));
        }
        if self.grid_pinpoints.is_empty() {
            return bad("grid_pinpoints is empty".into());
        }
        for &[h, w] in &self.grid_pinpoints {
            if h == 0
                || w == 0
                || !h.is_multiple_of(self.tile_size)
                || !w.is_multiple_of(self.tile_size)
            {
                return bad(format!(
                    "grid pinpoint [{h}, {w}] is not a positive multiple of tile_size {}",
                    self.tile_size
                ));
            }
            let tiles = u64::from(h / self.tile_size) * u64::from(w / self.tile_size);
            let pixels = (1 + tiles) * u64::from(self.tile_size).pow(2);
            if tiles > u64::from(MAX_TILES) || pixels > MAX_PREPROCESSED_PIXELS {
                return bad(format!(
                    "image_grid_pinpoints entry [{h}, {w}] makes {tiles} tiles of {0}x{0} pixels; at most {MAX_TILES} tiles \
                     and {MAX_PREPROCESSED_PIXELS} pixels with the overview are accepted",
                    self.tile_size
                ));
            }
        }
        if self
            .image_mean
            .iter()
            .chain(&self.image_std)
            .any(|x| !x.is_finite())
            || self.image_std.contains(&0.0)
        {
            return bad(format!(
                "image_mean {:?} and image_std {:?} must be finite, and image_std non-zero",
                self.image_mean, self.image_std
            ));
        }
        Ok(())
    }

    /// Features per tile side: `tile_size / patch_size` (24 for LLaVA-1.6).
    fn features_per_side(&self) -> usize {
        self.tile_size.checked_div(self.patch_size).unwrap_or(0) as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image has no pixels ({width}x{height})")]
    Empty { width: u32, height: u32 },
    #[error("image is {width}x{height}; a side may be at most {max} pixels")]
    SideTooLarge { width: u32, height: u32, max: u32 },
    #[error("image is {width}x{height}; at most {max} pixels (50 megapixels) are accepted")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("the encoded image is {bytes} bytes; at most {max} bytes (256 MiB) are accepted")]
    FileTooLarge { bytes: u64, max: u64 },
    #[error("unrecognised image format (expected PNG, JPEG, WebP or GIF)")]
    UnknownFormat,
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("unsupported pixel type {0} (8- or 16-bit grey/RGB with optional alpha are supported)")]
    UnsupportedPixelType(String),
    #[error("channels must be 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA), got {0}")]
    BadChannels(u32),
    #[error(
        "pixel buffer for {width}x{height} with {channels} channels needs {expected} bytes, got {got}"
    )]
    BadPixelBuffer {
        width: u32,
        height: u32,
        channels: u32,
        expected: usize,
        got: usize,
    },
    #[error("invalid image config: {0}")]
    BadConfig(String),
}

/// transformers' `select_best_resolution`: the pinpoint `[h, w]` that keeps the most of the original
/// resolution after an aspect-preserving fit, ties broken by the least wasted area, then list order.
/// `orig_hw` is `[height, width]`. Returns `[0, 0]` for an empty list.
pub fn select_best_resolution(orig_hw: [u32; 2], pinpoints: &[[u32; 2]]) -> [u32; 2] {
    let (h, w) = (f64::from(orig_hw[0]), f64::from(orig_hw[1]));
    let mut best = [0, 0];
    let mut best_effective = 0i64;
    let mut best_wasted = i64::MAX;
    for &[ph, pw] in pinpoints {
        let scale = (f64::from(pw) / w).min(f64::from(ph) / h);
        // Python's int() truncates; `as` does too (and saturates instead of raising on inf/NaN).
        let effective = ((w * scale) as i64 * (h * scale) as i64)
            .min(i64::from(orig_hw[0]) * i64::from(orig_hw[1]));
        let wasted = i64::from(ph) * i64::from(pw) - effective;
        if effective > best_effective || (effective == best_effective && wasted < best_wasted) {
            best_effective = effective;
            best_wasted = wasted;
            best = [ph, pw];
        }
    }
    best
}

/// transformers' `get_patch_output_size`: `[height, width]` of the aspect-preserving resize that fits
/// `orig_hw` into `target_hw`, touching it on at least one side.
fn fit_size(orig_hw: [u32; 2], target_hw: [u32; 2]) -> [u32; 2] {
    let (h, w) = (f64::from(orig_hw[0]), f64::from(orig_hw[1]));
    let (th, tw) = (target_hw[0], target_hw[1]);
    let scale_w = f64::from(tw) / w;
    let scale_h = f64::from(th) / h;
    if scale_w < scale_h {
        [((h * scale_w).ceil() as u32).min(th), tw]
    } else {
        [th, ((w * scale_h).ceil() as u32).min(tw)]
    }
}

/// The output of [`preprocess`].
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessed {
    /// `[height, width]` of the input image (transformers' `image_sizes`).
    pub original_hw: [u32; 2],
    /// The chosen pinpoint `[height, width]`.
    pub best_resolution: [u32; 2],
    /// Tile grid `[rows, cols]` = `best_resolution / tile_size`.
    pub grid: [u32; 2],
    /// `1 + rows * cols`: the overview then the tiles row-major.
    pub num_patches: usize,
    /// `[num_patches, 3, tile_size, tile_size]` normalised values (transformers' `pixel_values[0]`).
    pub pixels: Vec<f32>,
}

/// Full AnyRes preprocessing of one image; see the crate docs for the steps.
pub fn preprocess(img: &Rgb8, cfg: &ImageConfig) -> Result<Preprocessed, ImageError> {
    cfg.validate()?;
    check_size(img.width, img.height)?;
    let expected = img.width as usize * img.height as usize * 3;
    if img.data.len() != expected {
        return Err(ImageError::BadPixelBuffer {
            width: img.width,
            height: img.height,
            channels: 3,
            expected,
            got: img.data.len(),
        });
    }
    let original_hw = [img.height, img.width];
    let best_resolution = select_best_resolution(original_hw, &cfg.grid_pinpoints);
    let [th, tw] = best_resolution;
    let [nh, nw] = fit_size(original_hw, best_resolution);
    let resized = resize_bicubic(img, nw, nh);

    // Zero-pad to the pinpoint, centred with the odd pixel at the bottom/right.
    let (top, left) = (((th - nh) / 2) as usize, ((tw - nw) / 2) as usize);
    let (th, tw, nh, nw) = (th as usize, tw as usize, nh as usize, nw as usize);
    let mut canvas = vec![0u8; th * tw * 3];
    for y in 0..nh {
        let dst = ((top + y) * tw + left) * 3;
        canvas[dst..dst + nw * 3].copy_from_slice(&resized.data[y * nw * 3..(y + 1) * nw * 3]);
    }

    let tile = cfg.tile_size as usize;
    let grid = [(th / tile) as u32, (tw / tile) as u32];
    let num_patches = 1 + th / tile * (tw / tile);
    let normalise = normalisation_table(cfg);
    let mut pixels = vec![0f32; num_patches * 3 * tile * tile];
    let (overview_patch, tiles) = pixels.split_at_mut(3 * tile * tile);
    let overview = resize_bicubic(img, cfg.tile_size, cfg.tile_size);
    write_patch(overview_patch, &overview.data, tile, 0, 0, tile, &normalise);
    let cols = tw / tile;
    for (i, patch) in tiles.chunks_exact_mut(3 * tile * tile).enumerate() {
        write_patch(
            patch,
            &canvas,
            tw,
            i / cols * tile,
            i % cols * tile,
            tile,
            &normalise,
        );
    }
    Ok(Preprocessed {
        original_hw,
        best_resolution,
        grid,
        num_patches,
        pixels,
    })
}

/// `table[c][v]`: transformers' rescale (`float32(float64(v) * (1/255))`) then normalise
/// (`(x - mean) / std` in f32) for channel `c` and byte value `v`.
fn normalisation_table(cfg: &ImageConfig) -> [[f32; 256]; 3] {
    let mut table = [[0f32; 256]; 3];
    for (c, row) in table.iter_mut().enumerate() {
        for (v, out) in row.iter_mut().enumerate() {
            let x = (v as f64 * (1.0 / 255.0)) as f32;
            *out = (x - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    table
}

/// Writes the `tile`x`tile` square at (`y0`, `x0`) of an HWC image `width` pixels wide as CHW floats.
fn write_patch(
    out: &mut [f32],
    src: &[u8],
    width: usize,
    y0: usize,
    x0: usize,
    tile: usize,
    table: &[[f32; 256]; 3],
) {
    for (c, plane) in out.chunks_exact_mut(tile * tile).enumerate() {
        for (y, out_row) in plane.chunks_exact_mut(tile).enumerate() {
            let start = ((y0 + y) * width + x0) * 3;
            let src_row = &src[start..start + tile * 3];
            for (o, px) in out_row.iter_mut().zip(src_row.chunks_exact(3)) {
                *o = table[c][usize::from(px[c])];
            }
        }
    }
}

/// Round to 7 decimals then truncate, like Python's `int(round(v, 7))` for `v >= 0`.
///
/// Python rounds the exact binary value correctly; only a fraction above 0.99999995 reaches the next
/// integer, and no double lies strictly between `0.99999995_f64` and the real 0.99999995, so the
/// comparison below is exact (exact ties cannot occur: 0.99999995 is not a dyadic fraction).
fn int_round7(v: f64) -> i64 {
    let floor = v.floor();
    if v - floor > 0.99999995 {
        floor as i64 + 1
    } else {
        floor as i64
    }
}

/// Which part of the `(rows * f) x (cols * f)` grid feature map survives `unpad_image`
/// (`f = tile_size / patch_size`, the grid from [`select_best_resolution`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpadLayout {
    /// Kept feature rows.
    pub rows: usize,
    /// Kept feature columns (the newline column is not counted).
    pub cols: usize,
    /// First kept row of the full grid feature map.
    pub row_start: usize,
    /// First kept column of the full grid feature map.
    pub col_start: usize,
}

/// transformers' `unpad_image` geometry for an image of `orig_hw = [height, width]`: the padding
/// removed is recomputed from the aspect ratio with `int(round(.., 7))`, symmetrically.
/// Meaningful for a config that passes [`ImageConfig::validate`] and a non-empty image.
pub fn unpad_layout(orig_hw: [u32; 2], cfg: &ImageConfig) -> UnpadLayout {
    let f = cfg.features_per_side();
    let [th, tw] = select_best_resolution(orig_hw, &cfg.grid_pinpoints);
    let rows = f * th.checked_div(cfg.tile_size).unwrap_or(0) as usize;
    let cols = f * tw.checked_div(cfg.tile_size).unwrap_or(0) as usize;
    let (h, w) = (f64::from(orig_hw[0]), f64::from(orig_hw[1]));
    let (cur_h, cur_w) = (rows as f64, cols as f64);
    if w / h > cur_w / cur_h {
        let new_h = int_round7(h * (cur_w / w));
        let pad = (rows as i64 - new_h).div_euclid(2).max(0) as usize;
        UnpadLayout {
            rows: rows.saturating_sub(2 * pad),
            cols,
            row_start: pad,
            col_start: 0,
        }
    } else {
        let new_w = int_round7(w * (cur_h / h));
        let pad = (cols as i64 - new_w).div_euclid(2).max(0) as usize;
        UnpadLayout {
            rows,
            cols: cols.saturating_sub(2 * pad),
            row_start: 0,
            col_start: pad,
        }
    }
}

/// Number of `<image>` tokens for an image of `orig_hw = [height, width]`: the overview's
/// `f * f` features (CLS dropped), the unpadded grid features and one newline per grid row.
pub fn image_token_count(orig_hw: [u32; 2], cfg: &ImageConfig) -> usize {
    let f = cfg.features_per_side();
    let layout = unpad_layout(orig_hw, cfg);
    layout.rows * layout.cols + layout.rows + f * f
}
