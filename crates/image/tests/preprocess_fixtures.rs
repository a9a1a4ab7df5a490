//! Every case of tests/fixtures/preprocess.json (transformers 5.24 LlavaNextProcessor, PIL backend):
//! geometry, token count and the sha256 of the float32 pixel_values.

mod common;

use common::{f32_bytes, read_json, sha256_hex, shared_image_path, synthetic};
use llava_image::{ImageConfig, Rgb8, decode, from_pixels, image_token_count, preprocess};

fn input(case: &serde_json::Value) -> Rgb8 {
    let (w, h) = (
        case["width"].as_u64().unwrap() as u32,
        case["height"].as_u64().unwrap() as u32,
    );
    match case["source"].as_str().unwrap().strip_prefix("file:") {
        Some(file) => decode(&std::fs::read(shared_image_path(file)).unwrap()).unwrap(),
        None => {
            let channels = match case["mode"].as_str().unwrap() {
                "L" => 1,
                "LA" => 2,
                "RGB" => 3,
                "RGBA" => 4,
                other => panic!("mode {other}"),
            };
            from_pixels(w, h, channels, &synthetic(w, h, channels)).unwrap()
        }
    }
}

/// Runs every `SHARDS`-th case starting at `shard`, so that the shards run in parallel.
fn run_shard(shard: usize) {
    const SHARDS: usize = 4;
    let cfg = ImageConfig::default();
    let cases = read_json(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/preprocess.json"
    ));
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 50);
    let mut failures = Vec::new();
    for case in cases.iter().skip(shard).step_by(SHARDS) {
        let name = case["name"].as_str().unwrap();
        let u32s = |key: &str| -> Vec<u32> {
            case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let img = input(case);
        let hw = [img.height, img.width];
        let out = preprocess(&img, &cfg).unwrap();
        assert_eq!(out.original_hw, hw, "{name}");
        assert_eq!(
            out.best_resolution.to_vec(),
            u32s("best_resolution"),
            "{name}"
        );
        assert_eq!(out.grid.to_vec(), u32s("grid"), "{name}");
        assert_eq!(
            out.num_patches as u64,
            case["num_patches"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            vec![out.num_patches as u32, 3, 336, 336],
            u32s("pixels_shape"),
            "{name}"
        );
        assert_eq!(
            image_token_count(hw, &cfg) as u64,
            case["image_tokens"].as_u64().unwrap(),
            "{name}"
        );
        if sha256_hex(&img.data) != case["rgb_sha256"].as_str().unwrap() {
            failures.push(format!("{name}: RGB input"));
        } else if sha256_hex(&f32_bytes(&out.pixels)) != case["pixels_sha256"].as_str().unwrap() {
            failures.push(format!("{name}: pixel_values"));
        }
        for sample in case["samples"].as_array().unwrap() {
            let (index, want) = (
                sample[0].as_u64().unwrap() as usize,
                sample[1].as_f64().unwrap(),
            );
            if f64::from(out.pixels[index]) != want {
                failures.push(format!("{name}[{index}]: {} != {want}", out.pixels[index]));
            }
        }
    }
    assert!(failures.is_empty(), "mismatches: {failures:?}");
}

#[test]
fn reference_cases_shard_0() {
    run_shard(0);
}

#[test]
fn reference_cases_shard_1() {
    run_shard(1);
}

#[test]
fn reference_cases_shard_2() {
    run_shard(2);
}

#[test]
fn reference_cases_shard_3() {
    run_shard(3);
}
