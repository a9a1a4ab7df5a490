//! `llava bench`: a random-weight model of a real geometry, made straight into GPU memory (no
//! checkpoint), timed phase by phase with the GPU's work waited for: the vision tower on five
//! tiles, the prefill of an image prompt, and decode steps at that context (planned greedy, planned
//! with temperature, top-k, top-p and a repetition penalty, and op by op as before the planned
//! step, for a same-run ratio), beside bandwidth probes: the read probe (a kernel that only
//! streams memory) is decode's roofline.

use std::sync::Arc;

use clap::{Args, ValueEnum};
use llava_gpu::ops::decode::Sampling;
use llava_gpu::ops::reduce::argmax;
use llava_gpu::{Counters, Gpu, GpuOptions, Tensor, probe, random};
use llava_model::files::config::{Activation, TextArch, TextConfig, VisionConfig};
use llava_model::files::weights::{WeightPrecision, Weights};
use llava_model::llava::KvPrecision;
use llava_model::net::language::{KvCache, LanguageModel};
use llava_model::net::projector::Projector;
use llava_model::net::vision::VisionTower;
use web_time::Instant;

use crate::{CliResult, names, precision, print_kernel_times};

#[derive(Args)]
pub struct BenchArgs {
    /// The geometry (LLaVA-1.6's checkpoints; `tiny` is the bundled test model's size).
    #[arg(long, value_enum, default_value_t = Shape::Mistral7b)]
    shape: Shape,
    /// Decoder layers to build (default: the shape's); fewer scale a run down for a CPU adapter.
    #[arg(long)]
    layers: Option<usize>,
    /// Vision-tower layers to build (default: the shape's).
    #[arg(long)]
    vision_layers: Option<usize>,
    #[arg(long, default_value = "q4", value_parser = precision::<WeightPrecision>(["q4", "q8", "f16"]))]
    quant: WeightPrecision,
    /// What the KV cache stores.
    #[arg(long, default_value = "f32", value_parser = precision::<KvPrecision>(names(KvPrecision::NAMED)))]
    kv: KvPrecision,
    /// Prompt length of the prefill (an 800x600 image and a question: 2355).
    #[arg(long, default_value_t = 2355)]
    prompt_tokens: usize,
    /// Decode steps per decode row.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Decode steps of the op-by-op row (the path before the planned step).
    #[arg(long, default_value_t = 16)]
    op_tokens: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also print the GPU time by kernel of the (warm) vision tower, prefill and greedy decode,
    /// from timestamp queries where the adapter has them. Slows every figure down.
    #[arg(long)]
    profile: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    #[value(name = "mistral-7b")]
    Mistral7b,
    #[value(name = "vicuna-7b")]
    Vicuna7b,
    #[value(name = "vicuna-13b")]
    Vicuna13b,
    Tiny,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Mistral7b => "mistral-7b",
            Shape::Vicuna7b => "vicuna-7b",
            Shape::Vicuna13b => "vicuna-13b",
            Shape::Tiny => "tiny",
        }
    }
}

fn text_config(shape: Shape) -> TextConfig {
    let (hidden, inter, layers, heads, kv_heads, theta) = match shape {
        Shape::Mistral7b => (4096, 14336, 32, 32, 8, 1e6),
        Shape::Vicuna7b => (4096, 11008, 32, 32, 32, 1e4),
        Shape::Vicuna13b => (5120, 13824, 40, 40, 40, 1e4),
        Shape::Tiny => (64, 128, 2, 4, 2, 1e6),
    };
    TextConfig {
        arch: if matches!(shape, Shape::Mistral7b | Shape::Tiny) {
            TextArch::Mistral
        } else {
            TextArch::Llama
        },
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden / heads,
        hidden_act: Activation::Silu,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        vocab_size: 32064,
        max_position_embeddings: 32768,
        sliding_window: None,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: None,
    }
}

fn vision_config(shape: Shape) -> VisionConfig {
    match shape {
        Shape::Tiny => VisionConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            ..VisionConfig::CLIP_VIT_L_14_336
        },
        _ => VisionConfig::CLIP_VIT_L_14_336,
    }
}

/// Seconds of `run`, with the GPU work it submitted waited for.
fn timed<T>(gpu: &Gpu, run: impl FnOnce() -> CliResult<T>) -> CliResult<(T, f64)> {
    gpu.wait()?;
    let start = Instant::now();
    let out = run()?;
    gpu.wait()?;
    Ok((out, start.elapsed().as_secs_f64()))
}

struct Decode {
    tokens_per_s: f64,
    counters: Counters,
    tokens: usize,
}

pub fn bench(args: BenchArgs) -> CliResult<()> {
    let gpu = Arc::new(Gpu::with_options_blocking(GpuOptions {
        profile: args.profile,
        ..GpuOptions::from_env()
    })?);
    let mut text = text_config(args.shape);
    text.num_hidden_layers = args.layers.unwrap_or(text.num_hidden_layers);
    let mut vision_cfg = vision_config(args.shape);
    vision_cfg.num_hidden_layers = args.vision_layers.unwrap_or(vision_cfg.num_hidden_layers);
    let precision = args.quant;
    let context = (args.prompt_tokens + 2 * args.tokens + args.op_tokens + 1).next_multiple_of(64);

    let (model, build_s) = timed(&gpu, || {
        let mut w = Weights::random(gpu.clone(), precision, 7);
        let vision = VisionTower::load(&mut w, &gpu, &vision_cfg, -2)?;
        let projector = Projector::load(&mut w, vision_cfg.hidden_size, text.hidden_size)?;
        let language = LanguageModel::load(&mut w, &gpu, &text, false)?;
        Ok((vision, projector, language))
    })?;
    let (vision, projector, language) = model;

    // The vision tower and projector on five 336-pixel tiles (a 2x2 grid and the overview).
    let side = vision_cfg.image_size;
    let pixels = Tensor::from_f32(&gpu, &[5, 3, side, side], &random(5 * 3 * side * side, 1))?;
    // Each stage runs twice: the first run also compiles its pipelines, the second is the figure
    // (a chat's later images and turns run warm).
    let encode = || -> CliResult<()> {
        let mut batch = gpu.batch();
        let hidden = vision.forward(&mut batch, &pixels)?;
        let flat = hidden.reshape(&[hidden.shape()[0] * hidden.shape()[1], hidden.last_dim()])?;
        projector.forward(&mut batch, &flat)?;
        Ok(batch.submit()?)
    };
    let (_, vision_first_s) = timed(&gpu, encode)?;
    gpu.take_profile();
    let (_, vision_s) = timed(&gpu, encode)?;
    let vision_profile = gpu.take_profile();

    // Prefill of the prompt, to the first token.
    let x = Tensor::from_f32(
        &gpu,
        &[args.prompt_tokens, text.hidden_size],
        &random(args.prompt_tokens * text.hidden_size, 2),
    )?;
    let kv_dtype = args.kv.dtype();
    let mut cache = language.new_cache(&gpu, context, kv_dtype)?;
    let mut prefill = || {
        cache.truncate(0);
        timed(&gpu, || {
            let mut batch = gpu.batch();
            let last = language.forward_last(&mut batch, &x, &mut cache)?;
            let hidden = language.final_norm(&mut batch, &last)?;
            let logits = language.logits(&mut batch, &hidden)?;
            let best = argmax(&mut batch, &logits)?;
            batch.submit()?;
            Ok(pollster::block_on(best.to_u32(&gpu))?)
        })
    };
    let (_, prefill_first_s) = prefill()?;
    gpu.take_profile();
    let (_, prefill_s) = prefill()?;
    let prefill_profile = gpu.take_profile();

    let plan = language
        .plan_decode(&gpu, &cache)?
        .ok_or("this geometry has no planned decode step")?;
    let decode = |cache: &mut KvCache, sampling: Sampling| -> CliResult<Decode> {
        plan.set_sampling(&gpu, sampling, &[]);
        let mut batch = gpu.batch();
        let last = Tensor::empty(&gpu, &[1, text.hidden_size], llava_gpu::DType::F32)?;
        plan.record_head(&mut batch, &last)?;
        pollster::block_on(plan.submit_sampled(batch, false))?;
        let before = gpu.counters();
        // Pipelined as a chat runs it: step i + 1 is submitted before step i's token is read.
        let ((), secs) = timed(&gpu, || {
            let mut batch = gpu.batch();
            plan.record_step(&mut batch, cache, 0)?;
            plan.submit(batch, 0)?;
            for i in 0..args.tokens {
                if i + 1 < args.tokens {
                    let mut batch = gpu.batch();
                    plan.record_step(&mut batch, cache, i + 1)?;
                    plan.submit(batch, i + 1)?;
                }
                pollster::block_on(plan.read(&gpu, i))?;
            }
            Ok(())
        })?;
        Ok(Decode {
            tokens_per_s: args.tokens as f64 / secs,
            counters: gpu.counters() - before,
            tokens: args.tokens,
        })
    };
    gpu.take_profile();
    let greedy = decode(&mut cache, Sampling::GREEDY)?;
    let decode_profile = gpu.take_profile();
    let top_p = Sampling {
        temperature: 1.0,
        top_k: 40,
        top_p: 0.9,
        repetition_penalty: 1.1,
        seed: 1,
    };
    let sampled = decode(&mut cache, top_p)?;

    // The op-by-op step (what every token ran before the planned step), greedy.
    let before = gpu.counters();
    let mut next = 0;
    let ((), op_secs) = timed(&gpu, || {
        for _ in 0..args.op_tokens {
            let mut batch = gpu.batch();
            let x = language.embed(&mut batch, &[next])?;
            let hidden = language.forward(&mut batch, &x, &mut cache)?;
            let logits = language.logits(&mut batch, &hidden)?;
            let best = argmax(&mut batch, &logits)?;
            batch.submit()?;
            next = pollster::block_on(best.to_u32(&gpu))?[0];
        }
        Ok(())
    })?;
    let op_by_op = Decode {
        tokens_per_s: args.op_tokens as f64 / op_secs,
        counters: gpu.counters() - before,
        tokens: args.op_tokens,
    };

    // Probes last, on a GPU the stages above have brought to its working clocks.
    let probe_bytes = if gpu.loop_budget().is_some() {
        64 << 20
    } else {
        1 << 30
    };
    let copy_gb_s = probe::copy_bandwidth(&gpu, probe_bytes)? / 1e9;
    let read_gb_s = probe::read_bandwidth(&gpu, probe_bytes)? / 1e9;

    let weight_bytes = language.decode_weight_bytes();
    let kv_bytes = kv_dtype.data_bytes(
        2 * text.num_hidden_layers * args.prompt_tokens * text.num_key_value_heads * text.head_dim,
    );
    let bytes_per_token = (weight_bytes + kv_bytes) as f64;
    // The decode step reads (its writes are a few KB): the read probe is its roofline.
    let roofline_tokens_per_s = read_gb_s * 1e9 / bytes_per_token;
    let info = gpu.info();
    let mut report = serde_json::json!({
        "adapter": format!("{} ({:?}, {})", info.name, info.backend, info.driver),
        "shape": args.shape.name(),
        "layers": text.num_hidden_layers,
        "vision_layers": vision_cfg.num_hidden_layers,
        "quant": format!("{:?}", precision),
        "kv": format!("{kv_dtype:?}"),
        "build_s": build_s,
        "copy_gb_s": copy_gb_s,
        "read_gb_s": read_gb_s,
        "vision_5_tiles_s": vision_s,
        "vision_first_run_s": vision_first_s,
        "prompt_tokens": args.prompt_tokens,
        "prefill_s": prefill_s,
        "prefill_first_run_s": prefill_first_s,
        "prefill_tokens_per_s": args.prompt_tokens as f64 / prefill_s,
        "time_to_first_token_s": vision_s + prefill_s,
        "weight_bytes_per_token": weight_bytes,
        "kv_bytes_per_token": kv_bytes,
        "roofline_tokens_per_s": roofline_tokens_per_s,
        "decode_greedy": decode_json(&greedy, text.num_hidden_layers, roofline_tokens_per_s),
        "decode_sampled": decode_json(&sampled, text.num_hidden_layers, roofline_tokens_per_s),
        "decode_op_by_op": decode_json(&op_by_op, text.num_hidden_layers, roofline_tokens_per_s),
    });
    if args.profile {
        report["profile"] = serde_json::json!({
            "vision": vision_profile,
            "prefill": prefill_profile,
            "decode_greedy": decode_profile,
        });
    }
    if args.json {
        println!("{report}");
        return Ok(());
    }
    print_table(&report);
    if args.profile {
        print_kernel_times("vision tower, 5 tiles", vision_profile);
        print_kernel_times("prefill", prefill_profile);
        print_kernel_times("decode, planned greedy", decode_profile);
    }
    Ok(())
}

fn decode_json(d: &Decode, layers: usize, roofline: f64) -> serde_json::Value {
    let per = |v: u64| v as f64 / d.tokens as f64;
    let c = d.counters;
    serde_json::json!({
        "tokens_per_s": d.tokens_per_s,
        "ms_per_layer": 1e3 / d.tokens_per_s / layers as f64,
        "roofline_percent": 100.0 * d.tokens_per_s / roofline,
        "per_token": {
            "dispatches": per(c.dispatches),
            "passes": per(c.passes),
            "submits": per(c.submits),
            "buffers_created": per(c.buffers_created),
            "bind_groups_created": per(c.bind_groups_created),
            "bytes_written": per(c.bytes_written),
            "bytes_read": per(c.bytes_read),
        },
    })
}

fn print_table(r: &serde_json::Value) {
    let name = r["shape"].as_str().unwrap_or("");
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!("adapter: {}", r["adapter"].as_str().unwrap_or(""));
    println!(
        "model: {name}, {} layers ({} vision layers), {}, KV {}; weights read per token {:.1} MB, KV {:.1} MB at {} tokens",
        r["layers"],
        r["vision_layers"],
        r["quant"].as_str().unwrap_or(""),
        r["kv"].as_str().unwrap_or(""),
        f("weight_bytes_per_token") / 1e6,
        f("kv_bytes_per_token") / 1e6,
        r["prompt_tokens"]
    );
    println!(
        "probes: read {:.1} GB/s (a kernel streaming 16-byte loads), copy {:.1} GB/s (read + written); decode roofline {:.1} tokens/s (bytes per token / read probe)",
        f("read_gb_s"),
        f("copy_gb_s"),
        f("roofline_tokens_per_s")
    );
    println!(
        "vision tower, 5 tiles: {:.3} s (first run, compiling its pipelines: {:.3} s)",
        f("vision_5_tiles_s"),
        f("vision_first_run_s")
    );
    println!(
        "prefill {} tokens: {:.3} s ({:.1} tokens/s; first run {:.3} s); time to first token {:.3} s",
        r["prompt_tokens"],
        f("prefill_s"),
        f("prefill_tokens_per_s"),
        f("prefill_first_run_s"),
        f("time_to_first_token_s")
    );
    println!();
    println!(
        "{:<22} {:>9} {:>8} {:>9} {:>10} {:>7} {:>7} {:>8} {:>11} {:>10} {:>10}",
        "decode",
        "tokens/s",
        "ms/layer",
        "roofline%",
        "dispatches",
        "passes",
        "submits",
        "buffers",
        "bind groups",
        "B written",
        "B read"
    );
    for (label, key) in [
        ("planned, greedy", "decode_greedy"),
        ("planned, sampled", "decode_sampled"),
        ("op by op (before)", "decode_op_by_op"),
    ] {
        let d = &r[key];
        let p = &d["per_token"];
        let g = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        println!(
            "{label:<22} {:>9.2} {:>8.3} {:>9.1} {:>10.1} {:>7.1} {:>7.1} {:>8.1} {:>11.1} {:>10.0} {:>10.0}",
            g(&d["tokens_per_s"]),
            g(&d["ms_per_layer"]),
            g(&d["roofline_percent"]),
            g(&p["dispatches"]),
            g(&p["passes"]),
            g(&p["submits"]),
            g(&p["buffers_created"]),
            g(&p["bind_groups_created"]),
            g(&p["bytes_written"]),
            g(&p["bytes_read"])
        );
    }
}
