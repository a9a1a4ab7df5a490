//! The planned decode step's promises, counted on the GPU (no timing): after the first token, a
//! decode token creates no buffer and no bind group, is one submit of one compute pass, runs at
//! most 6 dispatches per decoder layer plus 4 outside the layers, and reads back at most 8 bytes,
//! greedy and sampled; on the bundled tiny model through a chat, and on a 7B-shaped layer.

mod common;

use std::sync::Arc;

use common::{fixture, load_image};
use llava_gpu::ops::decode::Sampling;
use llava_gpu::{Counters, Gpu, Tensor};
use llava_model::files::config::{Activation, TextArch, TextConfig};
use llava_model::files::weights::{WeightPrecision, Weights};
use llava_model::generate::{GenerateParams, GpuPerToken, Turn};
use llava_model::llava::{KvPrecision, Llava, LoadOptions};
use llava_model::net::language::LanguageModel;

/// Asserts the per-token promises for a model of `layers` decoder layers.
#[track_caller]
fn assert_planned(g: &GpuPerToken, layers: usize, what: &str) {
    assert!(g.planned, "{what}: the decode step was not planned");
    assert_eq!(
        (g.buffers_created, g.bind_groups_created),
        (0.0, 0.0),
        "{what}: {g:?}"
    );
    assert_eq!((g.submits, g.passes), (1.0, 1.0), "{what}: {g:?}");
    assert!(g.dispatches <= (6 * layers + 4) as f64, "{what}: {g:?}");
    assert!(g.bytes_read <= 8.0, "{what}: {g:?}");
}

#[test]
fn tiny_model_decodes_without_creating_anything() {
    // A device of its own: counters see everything done on a device.
    let gpu = Arc::new(Gpu::new_blocking().unwrap());
    let llava = Llava::load_dir(gpu, &fixture("mistral-tiny"), &LoadOptions::default()).unwrap();
    let layers = llava.config().text.num_hidden_layers;
    let image = load_image("rocket.jpg");
    let sampled = GenerateParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        repetition_penalty: 1.1,
        seed: 4,
        ..Default::default()
    };
    for (params, what) in [(GenerateParams::default(), "greedy"), (sampled, "sampled")] {
        let params = GenerateParams {
            max_new_tokens: 12,
            ignore_eos: true,
            ..params
        };
        let mut chat = llava.chat(None).unwrap();
        let turn = Turn {
            image: Some(&image),
            text: "What is this?",
            raw_prompt: false,
            want_logits: false,
        };
        let reply = pollster::block_on(chat.send(&llava, turn, &params, |_| true)).unwrap();
        assert_eq!(reply.tokens.len(), 12);
        assert_planned(&reply.gpu, layers, what);
        // A follow-up reuses the same plan.
        let turn = Turn {
            image: None,
            text: "And then?",
            raw_prompt: false,
            want_logits: false,
        };
        let reply = pollster::block_on(chat.send(&llava, turn, &params, |_| true)).unwrap();
        assert_planned(&reply.gpu, layers, &format!("{what} follow-up"));
    }
}

/// One Mistral-7B decoder layer (q4, random weights) at context 40: the planned step counted
/// per token, greedy and sampled.
#[test]
fn mistral_7b_layer_decodes_without_creating_anything() {
    let gpu = Arc::new(Gpu::new_blocking().unwrap());
    let text = TextConfig {
        arch: TextArch::Mistral,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_hidden_layers: 1,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 128,
        hidden_act: Activation::Silu,
        rms_norm_eps: 1e-5,
        rope_theta: 1e6,
        vocab_size: 32064,
        max_position_embeddings: 32768,
        sliding_window: None,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: None,
    };
    let mut w = Weights::random(gpu.clone(), WeightPrecision::Q4, 3);
    let language = LanguageModel::load(&mut w, &gpu, &text, false).unwrap();
    let mut cache = language.new_cache(&gpu, 64, llava_gpu::DType::F32).unwrap();
    let x = Tensor::from_f32(&gpu, &[40, 4096], &llava_gpu::random(40 * 4096, 1)).unwrap();
    let mut batch = gpu.batch();
    let last = language.forward_last(&mut batch, &x, &mut cache).unwrap();
    let plan = language
        .plan_decode(&gpu, &cache)
        .unwrap()
        .expect("a planned step");
    let sampled = Sampling {
        temperature: 1.0,
        top_k: 40,
        top_p: 0.9,
        repetition_penalty: 1.1,
        seed: 1,
    };
    for (sampling, what) in [(Sampling::GREEDY, "greedy"), (sampled, "sampled")] {
        plan.set_sampling(&gpu, sampling, &[1, 2, 3]);
        plan.record_head(&mut batch, &last).unwrap();
        pollster::block_on(plan.submit_sampled(batch, false)).unwrap();
        let before = gpu.counters();
        let tokens = 2;
        for i in 0..tokens {
            let mut step = gpu.batch();
            plan.record_step(&mut step, &mut cache, i).unwrap();
            let (id, _) = pollster::block_on(plan.submit_sampled(step, false)).unwrap();
            assert!(id < 32064);
        }
        let used: Counters = gpu.counters() - before;
        let per = |v: u64| v as f64 / tokens as f64;
        let g = GpuPerToken {
            dispatches: per(used.dispatches),
            passes: per(used.passes),
            submits: per(used.submits),
            buffers_created: per(used.buffers_created),
            bind_groups_created: per(used.bind_groups_created),
            bytes_written: per(used.bytes_written),
            bytes_read: per(used.bytes_read),
            planned: true,
        };
        assert_planned(&g, 1, what);
        batch = gpu.batch();
    }
}

/// The planned step over an f16 cache (its kernels store and read halves) gives the greedy
/// tokens of the f32 cache, which match transformers' (tests/parity.rs).
#[test]
fn f16_cache_decodes_the_f32_caches_tokens() {
    let gpu = common::gpu();
    let image = load_image("rocket.jpg");
    let tokens = |kv_cache| {
        let mut llava = Llava::load_dir(
            gpu.clone(),
            &fixture("mistral-tiny"),
            &LoadOptions::default(),
        )
        .unwrap();
        llava.set_kv_cache(kv_cache);
        let mut chat = llava.chat(None).unwrap();
        let turn = Turn {
            image: Some(&image),
            text: "What is this?",
            raw_prompt: false,
            want_logits: false,
        };
        let reply =
            pollster::block_on(chat.send(&llava, turn, &common::greedy16(), |_| true)).unwrap();
        assert!(reply.gpu.planned);
        reply.tokens
    };
    assert_eq!(tokens(KvPrecision::F16), tokens(KvPrecision::F32));
}
