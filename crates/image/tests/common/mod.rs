//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Little-endian bytes of f32 values, as numpy's `<f4` `tobytes()`.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Path of a file under `crates/image/tests/data/`.
pub fn data_path(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Path of a file under the shared test images.
pub fn shared_image_path(name: &str) -> String {
    format!(
        "{}/../../../shared/testdata/images/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

pub fn read_json(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The documented synthetic pattern (shared with the reference generator), `channels` 1..=4 for
/// L, LA, RGB, RGBA; x is the column, y the row.
pub fn synthetic(width: u32, height: u32, channels: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity((width * height * channels) as usize);
    for y in 0..height as u64 {
        for x in 0..width as u64 {
            let r = (7 * x + 13 * y) % 256;
            let g = (x * y + 3 * x) % 256;
            let b = (x ^ y) % 256;
            let alpha = (5 * x + 11 * y) % 256;
            let gray = (3 * x + 5 * y) % 256;
            let px: &[u64] = match channels {
                1 => &[gray],
                2 => &[gray, alpha],
                3 => &[r, g, b],
                _ => &[r, g, b, alpha],
            };
            out.extend(px.iter().map(|&v| v as u8));
        }
    }
    out
}
