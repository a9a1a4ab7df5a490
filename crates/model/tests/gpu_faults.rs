//! GPU faults end a reply or a load with a clear error, never a hang or a panic, and the model
//! loads again afterwards: a device destroyed in the middle of an answer. (A GPU whose limits are
//! smaller than the model needs: tests/gpu_limits.rs.)

use std::sync::Arc;

use llava_gpu::Gpu;
use llava_model::generate::Turn;
use llava_model::llava::{Llava, LoadOptions};
use serde_json::Value;

mod common;
use common::{expected, fixture, greedy16};

fn text_only() -> Value {
    expected("mistral-tiny")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "text_only")
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

fn load(gpu: Arc<Gpu>) -> llava_model::Result<Llava> {
    Llava::load_dir(gpu, &fixture("mistral-tiny"), &LoadOptions::default())
}

fn ask(
    llava: &Llava,
    question: &str,
    on_token: impl FnMut() -> bool,
) -> llava_model::Result<Vec<u32>> {
    let mut on_token = on_token;
    let turn = Turn {
        image: None,
        text: question,
        raw_prompt: false,
        want_logits: false,
    };
    let mut chat = llava.chat(None)?;
    pollster::block_on(chat.send(llava, turn, &greedy16(), |_| on_token())).map(|r| r.tokens)
}

#[test]
fn a_device_destroyed_mid_answer_ends_it_with_a_clear_error_and_the_model_loads_again() {
    let case = text_only();
    let question = case["question"].as_str().unwrap();
    let gpu = Arc::new(Gpu::new_blocking().unwrap());
    let llava = load(gpu.clone()).unwrap();
    let mut streamed = 0;
    let err = ask(&llava, question, || {
        streamed += 1;
        if streamed == 3 {
            gpu.device().destroy();
        }
        true
    })
    .unwrap_err()
    .to_string();
    assert_eq!(err, "the GPU device was lost: it was destroyed");
    assert!(
        streamed < 16,
        "the answer went on after the loss ({streamed} tokens)"
    );
    // The device stays lost for every later call, and says so.
    let err = ask(&llava, question, || true).unwrap_err().to_string();
    assert_eq!(err, "the GPU device was lost: it was destroyed");
    assert_eq!(
        gpu.wait().unwrap_err().to_string(),
        "the GPU device was lost: it was destroyed"
    );
    drop(llava);

    // A new device in the same process loads the model again, which answers as transformers does.
    let llava = load(Arc::new(Gpu::new_blocking().unwrap())).unwrap();
    assert_eq!(
        ask(&llava, question, || true).unwrap(),
        ids(&case["greedy_tokens"])
    );
}
