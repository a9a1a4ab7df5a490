//! Quality of quantized weights: first-step logits of Q8 and Q4 runs against transformers' f32
//! logits, with the gates (cosine >= 0.999 for Q8, >= 0.99 for Q4) and the greedy-token
//! agreement (16 steps) printed.
//!
//! Three kinds of check:
//! - The quantized kernels against f32 kernels on host-dequantized copies of the same weights
//!   (every path that reads quantized weights must agree to f32 rounding): what the gates
//!   measure is the quantization, not a kernel error.
//! - The gates, on `quant-gate`: a tiny checkpoint with transformers' own initialization
//!   (initializer_range 0.02, CLIP's rules for the vision tower), rows of 128-768, four layers and
//!   the real tokenizer, whose weights are generated bit for bit like tests/reference/generate.py
//!   does. Our quantized cosine must also equal the one transformers gets with the same
//!   dequantized weights (expected/quant-gate.json), which shows the loss is the weights'.
//! - The parity fixtures (initializer_range 0.4 in rows of 32-64: a chaotic network in which a
//!   0.5 % weight perturbation moves the logits by several %): their cosines are printed and
//!   checked against transformers on the same dequantized weights (expected/quant_quality.json),
//!   not gated.
//!
//! Under `--quant q4` the language model's attention value/output matrices and token embeddings
//! are Q6 and its other matrices Q4 (a code book in groups of 64): plain Q4_0 everywhere gave
//! 0.969 on the text case, because the errors of the value/output matrices add up along the
//! residual stream. Numbers and the measured alternatives: docs/converted-format.md, "Quality".

use std::path::Path;
use std::sync::OnceLock;

use half::f16;
use llava_gpu::DType;
use llava_gpu::quant::{dequantize, quantize};
use llava_model::files::checkpoint::{Checkpoint, Dtype, HostTensor, is_canonical};
use llava_model::files::config::LlavaConfig;
use llava_model::files::convert::model_tensors;
use llava_model::files::npy;
use llava_model::files::weights::{WeightPrecision, Weights, storage_dtype};
use llava_model::generate::Reply;
use llava_model::llava::{Llava, LoadOptions, ModelFiles};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
use common::{gpu, greedy_raw, load_image, root};

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Leading greedy tokens equal to the reference's, and tokens equal position by position.
fn agreement(got: &[u32], want: &[u32]) -> (usize, usize) {
    let prefix = got.iter().zip(want).take_while(|(g, w)| g == w).count();
    let same = got.iter().zip(want).filter(|(g, w)| g == w).count();
    (prefix, same)
}

/// One raw-prompt case of a fixture's expected outputs.
struct Case {
    image: Option<llava_image::Rgb8>,
    prompt: String,
    logits: Vec<f32>,
    tokens: Vec<u32>,
}

fn read_case(model: &str, case_id: &str) -> Case {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(format!("tests/fixtures/expected/{model}.json")))
            .unwrap(),
    )
    .unwrap();
    let case = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == case_id)
        .unwrap();
    let (_, logits) = npy::read_f32(
        root()
            .join("tests/fixtures/expected")
            .join(case["logits_npy"].as_str().unwrap()),
    )
    .unwrap();
    Case {
        image: case["image"].as_str().map(load_image),
        prompt: case["prompt"].as_str().unwrap().to_string(),
        logits,
        tokens: case["greedy_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect(),
    }
}

/// 16 greedy steps (no eos stop) with the first-step logits.
fn run(llava: &Llava, case: &Case) -> Reply {
    greedy_raw(llava, case.image.as_ref(), &case.prompt)
}

/// The fixture's weights as `precision` would store them, but quantized and dequantized on the
/// host and uploaded as f32 (f16-stored tensors rounded through f16): the model the quantized
/// kernels should compute, up to f32 rounding.
fn fake_quantized(dir: &Path, precision: WeightPrecision) -> Llava {
    let gpu = gpu();
    let checkpoint = Checkpoint::open(dir).unwrap();
    let mut weights = Weights::default();
    for name in checkpoint.names() {
        let host = checkpoint.read(name).unwrap();
        let values = match storage_dtype(name, &host, precision) {
            DType::F32 => host.to_f32(),
            DType::F16 => host
                .to_f32()
                .into_iter()
                .map(|x| f16::from_f32(x).to_f32())
                .collect(),
            dtype => {
                let (rows, cols) = (host.shape[0], host.shape[1]);
                dequantize(&quantize(dtype, rows, cols, &host.to_f32()))
            }
        };
        let host = HostTensor {
            shape: host.shape.clone(),
            dtype: Dtype::F32,
            bytes: bytemuck::cast_slice(&values).to_vec(),
        };
        weights
            .insert(&gpu, name, &host, WeightPrecision::F32)
            .unwrap();
    }
    let options = LoadOptions {
        precision: WeightPrecision::F32,
        context: None,
    };
    Llava::new(gpu, ModelFiles::from_dir(dir).unwrap(), weights, &options).unwrap()
}

/// The quantized kernels against f32 kernels on host-dequantized copies of the same weights:
/// every path that reads quantized weights (GEMV for decode steps, GEMM for prefill, embedding
/// gathers, the lm_head or tied table, vision tower and projector linears) must agree to f32
/// rounding, so that what the quality gates measure is the quantization itself.
fn check_kernels_match_fake_quantization(model: &str, case_id: &str) {
    let case = read_case(model, case_id);
    let dir = root().join("tests/fixtures/models").join(model);
    for precision in [WeightPrecision::Q8, WeightPrecision::Q4] {
        let options = LoadOptions {
            precision,
            context: None,
        };
        let quantized = run(&Llava::load_dir(gpu(), &dir, &options).unwrap(), &case);
        let fake = run(&fake_quantized(&dir, precision), &case);
        let (got, want) = (quantized.first_logits.unwrap(), fake.first_logits.unwrap());
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let cos = cosine(&got, &want);
        eprintln!(
            "{model}/{case_id} {precision:?} vs f32 on dequantized weights: cosine {cos:.8}, max |diff| \
             {worst:.2e} of max |logit| {scale:.3}; cosine to transformers f32 {:.6}",
            cosine(&got, &case.logits)
        );
        assert!(
            cos > 0.99999 && worst <= 1e-3 * scale,
            "{model} {precision:?}: {cos} {worst}"
        );
        assert_eq!(
            quantized.tokens, fake.tokens,
            "{model} {precision:?}: greedy tokens"
        );
    }
}

/// Tied: the Q4 embedding table is also the output matrix (Q4 gather and Q4 GEMV over the
/// vocabulary); the vision tower and projector are Q8 in both runs.
#[test]
fn tied_f32_quantized_kernels_match_dequantized_weights() {
    check_kernels_match_fake_quantization("tied-f32", "astronaut_en");
}

// ---- the quant-gate fixture: realistic initialization, generated weights ----------------------

const GATE_MODEL: &str = "quant-gate";
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// tests/reference/generate.py `generated_normal`: value i sums the twelve 16-bit words of
/// SplitMix64 outputs 3i..3i+2 (Irwin-Hall), exact in f64.
fn generated_normal(name: &str, seed: u64, count: usize) -> impl Iterator<Item = f64> {
    let base = seed ^ fnv1a64(name);
    (0..count as u64).map(move |i| {
        let total: u64 = (3 * i + 1..3 * i + 4)
            .map(|j| splitmix64(base.wrapping_add(j.wrapping_mul(SPLITMIX_GAMMA))))
            .map(|w| (0..4).map(|k| (w >> (16 * k)) & 0xFFFF).sum::<u64>())
            .sum();
        (total as f64 + 6.0 - 6.0 * 65536.0) / 65536.0
    })
}

/// The quant-gate checkpoint's tensors (canonical names, f16), drawn from the recipe in
/// weights.json and checked against the generator's SHA-256 and the names and shapes the model
/// of its config loads.
fn gate_tensors() -> &'static [(String, HostTensor)] {
    static TENSORS: OnceLock<Vec<(String, HostTensor)>> = OnceLock::new();
    TENSORS.get_or_init(|| {
        let dir = root().join("tests/fixtures/models").join(GATE_MODEL);
        let recipe: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("weights.json")).unwrap())
                .unwrap();
        let seed = recipe["seed"].as_u64().unwrap();
        let mut digest = Sha256::new();
        let mut tensors = Vec::new();
        for entry in recipe["tensors"].as_array().unwrap() {
            let name = entry["name"].as_str().unwrap();
            let shape: Vec<usize> = entry["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let count = shape.iter().product();
            let values: Vec<f16> = match (entry["constant"].as_f64(), entry["std"].as_f64()) {
                (Some(c), None) => vec![f16::from_f32(c as f32); count],
                (None, Some(std)) => generated_normal(name, seed, count)
                    .map(|z| f16::from_f32((z * std) as f32))
                    .collect(),
                _ => panic!("{name}: a recipe entry has a constant or a std"),
            };
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            digest.update(&bytes);
            // Like the checkpoint reader, keep only the tensors the model uses (not CLIP's
            // post_layernorm).
            if is_canonical(name) {
                tensors.push((
                    name.to_string(),
                    HostTensor {
                        shape,
                        dtype: Dtype::F16,
                        bytes,
                    },
                ));
            }
        }
        assert_eq!(
            format!("{:x}", digest.finalize()),
            recipe["sha256_f16"].as_str().unwrap()
        );
        let config = LlavaConfig::from_dir(&dir).unwrap();
        let mut want = model_tensors(&config);
        let mut got: Vec<_> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "the recipe holds every tensor of the config");
        tensors
    })
}

/// The quant-gate model with weights stored as `precision` stores them on load.
fn gate_model(precision: WeightPrecision) -> Llava {
    let gpu = gpu();
    let dir = root().join("tests/fixtures/models").join(GATE_MODEL);
    let mut weights = Weights::default();
    for (name, host) in gate_tensors() {
        weights.insert(&gpu, name, host, precision).unwrap();
    }
    let options = LoadOptions {
        precision,
        context: None,
    };
    Llava::new(gpu, ModelFiles::from_dir(&dir).unwrap(), weights, &options).unwrap()
}

/// Per case: our first-step cosine to transformers' f32 logits, transformers' own cosine with
/// the same dequantized weights (for Q8 / Q4), and the greedy agreement.
struct GateResult {
    case: &'static str,
    cosine: f64,
    transformers_cosine: Option<f64>,
    prefix: usize,
    same: usize,
}

fn measure_gate_model(precision: WeightPrecision, cases: &[&'static str]) -> Vec<GateResult> {
    let llava = gate_model(precision);
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(format!("tests/fixtures/expected/{GATE_MODEL}.json")))
            .unwrap(),
    )
    .unwrap();
    let key = match precision {
        WeightPrecision::Q8 => Some("q8"),
        WeightPrecision::Q4 => Some("q4"),
        _ => None,
    };
    cases
        .iter()
        .map(|&case_id| {
            let case = read_case(GATE_MODEL, case_id);
            let reply = run(&llava, &case);
            let cosine = cosine(reply.first_logits.as_ref().unwrap(), &case.logits);
            let entry = expected["cases"].as_array().unwrap().iter().find(|c| c["id"] == case_id).unwrap();
            let transformers_cosine = key.map(|k| entry["fake_quantized_cosine"][k].as_f64().unwrap());
            let (prefix, same) = agreement(&reply.tokens, &case.tokens);
            eprintln!(
                "{GATE_MODEL}/{case_id} {precision:?}: first-step logits cosine {cosine:.6} (transformers \
                 on the same dequantized weights: {transformers_cosine:?}); greedy tokens {same}/{} equal, \
                 first {prefix} identical",
                case.tokens.len()
            );
            GateResult { case: case_id, cosine, transformers_cosine, prefix, same }
        })
        .collect()
}

/// The image case has 2162 prompt tokens at head dim 64: a long prefill (on llvmpipe it needs the
/// key-chunked attention, llava_gpu's `long_causal_prefill_at_head_dims_32_to_128`).
const TEXT_CASE: &[&str] = &["text_only"];
const IMAGE_CASE: &[&str] = &["rocket_en"];

fn check_f32(cases: &[&'static str]) {
    for r in measure_gate_model(WeightPrecision::F32, cases) {
        assert!(r.cosine >= 0.99999, "{}: cosine {}", r.case, r.cosine);
        assert_eq!((r.prefix, r.same), (16, 16), "{}: greedy tokens", r.case);
    }
}

/// The quantized run loses exactly what transformers loses with the same dequantized weights
/// (up to f32 rounding) and, when given, the gate holds.
fn check_gate(precision: WeightPrecision, cases: &[&'static str], gate: Option<f64>) {
    for r in measure_gate_model(precision, cases) {
        let theirs = r.transformers_cosine.unwrap();
        assert!(
            (r.cosine - theirs).abs() <= 1e-4,
            "{}: cosine {} vs transformers {theirs}",
            r.case,
            r.cosine
        );
        if let Some(gate) = gate {
            assert!(
                r.cosine >= gate,
                "{} {precision:?}: cosine {} < gate {gate}",
                r.case,
                r.cosine
            );
        }
    }
}

#[test]
fn quant_gate_f32_matches_transformers() {
    check_f32(TEXT_CASE);
}

#[test]
fn quant_gate_q8_meets_the_gate() {
    check_gate(WeightPrecision::Q8, TEXT_CASE, Some(0.999));
}

#[test]
fn quant_gate_q4_meets_the_gate() {
    check_gate(WeightPrecision::Q4, TEXT_CASE, Some(0.99));
}

#[test]
fn quant_gate_image_case_f32_matches_transformers() {
    check_f32(IMAGE_CASE);
}

#[test]
fn quant_gate_image_case_q8_meets_the_gate() {
    check_gate(WeightPrecision::Q8, IMAGE_CASE, Some(0.999));
}

#[test]
fn quant_gate_image_case_q4_meets_the_gate() {
    check_gate(WeightPrecision::Q4, IMAGE_CASE, Some(0.99));
}

// ---- the chaotic fixtures: reported, not gated ------------------------------------------------

/// The tiny parity fixtures (initializer_range 0.4, rows of 32-64) amplify any weight
/// perturbation; their quantized cosines are printed, and checked against what transformers
/// gets with the same dequantized weights (expected/quant_quality.json), which shows that the
/// loss belongs to the weights, not to the runtime. The tolerance is wider than on quant-gate
/// because this network also amplifies f32 rounding differences.
fn check_chaotic(model: &str, case_id: &str) {
    let case = read_case(model, case_id);
    let dir = root().join("tests/fixtures/models").join(model);
    let measured: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/expected/quant_quality.json"))
            .unwrap(),
    )
    .unwrap();
    let entry = measured["chaotic_fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["model"] == model)
        .unwrap();
    for (precision, key) in [(WeightPrecision::Q8, "q8"), (WeightPrecision::Q4, "q4")] {
        let options = LoadOptions {
            precision,
            context: None,
        };
        let reply = run(&Llava::load_dir(gpu(), &dir, &options).unwrap(), &case);
        let cos = cosine(reply.first_logits.as_ref().unwrap(), &case.logits);
        let theirs = entry["fake_quantized_cosine"][key].as_f64().unwrap();
        let (prefix, same) = agreement(&reply.tokens, &case.tokens);
        eprintln!(
            "{model}/{case_id} {precision:?}: first-step logits cosine {cos:.6} (transformers on the same \
             dequantized weights: {theirs:.6}); greedy tokens {same}/{} equal, first {prefix} identical",
            case.tokens.len()
        );
        assert!(
            (cos - theirs).abs() <= 0.01,
            "{model} {precision:?}: cosine {cos} vs transformers {theirs}"
        );
    }
}

#[test]
fn bf16_tiny_quantized_cost_is_the_weights() {
    check_chaotic("bf16-tiny", "coffee_en");
}

#[test]
fn vicuna_tiny_quantized_cost_is_the_weights() {
    check_chaotic("vicuna-tiny", "rocket_en");
}

#[test]
fn mistral_tiny_quantized_cost_is_the_weights() {
    check_chaotic("mistral-tiny", "rocket_en");
}

#[test]
fn tied_f32_quantized_cost_is_the_weights() {
    check_chaotic("tied-f32", "astronaut_en");
}
