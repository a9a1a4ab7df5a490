//! Writes the RGB bytes `llava_image::decode` makes of an image file to stdout: the native side
//! of the browser test that checks the wasm build decodes files identically.

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: decode_rgb <image file>")?;
    let rgb = llava_image::decode(&std::fs::read(&path)?)?;
    std::io::stdout().lock().write_all(&rgb.data)?;
    Ok(())
}
