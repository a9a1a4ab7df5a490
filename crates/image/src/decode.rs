//! Decoding and conversion to RGB the way transformers 5 does it with Pillow
//! (`image_transforms.convert_to_rgb`): images with an alpha band (or PNG/GIF transparency) are
//! converted to RGBA and alpha-composited onto opaque white with Pillow's integer `alpha_composite`;
//! everything else goes through Pillow's `convert("RGB")`.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::{ImageError, MAX_ENCODED_BYTES, MAX_PIXELS, MAX_SIDE, Rgb8};

/// Refuses empty images and images over [`MAX_SIDE`] or [`MAX_PIXELS`].
pub(crate) fn check_size(width: u32, height: u32) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(ImageError::SideTooLarge {
            width,
            height,
            max: MAX_SIDE,
        });
    }
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            max: MAX_PIXELS,
        });
    }
    Ok(())
}

/// Pillow `Image.alpha_composite(white, rgba)` for one channel value `c` with alpha `a`.
///
/// With an opaque white destination Pillow's formula reduces exactly to `coef1 = a * 128`, but the
/// general expression is kept so the correspondence with `AlphaComposite.c` stays visible.
fn composite_on_white(c: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if a == 0 {
        return 255;
    }
    let (src_a, dst_a, dst_c) = (u32::from(a), 255u32, 255u32);
    let blend = dst_a * (255 - src_a);
    let outa255 = src_a * 255 + blend;
    let coef1 = src_a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = u32::from(c) * coef1 + dst_c * coef2 + (0x80 << PRECISION_BITS);
    (((tmp >> 8) + tmp) >> 8 >> PRECISION_BITS) as u8
}

/// Builds an RGB image from `channels`-interleaved 8-bit pixels: 1 = L, 2 = LA, 3 = RGB, 4 = RGBA.
fn to_rgb(width: u32, height: u32, channels: usize, data: &[u8]) -> Rgb8 {
    let mut rgb = Vec::with_capacity(data.len() / channels * 3);
    match channels {
        1 => data.iter().for_each(|&l| rgb.extend([l, l, l])),
        2 => data.chunks_exact(2).for_each(|p| {
            let l = composite_on_white(p[0], p[1]);
            rgb.extend([l, l, l]);
        }),
        3 => rgb.extend_from_slice(data),
        _ => data.chunks_exact(4).for_each(|p| {
            rgb.extend([
                composite_on_white(p[0], p[3]),
                composite_on_white(p[1], p[3]),
                composite_on_white(p[2], p[3]),
            ])
        }),
    }
    Rgb8 {
        width,
        height,
        data: rgb,
    }
}

/// Converts raw 8-bit pixels to RGB exactly as [`decode`] does: `channels` is 1 (L), 2 (LA), 3 (RGB)
/// or 4 (RGBA, e.g. a browser `ImageData`), interleaved row-major without row padding.
pub fn from_pixels(
    width: u32,
    height: u32,
    channels: u32,
    data: &[u8],
) -> Result<Rgb8, ImageError> {
    if !(1..=4).contains(&channels) {
        return Err(ImageError::BadChannels(channels));
    }
    check_size(width, height)?;
    let expected = width as usize * height as usize * channels as usize;
    if data.len() != expected {
        return Err(ImageError::BadPixelBuffer {
            width,
            height,
            channels,
            expected,
            got: data.len(),
        });
    }
    Ok(to_rgb(width, height, channels as usize, data))
}

/// Decodes PNG, JPEG, WebP or GIF (first frame) bytes to RGB as transformers 5 + Pillow 13 would.
///
/// The format is detected from the content. Size limits are checked from the header before any
/// pixel buffer is allocated. The EXIF orientation tag is ignored (transformers does not apply it
/// either). Embedded ICC profiles are ignored (as Pillow's `convert` does).
pub fn decode(bytes: &[u8]) -> Result<Rgb8, ImageError> {
    if bytes.len() as u64 > MAX_ENCODED_BYTES {
        return Err(ImageError::FileTooLarge {
            bytes: bytes.len() as u64,
            max: MAX_ENCODED_BYTES,
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let format = reader.format().ok_or(ImageError::UnknownFormat)?;
    // The default image::Limits (512 MiB allocation cap) stay on as a backstop; the side and pixel
    // limits are checked here from the header so that they give this crate's own errors.
    if format == ImageFormat::Jpeg
        && let Some(rgb) = crate::jpeg::decode_jpeg(bytes)?
    {
        return Ok(rgb);
    }
    // JPEG variants the libjpeg-compatible decoder leaves out (arithmetic coding, lossless,
    // CMYK/YCCK) go through zune-jpeg: not bit-exact.
    if format == ImageFormat::Jpeg && !jpeg_reaches_end_marker(bytes) {
        // zune-jpeg pads missing data silently; Pillow raises "image file is truncated".
        return Err(ImageError::Decode(
            "truncated JPEG: no end-of-image marker".into(),
        ));
    }
    let decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    check_size(width, height)?;
    let image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    if (image.width(), image.height()) != (width, height) {
        return Err(ImageError::Decode(
            "decoded size differs from the header".into(),
        ));
    }
    Ok(match image {
        DynamicImage::ImageLuma8(i) => to_rgb(width, height, 1, i.as_raw()),
        DynamicImage::ImageLumaA8(i) => to_rgb(width, height, 2, i.as_raw()),
        DynamicImage::ImageRgb8(i) => to_rgb(width, height, 3, i.as_raw()),
        DynamicImage::ImageRgba8(i) => to_rgb(width, height, 4, i.as_raw()),
        // 16-bit PNGs: Pillow opens grey as mode "I;16" (converted to 8 bits by clipping at 255) and
        // RGB/RGBA/LA with the high byte of each sample. For 16-bit grey/RGB it keeps tRNS as a
        // 16-bit colour but compares it, truncated to its low byte, with the 8-bit pixels; the
        // decoder here has already turned tRNS into an alpha band, which is therefore ignored.
        DynamicImage::ImageLuma16(i) => {
            from_16bit(width, height, i.as_raw(), 1, 1, bytes, clip_to_u8)
        }
        DynamicImage::ImageLumaA16(i) if is_png_16bit_grey_or_rgb(format, bytes) => {
            from_16bit(width, height, i.as_raw(), 2, 1, bytes, clip_to_u8)
        }
        DynamicImage::ImageLumaA16(i) => {
            from_16bit(width, height, i.as_raw(), 2, 2, bytes, high_byte)
        }
        DynamicImage::ImageRgb16(i) => {
            from_16bit(width, height, i.as_raw(), 3, 3, bytes, high_byte)
        }
        DynamicImage::ImageRgba16(i) if is_png_16bit_grey_or_rgb(format, bytes) => {
            from_16bit(width, height, i.as_raw(), 4, 3, bytes, high_byte)
        }
        DynamicImage::ImageRgba16(i) => {
            from_16bit(width, height, i.as_raw(), 4, 4, bytes, high_byte)
        }
        other => {
            return Err(ImageError::UnsupportedPixelType(format!(
                "{:?}",
                other.color()
            )));
        }
    })
}

fn decode_error(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Limits(l) => {
            ImageError::Decode(format!("image exceeds the decoder limits: {l}"))
        }
        image::ImageError::Unsupported(u) => ImageError::Decode(format!("unsupported image: {u}")),
        other => ImageError::Decode(other.to_string()),
    }
}

/// Walks the JPEG marker segments (skipping entropy-coded data) and reports whether an EOI marker
/// is reached before the bytes run out.
fn jpeg_reaches_end_marker(bytes: &[u8]) -> bool {
    let mut pos = 2; // after SOI
    loop {
        if bytes.get(pos) != Some(&0xff) {
            return false;
        }
        while bytes.get(pos) == Some(&0xff) {
            pos += 1; // fill bytes
        }
        let Some(&marker) = bytes.get(pos) else {
            return false;
        };
        pos += 1;
        match marker {
            0xd9 => return true,
            0x01 | 0xd0..=0xd7 => {} // TEM, RSTn: no length
            _ => {
                let Some(len) = bytes.get(pos..pos + 2) else {
                    return false;
                };
                pos += usize::from(u16::from_be_bytes([len[0], len[1]]));
                if marker == 0xda {
                    // Entropy-coded data: 0xff is followed by 0 (stuffing) or RSTn, else a marker starts.
                    loop {
                        let Some(offset) = bytes
                            .get(pos..)
                            .and_then(|rest| rest.iter().position(|&b| b == 0xff))
                        else {
                            return false;
                        };
                        pos += offset;
                        match bytes.get(pos + 1) {
                            Some(0x00 | 0xd0..=0xd7) => pos += 2,
                            Some(_) => break,
                            None => return false,
                        }
                    }
                }
            }
        }
    }
}

/// True for a PNG whose header says 16-bit grey (colour type 0) or 16-bit RGB (colour type 2): any
/// alpha the decoder reports then comes from tRNS.
fn is_png_16bit_grey_or_rgb(format: ImageFormat, bytes: &[u8]) -> bool {
    // Signature (8) + IHDR length (4) + "IHDR" (4) + width (4) + height (4), then depth and colour type.
    format == ImageFormat::Png
        && bytes.len() > 25
        && &bytes[12..16] == b"IHDR"
        && bytes[24] == 16
        && matches!(bytes[25], 0 | 2)
}

/// The tRNS samples (one grey or three RGB 16-bit values) of a 16-bit grey/RGB PNG, if any.
fn png_16bit_transparent_colour(bytes: &[u8]) -> Option<Vec<u16>> {
    if !is_png_16bit_grey_or_rgb(ImageFormat::Png, bytes) {
        return None;
    }
    let mut pos = 8;
    while let Some(header) = bytes.get(pos..pos + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let data = bytes.get(pos + 8..(pos + 8).checked_add(len)?)?;
        match &header[4..8] {
            b"tRNS" => {
                return Some(
                    data.chunks_exact(2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]))
                        .collect(),
                );
            }
            b"IDAT" | b"IEND" => return None,
            _ => pos += 12 + len,
        }
    }
    None
}

fn clip_to_u8(v: u16) -> u8 {
    v.min(255) as u8
}

fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// Keeps the first `keep` of every `stride` 16-bit samples, reduced to 8 bits by `to_u8`, then
/// applies a 16-bit PNG's tRNS colour the way Pillow does (its low byte against the 8-bit pixel).
fn from_16bit(
    width: u32,
    height: u32,
    samples: &[u16],
    stride: usize,
    keep: usize,
    bytes: &[u8],
    to_u8: fn(u16) -> u8,
) -> Rgb8 {
    let mut pixels: Vec<u8> = samples
        .chunks_exact(stride)
        .flat_map(|p| p[..keep].iter().map(|&v| to_u8(v)))
        .collect();
    if let Some(colour) = png_16bit_transparent_colour(bytes).filter(|c| c.len() == keep) {
        let colour: Vec<u8> = colour.iter().map(|&v| (v & 0xff) as u8).collect();
        for pixel in pixels.chunks_exact_mut(keep) {
            if *pixel == colour[..] {
                pixel.fill(255);
            }
        }
    }
    to_rgb(width, height, keep, &pixels)
}
