//! The `llava` command as a user runs it, on the bundled tiny model (tests/fixtures/models/
//! mistral-tiny) and the original-LLaVA-layout one (liuhaotian-tiny), checked against the
//! transformers fixtures.

use std::process::{Command, Output};

mod common;

use common::{case, image, llava, root};
use serde_json::Value;

fn json_stdout(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "llava failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_with_an_image_gives_transformers_greedy_tokens() {
    let case = case("logo_rgba_zh");
    let question = case["question"].as_str().unwrap();
    let logits = std::env::temp_dir().join(format!("llava-cli-logits-{}.npy", std::process::id()));
    let out = llava(&[
        "run",
        "--image",
        image("logo.png").to_str().unwrap(),
        "--prompt",
        question,
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--json",
        "--logits-out",
        logits.to_str().unwrap(),
        // The f32 KV cache keeps logits within 1e-4 (the default is f16 where the GPU has shader-f16).
        "--kv",
        "f32",
    ]);
    let reply = json_stdout(&out);
    assert_eq!(reply["tokens"], case["greedy_tokens"]);
    assert_eq!(reply["image_tokens"], case["image_tokens"]);
    assert_eq!(
        reply["prompt_tokens"].as_u64().unwrap() as usize,
        case["input_ids"].as_array().unwrap().len()
    );
    assert_eq!(reply["text"], case["greedy_text"]);
    for key in ["load_s", "vision_s", "prefill_s", "decode_tokens_per_s"] {
        assert!(reply["timings"][key].as_f64().is_some(), "timings.{key}");
    }
    let (shape, got) = llava_model::files::npy::read_f32(&logits).unwrap();
    let (_, want) = llava_model::files::npy::read_f32(
        root()
            .join("tests/fixtures/expected")
            .join(case["logits_npy"].as_str().unwrap()),
    )
    .unwrap();
    std::fs::remove_file(&logits).unwrap();
    assert_eq!(shape, [want.len()]);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(diff <= 1e-4 * scale, "logits max |diff| {diff}");
}

#[test]
fn run_text_only_streams_the_answer() {
    let case = case("text_only");
    let out = llava(&[
        "run",
        "--prompt",
        case["question"].as_str().unwrap(),
        "--max-new-tokens",
        "16",
        "--ignore-eos",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        case["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn profile_reports_gpu_time_by_kernel_and_the_same_answer() {
    let case = case("text_only");
    let out = llava(&[
        "run",
        "--prompt",
        case["question"].as_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
        "--profile",
        "--kv",
        "f32",
    ]);
    let reply = json_stdout(&out);
    let want: Vec<&Value> = case["greedy_tokens"].as_array().unwrap()[..4]
        .iter()
        .collect();
    let got: Vec<&Value> = reply["tokens"].as_array().unwrap().iter().collect();
    assert_eq!(got, want);
    // llvmpipe has timestamp queries; an adapter without them reports no profile.
    let Some(profile) = reply["profile"].as_array() else {
        assert!(reply.get("profile").is_none(), "{reply}");
        return;
    };
    let calls = |kernel: &str| {
        profile
            .iter()
            .find(|k| k["kernel"] == kernel)
            .and_then(|k| k["calls"].as_u64())
    };
    // The prompt's attention runs once per layer (2), the sampler once per token.
    assert_eq!(calls("attention_rows ROWS TILED"), Some(2), "{profile:?}");
    assert_eq!(calls("sample SAMPLE"), Some(4), "{profile:?}");
    assert!(
        profile
            .iter()
            .all(|k| k["seconds"].as_f64().is_some_and(|s| s >= 0.0))
    );
}

#[test]
fn preprocess_reports_the_anyres_choice() {
    let out = llava(&[
        "preprocess",
        "--image",
        image("chelsea.png").to_str().unwrap(),
        "--json",
    ]);
    let info = json_stdout(&out);
    // tests/fixtures/preprocess.json, case chelsea.png (451x300).
    assert_eq!(info["best_resolution"], serde_json::json!([336, 672]));
    assert_eq!(info["grid"], serde_json::json!([1, 2]));
    assert_eq!(info["tiles"], 3);
    assert_eq!(info["image_tokens"], 1464);
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = std::env::temp_dir().join(format!("llava-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let logo = image("logo.png");
    let logo = logo.to_str().unwrap();

    let cases: [(Vec<&str>, &str); 5] = [
        (
            vec![
                "run",
                "--image",
                corrupt.to_str().unwrap(),
                "--prompt",
                "hi",
            ],
            "corrupt.png",
        ),
        (
            vec!["run", "--model", dir.to_str().unwrap(), "--prompt", "hi"],
            "config.json",
        ),
        (
            vec![
                "run",
                "--image",
                logo,
                "--raw-prompt",
                "--prompt",
                "<image> and <image>",
            ],
            "2 <image>",
        ),
        (
            vec!["run", "--raw-prompt", "--prompt", "<image> what?"],
            "no image",
        ),
        (
            vec!["run", "--image", logo, "--context", "300", "--prompt", "hi"],
            "context",
        ),
    ];
    for (args, needle) in cases {
        let out = llava(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains("error:") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_answers_a_follow_up_like_transformers_from_scratch() {
    use std::io::Write;
    let case = case("multi_turn");
    let mut child = Command::new(env!("CARGO_BIN_EXE_llava"))
        .args([
            "chat",
            "--image",
            image(case["image"].as_str().unwrap()).to_str().unwrap(),
        ])
        .args(["--max-new-tokens", "16", "--ignore-eos"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let questions = format!(
        "{}\n{}\n\n",
        case["turn1"]["question"].as_str().unwrap(),
        case["question"].as_str().unwrap()
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(questions.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Each answer streams after a "> " prompt and ends with a tokens/s line.
    let answers: Vec<&str> = stdout
        .split("> ")
        .filter_map(|turn| turn.split("\n[").next())
        .filter(|a| !a.is_empty())
        .collect();
    assert_eq!(
        answers,
        [
            case["turn1"]["greedy_text"].as_str().unwrap(),
            case["greedy_text"].as_str().unwrap()
        ]
    );
}

/// `--pixels-out` writes the normalised tiles as float32 `[tiles, 3, 336, 336]`, bit-exact with
/// transformers' pixel_values (tests/fixtures/preprocess.json). The original-LLaVA folder, which
/// ships no preprocessor config, gets the same pixels from its defaults.
#[test]
fn preprocess_pixels_out_matches_transformers() {
    use sha2::Digest;
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/preprocess.json")).unwrap(),
    )
    .unwrap();
    let case = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "chelsea.png")
        .unwrap();
    let liuhaotian = root().join("tests/fixtures/models/liuhaotian-tiny");
    let chelsea = image("chelsea.png");
    for (label, model) in [
        ("bundled", None),
        ("liuhaotian", Some(liuhaotian.to_str().unwrap())),
    ] {
        let npy = std::env::temp_dir().join(format!(
            "llava-cli-pixels-{label}-{}.npy",
            std::process::id()
        ));
        let mut args = vec!["preprocess", "--image", chelsea.to_str().unwrap()];
        args.extend(["--json", "--pixels-out", npy.to_str().unwrap()]);
        args.extend(model.iter().flat_map(|m| ["--model", m]));
        let info = json_stdout(&llava(&args));
        assert_eq!(info["tiles"], case["num_patches"], "{label}");

        let bytes = std::fs::read(&npy).unwrap();
        std::fs::remove_file(&npy).unwrap();
        // .npy version 1: magic, version, u16 header length, header, data.
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{label}");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(
            header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
            "{header}"
        );
        assert!(
            header.contains("'shape': (3, 3, 336, 336)"),
            "{label}: {header}"
        );
        assert_eq!(case["pixels_shape"], serde_json::json!([3, 3, 336, 336]));
        let data = &bytes[10 + header_len..];
        assert_eq!(data.len(), 3 * 3 * 336 * 336 * 4, "{label}");
        let digest: String = sha2::Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest,
            case["pixels_sha256"].as_str().unwrap(),
            "{label}: pixels differ from transformers"
        );
        for sample in case["samples"].as_array().unwrap() {
            let i = sample[0].as_u64().unwrap() as usize;
            let got = f32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap());
            assert_eq!(
                got,
                sample[1].as_f64().unwrap() as f32,
                "{label}: pixel {i}"
            );
        }
    }
}

/// An original liuhaotian/llava-v1.6 folder runs as downloaded: LLaVA's tensor names, its
/// `llava_llama` config with `mm_vision_tower` naming a CLIP folder, a tokenizer without `<image>`,
/// and LLaVA's llava_v1 conversation template.
#[test]
fn run_liuhaotian_layout_gives_transformers_greedy_tokens() {
    let path = root().join("tests/fixtures/expected/liuhaotian-tiny.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "rocket_en")
        .unwrap();
    let model = root().join("tests/fixtures/models/liuhaotian-tiny");
    // The JPEG itself: crates/image decodes it as Pillow does.
    let rocket = root().join("../shared/testdata/images/rocket.jpg");
    let out = llava(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--image",
        rocket.to_str().unwrap(),
        "--prompt",
        case["question"].as_str().unwrap(),
        "--max-new-tokens",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    let reply = json_stdout(&out);
    assert_eq!(reply["tokens"], case["greedy_tokens"]);
    assert_eq!(reply["image_tokens"], case["image_tokens"]);
    assert_eq!(
        reply["prompt_tokens"].as_u64().unwrap() as usize,
        case["input_ids"].as_array().unwrap().len()
    );
    assert_eq!(reply["text"], case["greedy_text"]);
}
