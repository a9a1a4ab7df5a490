//! Image-feature reuse: a second chat (or a reset chat) about the same image takes the projected
//! features from the model's cache, runs no vision tower, and answers with the same tokens as
//! transformers (the mistral-tiny fixtures) and as a run with the cache off.

use llava_model::generate::{Reply, Turn};
use llava_model::llava::{Llava, LoadOptions};
use serde_json::Value;

mod common;
use common::{expected, fixture, gpu, greedy16, load_image};

fn case(id: &str) -> Value {
    expected("mistral-tiny")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap()
        .clone()
}

fn tokens(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn ask(
    llava: &Llava,
    chat: &mut llava_model::generate::ChatSession,
    image: &llava_image::Rgb8,
    question: &str,
) -> Reply {
    let turn = Turn {
        image: Some(image),
        text: question,
        raw_prompt: false,
        want_logits: false,
    };
    pollster::block_on(chat.send(llava, turn, &greedy16(), |_| true)).unwrap()
}

#[test]
fn a_second_chat_about_an_image_reuses_its_features() {
    let rocket = case("rocket_en");
    let want = tokens(&rocket["greedy_tokens"]);
    let question = rocket["question"].as_str().unwrap();
    let image = load_image(rocket["image"].as_str().unwrap());
    let llava = Llava::load_dir(gpu(), &fixture("mistral-tiny"), &LoadOptions::default()).unwrap();

    // Cache off: every chat runs the vision tower and nothing is kept.
    llava.set_image_cache_limit(0);
    let uncached = ask(&llava, &mut llava.chat(None).unwrap(), &image, question);
    assert_eq!(uncached.tokens, want);
    assert!(!uncached.timings.image_cached);
    let stats = llava.image_cache_stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.entries, stats.bytes),
        (0, 1, 0, 0)
    );

    llava.set_image_cache_limit(64 << 20);
    let first = ask(&llava, &mut llava.chat(None).unwrap(), &image, question);
    assert!(!first.timings.image_cached);
    let stats = llava.image_cache_stats();
    // One entry: the packed features, [image tokens, hidden] f32.
    let hidden = llava.config().text.hidden_size as u64;
    assert_eq!((stats.hits, stats.misses, stats.entries), (0, 2, 1));
    assert_eq!(
        stats.bytes,
        rocket["image_tokens"].as_u64().unwrap() * hidden * 4
    );

    // A new chat, then the same chat after a reset: both hits, no vision tower, same tokens.
    let mut chat = llava.chat(None).unwrap();
    let second = ask(&llava, &mut chat, &image, question);
    chat.reset();
    let after_reset = ask(&llava, &mut chat, &image, question);
    for reply in [&first, &second, &after_reset] {
        assert_eq!(reply.tokens, want);
        assert_eq!(reply.image_tokens, uncached.image_tokens);
    }
    for reply in [&second, &after_reset] {
        assert!(reply.timings.image_cached);
    }
    let stats = llava.image_cache_stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.entries),
        (2, 2, 1),
        "the vision tower ran only for misses"
    );

    // Other pixels are another key: a miss, and the transformers answer for that image.
    let other = case("logo_rgba_zh");
    let logo = load_image(other["image"].as_str().unwrap());
    let reply = ask(
        &llava,
        &mut llava.chat(None).unwrap(),
        &logo,
        other["question"].as_str().unwrap(),
    );
    assert!(!reply.timings.image_cached);
    assert_eq!(reply.tokens, tokens(&other["greedy_tokens"]));
    assert_eq!(
        (
            llava.image_cache_stats().misses,
            llava.image_cache_stats().entries
        ),
        (3, 2)
    );
}
