//! Kernel benchmark (not a test): `cargo bench -p llava-gpu --bench kernels [-- --full]
//! [--only gemm,fused,gemv,crossover,attention,decode,dispatch]` (`--only` picks sections; the copy
//! baseline always runs). `fused` times the prefill's fused q/k/v and gate/up GEMMs and the
//! residual and quick_gelu epilogues against the same work apart.
//!
//! Prints one plain table: GPU time per call, GFLOP/s and GB/s of weights read, beside same-run
//! baselines (a CPU sgemm on the same shapes, a GPU buffer copy and the read probe) so the
//! figures read as ratios. Each kernel is recorded once into a plan and replayed
//! [`CALLS_PER_SUBMIT`] times per submission on a GPU (once on a CPU adapter). Where the adapter
//! has timestamp queries the time per call is the kernels' own (the mean over the timed
//! submissions); elsewhere it is the median wall time of a submission and its wait, shared by its
//! calls.
//! `--only decode` times the planned decode step's kernels (decode GEMV per format, attention of
//! one query at a 7B context). On a CPU adapter (llvmpipe) the
//! shapes are scaled down unless `--full` or `LLAVA_BENCH_FULL=1` asks for LLaVA's real ones.
//! Where the adapter has shader-f16, F16 weights are timed twice: through the kernels'
//! `SHADER_F16` variants (weights column `F16 +f16`) and on a second device without the feature
//! (the f32 path browsers without shader-f16 take).

use std::time::{Duration, Instant};

use llava_gpu::ops::attention::{Mask, attention};
use llava_gpu::ops::decode::{self, Epilogue, Step, StepUniform};
use llava_gpu::ops::elementwise::{add, quick_gelu, silu_mul};
use llava_gpu::ops::matmul::{
    GEMV_MAX_ROWS, LinearKernel, linear_qkv, linear_quick_gelu, linear_residual, linear_silu_mul,
    linear_with,
};
use llava_gpu::quant::quantize;
use llava_gpu::{Batch, DType, Gpu, GpuOptions, Result, Tensor, probe, random};

/// Runs after warm-up until this many samples or [`SAMPLE_BUDGET`], whichever comes first.
const SAMPLES: usize = 9;
const SAMPLE_BUDGET: Duration = Duration::from_secs(3);
/// Replays of a kernel per submission on a GPU.
const CALLS_PER_SUBMIT: usize = 16;

struct Table {
    rows: Vec<[String; 6]>,
}

impl Table {
    fn add(
        &mut self,
        what: &str,
        shape: &str,
        dtype: &str,
        secs: f64,
        flops: f64,
        weight_bytes: f64,
    ) {
        let rate = |amount: f64| {
            if amount > 0.0 {
                format!("{:.1}", amount / secs / 1e9)
            } else {
                "-".into()
            }
        };
        self.rows.push([
            what.into(),
            shape.into(),
            dtype.into(),
            format!("{:.3}", secs * 1e3),
            rate(flops),
            rate(weight_bytes),
        ]);
    }

    fn print(&self) {
        let header = ["kernel", "shape", "weights", "ms/call", "GFLOP/s", "GB/s"];
        let mut widths = header.map(str::len);
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut s = format!(
                "{:<w0$}  {:<w1$}  {:<w2$}",
                cells[0],
                cells[1],
                cells[2],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            for (cell, w) in cells[3..].iter().zip(&widths[3..]) {
                s += &format!("  {cell:>w$}");
            }
            println!("{s}");
        };
        line(header);
        println!(
            "{}",
            "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
        );
        for row in &self.rows {
            line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
        }
    }
}

/// Median seconds of `run` after two warm-up calls.
fn median_secs(mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    run()?;
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < SAMPLES && (samples.len() < 3 || start.elapsed() < SAMPLE_BUDGET) {
        let t = Instant::now();
        run()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// Seconds per call of the work `record` records: recorded once into a plan, replayed `calls`
/// times per submission. Where the device profiles (timestamp queries), the kernels' own GPU time,
/// the mean over the timed submissions; elsewhere the median wall time of a submission and its
/// wait, over `calls`.
fn gpu_secs(gpu: &Gpu, calls: usize, record: impl FnOnce(&mut Batch) -> Result<()>) -> Result<f64> {
    let mut plan = gpu.plan();
    record(&mut plan)?;
    let plan = plan.into_plan()?;
    let mut submissions = 0;
    let wall = median_secs(|| {
        let mut batch = gpu.batch();
        for _ in 0..calls {
            batch.run(&plan)?;
        }
        batch.submit()?;
        wait(gpu)?;
        submissions += 1;
        // The two warm-up submissions are not counted.
        if submissions == 2 {
            gpu.take_profile();
        }
        Ok(())
    })?;
    Ok(match gpu.take_profile() {
        Some(times) if !times.is_empty() => {
            let timed_calls = ((submissions - 2) * calls) as f64;
            times.iter().map(|t| t.seconds).sum::<f64>() / timed_calls
        }
        _ => wall / calls as f64,
    })
}

fn wait(gpu: &Gpu) -> Result<()> {
    gpu.device()
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        })
        .map_err(|e| llava_gpu::GpuError::Readback(e.to_string()))?;
    gpu.check()
}

/// A `[n, k]` weight in `dtype` and the bytes a kernel reads for it (values + scales).
fn weight(gpu: &Gpu, dtype: DType, n: usize, k: usize) -> Result<(Tensor, f64)> {
    let w = random(n * k, (n * k) as u64);
    let t = match dtype {
        DType::F32 => Tensor::from_f32(gpu, &[n, k], &w)?,
        DType::F16 => {
            let h: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            Tensor::from_f16(gpu, &[n, k], &h)?
        }
        _ => Tensor::from_quant(gpu, &quantize(dtype, n, k, &w))?,
    };
    let scales = if dtype.is_quantized() {
        (n * k / dtype.group_size() * 2) as f64
    } else {
        0.0
    };
    Ok((t, dtype.data_bytes(n * k) as f64 + scales))
}

/// Times `linear` for x `[m, k]` and w `[n, k]` and adds a row.
fn linear_row(
    gpu: &Gpu,
    table: &mut Table,
    calls: usize,
    kernel: LinearKernel,
    dtype: DType,
    (m, k, n): (usize, usize, usize),
) -> Result<f64> {
    let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, 7))?;
    let (w, weight_bytes) = weight(gpu, dtype, n, k)?;
    let secs = gpu_secs(gpu, calls, |batch| {
        linear_with(batch, &x, &w, None, kernel).map(drop)
    })?;
    let name = match kernel {
        LinearKernel::Auto => "linear",
        LinearKernel::Gemv => "linear gemv",
        LinearKernel::Gemm => "linear gemm",
    };
    let kernel_dtype = if gpu.has_f16() && dtype == DType::F16 {
        " +f16"
    } else {
        ""
    };
    table.add(
        name,
        &format!("{m}x{k}x{n}"),
        &format!("{dtype:?}{kernel_dtype}"),
        secs,
        2.0 * (m * k * n) as f64,
        weight_bytes,
    );
    Ok(secs)
}

/// Times the prefill's fused projections against the same ones apart, x `[m, k]`: gate and up
/// `[n, k]` with the SiLU (one GEMM, or two and silu_mul), q `[k, k]` with k and v `[k / 4, k]`
/// (Mistral's 4:1 heads; one GEMM or three), and gate alone with the residual add or quick_gelu
/// (one GEMM, or a GEMM and the elementwise op).
fn fused_rows(
    gpu: &Gpu,
    table: &mut Table,
    calls: usize,
    dtype: DType,
    (m, k, n): (usize, usize, usize),
) -> Result<()> {
    let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, 7))?;
    let f16 = if gpu.has_f16() && dtype == DType::F16 {
        " +f16"
    } else {
        ""
    };
    let weights = format!("{dtype:?}{f16}");
    let gemm = |batch: &mut Batch, w: &Tensor| linear_with(batch, &x, w, None, LinearKernel::Gemm);

    let (gate, gate_bytes) = weight(gpu, dtype, n, k)?;
    let (up, _) = weight(gpu, dtype, n, k)?;
    let pair = Tensor::pack(gpu, &[&gate, &up])?;
    let fused = gpu_secs(gpu, calls, |batch| {
        linear_silu_mul(batch, &x, &pair[0], &pair[1]).map(drop)
    })?;
    let apart = gpu_secs(gpu, calls, |batch| {
        let (g, u) = (gemm(batch, &gate)?, gemm(batch, &up)?);
        silu_mul(batch, &g, &u).map(drop)
    })?;
    let shape = format!("{m}x{k}x2*{n}");
    let flops = 4.0 * (m * k * n) as f64;
    table.add(
        "gate/up+silu fused",
        &shape,
        &weights,
        fused,
        flops,
        2.0 * gate_bytes,
    );
    table.add(
        "gate/up+silu apart",
        &shape,
        &weights,
        apart,
        flops,
        2.0 * gate_bytes,
    );

    let kv = k / 4;
    let (q, q_bytes) = weight(gpu, dtype, k, k)?;
    let (kw, kv_bytes) = weight(gpu, dtype, kv, k)?;
    let (v, _) = weight(gpu, dtype, kv, k)?;
    let qkv = Tensor::pack(gpu, &[&q, &kw, &v])?;
    let fused = gpu_secs(gpu, calls, |batch| {
        linear_qkv(batch, &x, [&qkv[0], &qkv[1], &qkv[2]], None).map(drop)
    })?;
    let apart = gpu_secs(gpu, calls, |batch| {
        for w in [&q, &kw, &v] {
            gemm(batch, w)?;
        }
        Ok(())
    })?;
    let shape = format!("{m}x{k}x({k}+2*{kv})");
    let flops = 2.0 * (m * k * (k + 2 * kv)) as f64;
    let bytes = q_bytes + 2.0 * kv_bytes;
    table.add("q/k/v fused", &shape, &weights, fused, flops, bytes);
    table.add("q/k/v apart", &shape, &weights, apart, flops, bytes);

    // The epilogues, on gate's shape: the residual add (o_proj, down_proj, CLIP's out_proj and
    // fc2) and quick_gelu (CLIP's fc1).
    let residual = Tensor::from_f32(gpu, &[m, n], &random(m * n, 9))?;
    let residual_fused = gpu_secs(gpu, calls, |batch| {
        linear_residual(batch, &x, &gate, None, &residual).map(drop)
    })?;
    let residual_apart = gpu_secs(gpu, calls, |batch| {
        let y = gemm(batch, &gate)?;
        add(batch, &residual, &y).map(drop)
    })?;
    let gelu_fused = gpu_secs(gpu, calls, |batch| {
        linear_quick_gelu(batch, &x, &gate, None).map(drop)
    })?;
    let gelu_apart = gpu_secs(gpu, calls, |batch| {
        let y = gemm(batch, &gate)?;
        quick_gelu(batch, &y).map(drop)
    })?;
    let shape = format!("{m}x{k}x{n}");
    let flops = 2.0 * (m * k * n) as f64;
    for (name, secs) in [
        ("linear+residual fused", residual_fused),
        ("linear+residual apart", residual_apart),
        ("linear+quick_gelu fused", gelu_fused),
        ("linear+quick_gelu apart", gelu_apart),
    ] {
        table.add(name, &shape, &weights, secs, flops, gate_bytes);
    }
    Ok(())
}

/// Same-run CPU baseline: matrixmultiply's sgemm (through ndarray, single thread) on `x · wᵀ`.
fn cpu_sgemm_row(table: &mut Table, (m, k, n): (usize, usize, usize)) -> Result<()> {
    let x = ndarray::Array2::from_shape_vec((m, k), random(m * k, 7)).expect("m*k values");
    let w = ndarray::Array2::from_shape_vec((n, k), random(n * k, 8)).expect("n*k values");
    let secs = median_secs(|| {
        std::hint::black_box(x.dot(&w.t()));
        Ok(())
    })?;
    table.add(
        "cpu sgemm (1 thread)",
        &format!("{m}x{k}x{n}"),
        "F32",
        secs,
        2.0 * (m * k * n) as f64,
        4.0 * (n * k) as f64,
    );
    Ok(())
}

/// Same-run GPU bandwidth baseline: one buffer-to-buffer copy; GB/s counts bytes read + written.
fn copy_row(gpu: &Gpu, table: &mut Table, bytes: u64) -> Result<()> {
    let bytes = bytes.min(gpu.limits().max_buffer_size) / 4 * 4;
    let words = (bytes / 4) as usize;
    let src = Tensor::empty(gpu, &[words], DType::F32)?;
    let dst = Tensor::empty(gpu, &[words], DType::F32)?;
    let secs = median_secs(|| {
        let mut batch = gpu.batch();
        batch.copy(src.binding(), dst.binding());
        batch.submit()?;
        wait(gpu)
    })?;
    table.add(
        "buffer copy (read+write)",
        &format!("{} MiB", bytes >> 20),
        "-",
        secs,
        0.0,
        2.0 * bytes as f64,
    );
    Ok(())
}

/// Per-dispatch overhead as a decode step sees it: `count` element-wise adds of 1024 floats
/// recorded into one batch, submitted and waited for.
fn dispatch_row(gpu: &Gpu, table: &mut Table, count: usize) -> Result<()> {
    let a = Tensor::from_f32(gpu, &[1024], &random(1024, 9))?;
    let secs = median_secs(|| {
        let mut batch = gpu.batch();
        let mut x = add(&mut batch, &a, &a)?;
        for _ in 1..count {
            x = add(&mut batch, &x, &a)?;
        }
        batch.submit()?;
        wait(gpu)
    })?;
    table.add(
        &format!("{count} small dispatches (add 1024)"),
        &format!("{:.1} us/dispatch", secs * 1e6 / count as f64),
        "F32",
        secs,
        0.0,
        0.0,
    );
    Ok(())
}

/// Causal attention as the LLM runs it: a prefill of `t` tokens and one decode step at context
/// `t`, with Mistral-7B's 32 query / 8 kv heads of 128 (fewer heads on a CPU adapter).
fn attention_rows(gpu: &Gpu, table: &mut Table, full: bool, calls: usize) -> Result<()> {
    let (t, hq, hkv, d) = if full {
        (2400, 32, 8, 128)
    } else {
        (600, 8, 2, 128)
    };
    let k = Tensor::from_f32(gpu, &[1, t + 1, hkv, d], &random((t + 1) * hkv * d, 3))?;
    let v = Tensor::from_f32(gpu, &[1, t + 1, hkv, d], &random((t + 1) * hkv * d, 4))?;
    let kv_bytes = 2.0 * (t * hkv * d * 4) as f64;
    for (what, tq, offset) in [("attention prefill", t, 0), ("attention decode", 1, t)] {
        let q = Tensor::from_f32(gpu, &[1, tq, hq, d], &random(tq * hq * d, 5))?;
        let secs = gpu_secs(gpu, calls, |batch| {
            attention(
                batch,
                &q,
                &k,
                &v,
                offset + tq,
                Mask::Causal { q_offset: offset },
            )
            .map(drop)
        })?;
        // QK^T and PV over the visible keys (half of them on average for the causal prefill).
        let visible = if tq == 1 {
            (offset + 1) as f64
        } else {
            (tq as f64 + 1.0) / 2.0
        };
        let flops = 4.0 * (tq * hq * d) as f64 * visible;
        table.add(
            what,
            &format!("{tq}q x {}kv, {hq}/{hkv}x{d}", offset + tq),
            "F32",
            secs,
            flops,
            kv_bytes,
        );
    }
    // The vision tower's: CLIP-L/336's 577 tokens per tile, 16 heads of 64, unmasked, 5 tiles
    // (one on a CPU adapter).
    let (tiles, t, h, d) = (if full { 5 } else { 1 }, 577, 16, 64);
    let qkv: Vec<Tensor> = (0..3)
        .map(|seed| Tensor::from_f32(gpu, &[tiles, t, h, d], &random(tiles * t * h * d, 6 + seed)))
        .collect::<Result<_, _>>()?;
    let secs = gpu_secs(gpu, calls, |batch| {
        attention(batch, &qkv[0], &qkv[1], &qkv[2], t, Mask::None).map(drop)
    })?;
    table.add(
        "attention vision",
        &format!("{tiles}x{t}q x {t}kv, {h}x{d}"),
        "F32",
        secs,
        4.0 * (tiles * t * t * h * d) as f64,
        2.0 * (tiles * t * h * d * 4) as f64,
    );
    Ok(())
}

/// The planned decode step's kernels at Mistral-7B sizes (scaled down on a CPU adapter): the
/// decode GEMV (plain store) of the MLP's two shapes per weight format, and the attention of one
/// query against an f16 cache of the bench prompt's length. GB/s read beside the read probe's.
fn decode_rows(gpu: &Gpu, table: &mut Table, full: bool, calls: usize) -> Result<()> {
    let (hidden, inter) = if full { (4096, 14336) } else { (1024, 3584) };
    let bytes = if full { 1 << 30 } else { 64 << 20 };
    let read = probe::read_bandwidth(gpu, bytes)?;
    table.add(
        "read probe (16-byte loads)",
        &format!("{} MiB", bytes >> 20),
        "-",
        bytes as f64 / read,
        0.0,
        bytes as f64,
    );
    for (n, k) in [(inter, hidden), (hidden, inter)] {
        let x = Tensor::from_f32(gpu, &[1, k], &random(k, 7))?;
        let y = Tensor::empty(gpu, &[1, n], DType::F32)?;
        for dtype in [DType::F16, DType::Q8, DType::Q4] {
            let (w, weight_bytes) = weight(gpu, dtype, n, k)?;
            let secs = gpu_secs(gpu, calls, |batch| {
                decode::gemv(batch, &x, &w, None, Epilogue::Store, &y)
            })?;
            table.add(
                "decode gemv",
                &format!("{n}x{k}"),
                &format!("{dtype:?}"),
                secs,
                2.0 * (n * k) as f64,
                weight_bytes,
            );
        }
    }
    let (heads, kv_heads, len): (usize, usize, usize) =
        if full { (32, 8, 2355) } else { (8, 2, 600) };
    let capacity = len.div_ceil(decode::ATTEND_KEYS) * decode::ATTEND_KEYS;
    let step = StepUniform::new(gpu)?;
    step.write(
        gpu,
        Step {
            pos: len as u32 - 1,
            kv_len: len as u32,
            index: 0,
            pad: 0,
        },
    );
    // Head dim 128 takes the kernel of 16-byte units; 124 (not a multiple of 8 halves) the
    // general one, for a same-run ratio of the two.
    for (d, kernel) in [(128, "F16 KV"), (124, "F16 KV, general")] {
        let cache: Vec<half::f16> = random(2 * capacity * kv_heads * d, 11)
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        let kv = Tensor::from_f16(gpu, &[2, capacity, kv_heads, d], &cache)?;
        let q = Tensor::from_f32(gpu, &[heads * d], &random(heads * d, 12))?;
        let secs = gpu_secs(gpu, calls, |batch| {
            decode::attend(batch, &step, &q, &kv, heads, kv_heads).map(drop)
        })?;
        let kv_bytes = (2 * len * kv_heads * d * 2) as f64;
        table.add(
            "decode attend",
            &format!("1q x {len}kv, {heads}/{kv_heads}x{d}"),
            kernel,
            secs,
            4.0 * (heads * d * len) as f64,
            kv_bytes,
        );
    }
    // The sampler over Mistral's vocabulary, greedy and with top-k/top-p.
    let vocab = 32000;
    let logits = Tensor::from_f32(gpu, &[1, vocab], &random(vocab, 13))?;
    let token = Tensor::from_u32(gpu, &[2], &[0, 0])?;
    let state = decode::SamplerState::new(gpu, vocab)?;
    let sampled = decode::Sampling {
        temperature: 0.7,
        top_k: 50,
        top_p: 0.9,
        repetition_penalty: 1.1,
        seed: 1,
    };
    // A reply's logits put most of the mass on a few ids: top-p alone then cuts among them.
    let mut peaked = random(vocab, 13);
    for i in (0..vocab).step_by(vocab / 20) {
        peaked[i] += 8.0;
    }
    let peaked = Tensor::from_f32(gpu, &[1, vocab], &peaked)?;
    let top_p = decode::Sampling {
        top_k: 0,
        ..sampled
    };
    for (what, sampling, logits) in [
        ("greedy", decode::Sampling::GREEDY, &logits),
        ("t 0.7, top-k 50, top-p 0.9", sampled, &logits),
        ("t 0.7, top-p 0.9, 20 likely ids", top_p, &peaked),
    ] {
        state.reset(gpu, sampling, &[1, 2, 3]);
        let secs = gpu_secs(gpu, calls, |batch| {
            decode::sample(batch, &step, &state, logits, &token)
        })?;
        table.add(
            "decode sample",
            &format!("{vocab} logits, {what}"),
            "F32",
            secs,
            0.0,
            (vocab * 4) as f64,
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--full")
        || std::env::var("LLAVA_BENCH_FULL").is_ok_and(|v| v == "1");
    let args: Vec<String> = std::env::args().collect();
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(String::from).collect());
    let section = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name));
    // Kernels are timed with timestamp queries where the adapter has them; the baselines and the
    // dispatch-overhead row, which time submissions as a decode step sees them, on a device that
    // does not profile.
    let profiled = GpuOptions {
        profile: true,
        ..GpuOptions::from_env()
    };
    let gpu = Gpu::with_options_blocking(profiled)?;
    let unprofiled = Gpu::new_blocking()?;
    // The same adapter without shader-f16, for the f32 rows beside the f16 ones.
    let plain = if gpu.has_f16() {
        Some(Gpu::with_options_blocking(GpuOptions {
            f16: false,
            ..profiled
        })?)
    } else {
        None
    };
    // Devices to time weights of `dtype` on: only f16 weights have f16 variants.
    let devices = |dtype: DType| -> Vec<&Gpu> {
        match &plain {
            Some(plain) if dtype == DType::F16 => vec![plain, &gpu],
            _ => vec![&gpu],
        }
    };
    let info = gpu.info();
    let full = full || info.device_type != wgpu::DeviceType::Cpu;
    println!(
        "adapter: {} ({:?}, {:?}), driver: {} {}",
        info.name, info.backend, info.device_type, info.driver, info.driver_info
    );
    println!(
        "gemm tile: {:?} (Wide 16x8 outputs per thread, Narrow 8x8, Auto wide from K = 256; \
         LLAVA_WIDE_GEMM=1 or 0 picks one)",
        gpu.gemm_tile()
    );
    println!(
        "shader-f16: {}",
        if gpu.has_f16() {
            "yes (f16 rows: weights `+f16`)"
        } else {
            "no"
        }
    );
    println!(
        "subgroups: {} (LLAVA_NO_SUBGROUPS=1 turns them off)",
        match gpu.subgroup_min_size() {
            Some(size) => format!("yes, at least {size} wide"),
            None => "no".to_string(),
        }
    );
    println!(
        "decode gemv: {} (LLAVA_GEMV_PAIRS=1 or 0 decides)",
        if gpu.gemv_pairs() {
            "two units of each row per step"
        } else {
            "one unit of each row per step"
        }
    );
    println!(
        "decode gemv Q4 codes: {} (LLAVA_Q4_TABLE=1 or 0 decides)",
        if gpu.q4_table() {
            "from a table in workgroup memory"
        } else {
            "computed"
        }
    );
    println!(
        "kernel times: {}",
        if gpu.take_profile().is_some() {
            "GPU timestamps (the kernels' own time)"
        } else {
            "wall time of each submission and its wait (no timestamp queries here)"
        }
    );
    println!(
        "shapes: {}, max storage binding {} MiB\n",
        if full {
            "full (LLaVA sizes)"
        } else {
            "scaled down for a CPU adapter (--full for real ones)"
        },
        gpu.max_binding() >> 20
    );

    // (rows of x, K, N): vision MLP fc1 (577 patches, 1024 -> 4096) and a 7B prefill of 2340
    // tokens; decode GEMVs of a 4096-wide attention projection and the MLP's 4096 -> 14336.
    // Fused projections: a 7B layer's gate/up (4096 -> 14336) and q/k/v at 2340 tokens.
    let (gemms, gemvs, sweep_k, copy_bytes, fused) = if full {
        (
            vec![(577, 1024, 4096), (2340, 4096, 4096)],
            vec![(1, 4096, 4096), (1, 4096, 14336)],
            4096,
            512 << 20,
            (2340, 4096, 14336),
        )
    } else {
        (
            // The vision MLP's real fc1 too: the GEMM target shape on llvmpipe.
            vec![(577, 256, 1024), (577, 1024, 4096), (256, 512, 512)],
            vec![(1, 1024, 1024), (1, 1024, 3584)],
            1024,
            64 << 20,
            (577, 512, 1792),
        )
    };

    let calls = if info.device_type == wgpu::DeviceType::Cpu {
        1
    } else {
        CALLS_PER_SUBMIT
    };
    let mut table = Table { rows: Vec::new() };
    copy_row(&unprofiled, &mut table, copy_bytes)?;
    for &shape in gemms.iter().filter(|_| section("gemm")) {
        cpu_sgemm_row(&mut table, shape)?;
        for dtype in [DType::F32, DType::F16, DType::Q4] {
            for gpu in devices(dtype) {
                linear_row(gpu, &mut table, calls, LinearKernel::Gemm, dtype, shape)?;
            }
        }
    }
    if section("fused") {
        for dtype in [DType::F16, DType::Q4] {
            fused_rows(&gpu, &mut table, calls, dtype, fused)?;
        }
    }
    for &shape in gemvs.iter().filter(|_| section("gemv")) {
        cpu_sgemm_row(&mut table, shape)?;
        for dtype in [DType::F32, DType::F16, DType::Q8, DType::Q6, DType::Q4] {
            for gpu in devices(dtype) {
                linear_row(gpu, &mut table, calls, LinearKernel::Gemv, dtype, shape)?;
            }
        }
    }
    // Where the GEMV stops paying: the same f16 weight through both kernels for growing M.
    let mut crossover = Vec::new();
    for m in [1, 2, 4, 8, 16, 32]
        .into_iter()
        .filter(|_| section("crossover"))
    {
        let shape = (m, sweep_k, sweep_k);
        let gemv = linear_row(
            &gpu,
            &mut table,
            calls,
            LinearKernel::Gemv,
            DType::F16,
            shape,
        )?;
        let gemm = linear_row(
            &gpu,
            &mut table,
            calls,
            LinearKernel::Gemm,
            DType::F16,
            shape,
        )?;
        crossover.push(format!("M={m}: gemm/gemv {:.2}", gemm / gemv));
    }
    if section("attention") {
        attention_rows(&gpu, &mut table, full, calls)?;
    }
    if section("decode") {
        decode_rows(&gpu, &mut table, full, calls)?;
    }
    if section("dispatch") {
        dispatch_row(&unprofiled, &mut table, 256)?;
    }

    table.print();
    println!(
        "\ncrossover (time ratio, >1 means GEMV is faster): {}",
        crossover.join(", ")
    );
    println!("linear() uses the GEMV for M <= {GEMV_MAX_ROWS}.");
    Ok(())
}
