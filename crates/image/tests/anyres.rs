//! AnyRes geometry: the worked examples of the spec (§2, §3, §5), computed by hand there.

use llava_image::{
    ImageConfig, ImageError, Rgb8, UnpadLayout, image_token_count, preprocess,
    select_best_resolution, unpad_layout,
};

const PINPOINTS: [[u32; 2]; 5] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]];

#[test]
fn best_resolutions() {
    // [height, width] in and out.
    let cases = [
        ([600, 800], [672, 672]),
        ([800, 600], [672, 672]),
        ([100, 100], [336, 672]), // everything keeps 100x100: least waste, then list order
        ([1000, 1000], [672, 672]),
        ([336, 1008], [336, 1008]),
        ([1008, 336], [1008, 336]),
        ([2000, 1], [336, 672]),
        ([1000, 13], [1008, 336]),
    ];
    for (orig, best) in cases {
        assert_eq!(select_best_resolution(orig, &PINPOINTS), best, "{orig:?}");
    }
    assert_eq!(select_best_resolution([10, 10], &[]), [0, 0]);
}

#[test]
fn token_counts_of_the_spec() {
    let cfg = ImageConfig::default();
    // [height, width]: 800x600 (W x H) is [600, 800].
    assert_eq!(image_token_count([600, 800], &cfg), 2340);
    assert_eq!(image_token_count([800, 600], &cfg), 2352);
    assert_eq!(image_token_count([100, 100], &cfg), 1176);
    assert_eq!(image_token_count([1000, 1000], &cfg), 2928);
}

#[test]
fn unpad_layouts() {
    let cfg = ImageConfig::default();
    // 800x600 -> 48x48 grid, new height 36 -> 6 padding rows each side.
    assert_eq!(
        unpad_layout([600, 800], &cfg),
        UnpadLayout {
            rows: 36,
            cols: 48,
            row_start: 6,
            col_start: 0
        }
    );
    assert_eq!(
        unpad_layout([800, 600], &cfg),
        UnpadLayout {
            rows: 48,
            cols: 36,
            row_start: 0,
            col_start: 6
        }
    );
    // 100x100 -> [336, 672]: 24x48 grid, width 24 kept from column 12.
    assert_eq!(
        unpad_layout([100, 100], &cfg),
        UnpadLayout {
            rows: 24,
            cols: 24,
            row_start: 0,
            col_start: 12
        }
    );
    assert_eq!(
        unpad_layout([1000, 1000], &cfg),
        UnpadLayout {
            rows: 48,
            cols: 48,
            row_start: 0,
            col_start: 0
        }
    );
}

/// 800x600: resized to 672x504, 84 zero rows above and below; the tile cut is row-major after the
/// overview.
#[test]
fn preprocess_pads_centred_and_cuts_row_major() {
    let cfg = ImageConfig::default();
    let img = Rgb8 {
        width: 800,
        height: 600,
        data: vec![255; 800 * 600 * 3],
    };
    let out = preprocess(&img, &cfg).unwrap();
    assert_eq!(
        (
            out.original_hw,
            out.best_resolution,
            out.grid,
            out.num_patches
        ),
        ([600, 800], [672, 672], [2, 2], 5)
    );
    assert_eq!(out.pixels.len(), 5 * 3 * 336 * 336);
    let zero = |c: usize| (0.0 - cfg.image_mean[c]) / cfg.image_std[c];
    let white = |c: usize| (1.0 - cfg.image_mean[c]) / cfg.image_std[c];
    let value = |patch: usize, c: usize, y: usize, x: usize| {
        out.pixels[((patch * 3 + c) * 336 + y) * 336 + x]
    };
    for c in 0..3 {
        for x in [0, 200, 335] {
            // Overview: all white (a constant image stays constant).
            assert_eq!(value(0, c, 0, x), white(c));
            // Top tiles (1, 2): rows 0..84 padding, 84.. image; bottom tiles (3, 4): image up to row
            // 672 - 84 - 336 = 252.
            for patch in [1, 2] {
                assert_eq!(value(patch, c, 83, x), zero(c));
                assert_eq!(value(patch, c, 84, x), white(c));
            }
            for patch in [3, 4] {
                assert_eq!(value(patch, c, 251, x), white(c));
                assert_eq!(value(patch, c, 252, x), zero(c));
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = ImageConfig::default();
    let empty = Rgb8 {
        width: 0,
        height: 5,
        data: vec![],
    };
    assert!(matches!(
        preprocess(&empty, &cfg),
        Err(ImageError::Empty { .. })
    ));
    let short = Rgb8 {
        width: 4,
        height: 4,
        data: vec![0; 47],
    };
    assert!(matches!(
        preprocess(&short, &cfg),
        Err(ImageError::BadPixelBuffer {
            expected: 48,
            got: 47,
            ..
        })
    ));
    let img = Rgb8 {
        width: 4,
        height: 4,
        data: vec![0; 48],
    };
    let bad_configs = [
        ImageConfig {
            grid_pinpoints: vec![],
            ..ImageConfig::default()
        },
        ImageConfig {
            grid_pinpoints: vec![[336, 500]],
            ..ImageConfig::default()
        },
        ImageConfig {
            patch_size: 0,
            ..ImageConfig::default()
        },
        ImageConfig {
            patch_size: 15,
            ..ImageConfig::default()
        },
        ImageConfig {
            image_std: [1.0, 0.0, 1.0],
            ..ImageConfig::default()
        },
    ];
    for bad in bad_configs {
        let err = preprocess(&img, &bad).unwrap_err();
        assert!(matches!(err, ImageError::BadConfig(_)), "{bad:?}: {err}");
    }
    // No panics from the geometry helpers on degenerate input.
    let zero_tile = ImageConfig {
        tile_size: 0,
        ..ImageConfig::default()
    };
    assert_eq!(image_token_count([10, 10], &zero_tile), 0);
    let _ = unpad_layout([0, 0], &ImageConfig::default());
}
