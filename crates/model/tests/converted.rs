//! The converted format: converting fixture checkpoints, loading them back (the same bytes as
//! quantizing on load, so the same logits and tokens), size plans from a config alone, and each
//! kind of broken folder as a clear error.

use std::path::Path;

use llava_gpu::DType;
use llava_model::files::checkpoint::{Checkpoint, Dtype};
use llava_model::files::config::LlavaConfig;
use llava_model::files::convert::{self, ConversionPlan, DEFAULT_SHARD_BYTES};
use llava_model::files::manifest::{MANIFEST_FILE, Manifest};
use llava_model::files::weights::{KeepOptions, KeepPrecision, WeightPrecision};
use llava_model::generate::Reply;
use llava_model::llava::{Llava, LoadOptions};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

mod common;
use common::{expected, fixture, gpu, greedy_raw, load_image, mistral_7b_config};

/// 16 greedy tokens and first-step logits of the fixture's text-only raw-prompt case, or of its
/// first case (with its image) when it has none.
fn run(llava: &Llava, model: &str) -> Reply {
    let expected = expected(model);
    let cases = expected["cases"].as_array().unwrap();
    let case = cases
        .iter()
        .find(|c| c["id"] == "text_only")
        .unwrap_or(&cases[0]);
    let image = case["image"].as_str().map(load_image);
    greedy_raw(llava, image.as_ref(), case["prompt"].as_str().unwrap())
}

fn load(dir: &Path, precision: WeightPrecision) -> llava_model::Result<Llava> {
    Llava::load_dir(
        gpu(),
        dir,
        &LoadOptions {
            precision,
            context: None,
        },
    )
}

/// Small shards, so the fixtures span several and the shard logic is exercised.
const TEST_SHARD_BYTES: u64 = 1 << 20;

fn converted_matches_quantize_on_load(model: &str) {
    for precision in [WeightPrecision::Q8, WeightPrecision::Q4] {
        let out = tempfile::tempdir().unwrap();
        let manifest = convert::convert(
            &fixture(model),
            out.path(),
            precision,
            KeepOptions::default(),
            TEST_SHARD_BYTES,
        )
        .unwrap()
        .manifest;
        assert!(
            manifest.shards.len() > 1,
            "{model}: {} shards",
            manifest.shards.len()
        );
        // Every shard is a valid safetensors file by an independent reading (the checkpoint reader
        // maps U8 entries to unsupported, so only headers are checked here).
        for shard in &manifest.shards {
            let bytes = std::fs::read(out.path().join(&shard.file)).unwrap();
            assert_eq!(bytes.len() as u64, shard.bytes);
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            assert_eq!(len % 8, 0, "header padded to 8 bytes");
            let header: Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
            let data_end = header
                .as_object()
                .unwrap()
                .values()
                .filter_map(|v| v.get("data_offsets"))
                .map(|o| o[1].as_u64().unwrap())
                .max()
                .unwrap();
            assert_eq!(
                8 + len as u64 + data_end,
                shard.bytes,
                "{}: data fills the file exactly",
                shard.file
            );
        }
        let plan = ConversionPlan::new(
            &checkpoint_tensors(&fixture(model)),
            precision,
            KeepOptions::default(),
            TEST_SHARD_BYTES,
        );
        assert_eq!(
            plan.summary().total,
            manifest.total_bytes(),
            "{model}: planned vs written size"
        );

        let converted = load(out.path(), WeightPrecision::Native).unwrap();
        let on_load = load(&fixture(model), precision).unwrap();
        let (a, b) = (run(&converted, model), run(&on_load, model));
        let (la, lb) = (a.first_logits.unwrap(), b.first_logits.unwrap());
        let diff = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("{model} {precision:?}: converted vs quantize-on-load max |diff| {diff}");
        assert!(diff <= 1e-5, "{model} {precision:?}: max |diff| {diff}");
        assert_eq!(a.tokens, b.tokens, "{model} {precision:?}: greedy tokens");
    }
}

fn checkpoint_tensors(dir: &Path) -> Vec<(String, Vec<usize>, Dtype)> {
    let checkpoint = Checkpoint::open(dir).unwrap();
    checkpoint
        .names()
        .map(|n| {
            let info = checkpoint.info(n).unwrap();
            let llava_model::StoredDtype::Known(dtype) = info.dtype else {
                panic!("{n}: unsupported dtype")
            };
            (n.to_string(), info.shape.clone(), dtype)
        })
        .collect()
}

#[test]
fn vicuna_tiny_converted_equals_quantize_on_load() {
    converted_matches_quantize_on_load("vicuna-tiny");
}

#[test]
fn mistral_tiny_converted_equals_quantize_on_load() {
    converted_matches_quantize_on_load("mistral-tiny");
}

#[test]
fn tied_f32_converted_equals_quantize_on_load() {
    converted_matches_quantize_on_load("tied-f32");
}

#[test]
fn bf16_tiny_converted_equals_quantize_on_load() {
    converted_matches_quantize_on_load("bf16-tiny");
}

#[test]
fn liuhaotian_tiny_converted_equals_quantize_on_load() {
    converted_matches_quantize_on_load("liuhaotian-tiny");
}

#[test]
fn chatml_tiny_converted_equals_quantize_on_load() {
    converted_matches_quantize_on_load("chatml-tiny");
}

/// The tensor list derived from a config matches what the fixture checkpoints hold.
#[test]
fn tensors_from_config_match_the_fixture_checkpoints() {
    for model in ["vicuna-tiny", "mistral-tiny", "tied-f32", "bf16-tiny"] {
        let config = LlavaConfig::from_dir(fixture(model)).unwrap();
        let mut from_config = convert::model_tensors(&config);
        from_config.sort();
        let mut stored: Vec<_> = checkpoint_tensors(&fixture(model))
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        stored.sort();
        assert_eq!(from_config, stored, "{model}");
    }
}

#[test]
fn mistral_7b_q4_download_is_at_most_4_5_gb() {
    let config = mistral_7b_config();
    let params: u64 = convert::model_tensors(&config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    for precision in [
        WeightPrecision::F16,
        WeightPrecision::Q8,
        WeightPrecision::Q4,
    ] {
        let plan = ConversionPlan::for_config(
            &config,
            Dtype::F16,
            precision,
            KeepOptions::default(),
            DEFAULT_SHARD_BYTES,
        );
        let summary = plan.summary();
        eprintln!("LLaVA-1.6-Mistral-7B {precision:?} ({params} params):\n{summary}");
        // Hand count: vectors and the vision embeddings stay f32 (4 bytes a parameter), the rest
        // is 2 bytes a parameter; header bytes come on top.
        if precision == WeightPrecision::F16 {
            let f32_params: u64 = convert::model_tensors(&config)
                .iter()
                .filter(|(n, s)| s.len() == 1 || n.starts_with("vision_model.embeddings"))
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(summary.total - summary.headers, 2 * params + 2 * f32_params);
        }
        if precision == WeightPrecision::Q4 {
            assert!(
                summary.total <= 4_500_000_000,
                "q4 total {} bytes",
                summary.total
            );
            // The LLM's matrices at 4.25 bits (a nibble plus an f16 scale per 64), its attention
            // value/output matrices and token embeddings at 6.25 bits, the lm_head, vision tower
            // and projector matrices at 8.5 bits (a byte plus an f16 scale per 32).
            let q4 = summary.by_storage[&DType::Q4];
            assert_eq!(q4.bytes * 64, q4.params * 34);
            let q6 = summary.by_storage[&DType::Q6];
            assert_eq!(q6.bytes * 64, q6.params * 50);
            let per_layer = 4096 * 1024 + 4096 * 4096;
            assert_eq!(q6.params, 32 * per_layer + 32064 * 4096);
            let q8 = summary.by_storage[&DType::Q8];
            assert_eq!(q8.bytes * 32, q8.params * 34);
        }
    }
}

// ---- bad input ------------------------------------------------------------------------------

/// A freshly converted vicuna-tiny (q8) in a temporary folder.
fn converted_copy() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    convert::convert(
        &fixture("vicuna-tiny"),
        out.path(),
        WeightPrecision::Q8,
        KeepOptions::default(),
        TEST_SHARD_BYTES,
    )
    .unwrap();
    out
}

/// Converting into a folder that holds an earlier conversion replaces it: no old shard or copied
/// file survives to be mixed with the new model.
#[test]
fn converting_over_an_earlier_conversion_replaces_it() {
    let out = converted_copy();
    let old_shards: Vec<String> = Manifest::read(out.path())
        .unwrap()
        .shards
        .iter()
        .map(|s| s.file.clone())
        .collect();
    assert!(out.path().join("chat_template.jinja").is_file() && !old_shards.is_empty());
    // liuhaotian-tiny ships no chat_template.jinja and, with one big shard, other shard names.
    convert::convert(
        &fixture("liuhaotian-tiny"),
        out.path(),
        WeightPrecision::Q8,
        KeepOptions::default(),
        u64::MAX,
    )
    .unwrap();
    let manifest = Manifest::read(out.path()).unwrap();
    assert_eq!(manifest.shards.len(), 1);
    assert!(!out.path().join("chat_template.jinja").exists());
    for old in old_shards.iter().filter(|f| **f != manifest.shards[0].file) {
        assert!(!out.path().join(old).exists(), "{old} is left over");
    }
    // It answers as the same conversion into an empty folder does.
    let fresh = tempfile::tempdir().unwrap();
    convert::convert(
        &fixture("liuhaotian-tiny"),
        fresh.path(),
        WeightPrecision::Q8,
        KeepOptions::default(),
        u64::MAX,
    )
    .unwrap();
    let reply = run(
        &load(out.path(), WeightPrecision::Native).unwrap(),
        "liuhaotian-tiny",
    );
    assert_eq!(
        reply.tokens,
        run(
            &load(fresh.path(), WeightPrecision::Native).unwrap(),
            "liuhaotian-tiny"
        )
        .tokens
    );
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join(MANIFEST_FILE);
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, manifest.to_string()).unwrap();
}

fn load_error(dir: &Path) -> String {
    match load(dir, WeightPrecision::Native) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(error: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            error.contains(part),
            "error {error:?} does not mention {part:?}"
        );
    }
}

#[test]
fn truncated_shard_is_reported() {
    let dir = converted_copy();
    let manifest = Manifest::read(dir.path()).unwrap();
    let shard = &manifest.shards[1];
    let path = dir.path().join(&shard.file);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let error = load_error(dir.path());
    assert_mentions(
        &error,
        &[&shard.file, "truncated", &format!("{}", shard.bytes - 100)],
    );
}

#[test]
fn sha256_mismatch_is_reported() {
    let dir = converted_copy();
    let manifest = Manifest::read(dir.path()).unwrap();
    let shard = &manifest.shards[0];
    let path = dir.path().join(&shard.file);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(
        &load_error(dir.path()),
        &[&shard.file, "SHA-256", &shard.sha256],
    );
}

/// The copied small files are hashed too: a config.json edited after the conversion is refused
/// by name; a manifest written before the hashes existed loads as before, unchecked.
#[test]
fn a_small_file_changed_after_conversion_is_reported() {
    let dir = converted_copy();
    let manifest = Manifest::read(dir.path()).unwrap();
    assert!(manifest.files.contains(&"config.json".to_string()));
    assert_eq!(manifest.file_sha256.len(), manifest.files.len());
    for name in &manifest.files {
        let bytes = std::fs::read(dir.path().join(name)).unwrap();
        assert_eq!(
            manifest.file_sha256[name],
            format!("{:x}", Sha256::digest(&bytes)),
            "{name}"
        );
    }
    let path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&path).unwrap();
    let tampered = config.replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 1e-06");
    assert_ne!(tampered, config, "the edit must change the file");
    std::fs::write(&path, tampered).unwrap();
    let error = load_error(dir.path());
    assert!(
        error.starts_with(&format!("{}: SHA-256 ", path.display())),
        "{error}"
    );
    assert_mentions(
        &error,
        &[
            &manifest.file_sha256["config.json"],
            "changed after the conversion",
        ],
    );

    // An older manifest, without `file_sha256`: the edited file is read as it is.
    edit_manifest(dir.path(), |m| {
        m.as_object_mut().unwrap().remove("file_sha256");
    });
    load(dir.path(), WeightPrecision::Native).unwrap();
}

#[test]
fn unknown_manifest_version_is_reported() {
    let dir = converted_copy();
    // Version 1 (Q4_0 in groups of 32) and a future version alike.
    for version in [1, 3] {
        edit_manifest(dir.path(), |m| m["version"] = json!(version));
        assert_mentions(
            &load_error(dir.path()),
            &[
                MANIFEST_FILE,
                &format!("version {version}"),
                "not supported",
                "convert the model again",
            ],
        );
    }
}

#[test]
fn tensor_missing_from_every_shard_is_reported() {
    let dir = converted_copy();
    edit_manifest(dir.path(), |m| {
        for shard in m["shards"].as_array_mut().unwrap() {
            shard["tensors"]
                .as_array_mut()
                .unwrap()
                .retain(|t| t != "model.norm.weight");
        }
    });
    assert_mentions(
        &load_error(dir.path()),
        &["model.norm.weight", "missing from every shard"],
    );
}

#[test]
fn shard_listed_twice_is_reported() {
    let dir = converted_copy();
    edit_manifest(dir.path(), |m| {
        let shards = m["shards"].as_array_mut().unwrap();
        let first = shards[0].clone();
        shards.push(first);
    });
    let file = Manifest::read(dir.path())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert_mentions(&file, &["listed twice"]);
    assert_mentions(
        &load_error(dir.path()),
        &["model-00001-of-", "listed twice"],
    );
}

#[test]
fn tensor_of_the_wrong_storage_is_reported() {
    let dir = converted_copy();
    // The manifest claims f16 for a matrix the shard stores as Q8 (.qweight + .scales).
    let name = "model.layers.0.mlp.up_proj.weight";
    edit_manifest(dir.path(), |m| m["quant"]["tensors"][name] = json!("f16"));
    assert_mentions(&load_error(dir.path()), &[name, "has no tensor"]);
}

#[test]
fn converted_model_refuses_another_precision() {
    let dir = converted_copy();
    let error = match load(dir.path(), WeightPrecision::Q4) {
        Ok(_) => panic!("loaded a q8 conversion as q4"),
        Err(e) => e.to_string(),
    };
    assert_mentions(&error, &["converted to q8", "q4"]);
}

#[test]
fn storage_kinds_follow_the_load_rule() {
    // Under q4: LLM matrices q4, but its attention value/output matrices and token embeddings
    // q6; lm_head, vision and projector matrices q8; vectors and the vision embeddings f32.
    let out = tempfile::tempdir().unwrap();
    let manifest = convert::convert(
        &fixture("vicuna-tiny"),
        out.path(),
        WeightPrecision::Q4,
        KeepOptions::default(),
        DEFAULT_SHARD_BYTES,
    )
    .unwrap()
    .manifest;
    let kinds = &manifest.quant.tensors;
    assert_eq!(kinds["model.layers.0.mlp.up_proj.weight"], DType::Q4);
    assert_eq!(kinds["model.layers.1.self_attn.q_proj.weight"], DType::Q4);
    assert_eq!(kinds["model.layers.1.self_attn.v_proj.weight"], DType::Q6);
    assert_eq!(kinds["model.layers.0.self_attn.o_proj.weight"], DType::Q6);
    assert_eq!(kinds["lm_head.weight"], DType::Q8);
    assert_eq!(kinds["model.embed_tokens.weight"], DType::Q6);
    assert_eq!(
        kinds["vision_model.encoder.layers.0.mlp.fc1.weight"],
        DType::Q8
    );
    assert_eq!(kinds["multi_modal_projector.linear_1.weight"], DType::Q8);
    assert_eq!(kinds["model.norm.weight"], DType::F32);
    assert_eq!(
        kinds["vision_model.embeddings.patch_embedding.weight"],
        DType::F32
    );
    assert_eq!(manifest.shards.len(), 1);
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(manifest.files.iter().any(|f| f == file), "{file} copied");
        assert_eq!(
            std::fs::read(out.path().join(file)).unwrap(),
            std::fs::read(fixture("vicuna-tiny").join(file)).unwrap()
        );
    }
}

#[test]
fn keep_options_override_vision_and_lm_head_storage() {
    let dir = fixture("vicuna-tiny");
    let tensors = checkpoint_tensors(&dir);
    let kinds = |precision, vision, lm_head| {
        let keep = KeepOptions { vision, lm_head };
        let plan = ConversionPlan::new(&tensors, precision, keep, DEFAULT_SHARD_BYTES);
        let all: Vec<_> = plan.shards.into_iter().flat_map(|s| s.tensors).collect();
        let of = |name: &str| all.iter().find(|t| t.name == name).unwrap().storage;
        [
            of("model.layers.0.mlp.up_proj.weight"),
            of("vision_model.encoder.layers.0.self_attn.q_proj.weight"),
            of("multi_modal_projector.linear_2.weight"),
            of("model.embed_tokens.weight"),
            of("lm_head.weight"),
        ]
    };
    use DType as S;
    use KeepPrecision::{F16, Q8};
    assert_eq!(
        kinds(WeightPrecision::Q4, None, None),
        [S::Q4, S::Q8, S::Q8, S::Q6, S::Q8]
    );
    assert_eq!(
        kinds(WeightPrecision::Q4, Some(F16), None),
        [S::Q4, S::F16, S::F16, S::Q6, S::Q8]
    );
    assert_eq!(
        kinds(WeightPrecision::Q4, None, Some(Q8)),
        [S::Q4, S::Q8, S::Q8, S::Q8, S::Q8]
    );
    assert_eq!(
        kinds(WeightPrecision::Q4, None, Some(F16)),
        [S::Q4, S::Q8, S::Q8, S::F16, S::F16]
    );
    assert_eq!(
        kinds(WeightPrecision::Q8, Some(F16), Some(F16)),
        [S::Q8, S::F16, S::F16, S::F16, S::F16]
    );
    assert_eq!(
        kinds(WeightPrecision::F16, Some(Q8), None),
        [S::F16, S::Q8, S::Q8, S::F16, S::F16]
    );
    assert_eq!(
        kinds(WeightPrecision::F16, None, Some(Q8)),
        [S::F16, S::F16, S::F16, S::Q8, S::Q8]
    );
    // f32 is the unquantized reference: overrides do not apply.
    assert_eq!(kinds(WeightPrecision::F32, Some(Q8), Some(Q8)), [S::F32; 5]);
}
