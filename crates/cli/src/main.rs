//! `llava`: run LLaVA-1.6 on an image natively (wgpu on Vulkan/Metal/DX12).

mod bench;

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use llava_gpu::{Gpu, GpuOptions, KernelTime};
use llava_model::files::convert::{self, ConversionPlan};
use llava_model::files::loader::{Progress, Stage};
use llava_model::files::npy;
use llava_model::files::weights::{KeepOptions, KeepPrecision, WeightPrecision};
use llava_model::generate::{GenerateParams, StopReason, Turn};
use llava_model::llava::{KvPrecision, Llava, LoadOptions, ModelFiles};
use llava_model::{Dtype, LlavaConfig, ModelError};
use web_time::Instant;

mod eval;

/// The tiny random-weight checkpoint bundled with the repository (real geometry, nonsense answers).
const BUNDLED_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/mistral-tiny"
);

#[derive(Parser)]
#[command(
    name = "llava",
    version,
    about = "LLaVA-1.6 (LLaVA-NeXT) on WebGPU, natively"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one question about an image, streaming the answer.
    Run(RunArgs),
    /// Show how an image is tiled (AnyRes) and how many tokens it becomes.
    Preprocess(PreprocessArgs),
    /// Interactive multi-turn chat about an image.
    Chat(ChatArgs),
    /// Convert a checkpoint folder to sharded, GPU-layout weights (docs/converted-format.md).
    Convert(ConvertArgs),
    /// Time a random-weight model of a real geometry (vision, prefill, decode) on this GPU.
    Bench(bench::BenchArgs),
    /// Answer a JSON Lines set of questions, write the answers, print the accuracy (resumable).
    Eval(eval::EvalArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint folder (HuggingFace llava-hf or liuhaotian layout). Default: the bundled tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Precision of the weights on the GPU (default: the checkpoint's, bf16 as f16).
    #[arg(long, value_parser = precision::<WeightPrecision>(names(WeightPrecision::NAMED)))]
    quant: Option<WeightPrecision>,
    /// KV-cache size in tokens (default: 4096, or what this GPU's limits hold).
    #[arg(long)]
    context: Option<usize>,
    /// Runs prompts at most this many tokens at a time, bounding the prefill's GPU memory
    /// (default: as many as one storage binding holds). The answer stays the same.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    prefill_chunk: Option<u32>,
    /// GPU memory for reusing images' features across chats and questions (0: off).
    #[arg(long, default_value_t = llava_model::image_cache::DEFAULT_IMAGE_CACHE_BYTES >> 20)]
    image_cache_mb: u64,
    /// What the KV cache stores: f16 halves its memory and the bytes each token reads from it;
    /// f32 keeps logits within 1e-4 of transformers'. Default: f16 where the GPU has shader-f16.
    #[arg(long, value_parser = precision::<KvPrecision>(names(KvPrecision::NAMED)))]
    kv: Option<KvPrecision>,
    /// Times every GPU kernel with timestamp queries (where the adapter has them) and prints
    /// where the GPU time went, by kernel (in `--json`: "profile"). Slows the run down.
    #[arg(long)]
    profile: bool,
}

/// Parses one of `names` into the model crate's own precision type (the vocabulary the JS package
/// and converted manifests use too); `--help` lists the names.
pub(crate) fn precision<T>(
    names: impl IntoIterator<Item = &'static str>,
) -> impl TypedValueParser<Value = T>
where
    T: FromStr<Err = ModelError> + Clone + Send + Sync + 'static,
{
    PossibleValuesParser::new(names).try_map(|name| name.parse::<T>())
}

pub(crate) fn names<T>(named: &'static [(T, &'static str)]) -> impl Iterator<Item = &'static str> {
    named.iter().map(|&(_, name)| name)
}

#[derive(Args)]
struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; greedy decoding when omitted or 0.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    system: Option<String>,
    /// Use --prompt as the whole prompt (with <image> where the image goes), no chat template.
    #[arg(long)]
    raw_prompt: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Write the logits at the last prompt position as float32 .npy [vocab].
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

#[derive(Args)]
struct PreprocessArgs {
    /// Checkpoint folder whose config gives the grid pinpoints. Default: the bundled tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    json: bool,
    /// Write the normalised tiles as float32 .npy [tiles, 3, H, W].
    #[arg(long)]
    pixels_out: Option<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct ConvertArgs {
    /// HuggingFace checkpoint folder (with --dry-run: a folder with config.json, or that file).
    #[arg(long)]
    input: PathBuf,
    /// Output folder (created if needed); not needed with --dry-run.
    #[arg(long, required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    #[arg(long, value_parser = precision::<WeightPrecision>(["f16", "q8", "q4"]))]
    quant: WeightPrecision,
    /// Shard size in MiB (a tensor larger than this gets a shard of its own).
    #[arg(long, default_value_t = 64)]
    shard_mb: u64,
    /// Print the size summary for the config alone, reading no weights and writing nothing.
    #[arg(long)]
    dry_run: bool,
    /// Precision of the vision tower and projector (default: q8 under q8 and q4, else f16).
    #[arg(long, value_parser = precision::<KeepPrecision>(names(KeepPrecision::NAMED)))]
    keep_vision: Option<KeepPrecision>,
    /// Precision of the token embeddings and lm_head (default: q8 under q8 and q4, else f16).
    #[arg(long, value_parser = precision::<KeepPrecision>(names(KeepPrecision::NAMED)))]
    keep_lm_head: Option<KeepPrecision>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Preprocess(args) => preprocess(args),
        Command::Chat(args) => chat(args),
        Command::Convert(args) => convert(args),
        Command::Bench(args) => bench::bench(args),
        Command::Eval(args) => eval::eval(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult<T> = Result<T, Box<dyn std::error::Error>>;

fn model_dir(model: &Option<PathBuf>) -> PathBuf {
    model
        .clone()
        .unwrap_or_else(|| PathBuf::from(BUNDLED_MODEL))
}

fn load(args: &ModelArgs) -> CliResult<(Llava, f64)> {
    let start = Instant::now();
    let gpu = Arc::new(Gpu::with_options_blocking(GpuOptions {
        profile: args.profile,
        ..GpuOptions::from_env()
    })?);
    let precision = args.quant.unwrap_or_default();
    let dir = model_dir(&args.model);
    let kv_cache = args.kv.unwrap_or_else(|| KvPrecision::preferred(&gpu));
    let options = LoadOptions {
        precision,
        context: args.context,
    };
    // A progress line on a terminal only: redirected stderr (logs, tests) stays clean.
    let terminal = std::io::stderr().is_terminal();
    let mut show = |p: Progress<'_>| {
        if !terminal {
            return;
        }
        match p.stage {
            Stage::Config => {}
            Stage::Weights => eprint!(
                "\rloading weights: {:.1} / {:.1} MiB ({})\x1b[K",
                p.bytes_done as f64 / 1048576.0,
                p.bytes_total as f64 / 1048576.0,
                p.file
            ),
            Stage::Ready => eprint!("\r\x1b[K"),
        }
    };
    let loaded = Llava::load_dir_with_progress(gpu, &dir, &options, &mut show);
    if terminal && loaded.is_err() {
        eprintln!();
    }
    let mut model = loaded.map_err(|e| format!("loading {}: {e}", dir.display()))?;
    model.set_image_cache_limit(args.image_cache_mb.saturating_mul(1 << 20));
    model.set_kv_cache(kv_cache);
    model.set_prefill_chunk(args.prefill_chunk.map(|n| n as usize));
    Ok((model, start.elapsed().as_secs_f64()))
}

/// Reads and decodes an image file. Only regular files are read (a directory, FIFO or device such
/// as /dev/zero is refused before any read), and never more than the decoder accepts.
fn read_image(path: &Path) -> CliResult<llava_image::Rgb8> {
    let fail = |msg: String| format!("--image {}: {msg}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.is_dir() {
        return Err(fail("is a directory, not an image file".into()).into());
    }
    if !meta.is_file() {
        return Err(fail(
            "is not a regular file (a device, FIFO or socket); give an image file".into(),
        )
        .into());
    }
    let max = llava_image::MAX_ENCODED_BYTES;
    if meta.len() > max {
        return Err(fail(format!(
            "is {} bytes; image files over {max} bytes (256 MiB) are refused",
            meta.len()
        ))
        .into());
    }
    let mut bytes = Vec::new();
    // A file that grows while it is read still stops one byte past the limit.
    std::fs::File::open(path)
        .and_then(|file| file.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| fail(e.to_string()))?;
    Ok(llava_image::decode(&bytes).map_err(|e| fail(e.to_string()))?)
}

impl SamplingArgs {
    fn params(&self) -> GenerateParams {
        GenerateParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}

fn run(args: RunArgs) -> CliResult<()> {
    let params = args.sampling.params();
    params.validate()?;
    let image = args.image.as_deref().map(read_image).transpose()?;
    let (model, load_s) = load(&args.model)?;
    let mut session = model.chat(args.system.clone())?;
    let turn = Turn {
        image: image.as_ref(),
        text: &args.prompt,
        raw_prompt: args.raw_prompt,
        want_logits: args.logits_out.is_some(),
    };
    let stream = !args.json;
    let reply = pollster::block_on(session.send(&model, turn, &params, |event| {
        if stream {
            print!("{}", event.text);
            let _ = std::io::stdout().flush();
        }
        true
    }))?;
    if let (Some(path), Some(logits)) = (&args.logits_out, &reply.first_logits) {
        npy::write_f32(path, &[logits.len()], logits)?;
    }
    if args.json {
        let mut timings = serde_json::to_value(&reply.timings)?;
        timings["load_s"] = load_s.into();
        let mut out = serde_json::json!({
            "text": reply.text,
            "tokens": reply.tokens,
            "prompt_tokens": reply.prompt_tokens,
            "image_tokens": reply.image_tokens,
            "stop_reason": reply.stop_reason,
            "timings": timings,
            "gpu": reply.gpu,
        });
        if let Some(profile) = model.gpu().take_profile() {
            out["profile"] = serde_json::to_value(profile)?;
        }
        println!("{out}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens ({} image) | load {:.2}s, vision {:.2}s, prefill {:.2}s, decode {:.1} tokens/s]",
            reply.prompt_tokens,
            reply.image_tokens,
            load_s,
            reply.timings.vision_s,
            reply.timings.prefill_s,
            reply.timings.decode_tokens_per_s
        );
        if args.model.profile {
            print_kernel_times("vision, prefill and decode", model.gpu().take_profile());
        }
    }
    Ok(())
}

/// Prints to stderr the GPU time by kernel of `what` ([`Gpu::take_profile`]).
pub(crate) fn print_kernel_times(what: &str, times: Option<Vec<KernelTime>>) {
    let Some(times) = times else {
        eprintln!("profile: this adapter has no timestamp queries");
        return;
    };
    let total: f64 = times.iter().map(|t| t.seconds).sum();
    eprintln!("GPU time by kernel ({what}): {:.1} ms", total * 1e3);
    let width = times.iter().map(|t| t.kernel.len()).max().unwrap_or(0);
    for t in &times {
        eprintln!(
            "  {:<width$}  {:>6} calls  {:>10.3} ms  {:>5.1}%",
            t.kernel,
            t.calls,
            t.seconds * 1e3,
            100.0 * t.seconds / total.max(f64::MIN_POSITIVE)
        );
    }
}

fn preprocess(args: PreprocessArgs) -> CliResult<()> {
    let dir = model_dir(&args.model);
    let cfg = ModelFiles::from_dir(&dir)?.image_config;
    let image = read_image(&args.image)?;
    let pre = llava_image::preprocess(&image, &cfg)?;
    let tokens = llava_image::image_token_count(pre.original_hw, &cfg);
    if let Some(path) = &args.pixels_out {
        let s = cfg.tile_size as usize;
        npy::write_f32(path, &[pre.num_patches, 3, s, s], &pre.pixels)?;
    }
    if args.json {
        let out = serde_json::json!({
            "original_size": pre.original_hw,
            "best_resolution": pre.best_resolution,
            "grid": pre.grid,
            "tiles": pre.num_patches,
            "image_tokens": tokens,
        });
        println!("{out}");
    } else {
        println!(
            "image {}x{} (w x h) -> best resolution {}x{} (h x w), grid {}x{} tiles + overview = {} tiles, {} image tokens",
            pre.original_hw[1],
            pre.original_hw[0],
            pre.best_resolution[0],
            pre.best_resolution[1],
            pre.grid[0],
            pre.grid[1],
            pre.num_patches,
            tokens
        );
    }
    Ok(())
}

fn chat(args: ChatArgs) -> CliResult<()> {
    let params = args.sampling.params();
    params.validate()?;
    let image = args.image.as_deref().map(read_image).transpose()?;
    let (model, load_s) = load(&args.model)?;
    eprintln!(
        "loaded in {load_s:.1}s. Type a question; /reset starts over; an empty line or Ctrl-D quits."
    );
    let mut session = model.chat(args.system.clone())?;
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        let question = line.trim();
        if question == "/reset" {
            session.reset();
            continue;
        }
        // The image goes with the first question that succeeds; follow-ups reuse its cached tokens.
        let turn_image = image.as_ref().filter(|_| !session.has_image());
        let turn = Turn {
            image: turn_image,
            text: question,
            raw_prompt: false,
            want_logits: false,
        };
        let reply = pollster::block_on(session.send(&model, turn, &params, |event| {
            print!("{}", event.text);
            let _ = std::io::stdout().flush();
            true
        }));
        // A failed turn leaves the conversation as it was: say why and take the next question.
        match reply {
            Ok(reply) => {
                println!(
                    "\n[{:.1} tokens/s{}]",
                    reply.timings.decode_tokens_per_s,
                    stop_note(&reply)
                );
                if args.model.profile {
                    print_kernel_times("this answer", model.gpu().take_profile());
                }
            }
            Err(e @ ModelError::ContextOverflow { .. }) => println!("\nerror: {e} (use /reset)"),
            Err(e) => println!("\nerror: {e}"),
        }
    }
}

/// Why a chat reply ended early, when the user may want to act on it.
fn stop_note(reply: &llava_model::generate::Reply) -> &'static str {
    match reply.stop_reason {
        StopReason::ContextFull => ", the context is full: use /reset",
        _ => "",
    }
}

fn convert(args: ConvertArgs) -> CliResult<()> {
    let precision = args.quant;
    // At most 2^44 MiB, so that the size in bytes fits in 64 bits.
    let shard_bytes = match args.shard_mb.checked_mul(1 << 20) {
        Some(bytes) if bytes > 0 => bytes,
        _ => {
            return Err(
                format!("--shard-mb must be between 1 and {} (MiB)", u64::MAX >> 20).into(),
            );
        }
    };
    let keep = KeepOptions {
        vision: args.keep_vision,
        lm_head: args.keep_lm_head,
    };
    if args.dry_run {
        let config_path = if args.input.is_dir() {
            args.input.join("config.json")
        } else {
            args.input.clone()
        };
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| format!("reading {}: {e}", config_path.display()))?;
        let config = LlavaConfig::from_json(&text)?;
        // Hub checkpoints store f16 or bf16; the stored dtype only matters for f32 weights.
        let plan = ConversionPlan::for_config(&config, Dtype::F16, precision, keep, shard_bytes);
        println!(
            "{} (dry run, {:?}):\n{}",
            config_path.display(),
            precision,
            plan.summary()
        );
        return Ok(());
    }
    let output = args
        .output
        .expect("clap requires --output without --dry-run");
    let start = Instant::now();
    let converted = convert::convert(&args.input, &output, precision, keep, shard_bytes)?;
    println!(
        "converted {} -> {} ({:?}) in {:.1}s:\n{}",
        args.input.display(),
        output.display(),
        precision,
        start.elapsed().as_secs_f64(),
        converted.summary
    );
    Ok(())
}
