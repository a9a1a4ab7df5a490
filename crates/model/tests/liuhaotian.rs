//! The original LLaVA layout (liuhaotian/llava-v1.6-*) end to end: tests/fixtures/models/liuhaotian-tiny
//! has LLaVA's tensor names, a `llava_llama` config.json whose `mm_vision_tower` names a folder with
//! a tiny CLIP config, and a tokenizer without `<image>`. tests/reference/generate.py (section
//! `liuhaotian`) ran a llava-hf model with the same weights plus one vocabulary row for its image
//! token on LLaVA's `tokenizer_image_token` ids, and recorded its prompt ids, image features,
//! first-step logits (image token's logit dropped) and 16 greedy tokens.

use llava_model::files::config::ConfigLayout;
use llava_model::files::npy;
use llava_model::files::weights::WeightPrecision;
use llava_model::generate::Turn;
use llava_model::llava::{IMAGE_MARKER, Llava, LoadOptions};
use llava_model::text::Message;
use serde_json::Value;

mod common;
use common::{gpu, greedy16, load_image, root};

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

#[test]
fn liuhaotian_tiny_matches_transformers() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/expected/liuhaotian-tiny.json"))
            .unwrap(),
    )
    .unwrap();
    let gpu = gpu();
    let dir = root().join("tests/fixtures/models/liuhaotian-tiny");
    let options = LoadOptions {
        precision: WeightPrecision::F32,
        context: None,
    };
    let llava = Llava::load_dir(gpu, &dir, &options).unwrap();
    let config = llava.config();
    assert_eq!(config.layout, ConfigLayout::OriginalLlava);
    assert_eq!(
        (
            config.vision.hidden_size,
            config.vision.image_size,
            config.vision.patch_size
        ),
        (32, 336, 14)
    );
    assert_eq!(llava.tokenizer().token_id("<image>"), None);
    assert_eq!(llava.image_token(), IMAGE_MARKER);

    for case in expected["cases"].as_array().unwrap() {
        let what = format!("liuhaotian-tiny/{}", case["id"].as_str().unwrap());
        let image = case["image"].as_str().map(load_image);
        let question = case["question"].as_str().unwrap();
        let prompt = case["prompt"].as_str().unwrap();

        // The built-in template for this layout is LLaVA's llava_v1.
        let rendered = llava
            .render_chat(None, &[Message::user(image.is_some() as usize, question)])
            .unwrap();
        assert_eq!(rendered, prompt, "{what}: llava_v1 prompt");

        // tokenizer_image_token's ids with -200 expanded to the image's tokens, here marked by IMAGE_MARKER.
        let image_tokens = case["image_tokens"].as_u64().unwrap() as usize;
        let (prompt_ids, image_start) = llava
            .tokenize_prompt(prompt, image.as_ref().map(|_| image_tokens))
            .unwrap();
        let want: Vec<i64> = ids(&case["input_ids"])
            .into_iter()
            .map(|id| {
                if id == 32000 {
                    i64::from(IMAGE_MARKER)
                } else {
                    id
                }
            })
            .collect();
        let got: Vec<i64> = prompt_ids.iter().map(|&id| i64::from(id)).collect();
        assert_eq!(got, want, "{what}: prompt ids");
        let llava_ids = ids(&case["llava_input_ids"]);
        assert_eq!(
            image_start,
            llava_ids.iter().position(|&id| id == -200),
            "{what}: image position"
        );

        if let Some(file) = case["image_features_npy"].as_str() {
            let encoded = pollster::block_on(llava.encode_image(image.as_ref().unwrap())).unwrap();
            assert_eq!(encoded.tokens, image_tokens, "{what}: image tokens");
            let got = pollster::block_on(encoded.features.to_f32(llava.gpu())).unwrap();
            let (shape, want) =
                npy::read_f32(root().join("tests/fixtures/expected").join(file)).unwrap();
            assert_eq!(
                shape,
                [image_tokens, config.text.hidden_size],
                "{what}: feature shape"
            );
            let diff = max_rel_diff(&got, &want);
            assert!(
                diff <= 1e-4,
                "{what}: image features max |diff| = {diff} x max|want|"
            );
        }

        let mut chat = llava.chat(None).unwrap();
        let turn = Turn {
            image: image.as_ref(),
            text: prompt,
            raw_prompt: true,
            want_logits: true,
        };
        let reply = pollster::block_on(chat.send(&llava, turn, &greedy16(), |_| true)).unwrap();
        assert_eq!(
            (reply.prompt_tokens, reply.image_tokens),
            (want.len(), image_tokens),
            "{what}: token counts"
        );
        let logits = reply.first_logits.as_ref().unwrap();
        let (shape, want_logits) = npy::read_f32(
            root()
                .join("tests/fixtures/expected")
                .join(case["logits_npy"].as_str().unwrap()),
        )
        .unwrap();
        assert_eq!(shape, [32000], "{what}: vocabulary without the image token");
        let diff = max_rel_diff(logits, &want_logits);
        assert!(
            diff <= 1e-4,
            "{what}: first-step logits max |diff| = {diff} x max|logit|"
        );
        let want_tokens: Vec<u32> = ids(&case["greedy_tokens"])
            .into_iter()
            .map(|id| id as u32)
            .collect();
        assert_eq!(reply.tokens, want_tokens, "{what}: greedy tokens");
        assert_eq!(
            reply.text,
            case["greedy_text"].as_str().unwrap(),
            "{what}: greedy text"
        );
    }
}

/// tokenizer_image_token's BOS handling: BOS once at the front, none after an image; a prompt
/// without `<image>` is a plain encode; too many or unwanted `<image>`s are errors.
#[test]
fn liuhaotian_prompt_splitting() {
    let gpu = gpu();
    let dir = root().join("tests/fixtures/models/liuhaotian-tiny");
    let llava = Llava::load_dir(gpu, &dir, &LoadOptions::default()).unwrap();
    let tokenizer = llava.tokenizer();
    let encode = |text: &str| tokenizer.encode(text, true).unwrap();

    let (ids, start) = llava.tokenize_prompt("<image>\nHi", Some(3)).unwrap();
    // First chunk "" is just BOS; the second chunk's own BOS is dropped.
    let mut want = vec![1, IMAGE_MARKER, IMAGE_MARKER, IMAGE_MARKER];
    want.extend(&encode("\nHi")[1..]);
    assert_eq!((ids, start), (want, Some(1)));

    let (ids, start) = llava.tokenize_prompt("Look: <image>", Some(2)).unwrap();
    let mut want = encode("Look: ");
    want.extend([IMAGE_MARKER, IMAGE_MARKER]);
    assert_eq!(start, Some(want.len() - 2));
    assert_eq!(ids, want);

    assert_eq!(
        llava.tokenize_prompt("Just text.", None).unwrap(),
        (encode("Just text."), None)
    );

    let two = llava
        .tokenize_prompt("<image> and <image>", Some(5))
        .unwrap_err()
        .to_string();
    assert!(two.contains("2 <image>"), "{two}");
    let unwanted = llava
        .tokenize_prompt("<image> what?", None)
        .unwrap_err()
        .to_string();
    assert!(unwanted.contains("no image was given"), "{unwanted}");
    let missing = llava
        .tokenize_prompt("what?", Some(5))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("no <image>"), "{missing}");
}
