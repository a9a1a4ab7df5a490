//! The decoder with an f16 KV cache against the same decoder with an f32 one (which the parity
//! tests hold to transformers): on the text-only case of each fixture model, first-step logits
//! with cosine >= 0.9999 and the same 16 greedy tokens as transformers.

use llava_gpu::{DType, Tensor};
use llava_model::files::weights::WeightPrecision;
use llava_model::llava::{Llava, LoadOptions};

mod common;
use common::{expected, fixture, gpu};

/// First-step logits and 16 greedy tokens (argmax, no eos stop) of `ids` with a `dtype` cache.
fn greedy_with_cache(llava: &Llava, ids: &[u32], dtype: DType) -> (Vec<f32>, Vec<u32>) {
    let language = llava.language();
    let gpu = llava.gpu();
    let mut cache = language.new_cache(gpu, ids.len() + 16, dtype).unwrap();
    let logits_of = |x: Tensor, cache: &mut _| -> Vec<f32> {
        let mut batch = gpu.batch();
        let hidden = language.forward(&mut batch, &x, cache).unwrap();
        let logits = language.logits(&mut batch, &hidden).unwrap();
        batch.submit().unwrap();
        pollster::block_on(logits.to_f32(gpu)).unwrap()
    };
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(0, |best, (i, &x)| if x > v[best] { i } else { best }) as u32
    };
    let embed = |ids: &[u32]| {
        let mut batch = gpu.batch();
        let x = language.embed(&mut batch, ids).unwrap();
        batch.submit().unwrap();
        x
    };
    let first = logits_of(embed(ids), &mut cache);
    let mut tokens = vec![argmax(&first)];
    while tokens.len() < 16 {
        let logits = logits_of(embed(&tokens[tokens.len() - 1..]), &mut cache);
        tokens.push(argmax(&logits));
    }
    (first, tokens)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn f16_cache_keeps_greedy_tokens_and_logits_of_the_f32_cache() {
    for model in ["vicuna-tiny", "mistral-tiny", "tied-f32", "odd-heads-tiny"] {
        let llava = Llava::load_dir(
            gpu(),
            &fixture(model),
            &LoadOptions {
                precision: WeightPrecision::F32,
                context: None,
            },
        )
        .unwrap();
        let expected = expected(model);
        let case = expected["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "text_only")
            .unwrap();
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<u32> = case["greedy_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let (f32_logits, f32_tokens) = greedy_with_cache(&llava, &ids, DType::F32);
        assert_eq!(f32_tokens, want, "{model}: f32 cache vs transformers");
        let (f16_logits, f16_tokens) = greedy_with_cache(&llava, &ids, DType::F16);
        let cos = cosine(&f16_logits, &f32_logits);
        println!(
            "{model}: f16 cache first-step logits cosine {cos:.7}, tokens {:?}",
            f16_tokens == want
        );
        assert!(cos >= 0.9999, "{model}: f16 cache logits cosine {cos}");
        assert_ne!(
            f16_logits, f32_logits,
            "{model}: the f16 cache must round the keys and values"
        );
        assert_eq!(f16_tokens, want, "{model}: f16 cache greedy tokens");
    }
}

#[test]
fn new_cache_rejects_other_dtypes() {
    let llava = Llava::load_dir(
        gpu(),
        &fixture("tied-f32"),
        &LoadOptions {
            precision: WeightPrecision::F32,
            context: None,
        },
    )
    .unwrap();
    let err = llava
        .language()
        .new_cache(llava.gpu(), 8, DType::Q8)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("Q8 KV cache (it must be F32 or F16)"),
        "{err}"
    );
}
