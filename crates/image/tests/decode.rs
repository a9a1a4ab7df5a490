//! Decoding and RGB conversion against Pillow 13 + transformers 5 `convert_to_rgb`.

mod common;

use common::{data_path, f32_bytes, read_json, sha256_hex, shared_image_path, synthetic};
use llava_image::{ImageConfig, ImageError, decode, from_pixels, preprocess};

fn decode_file(path: &str) -> llava_image::Rgb8 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    decode(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// PNG (all bit depths and colour types, tRNS, palettes), GIF, WebP and JPEG decode to exactly
/// Pillow's RGB.
#[test]
fn decoded_variants_match_pillow() {
    let cases = read_json(&data_path("decode.json"));
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let rgb = decode_file(&data_path(&format!("decode/{file}")));
        assert_eq!(
            [u64::from(rgb.width), u64::from(rgb.height)],
            [
                case["width"].as_u64().unwrap(),
                case["height"].as_u64().unwrap()
            ],
            "{file}"
        );
        if file.ends_with(".jpg") {
            // The lossy files also come with Pillow's RGB bytes.
            let pillow = std::fs::read(data_path(&format!("decode/{file}.rgb"))).unwrap();
            assert!(rgb.data == pillow, "{file}: RGB bytes differ from Pillow's");
        }
        if sha256_hex(&rgb.data) != case["rgb_sha256"].as_str().unwrap() {
            failures.push(format!("{file} (Pillow mode {})", case["pil_mode"]));
        }
    }
    assert!(
        failures.is_empty(),
        "decoded RGB differs from Pillow for {failures:?}"
    );
}

/// The shared images (PNG and JPEG) decode to exactly the RGB transformers builds (fixture from the
/// reference generator).
#[test]
fn shared_images_decode_like_pillow() {
    let cases = read_json(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/preprocess.json"
    ));
    let mut checked = 0;
    for case in cases.as_array().unwrap() {
        let Some(file) = case["source"].as_str().unwrap().strip_prefix("file:") else {
            continue;
        };
        let rgb = decode_file(&shared_image_path(file));
        assert_eq!(
            [u64::from(rgb.width), u64::from(rgb.height)],
            [
                case["width"].as_u64().unwrap(),
                case["height"].as_u64().unwrap()
            ]
        );
        assert_eq!(
            sha256_hex(&rgb.data),
            case["rgb_sha256"].as_str().unwrap(),
            "{file}"
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        std::fs::read_dir(shared_image_path("")).unwrap().count()
    );
}

/// Decode + full preprocess of transparent/palette/16-bit/lossy files against LlavaNextImageProcessor.
#[test]
fn decoded_files_preprocess_like_transformers() {
    for case in read_json(&data_path("preprocess_files.json"))
        .as_array()
        .unwrap()
    {
        let file = case["file"].as_str().unwrap();
        let out = preprocess(
            &decode_file(&data_path(&format!("decode/{file}"))),
            &ImageConfig::default(),
        )
        .unwrap();
        let shape: Vec<u64> = case["pixels_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(shape, [out.num_patches as u64, 3, 336, 336], "{file}");
        assert_eq!(
            sha256_hex(&f32_bytes(&out.pixels)),
            case["pixels_sha256"].as_str().unwrap(),
            "{file}"
        );
    }
}

/// Every (value, alpha) pair through `from_pixels` equals transformers' `convert_to_rgb`
/// (Pillow `alpha_composite` onto white), for RGBA and LA.
#[test]
fn alpha_composite_matches_pillow_for_every_value_and_alpha() {
    let expected = read_json(&data_path("convert.json"));
    let mut rgba = Vec::with_capacity(256 * 256 * 4);
    let mut la = Vec::with_capacity(256 * 256 * 2);
    for alpha in 0..=255u8 {
        for v in 0..=255u8 {
            rgba.extend([v, 255 - v, v.wrapping_mul(7), alpha]);
            la.extend([v, alpha]);
        }
    }
    let rgb = from_pixels(256, 256, 4, &rgba).unwrap();
    assert_eq!(
        sha256_hex(&rgb.data),
        expected["rgba_256x256"].as_str().unwrap()
    );
    let rgb = from_pixels(256, 256, 2, &la).unwrap();
    assert_eq!(
        sha256_hex(&rgb.data),
        expected["la_256x256"].as_str().unwrap()
    );
    // L and RGB: replicated / unchanged.
    let gray = synthetic(7, 5, 1);
    let rgb = from_pixels(7, 5, 1, &gray).unwrap();
    assert!(
        rgb.data
            .chunks_exact(3)
            .zip(&gray)
            .all(|(p, &g)| p == [g, g, g])
    );
    assert_eq!(
        from_pixels(7, 5, 3, &synthetic(7, 5, 3)).unwrap().data,
        synthetic(7, 5, 3)
    );
}

/// A PNG header (signature + IHDR) claiming the given size, with no pixel data after it.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(13u32.to_be_bytes());
    out.extend(&ihdr);
    out.extend(crc32(&ihdr).to_be_bytes());
    // An empty IDAT then IEND, so that the decoder gets past the header.
    for chunk in [&b"IDAT"[..], b"IEND"] {
        out.extend(0u32.to_be_bytes());
        out.extend(chunk);
        out.extend(crc32(chunk).to_be_bytes());
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn limits_are_checked_from_the_header() {
    assert!(matches!(
        decode(&png_header(16385, 10)),
        Err(ImageError::SideTooLarge { width: 16385, .. })
    ));
    assert!(matches!(
        decode(&png_header(10, 20000)),
        Err(ImageError::SideTooLarge { height: 20000, .. })
    ));
    assert!(matches!(
        decode(&png_header(10000, 5001)),
        Err(ImageError::TooManyPixels { .. })
    ));
    // At the limit the header is accepted and decoding fails on the missing data instead.
    assert!(matches!(
        decode(&png_header(10000, 5000)),
        Err(ImageError::Decode(_))
    ));
    assert!(matches!(
        decode(&png_header(0, 10)),
        Err(ImageError::Empty { .. }) | Err(ImageError::Decode(_))
    ));
    assert!(matches!(
        from_pixels(10000, 5001, 4, &[]),
        Err(ImageError::TooManyPixels { .. })
    ));
    assert!(matches!(
        from_pixels(0, 3, 3, &[]),
        Err(ImageError::Empty { .. })
    ));
}

#[test]
fn corrupt_truncated_and_unknown_bytes_are_errors() {
    assert!(matches!(decode(b""), Err(ImageError::UnknownFormat)));
    assert!(matches!(
        decode(b"definitely not an image"),
        Err(ImageError::UnknownFormat)
    ));
    for file in [
        "rgb8.png",
        "palette_trns.gif",
        "lossy_rgb.webp",
        "q90_420.jpg",
        "q75_420_progressive.jpg",
    ] {
        let bytes = std::fs::read(data_path(&format!("decode/{file}"))).unwrap();
        for cut in [4, 12, 30, bytes.len() / 2, bytes.len() * 3 / 4] {
            assert!(
                decode(&bytes[..cut]).is_err(),
                "{file} cut at {cut} decoded"
            );
        }
        let mut flipped = bytes.clone();
        for i in (20..flipped.len()).step_by(7) {
            flipped[i] ^= 0x5a;
        }
        let _ = decode(&flipped); // must return (Ok or Err), not panic
    }
    assert!(matches!(
        from_pixels(2, 2, 5, &[0; 20]),
        Err(ImageError::BadChannels(5))
    ));
    assert!(matches!(
        from_pixels(2, 2, 4, &[0; 15]),
        Err(ImageError::BadPixelBuffer {
            expected: 16,
            got: 15,
            ..
        })
    ));
}
