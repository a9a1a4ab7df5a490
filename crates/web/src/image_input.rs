//! Images handed over from JavaScript. Encoded files (a `Blob`, `File` or bytes) are decoded here
//! by `llava_image`, exactly as natively, so that the browser sees the same pixels as `llava run`
//! for the same file; already-decoded pixels (`ImageData`, or a canvas the page drew an image,
//! bitmap or video frame into) arrive as RGBA.

use llava_image::{ImageConfig, ImageError, Rgb8};
use serde::Deserialize;

/// An image as JavaScript gives it.
pub enum ImageSource {
    Encoded(Vec<u8>),
    Rgba {
        width: u32,
        height: u32,
        data: Vec<u8>,
    },
}

impl ImageSource {
    pub fn to_rgb(&self) -> Result<Rgb8, ImageError> {
        match self {
            ImageSource::Encoded(bytes) => llava_image::decode(bytes),
            ImageSource::Rgba {
                width,
                height,
                data,
            } => llava_image::from_pixels(*width, *height, 4, data),
        }
    }
}

/// `preprocessor_config.json`'s image settings as JavaScript passes them (camelCase); a missing
/// field keeps LLaVA-1.6's value.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ImageOptions {
    pub tile_size: u32,
    pub patch_size: u32,
    pub grid_pinpoints: Vec<[u32; 2]>,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageOptions {
    fn default() -> Self {
        let c = ImageConfig::default();
        ImageOptions {
            tile_size: c.tile_size,
            patch_size: c.patch_size,
            grid_pinpoints: c.grid_pinpoints,
            image_mean: c.image_mean,
            image_std: c.image_std,
        }
    }
}

impl ImageOptions {
    pub fn config(self) -> Result<ImageConfig, ImageError> {
        let config = ImageConfig {
            tile_size: self.tile_size,
            patch_size: self.patch_size,
            grid_pinpoints: self.grid_pinpoints,
            image_mean: self.image_mean,
            image_std: self.image_std,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_options_keep_llava_1_6_values() {
        let o: ImageOptions =
            serde_json::from_str(r#"{"tileSize": 28, "gridPinpoints": [[28, 56]]}"#).unwrap();
        let c = o.config().unwrap();
        assert_eq!(
            (c.tile_size, c.patch_size, c.grid_pinpoints),
            (28, 14, vec![[28, 56]])
        );
        assert_eq!(c.image_mean, ImageConfig::default().image_mean);
        assert!(serde_json::from_str::<ImageOptions>(r#"{"tilesize": 28}"#).is_err());
    }

    #[test]
    fn rgba_pixels_are_composited_like_a_decoded_file() {
        // Half-transparent black over white is mid grey; opaque pixels pass through.
        let source = ImageSource::Rgba {
            width: 2,
            height: 1,
            data: vec![0, 0, 0, 128, 10, 20, 30, 255],
        };
        let rgb = source.to_rgb().unwrap();
        assert_eq!((rgb.width, rgb.height), (2, 1));
        assert_eq!(&rgb.data[3..], [10, 20, 30]);
        assert!(
            rgb.data[..3].iter().all(|&v| v == 127 || v == 128),
            "{:?}",
            rgb.data
        );
        let short = ImageSource::Rgba {
            width: 2,
            height: 2,
            data: vec![0; 8],
        };
        assert!(short.to_rgb().is_err());
        assert!(
            ImageSource::Encoded(b"not an image".to_vec())
                .to_rgb()
                .is_err()
        );
    }
}
