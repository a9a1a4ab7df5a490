//! The whole model against transformers: the fixtures in tests/fixtures/expected were written by
//! tests/reference/generate.py from tiny random checkpoints with the real LLaVA-1.6 geometry.
//! Checked per case: prompt ids, packed image features, first-step logits (max |diff| <= 1e-4 x
//! max |logit|), 16 greedy tokens, and multi-turn chat with KV-cache reuse.

use llava_model::files::config::Activation;
use llava_model::files::npy;
use llava_model::files::weights::WeightPrecision;
use llava_model::generate::Turn;
use llava_model::llava::{Llava, LoadOptions};
use serde_json::Value;

mod common;
use common::{expected, gpu, greedy16, load_image, root};

fn load(model: &str, precision: WeightPrecision) -> Llava {
    let dir = root().join("tests/fixtures/models").join(model);
    Llava::load_dir(
        gpu(),
        &dir,
        &LoadOptions {
            precision,
            context: None,
        },
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn assert_close_rel(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (i, diff) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0f32), |best, (i, d)| {
            if d > best.1 || d.is_nan() {
                (i, d)
            } else {
                best
            }
        });
    assert!(
        diff <= rel * scale,
        "{what}: max |diff| {diff} at {i} (got {}, want {}) > {rel} x {scale}",
        got[i],
        want[i]
    );
}

fn check_model(model: &str) {
    let expected = expected(model);
    let llava = load(model, WeightPrecision::F32);
    for case in expected["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let what = format!("{model}/{id}");
        let image = case["image"].as_str().map(load_image);
        if case.get("turn1").is_some() {
            check_multi_turn(&llava, case, image.as_ref().unwrap(), &what);
            continue;
        }
        // The prompt as the processor got it, so the template is not under test here.
        let prompt = case["prompt"].as_str().unwrap();
        let image_tokens = case["image_tokens"].as_u64().unwrap() as usize;
        let (prompt_ids, _) = llava
            .tokenize_prompt(prompt, image.as_ref().map(|_| image_tokens))
            .unwrap();
        assert_eq!(prompt_ids, ids(&case["input_ids"]), "{what}: prompt ids");

        if let Some(file) = case["image_features_npy"].as_str() {
            let encoded = pollster::block_on(llava.encode_image(image.as_ref().unwrap())).unwrap();
            assert_eq!(encoded.tokens, image_tokens, "{what}: image tokens");
            let got = pollster::block_on(encoded.features.to_f32(llava.gpu())).unwrap();
            let (shape, want) =
                npy::read_f32(root().join("tests/fixtures/expected").join(file)).unwrap();
            assert_eq!(
                shape,
                [image_tokens, llava.config().text.hidden_size],
                "{what}: feature shape"
            );
            assert_close_rel(&got, &want, 1e-4, &format!("{what}: image features"));
        }

        let mut chat = llava.chat(None).unwrap();
        let turn = Turn {
            image: image.as_ref(),
            text: prompt,
            raw_prompt: true,
            want_logits: true,
        };
        let reply = pollster::block_on(chat.send(&llava, turn, &greedy16(), |_| true)).unwrap();
        assert_eq!(reply.image_tokens, image_tokens, "{what}: image tokens");
        let (_, want) = npy::read_f32(
            root()
                .join("tests/fixtures/expected")
                .join(case["logits_npy"].as_str().unwrap()),
        )
        .unwrap();
        assert_close_rel(
            reply.first_logits.as_ref().unwrap(),
            &want,
            1e-4,
            &format!("{what}: first-step logits"),
        );
        assert_eq!(
            reply.tokens,
            ids(&case["greedy_tokens"]),
            "{what}: greedy tokens"
        );
    }
}

/// Turn 1 through the chat template, turn 2 as a follow-up reusing the KV cache: its answer must
/// equal transformers' answer for the whole conversation run from scratch.
fn check_multi_turn(llava: &Llava, case: &Value, image: &llava_image::Rgb8, what: &str) {
    let turn1 = &case["turn1"];
    let mut chat = llava.chat(None).unwrap();
    let first = Turn {
        image: Some(image),
        text: turn1["question"].as_str().unwrap(),
        raw_prompt: false,
        want_logits: false,
    };
    let reply = pollster::block_on(chat.send(llava, first, &greedy16(), |_| true)).unwrap();
    assert_eq!(
        reply.prompt_tokens,
        ids(&turn1["input_ids"]).len(),
        "{what}: turn 1 prompt length"
    );
    assert_eq!(
        reply.tokens,
        ids(&turn1["greedy_tokens"]),
        "{what}: turn 1 tokens"
    );
    assert_eq!(
        reply.text,
        turn1["assistant_text"].as_str().unwrap(),
        "{what}: turn 1 text"
    );

    let second = Turn {
        image: None,
        text: case["question"].as_str().unwrap(),
        raw_prompt: false,
        want_logits: true,
    };
    let reply = pollster::block_on(chat.send(llava, second, &greedy16(), |_| true)).unwrap();
    assert_eq!(
        reply.prompt_tokens,
        ids(&case["input_ids"]).len(),
        "{what}: turn 2 prompt length"
    );
    assert!(
        reply.timings.prefill_tokens < reply.prompt_tokens - reply.image_tokens,
        "{what}: the follow-up must reuse the cached image and turn 1 ({} of {} tokens prefilled)",
        reply.timings.prefill_tokens,
        reply.prompt_tokens
    );
    assert_eq!(
        reply.tokens,
        ids(&case["greedy_tokens"]),
        "{what}: turn 2 tokens (vs. from scratch)"
    );
}

#[test]
fn vicuna_tiny_matches_transformers() {
    check_model("vicuna-tiny");
}

#[test]
fn mistral_tiny_hub_layout_gqa_matches_transformers() {
    check_model("mistral-tiny");
}

#[test]
fn tied_f32_matches_transformers() {
    check_model("tied-f32");
}

#[test]
fn bf16_tiny_matches_transformers() {
    check_model("bf16-tiny");
}

/// Head dims off the powers of two: vision 12 (hidden 24, 2 heads), text 20 (hidden 40, 2 query
/// heads on 1 kv head), tied embeddings.
#[test]
fn odd_head_dims_match_transformers() {
    let llava = load("odd-heads-tiny", WeightPrecision::F32);
    let (vision, text) = (&llava.config().vision, &llava.config().text);
    assert_eq!(vision.hidden_size / vision.num_attention_heads, 12);
    assert_eq!(
        (
            text.head_dim,
            text.num_attention_heads,
            text.num_key_value_heads
        ),
        (20, 2, 1)
    );
    check_model("odd-heads-tiny");
}

/// A CLIP tower with exact GELU (`vision_config.hidden_act: "gelu"`, as LAION's CLIP towers have)
/// instead of quick_gelu.
#[test]
fn gelu_vision_tower_matches_transformers() {
    let llava = load("gelu-tower-tiny", WeightPrecision::F32);
    assert_eq!(llava.config().vision.hidden_act, Activation::Gelu);
    check_model("gelu-tower-tiny");
}

/// A llava-v1.6-34b-style checkpoint: ChatML template shipped as chat_template.jinja,
/// `<|im_start|>`/`<|im_end|>` special tokens (on a Llama-2 tokenizer: there is no Yi tokenizer in
/// the shared test data), eos `<|im_end|>` from generation_config.json.
#[test]
fn chatml_tiny_matches_transformers() {
    let llava = load("chatml-tiny", WeightPrecision::F32);
    let im_end = llava.tokenizer().token_id("<|im_end|>");
    assert_eq!(im_end, Some(32003));
    assert!(llava.is_eos(32003));
    for case in expected("chatml-tiny")["cases"].as_array().unwrap() {
        let image = !case["image"].is_null();
        let question = case["question"].as_str().unwrap();
        let rendered = llava
            .render_chat(
                None,
                &[llava_model::Message::user(image as usize, question)],
            )
            .unwrap();
        assert_eq!(
            rendered,
            case["prompt"].as_str().unwrap(),
            "chatml-tiny/{}: rendered prompt",
            case["id"]
        );
    }
    check_model("chatml-tiny");
}
