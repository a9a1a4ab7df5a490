//! The Pillow 13 BICUBIC port against Pillow itself (fixture: tests/data/generate.py).

mod common;

use common::{data_path, read_json, sha256_hex, synthetic};
use llava_image::{Rgb8, resize_bicubic};

#[test]
fn resize_matches_pillow_bit_for_bit_in_both_pass_orders() {
    let cases = read_json(&data_path("resize.json"));
    let cases = cases.as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let dim = |key: &str, i: usize| case[key][i].as_u64().unwrap() as u32;
        let (w, h, nw, nh) = (dim("src", 0), dim("src", 1), dim("dst", 0), dim("dst", 1));
        let src = Rgb8 {
            width: w,
            height: h,
            data: synthetic(w, h, 3),
        };
        let out = resize_bicubic(&src, nw, nh);
        assert_eq!(
            (out.width, out.height, out.data.len()),
            (nw, nh, (nw * nh * 3) as usize)
        );
        if sha256_hex(&out.data) != case["sha256"].as_str().unwrap() {
            failures.push(format!("{w}x{h} -> {nw}x{nh} ({})", case["order"]));
        }
    }
    assert!(failures.is_empty(), "differs from Pillow: {failures:?}");
    // The fixture must exercise both orders where they give different bytes.
    for order in ["horizontal_first", "vertical_first"] {
        assert!(
            cases.iter().any(|c| c["order"] == order),
            "no {order} case in resize.json"
        );
    }
}

/// Hand-checked properties that hold for any correct port: a constant image stays constant (weights
/// sum to one in fixed point), and a same-size resize is a copy.
#[test]
fn constant_image_stays_constant_and_same_size_is_copy() {
    let src = Rgb8 {
        width: 17,
        height: 9,
        data: [10u8, 128, 250].repeat(17 * 9),
    };
    for (w, h) in [(5, 3), (40, 30), (17, 4), (3, 9), (336, 336)] {
        let out = resize_bicubic(&src, w, h);
        assert!(
            out.data.chunks_exact(3).all(|p| p == [10, 128, 250]),
            "{w}x{h}"
        );
    }
    let pattern = Rgb8 {
        width: 13,
        height: 7,
        data: synthetic(13, 7, 3),
    };
    assert_eq!(resize_bicubic(&pattern, 13, 7), pattern);
    assert_eq!(resize_bicubic(&pattern, 0, 7).data.len(), 0);
}
