//! Bandwidth probes for the benchmarks: what this GPU moves per second, measured in the same run
//! as the kernels, so that their figures read as a fraction of it. Native only (they wait on the
//! device).

use std::time::Instant;

use crate::registry::PipelineKey;
use crate::{DType, Gpu, Result, Tensor, shader};

/// Threads of the read probe: enough loads in flight to saturate any GPU's memory.
const READ_THREADS: u32 = 1 << 20;

/// Bytes per second a kernel reads when it does nothing but stream `bytes` with 16-byte loads
/// (shaders/probe.wgsl): the roofline of a weight-bound decode step. Best of three after a
/// warm-up.
pub fn read_bandwidth(gpu: &Gpu, bytes: u64) -> Result<f64> {
    let bytes = bytes.min(gpu.max_binding()) / 16 * 16;
    let data = Tensor::empty(gpu, &[(bytes / 4) as usize], DType::F32)?;
    let sums = Tensor::empty(gpu, &[READ_THREADS as usize], DType::F32)?;
    let key = PipelineKey::new(shader!("probe"), "read_all");
    let params = [(bytes / 16) as u32, READ_THREADS];
    let mut plan = gpu.plan();
    plan.dispatch(
        &key,
        bytemuck::cast_slice(&params),
        &[data.binding(), sums.binding()],
        gpu.grid(READ_THREADS / 256),
    )?;
    let plan = plan.into_plan()?;
    time_best(gpu, bytes, |batch| batch.run(&plan))
}

/// Bytes per second of buffer-to-buffer copies of `bytes`, counting what is read and written.
pub fn copy_bandwidth(gpu: &Gpu, bytes: u64) -> Result<f64> {
    let bytes = bytes.min(gpu.limits().max_buffer_size) / 4 * 4;
    let src = Tensor::empty(gpu, &[(bytes / 4) as usize], DType::F32)?;
    let dst = Tensor::empty(gpu, &[(bytes / 4) as usize], DType::F32)?;
    time_best(gpu, 2 * bytes, |batch| {
        batch.copy(src.binding(), dst.binding());
        Ok(())
    })
}

/// `bytes` over the best time of 4 recordings of `record` per submission, 3 submissions after a
/// warm-up.
fn time_best(
    gpu: &Gpu,
    bytes: u64,
    record: impl Fn(&mut crate::Batch) -> Result<()>,
) -> Result<f64> {
    const REPEATS: u32 = 4;
    let mut best = f64::INFINITY;
    for run in 0..4 {
        gpu.wait()?;
        let start = Instant::now();
        let mut batch = gpu.batch();
        for _ in 0..REPEATS {
            record(&mut batch)?;
        }
        batch.submit()?;
        gpu.wait()?;
        if run > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    Ok(bytes as f64 * REPEATS as f64 / best)
}
