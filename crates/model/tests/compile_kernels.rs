//! `Llava::compile_kernels` creates every pipeline a first answer uses and runs nothing: after
//! it, a first turn with an image and the chat's follow-up compile nothing (counted on a device of
//! its own); without it, the same turn compiles them itself.

mod common;

use std::sync::Arc;

use common::{fixture, load_image};
use llava_gpu::Gpu;
use llava_model::generate::{GenerateParams, Turn};
use llava_model::llava::{KvPrecision, Llava, LoadOptions};

/// Pipelines compiled by a first turn (image and question) and by a follow-up, after
/// `compile_kernels` ran or not; and by `compile_kernels` itself.
fn pipelines_of_a_chat(kv: KvPrecision, compile_first: bool) -> (u64, u64, u64) {
    let gpu = Arc::new(Gpu::new_blocking().unwrap());
    let mut llava = Llava::load_dir(
        gpu.clone(),
        &fixture("mistral-tiny"),
        &LoadOptions::default(),
    )
    .unwrap();
    llava.set_kv_cache(kv);
    let start = gpu.counters();
    if compile_first {
        llava.compile_kernels().unwrap();
    }
    let used = gpu.counters() - start;
    assert_eq!(
        (used.dispatches, used.submits),
        (0, 0),
        "compile_kernels ran work"
    );
    let compiled = used.pipelines_created;
    let image = load_image("rocket.jpg");
    let params = GenerateParams {
        max_new_tokens: 4,
        ignore_eos: true,
        ..Default::default()
    };
    let mut chat = llava.chat(None).unwrap();
    let mut ask = |image, text| {
        let before = gpu.counters().pipelines_created;
        let turn = Turn {
            image,
            text,
            raw_prompt: false,
            want_logits: false,
        };
        let reply = pollster::block_on(chat.send(&llava, turn, &params, |_| true)).unwrap();
        assert_eq!(reply.tokens.len(), 4);
        gpu.counters().pipelines_created - before
    };
    let first = ask(Some(&image), "What is this?");
    let follow_up = ask(None, "Tell me more about the rocket and its launch.");
    (compiled, first, follow_up)
}

#[test]
fn after_compile_kernels_a_first_answer_compiles_nothing() {
    for kv in [KvPrecision::F32, KvPrecision::F16] {
        let (compiled, first, follow_up) = pipelines_of_a_chat(kv, true);
        assert!(
            compiled >= 10,
            "{kv:?}: compile_kernels made {compiled} pipelines"
        );
        assert_eq!(
            (first, follow_up),
            (0, 0),
            "{kv:?}: compiled after compile_kernels"
        );
        let (_, first, _) = pipelines_of_a_chat(kv, false);
        assert_eq!(
            first, compiled,
            "{kv:?}: a first answer without compile_kernels"
        );
    }
}
