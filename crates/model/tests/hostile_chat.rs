//! Chats survive every per-turn error, and generation's stop rules, on the bundled tiny model
//! against the transformers fixtures (tests/fixtures/expected/mistral-tiny.json): after an
//! over-long message, a bad image, a typed `<image>`, or a cancelled turn, the next question gets
//! exactly the answer transformers gives for the conversation as it stands.

use llava_model::ModelError;
use llava_model::generate::{GenerateParams, StopReason, Turn};
use llava_model::llava::{Llava, LoadOptions};
use serde_json::Value;

mod common;
use common::{expected, fixture, gpu, greedy16, load_image};

fn load() -> Llava {
    Llava::load_dir(gpu(), &fixture("mistral-tiny"), &LoadOptions::default()).unwrap()
}

fn case(id: &str) -> Value {
    expected("mistral-tiny")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap()
        .clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn turn<'a>(image: Option<&'a llava_image::Rgb8>, text: &'a str) -> Turn<'a> {
    Turn {
        image,
        text,
        raw_prompt: false,
        want_logits: false,
    }
}

#[test]
fn a_chat_survives_each_per_turn_error() {
    let llava = load();
    let case = case("multi_turn");
    let image = load_image(case["image"].as_str().unwrap());
    let question1 = case["turn1"]["question"].as_str().unwrap();
    let question2 = case["question"].as_str().unwrap();
    let mut chat = llava.chat(None).unwrap();
    let send = |chat: &mut llava_model::generate::ChatSession, turn: Turn<'_>| {
        pollster::block_on(chat.send(&llava, turn, &greedy16(), |_| true))
    };

    // An over-long first message with the image: refused, and the image is not kept.
    let long = "sea ".repeat(llava.context());
    let err = send(&mut chat, turn(Some(&image), &long))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, ModelError::ContextOverflow { .. }), "{err}");
    assert!(!chat.has_image() && chat.messages().is_empty());

    // A bad image (a pixel buffer that does not match its size).
    let bad = llava_image::Rgb8 {
        width: 4,
        height: 4,
        data: vec![0; 5],
    };
    let err = send(&mut chat, turn(Some(&bad), question1))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs 48 bytes, got 5"), "{err}");
    assert!(!chat.has_image() && chat.messages().is_empty());

    // Then the first question works as if it were the first.
    let reply = send(&mut chat, turn(Some(&image), question1)).unwrap();
    assert_eq!(reply.tokens, ids(&case["turn1"]["greedy_tokens"]));
    assert!(chat.has_image());

    // `<image>` typed in a follow-up, and an over-long follow-up: refused without a trace.
    let err = send(&mut chat, turn(None, "What is <image> here?"))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the message contains the text `<image>`"),
        "{err}"
    );
    let err = send(&mut chat, turn(None, &long)).map(|_| ()).unwrap_err();
    assert!(matches!(err, ModelError::ContextOverflow { .. }), "{err}");
    let err = send(&mut chat, turn(Some(&image), question2))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already has an image"), "{err}");
    assert_eq!(chat.messages().len(), 2);

    // The follow-up gets transformers' answer for the whole conversation run from scratch.
    let reply = send(&mut chat, turn(None, question2)).unwrap();
    assert_eq!(reply.tokens, ids(&case["greedy_tokens"]));
}

/// A cancelled turn keeps what it generated; the next question is answered from the KV cache
/// exactly as a fresh session answers the same conversation as one raw prompt.
#[test]
fn a_cancelled_turn_leaves_a_consistent_conversation() {
    let llava = load();
    let case = case("multi_turn");
    let image = load_image(case["image"].as_str().unwrap());
    let mut chat = llava.chat(None).unwrap();
    let mut seen = 0;
    let first = turn(Some(&image), case["turn1"]["question"].as_str().unwrap());
    let reply = pollster::block_on(chat.send(&llava, first, &greedy16(), |_| {
        seen += 1;
        seen < 5
    }))
    .unwrap();
    assert_eq!(reply.stop_reason, StopReason::Cancelled);
    assert_eq!(reply.tokens, ids(&case["turn1"]["greedy_tokens"])[..5]);
    let question = case["question"].as_str().unwrap();
    let follow_up =
        pollster::block_on(chat.send(&llava, turn(None, question), &greedy16(), |_| true)).unwrap();

    let mut messages = chat.messages().to_vec();
    messages.pop();
    assert_eq!(messages.len(), 3);
    let prompt = llava.render_chat(None, &messages).unwrap();
    let mut fresh = llava.chat(None).unwrap();
    let raw = Turn {
        image: Some(&image),
        text: &prompt,
        raw_prompt: true,
        want_logits: false,
    };
    let from_scratch = pollster::block_on(fresh.send(&llava, raw, &greedy16(), |_| true)).unwrap();
    assert_eq!(follow_up.tokens, from_scratch.tokens);
    assert_eq!(follow_up.prompt_tokens, from_scratch.prompt_tokens);
}

#[test]
fn generation_limits_and_stop_strings() {
    let llava = load();
    let case = case("text_only");
    let question = case["question"].as_str().unwrap();
    let greedy_tokens = ids(&case["greedy_tokens"]);
    let greedy_text = case["greedy_text"].as_str().unwrap();
    let prompt_tokens = ids(&case["input_ids"]).len();

    // max_new_tokens 0: nothing generated, nothing streamed.
    let mut chat = llava.chat(None).unwrap();
    let params = GenerateParams {
        max_new_tokens: 0,
        ..greedy16()
    };
    let mut events = 0;
    let reply = pollster::block_on(chat.send(&llava, turn(None, question), &params, |_| {
        events += 1;
        true
    }))
    .unwrap();
    assert_eq!(
        (reply.tokens.len(), reply.text.as_str(), events),
        (0, "", 0)
    );
    assert_eq!(reply.stop_reason, StopReason::MaxTokens);

    // A context with room for 3 more tokens: 4 come out (the last needs no cache slot), with text.
    let small = Llava::load_dir(
        gpu(),
        &fixture("mistral-tiny"),
        &LoadOptions {
            context: Some(prompt_tokens + 3),
            ..Default::default()
        },
    )
    .unwrap();
    let mut chat = small.chat(None).unwrap();
    let reply =
        pollster::block_on(chat.send(&small, turn(None, question), &greedy16(), |_| true)).unwrap();
    assert_eq!(reply.stop_reason, StopReason::ContextFull);
    assert_eq!(reply.tokens, greedy_tokens[..4]);
    assert!(
        !reply.text.is_empty() && greedy_text.starts_with(&reply.text),
        "{:?}",
        reply.text
    );

    // A stop string from the middle of the answer: the streamed text never ends with the
    // beginning of it, and all streamed pieces make up the reply.
    let chars: Vec<char> = greedy_text.chars().collect();
    let stop: String = chars[20..24].iter().collect();
    let params = GenerateParams {
        stop: vec![stop.clone()],
        ..greedy16()
    };
    let mut streamed = String::new();
    let mut chat = llava.chat(None).unwrap();
    let reply = pollster::block_on(chat.send(&llava, turn(None, question), &params, |event| {
        streamed.push_str(event.text);
        let held = (1..stop.len())
            .filter(|&n| stop.is_char_boundary(n))
            .any(|n| streamed.ends_with(&stop[..n]));
        assert!(
            !held,
            "streamed {streamed:?} ends with the beginning of {stop:?}"
        );
        true
    }))
    .unwrap();
    assert_eq!(reply.stop_reason, StopReason::StopString);
    let cut = greedy_text.find(&stop).unwrap();
    assert_eq!(
        (reply.text.as_str(), streamed.as_str()),
        (&greedy_text[..cut], &greedy_text[..cut])
    );

    // Without a stop, the held-back text is flushed at the end: streamed == reply.
    let params = GenerateParams {
        stop: vec!["never in this text".into()],
        ..greedy16()
    };
    let mut streamed = String::new();
    let reply = pollster::block_on(llava.chat(None).unwrap().send(
        &llava,
        turn(None, question),
        &params,
        |event| {
            streamed.push_str(event.text);
            true
        },
    ))
    .unwrap();
    assert_eq!(
        (reply.text.as_str(), streamed.as_str()),
        (greedy_text, greedy_text)
    );

    // Bad parameters are refused before any work.
    let params = GenerateParams {
        temperature: f32::NAN,
        ..greedy16()
    };
    let err = pollster::block_on(llava.chat(None).unwrap().send(
        &llava,
        turn(None, question),
        &params,
        |_| true,
    ))
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(err.contains("`temperature` is NaN"), "{err}");
}

/// A copy of the bundled model with `file` replaced by `contents`.
fn bundled_with(file: &str, contents: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("mistral-tiny")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.path().join(file), contents).unwrap();
    dir
}

/// What used to be one "the prompt has no <image>" message, per cause.
#[test]
fn each_cause_of_a_missing_image_placeholder_is_named() {
    let config = std::fs::read_to_string(fixture("mistral-tiny").join("config.json")).unwrap();
    for (id, expected) in [
        (
            "40000",
            "key `image_token_index`: 40000 is outside the vocabulary of 32064 tokens",
        ),
        (
            "1",
            "key `image_token_index`: 1, but the tokenizer's `<image>` token is 32000",
        ),
    ] {
        let dir = bundled_with(
            "config.json",
            &config.replace(
                "\"image_token_index\": 32000",
                &format!("\"image_token_index\": {id}"),
            ),
        );
        let msg = llava_model::llava::ModelFiles::from_dir(dir.path())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("config.json: ") && msg.contains(expected),
            "{msg}"
        );
    }
    // A template that drops image content items.
    let dir = bundled_with(
        "chat_template.jinja",
        "{% for m in messages %}{{ m['content'] if m['content'] is string else m['content'][-1]['text'] }}{% endfor %}",
    );
    let llava = Llava::load_dir(gpu(), dir.path(), &LoadOptions::default()).unwrap();
    let image = load_image("logo.png");
    let err = pollster::block_on(llava.chat(None).unwrap().send(
        &llava,
        turn(Some(&image), "What?"),
        &greedy16(),
        |_| true,
    ))
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the chat template wrote no `<image>` for the message's image"),
        "{err}"
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_says_so() {
    let config = std::fs::read_to_string(fixture("mistral-tiny").join("config.json")).unwrap();
    let dir = bundled_with(
        "config.json",
        &config.replace("\"hidden_size\": 64", "\"hidden_size\": 128"),
    );
    let msg = Llava::load_dir(gpu(), dir.path(), &LoadOptions::default())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("multi_modal_projector.linear_1.weight has shape [64, 32], but config.json's sizes make it [128, 32]"),
        "{msg}"
    );
}
