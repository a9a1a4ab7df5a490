//! GPU time per kernel, from timestamp queries: with [`GpuOptions::profile`] on an adapter with
//! TIMESTAMP_QUERY (natively), every dispatch gets a compute pass of its own whose beginning and
//! end are timestamped, and each submission's timestamps are read back and added up by kernel
//! (entry point and variant flags). Passes and readbacks cost time of their own, so profile for
//! the split between kernels, and measure speed without it.
//!
//! [`GpuOptions::profile`]: crate::GpuOptions::profile

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::context::Gpu;
#[cfg(not(target_arch = "wasm32"))]
use crate::context::map_read;
use crate::error::Result;

/// GPU time of one kernel over the profiled work.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KernelTime {
    /// Entry point and variant flags, e.g. `attention_tiled TILED KV_F16`.
    pub kernel: String,
    pub calls: u64,
    pub seconds: f64,
}

/// Totals by kernel: calls and nanoseconds.
#[derive(Default)]
pub(crate) struct Profiler {
    totals: Mutex<BTreeMap<String, (u64, f64)>>,
}

impl Profiler {
    /// The totals so far, the longest first, and a fresh start.
    pub(crate) fn take(&self) -> Vec<KernelTime> {
        let totals = std::mem::take(&mut *self.totals.lock().unwrap_or_else(|e| e.into_inner()));
        let mut times: Vec<KernelTime> = totals
            .into_iter()
            .map(|(kernel, (calls, ns))| KernelTime {
                kernel,
                calls,
                seconds: ns * 1e-9,
            })
            .collect();
        times.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        times
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn add(&self, kernel: &str, ns: f64) {
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        let entry = totals.entry(kernel.to_string()).or_default();
        entry.0 += 1;
        entry.1 += ns;
    }
}

/// The timestamps of one submission's dispatches: query 2i is the beginning of dispatch i's pass,
/// 2i + 1 its end.
pub(crate) struct SubmissionTimestamps {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    kernels: Vec<String>,
}

impl SubmissionTimestamps {
    /// Dispatches timed per submission; a batch with more is submitted in parts.
    pub(crate) const DISPATCHES: u32 = 1024;

    pub(crate) fn new(gpu: &Gpu) -> Result<SubmissionTimestamps> {
        let queries = gpu.device().create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * Self::DISPATCHES,
        });
        let bytes = 2 * Self::DISPATCHES as u64 * 8;
        let resolved = gpu.create_buffer(
            bytes,
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        )?;
        let readback = gpu.create_buffer(
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(SubmissionTimestamps {
            queries,
            resolved,
            readback,
            kernels: Vec::new(),
        })
    }

    pub(crate) fn is_full(&self) -> bool {
        self.kernels.len() as u32 >= Self::DISPATCHES
    }

    /// The timestamp writes of the pass of the next dispatch, a run of `kernel`.
    pub(crate) fn next(&mut self, kernel: String) -> wgpu::ComputePassTimestampWrites<'_> {
        let i = 2 * self.kernels.len() as u32;
        self.kernels.push(kernel);
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(i),
            end_of_pass_write_index: Some(i + 1),
        }
    }

    /// Records the copy of the timestamps to the host, at the end of the submission.
    pub(crate) fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        let count = 2 * self.kernels.len() as u32;
        if count == 0 {
            return;
        }
        encoder.resolve_query_set(&self.queries, 0..count, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.readback, 0, count as u64 * 8);
    }

    /// Waits for the submission, then adds each dispatch's time to its kernel's total.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn collect(self, gpu: &Gpu, profiler: &Profiler) -> Result<()> {
        if self.kernels.is_empty() {
            return Ok(());
        }
        let bytes = self.kernels.len() as u64 * 16;
        let bytes = pollster::block_on(map_read(gpu, &self.readback, bytes))?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        let period_ns = f64::from(gpu.queue().get_timestamp_period());
        for (kernel, pair) in self.kernels.iter().zip(ticks.chunks_exact(2)) {
            profiler.add(kernel, pair[1].saturating_sub(pair[0]) as f64 * period_ns);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::elementwise::add;
    use crate::ops::norm::rms_norm;
    use crate::testing::{gpu, random};
    use crate::{Gpu, GpuOptions, Tensor};

    #[test]
    fn profile_counts_every_dispatch_by_kernel_and_leaves_results_unchanged() {
        assert_eq!(gpu().take_profile(), None, "not asked for");
        let profiled = Gpu::with_options_blocking(GpuOptions {
            profile: true,
            ..Default::default()
        })
        .unwrap();
        if !profiled
            .device()
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            assert_eq!(profiled.take_profile(), None);
            return;
        }
        let compute = |g: &Gpu| {
            let x = Tensor::from_f32(g, &[3, 40], &random(120, 1)).unwrap();
            let w = Tensor::from_f32(g, &[40], &random(40, 2)).unwrap();
            let mut batch = g.batch();
            let mut y = rms_norm(&mut batch, &x, &w, 1e-6).unwrap();
            // More dispatches than one submission times, so the batch is submitted in parts.
            for _ in 0..1100 {
                y = add(&mut batch, &y, &x).unwrap();
            }
            batch.submit().unwrap();
            pollster::block_on(y.to_f32(g)).unwrap()
        };
        let before = profiled.counters();
        assert_eq!(compute(&profiled), compute(gpu()));
        let submits = profiled.counters().submits - before.submits;
        assert!(submits >= 2, "{submits} submissions");

        let times = profiled.take_profile().unwrap();
        let calls = |kernel: &str| times.iter().find(|t| t.kernel == kernel).map(|t| t.calls);
        assert_eq!(calls("norm"), Some(1), "{times:?}");
        assert_eq!(calls("add"), Some(1100), "{times:?}");
        assert!(
            times.iter().map(|t| t.seconds).sum::<f64>() > 0.0,
            "{times:?}"
        );
        assert_eq!(profiled.take_profile(), Some(Vec::new()), "taken");
    }
}
