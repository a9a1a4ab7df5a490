//! Host peak memory while loading a converted model of many shards stays under two shards plus
//! 64 MiB (the gate), measured with a counting global allocator; the progress reports of
//! the same load are checked on the way.
//!
//! Only memory allocated through Rust's allocator is counted. GPU buffers and wgpu's upload
//! staging memory on llvmpipe are host memory too, but the Vulkan driver allocates them outside
//! Rust's allocator, so they are not part of these figures.
//!
//! This file holds a single test: the allocator counts every thread of the process, and another
//! test running beside it would inflate the peak.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use llava_gpu::Gpu;
use llava_model::files::checkpoint::{Spelling, file_names};
use llava_model::files::convert;
use llava_model::files::loader::{Progress, Stage};
use llava_model::files::weights::{KeepOptions, WeightPrecision};
use llava_model::llava::{Llava, LoadOptions};
use serde_json::{Value, json};

/// Bytes currently allocated and the highest value since the last reset.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn added(size: usize) {
        let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn removed(size: usize) {
        CURRENT.fetch_sub(size, Ordering::Relaxed);
    }

    fn reset_peak() -> usize {
        let now = CURRENT.load(Ordering::Relaxed);
        PEAK.store(now, Ordering::Relaxed);
        now
    }
}

// `unsafe` because GlobalAlloc is an unsafe trait with unsafe methods: there is no safe way to
// observe every allocation. Each method forwards to the system allocator with the caller's own
// arguments (upholding the same contract) and only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Counting::added(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from `System` through `alloc`/`realloc`.
        unsafe { System.dealloc(ptr, layout) };
        Counting::removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            Counting::added(new_size);
            Counting::removed(layout.size());
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: u64 = 1 << 20;
const SHARD_BYTES: u64 = 4 * MIB;

fn fixture(model: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(model)
}

/// A safetensors file of f16 tensors with deterministic values (|x| < 0.05).
fn write_f16_safetensors(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    use std::io::Write;
    out.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&json).unwrap();
    let mut state = 0x2545_f491u32;
    for (_, shape) in tensors {
        for _ in 0..shape.iter().product::<usize>() {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let x = ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1;
            out.write_all(&half::f16::from_f32(x).to_le_bytes())
                .unwrap();
        }
    }
    out.flush().unwrap();
}

/// vicuna-tiny's files with a wider and deeper language model (~56 MiB of f16 weights).
fn synthetic_checkpoint(dir: &Path) {
    let source = fixture("vicuna-tiny");
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["text_config"]["intermediate_size"] = json!(4096);
    config["text_config"]["num_hidden_layers"] = json!(28);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let parsed = llava_model::LlavaConfig::from_dir(dir).unwrap();
    // Hub spellings of the canonical names.
    let tensors: Vec<(String, Vec<usize>)> = convert::model_tensors(&parsed)
        .into_iter()
        .map(|(name, shape)| {
            let (_, hub) = file_names(&name)
                .into_iter()
                .find(|(s, _)| *s == Spelling::Hub)
                .unwrap();
            (hub, shape)
        })
        .collect();
    write_f16_safetensors(&dir.join("model.safetensors"), &tensors);
}

#[test]
fn loading_a_converted_model_keeps_host_memory_under_two_shards_plus_64_mib() {
    let work = tempfile::tempdir().unwrap();
    let (hf, converted) = (work.path().join("hf"), work.path().join("converted"));
    std::fs::create_dir_all(&hf).unwrap();
    synthetic_checkpoint(&hf);
    let manifest = convert::convert(
        &hf,
        &converted,
        WeightPrecision::F16,
        KeepOptions::default(),
        SHARD_BYTES,
    )
    .unwrap()
    .manifest;
    let largest = manifest.shards.iter().map(|s| s.bytes).max().unwrap();
    assert!(
        manifest.shards.len() >= 12,
        "{} shards",
        manifest.shards.len()
    );
    assert!(largest < SHARD_BYTES + MIB, "largest shard {largest} bytes");
    let total = manifest.total_bytes();

    let gpu = Arc::new(Gpu::new_blocking().expect("a wgpu adapter"));
    let mut reports: Vec<(u64, u64, Stage, String)> = Vec::new();
    let baseline = Counting::reset_peak();
    let llava = Llava::load_dir_with_progress(
        gpu,
        &converted,
        &LoadOptions {
            precision: WeightPrecision::Native,
            context: Some(64),
        },
        &mut |p: Progress<'_>| {
            reports.push((p.bytes_done, p.bytes_total, p.stage, p.file.to_string()))
        },
    )
    .unwrap();
    let peak = (PEAK.load(Ordering::Relaxed) - baseline) as u64;
    let budget = 2 * largest + 64 * MIB;
    eprintln!(
        "{} shards, {total} bytes in all, largest {largest}: host peak during load {peak} bytes \
         ({:.1} MiB) above a baseline of {baseline}; budget {budget} ({:.1} MiB)",
        manifest.shards.len(),
        peak as f64 / MIB as f64,
        budget as f64 / MIB as f64,
    );
    assert!(peak < budget, "peak {peak} bytes >= budget {budget}");
    assert!(
        peak < total,
        "the peak {peak} must be well below the model's {total} bytes"
    );
    assert_eq!(llava.config().text.num_hidden_layers, 28);

    // Progress: config first, then weight bytes rising to the manifest's total, then ready.
    assert_eq!(reports.first().unwrap().2, Stage::Config);
    assert_eq!(
        reports.last().unwrap(),
        &(total, total, Stage::Ready, String::new())
    );
    let weights: Vec<_> = reports.iter().filter(|r| r.2 == Stage::Weights).collect();
    assert!(
        weights.len() >= manifest.shards.len(),
        "{} weight reports",
        weights.len()
    );
    assert!(
        weights.windows(2).all(|w| w[0].0 <= w[1].0),
        "bytes done never decrease"
    );
    assert!(weights.iter().all(|r| r.1 == total));
    assert_eq!(weights.last().unwrap().0, total);
    for shard in &manifest.shards {
        assert!(
            weights.iter().any(|r| r.3 == shard.file),
            "{} reported",
            shard.file
        );
    }
}
