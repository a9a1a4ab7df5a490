//! JPEG decoding against Pillow 13 (libjpeg-turbo): fixtures from tests/reference/jpeg_cases.py.

mod common;

use common::{read_json, sha256_hex, shared_image_path};
use llava_image::{ImageError, decode};

fn fixture(name: &str) -> String {
    format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn pixel(rgb: &llava_image::Rgb8, x: u64, y: u64) -> [u8; 3] {
    let i = (y as usize * rgb.width as usize + x as usize) * 3;
    [rgb.data[i], rgb.data[i + 1], rgb.data[i + 2]]
}

/// Every variant decodes to exactly Pillow's RGB bytes (size, sha256 and sampled pixels), except
/// the documented gap: arithmetic coding goes to the non-exact fallback, which refuses it.
#[test]
fn variants_decode_like_pillow() {
    let cases = read_json(&fixture("jpeg/cases.json"));
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut mismatches = Vec::new();
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let outcome = case["outcome"].as_str().unwrap();
        let decoded = decode(&read(&fixture(&format!("jpeg/{file}"))));
        if outcome == "refused" {
            assert!(
                matches!(decoded, Err(ImageError::Decode(_))),
                "{file}: {decoded:?}"
            );
            continue;
        }
        let rgb = decoded.unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            [u64::from(rgb.width), u64::from(rgb.height)],
            [
                case["width"].as_u64().unwrap(),
                case["height"].as_u64().unwrap()
            ],
            "{file}"
        );
        let exact = outcome == "exact";
        let same = sha256_hex(&rgb.data) == case["rgb_sha256"].as_str().unwrap();
        assert_eq!(
            same, exact,
            "{file} ({outcome}): bytes equal to Pillow's: {same}"
        );
        for sample in case["samples"].as_array().unwrap() {
            let (x, y) = (sample[0].as_u64().unwrap(), sample[1].as_u64().unwrap());
            let want: Vec<u8> = sample[2]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect();
            let got = pixel(&rgb, x, y);
            let max_diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            // Without block smoothing the sampled pixels stay within a few levels.
            let allowed = if exact { 0 } else { 24 };
            if max_diff > allowed {
                mismatches.push(format!("{file} ({x}, {y}): {got:?} vs {want:?}"));
            }
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}

/// The shared photos equal the PNG copies of Pillow's decode that the model parity tests use.
#[test]
fn shared_photos_equal_pillow_png_copies() {
    for stem in ["rocket", "grace_hopper"] {
        let jpeg = decode(&read(&shared_image_path(&format!("{stem}.jpg")))).unwrap();
        let png = decode(&read(&fixture(&format!("decoded/{stem}.png")))).unwrap();
        assert_eq!((jpeg.width, jpeg.height), (png.width, png.height), "{stem}");
        assert!(
            jpeg.data == png.data,
            "{stem}: JPEG decode differs from Pillow's"
        );
    }
}

/// Position just after the first SOS header (the start of entropy-coded data).
fn entropy_start(bytes: &[u8]) -> usize {
    let sos = bytes.windows(2).position(|w| w == [0xff, 0xda]).unwrap();
    sos + 2 + usize::from(u16::from_be_bytes([bytes[sos + 2], bytes[sos + 3]]))
}

/// Position of the first byte of the frame header (SOF0/1/2) marker.
fn sof(bytes: &[u8]) -> usize {
    bytes
        .windows(2)
        .position(|w| w[0] == 0xff && matches!(w[1], 0xc0..=0xc2))
        .unwrap()
}

fn decode_error(bytes: &[u8]) -> String {
    match decode(bytes) {
        Err(ImageError::Decode(message)) => message,
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[test]
fn truncated_files_are_refused_like_pillow() {
    for file in ["rgb_37x23_q75_420.jpg", "rgb_37x23_q75_420_progressive.jpg"] {
        let bytes = read(&fixture(&format!("jpeg/{file}")));
        let start = entropy_start(&bytes);
        // In the headers, inside the scan, and only the end-of-image marker missing.
        for cut in [
            3,
            100,
            start + 10,
            bytes.len() - 40,
            bytes.len() - 2,
            bytes.len() - 1,
        ] {
            let message = decode_error(&bytes[..cut]);
            assert!(
                message.contains("truncated"),
                "{file} cut at {cut}: {message}"
            );
        }
    }
}

/// Damaged entropy-coded data decodes as libjpeg does (its warnings are ignored by Pillow); the
/// Pillow comparisons are the `corrupt_*` fixtures. Here: random damage never panics.
#[test]
fn damaged_files_never_panic() {
    for file in [
        "rgb_37x23_q75_420.jpg",
        "rgb_40x30_q75_420_progressive_restart.jpg",
    ] {
        let bytes = read(&fixture(&format!("jpeg/{file}")));
        let start = entropy_start(&bytes);
        for step in [3, 5, 7, 11] {
            let mut damaged = bytes.clone();
            for i in (start..damaged.len() - 2).step_by(step) {
                damaged[i] = damaged[i].wrapping_mul(31).wrapping_add(7);
            }
            let _ = decode(&damaged);
        }
    }
}

#[test]
fn bad_frame_headers_are_errors() {
    let bytes = read(&fixture("jpeg/rgb_17x9_q75_422.jpg"));
    let at = sof(&bytes);
    let with = |offset: usize, value: &[u8]| {
        let mut b = bytes.clone();
        b[at + offset..at + offset + value.len()].copy_from_slice(value);
        b
    };
    // Width 0 (offset 7: width after precision and height).
    assert!(matches!(
        decode(&with(7, &[0, 0])),
        Err(ImageError::Empty {
            width: 0,
            height: 9
        })
    ));
    assert!(matches!(
        decode(&with(7, &[0x4e, 0x20])),
        Err(ImageError::SideTooLarge { width: 20000, .. })
    ));
    assert!(decode_error(&with(4, &[12])).contains("12-bit"));
    // Sampling factor 3 for luma and 2 for chroma: not an integral ratio.
    let mut fractional = with(11, &[0x31]);
    fractional[at + 14] = 0x21;
    assert!(decode_error(&fractional).contains("fractional"));
    // Sampling factor 0.
    assert!(decode_error(&with(11, &[0x01])).contains("sampling factor"));
}

/// Arithmetic coding is refused by name (zune-jpeg, the fallback, reported it as "Number of
/// components cannot be zero").
#[test]
fn arithmetic_coding_is_refused_by_name() {
    let err = decode(&read(&fixture("jpeg/arithmetic_37x23_q75_420.jpg")))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "cannot decode image: arithmetic-coded JPEG (frame marker FFC9) is not supported; save the image as a \
         Huffman-coded JPEG or as PNG"
    );
}

/// Encoded images are capped before any work, so a huge buffer from a browser is refused too.
#[test]
fn encoded_images_over_the_cap_are_refused() {
    let bytes = vec![0u8; llava_image::MAX_ENCODED_BYTES as usize + 1];
    let err = decode(&bytes).unwrap_err();
    assert!(matches!(err, ImageError::FileTooLarge { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("at most 268435456 bytes (256 MiB)"),
        "{err}"
    );
}
