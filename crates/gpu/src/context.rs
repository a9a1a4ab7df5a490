//! The GPU context: adapter choice, device with the adapter's own limits, error collection, and
//! [`Batch`], which records dispatches into one command encoder.

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use crate::error::{GpuError, Result};
use crate::registry::{PipelineKey, PipelineRegistry, SHADER_F16};

/// Optional device features this adapter offers (and that the device was opened with).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuFeatures {
    pub shader_f16: bool,
    pub subgroup: bool,
}

/// Choices made when opening a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuOptions {
    /// Open the device with SHADER_F16 where the adapter offers it, so that kernels can use their
    /// `enable f16;` variants. With `false` the device lacks the feature, as in browsers without
    /// `shader-f16`, and every kernel takes its f32 path.
    pub f16: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions { f16: true }
    }
}

impl GpuOptions {
    /// The defaults, with `f16` off when the environment variable `LLAVA_NO_F16` is `1`
    /// (natively; a browser has no environment).
    pub fn from_env() -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        let no_f16 = std::env::var("LLAVA_NO_F16").is_ok_and(|v| v == "1");
        #[cfg(target_arch = "wasm32")]
        let no_f16 = false;
        GpuOptions { f16: !no_f16 }
    }
}

/// One opened GPU device with its queue, limits and pipeline cache.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: GpuFeatures,
    registry: PipelineRegistry,
    /// First error wgpu reported through its callbacks since the last [`Gpu::check`].
    error: Arc<Mutex<Option<GpuError>>>,
}

impl Gpu {
    /// Opens the best adapter with [`GpuOptions::from_env`]. Natively `WGPU_BACKEND` (e.g.
    /// `vulkan`) and `WGPU_ADAPTER_NAME` are respected; in a browser this is `navigator.gpu`.
    pub async fn new() -> Result<Gpu> {
        Self::with_options(GpuOptions::from_env()).await
    }

    /// [`Gpu::new`] with explicit options (the environment is not read).
    pub async fn with_options(options: GpuOptions) -> Result<Gpu> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter_options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::from_env()
                .unwrap_or(wgpu::PowerPreference::HighPerformance),
            ..Default::default()
        };
        let adapter = instance.request_adapter(&adapter_options).await.map_err(|_| GpuError::NoAdapter)?;
        Self::from_adapter(adapter, options).await
    }

    /// Blocking [`Gpu::new`] for native programs and tests.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking() -> Result<Gpu> {
        pollster::block_on(Self::new())
    }

    /// Blocking [`Gpu::with_options`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_options_blocking(options: GpuOptions) -> Result<Gpu> {
        pollster::block_on(Self::with_options(options))
    }

    /// Opens a device on `adapter` with all of the adapter's limits (the defaults cap storage
    /// bindings at 128 MiB, less than a 7B model's embedding table), SUBGROUP where offered and
    /// SHADER_F16 where offered and `options.f16` asks for it.
    pub async fn from_adapter(adapter: wgpu::Adapter, options: GpuOptions) -> Result<Gpu> {
        let offered = adapter.features();
        let mut wanted = wgpu::Features::SUBGROUP;
        if options.f16 {
            wanted |= wgpu::Features::SHADER_F16;
        }
        let required_features = offered & wanted;
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("llava"),
                required_features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| GpuError::RequestDevice(e.to_string()))?;

        let error: Arc<Mutex<Option<GpuError>>> = Arc::default();
        let slot = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let e = match e {
                wgpu::Error::OutOfMemory { source } => GpuError::OutOfMemory(source.to_string()),
                wgpu::Error::Validation { description, .. } => GpuError::Validation(description),
                wgpu::Error::Internal { description, .. } => GpuError::Validation(description),
            };
            slot.lock().unwrap().get_or_insert(e);
        }));
        let slot = error.clone();
        device.set_device_lost_callback(move |reason, message| {
            // Dropping the device on purpose also "loses" it; that is no error.
            if reason != wgpu::DeviceLostReason::Destroyed {
                *slot.lock().unwrap() = Some(GpuError::DeviceLost(format!("{reason:?}: {message}")));
            }
        });

        Ok(Gpu {
            device,
            queue,
            info: adapter.get_info(),
            limits,
            features: GpuFeatures {
                shader_f16: required_features.contains(wgpu::Features::SHADER_F16),
                subgroup: required_features.contains(wgpu::Features::SUBGROUP),
            },
            registry: PipelineRegistry::default(),
            error,
        })
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
    pub fn features(&self) -> GpuFeatures {
        self.features
    }

    /// Whether the device has SHADER_F16, so that `SHADER_F16` kernel variants (`enable f16;`)
    /// compile.
    pub fn has_f16(&self) -> bool {
        self.features.shader_f16
    }

    /// Most loop iterations one shader invocation may run, counting every loop together, where the
    /// driver caps them: Mesa's llvmpipe silently leaves all loops of an invocation after 65535
    /// iterations (`LP_MAX_TGSI_LOOP_ITERATIONS`), so kernels whose loops grow with the input
    /// split their work across workgroups there.
    pub fn loop_budget(&self) -> Option<u32> {
        let llvmpipe = self.info.name.contains("llvmpipe") || self.info.driver.contains("llvmpipe");
        llvmpipe.then_some(65_535)
    }

    /// Largest number of bytes one storage binding may cover.
    pub fn max_binding(&self) -> u64 {
        (self.limits.max_storage_buffer_binding_size as u64).min(self.limits.max_buffer_size)
    }

    /// Returns (and clears) the first validation error, out-of-memory or device loss that wgpu
    /// reported since the last call.
    pub fn check(&self) -> Result<()> {
        match self.error.lock().unwrap().take() {
            Some(e @ GpuError::DeviceLost(_)) => {
                // A lost device stays lost: keep reporting it.
                let msg = e.to_string();
                *self.error.lock().unwrap() = Some(GpuError::DeviceLost(msg));
                Err(e)
            }
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The compiled pipeline for `key`, built on first use and cached. A `SHADER_F16` key on a device
    /// without SHADER_F16 is an error, not a shader compilation failure.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if key.flags().contains(&SHADER_F16) && !self.has_f16() {
            return Err(GpuError::Unsupported {
                op: key.entry,
                what: format!("the f16 variant of {}.wgsl on a device without shader-f16", key.shader.name),
            });
        }
        self.registry.get(&self.device, key)
    }

    /// Starts recording a batch of dispatches.
    pub fn batch(&self) -> Batch<'_> {
        self.batch_with_uniform_arena(UNIFORM_ARENA_BYTES)
    }

    /// A batch whose parameter buffers hold `arena_bytes` each (tests use small ones).
    pub(crate) fn batch_with_uniform_arena(&self, arena_bytes: u64) -> Batch<'_> {
        Batch {
            gpu: self,
            encoder: self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default()),
            uniforms: UniformArena {
                capacity: arena_bytes,
                buffer: None,
                used: 0,
                staged: Vec::new(),
                staged_from: 0,
            },
        }
    }

    /// Splits `n` workgroups into an x/y grid within the per-dimension limit. Kernels recover
    /// the linear index as `wg.x + wg.y * num_workgroups.x` and skip indices `>= n`.
    pub fn grid(&self, n: u32) -> [u32; 3] {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        if n <= max {
            [n.max(1), 1, 1]
        } else {
            [max, n.div_ceil(max), 1]
        }
    }

    pub(crate) fn create_buffer(&self, size: u64, usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        if size > self.limits.max_buffer_size {
            return Err(GpuError::TooLarge { bytes: size, limit: self.limits.max_buffer_size, what: "buffer" });
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: size.max(4).next_multiple_of(4),
            usage,
            mapped_at_creation: false,
        }))
    }

    /// Copies `size` bytes of `buffer` from `offset` back to the host. Natively this blocks on
    /// the device; on the web it awaits `mapAsync` (where `device.poll` does nothing).
    pub async fn read_buffer(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let padded = size.next_multiple_of(4);
        let staging =
            self.create_buffer(padded, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)?;
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, padded);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let mapped = rx.await.map_err(|_| GpuError::Readback("map callback dropped".into()));
        self.check()?;
        mapped?.map_err(|e| GpuError::Readback(e.to_string()))?;
        let view = staging.get_mapped_range(..).map_err(|e| GpuError::Readback(e.to_string()))?;
        let bytes = view[..size as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(bytes)
    }
}

/// A byte range of a buffer bound to one storage binding.
#[derive(Clone, Copy)]
pub struct Binding<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> Binding<'a> {
    /// `size` bytes starting `offset` bytes into this binding.
    pub fn slice(self, offset: u64, size: u64) -> Binding<'a> {
        Binding { buffer: self.buffer, offset: self.offset + offset, size }
    }
}

/// Bytes of each uniform buffer a batch packs its dispatches' parameters into: 256 dispatches at
/// the largest offset alignment WebGPU allows (256), one buffer per decode step of a 7B model
/// layer or so.
const UNIFORM_ARENA_BYTES: u64 = 64 << 10;

/// The uniform parameters of a batch's dispatches, packed at the device's uniform offset
/// alignment into shared buffers rather than one new buffer per dispatch. What is packed is
/// written with one `write_buffer` per buffer before the commands that read it are submitted
/// (queue writes take effect before the next submission's commands).
struct UniformArena {
    capacity: u64,
    buffer: Option<wgpu::Buffer>,
    /// Bytes of `buffer` handed out (a multiple of the alignment).
    used: u64,
    /// The bytes of `buffer` from `staged_from` to the end of the last parameters, not written yet.
    staged: Vec<u8>,
    staged_from: u64,
}

impl UniformArena {
    /// Packs `params` (a multiple of 16 bytes) and returns the buffer and offset holding them.
    fn push(&mut self, gpu: &Gpu, params: &[u8]) -> Result<(wgpu::Buffer, u64)> {
        let size = params.len() as u64;
        let buffer = match &self.buffer {
            Some(b) if self.used + size <= b.size() => b.clone(),
            _ => {
                self.upload(&gpu.queue);
                let capacity = self.capacity.max(size);
                let usage = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
                let fresh = gpu.create_buffer(capacity, usage)?;
                self.buffer = Some(fresh.clone());
                self.used = 0;
                self.staged_from = 0;
                fresh
            }
        };
        let offset = self.used;
        self.staged.resize((offset - self.staged_from) as usize, 0);
        self.staged.extend_from_slice(params);
        let align = gpu.limits.min_uniform_buffer_offset_alignment.max(16) as u64;
        self.used = (offset + size).next_multiple_of(align);
        Ok((buffer, offset))
    }

    /// Writes what was packed since the last upload.
    fn upload(&mut self, queue: &wgpu::Queue) {
        if let Some(buffer) = &self.buffer
            && !self.staged.is_empty()
        {
            queue.write_buffer(buffer, self.staged_from, &self.staged);
        }
        self.staged.clear();
        self.staged_from = self.used;
    }
}

/// Dispatches recorded into one command encoder and submitted together, so that a whole layer
/// (or a whole decode step) reaches the GPU in one submission.
pub struct Batch<'g> {
    gpu: &'g Gpu,
    encoder: wgpu::CommandEncoder,
    uniforms: UniformArena,
}

impl<'g> Batch<'g> {
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Records one dispatch of the pipeline `key`. By convention every kernel declares its
    /// parameters as `@binding(0) var<uniform>` (padded here to 16 bytes, and packed with the
    /// batch's other parameters into a shared buffer) and its storage buffers as bindings 1.. in
    /// the order given.
    pub fn dispatch(
        &mut self,
        key: &PipelineKey,
        params: &[u8],
        buffers: &[Binding<'_>],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let pipeline = self.gpu.pipeline(key)?;
        for b in buffers {
            if b.size > self.gpu.max_binding() {
                return Err(GpuError::TooLarge {
                    bytes: b.size,
                    limit: self.gpu.max_binding(),
                    what: "storage binding",
                });
            }
        }
        let mut padded = params.to_vec();
        padded.resize(params.len().max(16).next_multiple_of(16), 0);
        let (uniform, offset) = self.uniforms.push(self.gpu, &padded)?;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &uniform,
                offset,
                size: NonZeroU64::new(padded.len() as u64),
            }),
        }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: NonZeroU64::new(b.size.next_multiple_of(4)),
                }),
            });
        }
        let bind_group = self.gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(key.entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pass = self.encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(key.entry),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        Ok(())
    }

    /// Records a buffer-to-buffer copy.
    pub fn copy(&mut self, src: Binding<'_>, dst: Binding<'_>) {
        self.encoder.copy_buffer_to_buffer(src.buffer, src.offset, dst.buffer, dst.offset, src.size);
    }

    /// Submits what was recorded so far and goes on with a fresh encoder. Long forward passes
    /// flush between layers so that the intermediate buffers of one layer can be freed before
    /// the next is recorded.
    pub fn flush(&mut self) -> Result<()> {
        let fresh = self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        let encoder = std::mem::replace(&mut self.encoder, fresh);
        self.uniforms.upload(&self.gpu.queue);
        self.gpu.queue.submit([encoder.finish()]);
        self.gpu.check()
    }

    /// Submits everything recorded and reports any error wgpu raised while recording.
    pub fn submit(mut self) -> Result<()> {
        self.uniforms.upload(&self.gpu.queue);
        self.gpu.queue.submit([self.encoder.finish()]);
        self.gpu.check()
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::matmul::{LinearKernel, linear_windowed};
    use crate::testing::{assert_close, gpu, random};
    use crate::{DType, Tensor};

    /// Dispatches whose parameters differ (one per 1-row window of a weight, each writing its own
    /// output column) through parameter buffers of 3 slots, across a flush: a dispatch that read
    /// another's slot would write the wrong column or none.
    #[test]
    fn packed_parameters_reach_their_own_dispatch() {
        let gpu = gpu();
        let (m, k, n) = (2, 64, 11);
        let x = random(m * k, 1);
        let w = random(n * k, 2);
        let tx = Tensor::from_f32(gpu, &[m, k], &x).unwrap();
        let tw = Tensor::from_f32(gpu, &[n, k], &w).unwrap();
        let align = gpu.limits().min_uniform_buffer_offset_alignment.max(16) as u64;
        let row_bytes = DType::F32.data_bytes(k) as u64;
        // Windows of one row each need 256-byte offsets to fall on the storage alignment.
        let storage_align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        let window = row_bytes * (storage_align / row_bytes).max(1);
        let rows_per_window = (window / row_bytes) as usize;
        let mut batch = gpu.batch_with_uniform_arena(3 * align);
        let first = linear_windowed(&mut batch, &tx, &tw, None, LinearKernel::Gemv, window).unwrap();
        batch.flush().unwrap();
        let second = linear_windowed(&mut batch, &tx, &tw, None, LinearKernel::Gemm, window).unwrap();
        batch.submit().unwrap();
        assert!(n.div_ceil(rows_per_window) > 3, "the test needs more dispatches than slots");
        let want: Vec<f32> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>() as f32
            })
            .collect();
        for (y, what) in [(first, "gemv before the flush"), (second, "gemm after the flush")] {
            let got = pollster::block_on(y.to_f32(gpu)).unwrap();
            assert_close(&got, &want, 1e-4, what);
        }
    }
}
