//! The GPU context: adapter choice, device with the adapter's own limits, error collection, and
//! [`Batch`], which records dispatches into one command encoder.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{GpuError, Result};
use crate::profile::{KernelTime, Profiler, SubmissionTimestamps};
use crate::registry::{PipelineKey, PipelineRegistry, SHADER_F16};
use crate::tensor::{DType, Tensor};

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
    /// Opens the device with `max_buffer_size` and `max_storage_buffer_binding_size` at most this
    /// many bytes (`None`: the adapter's own limits), as a smaller GPU would have them.
    pub max_buffer_bytes: Option<u64>,
    /// Times every dispatch with timestamp queries, for [`Gpu::take_profile`] (natively, where the
    /// adapter has TIMESTAMP_QUERY; see [`crate::profile`]).
    pub profile: bool,
    /// The GEMM's register tile ([`Gpu::gemm_tile`]).
    pub gemm_tile: GemmTile,
    /// Open the device with SUBGROUP where the adapter offers it (natively: wgpu's web backend
    /// does not expose it yet), so that kernels can reduce within subgroups. With `false` they
    /// reduce through workgroup memory, as in browsers.
    pub subgroups: bool,
    /// Whether the decode GEMV takes two 16-byte units of each row per step ([`Gpu::gemv_pairs`]);
    /// `None`: on every adapter but a CPU one.
    pub gemv_pairs: Option<bool>,
    /// Whether the decode GEMV reads Q4 codes from a table in workgroup memory
    /// ([`Gpu::q4_table`]); `None`: on every adapter but a CPU one.
    pub q4_table: Option<bool>,
}

/// The prefill GEMM's register tile (`ops::matmul` picks the kernel by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTile {
    /// 8x8 outputs per thread (`gemm`, ~100 registers).
    Narrow,
    /// 16x8 outputs per thread (`gemm_wide`, ~180 registers): fewer workgroup-memory reads per
    /// multiply-add.
    Wide,
    /// Wide where the adapter has the registers and K is long enough (`ops::matmul`), narrow
    /// elsewhere (see [`GemmTile::for_adapter`]).
    Auto,
}

impl GemmTile {
    /// The tile on an adapter of `device_type`: `Auto` stays `Auto` on CPU adapters (registers
    /// live in cache) and discrete GPUs (255 registers per thread on NVIDIA and AMD) and becomes
    /// `Narrow` on integrated GPUs (Apple, Intel) and adapters of unknown type (a browser's),
    /// which may have 128 registers per thread and would spill the wide tile's.
    pub fn for_adapter(self, device_type: wgpu::DeviceType) -> GemmTile {
        match (self, device_type) {
            (GemmTile::Auto, wgpu::DeviceType::Cpu | wgpu::DeviceType::DiscreteGpu) => {
                GemmTile::Auto
            }
            (GemmTile::Auto, _) => GemmTile::Narrow,
            (tile, _) => tile,
        }
    }
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            f16: true,
            max_buffer_bytes: None,
            profile: false,
            gemm_tile: GemmTile::Auto,
            subgroups: true,
            gemv_pairs: None,
            q4_table: None,
        }
    }
}

impl GpuOptions {
    /// The defaults, with `f16` off when the environment variable `LLAVA_NO_F16` is `1`,
    /// `subgroups` off when `LLAVA_NO_SUBGROUPS` is `1` and the GEMM tile set by
    /// `LLAVA_WIDE_GEMM` (`1` wide, `0` narrow), the GEMV's pairs by `LLAVA_GEMV_PAIRS` and its
    /// Q4 table by `LLAVA_Q4_TABLE` (`1` or `0`), to compare them on one GPU (natively; a browser
    /// has no environment).
    pub fn from_env() -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        let switch = |name: &str| match std::env::var(name).as_deref() {
            Ok("1") => Some(true),
            Ok("0") => Some(false),
            _ => None,
        };
        #[cfg(not(target_arch = "wasm32"))]
        let (no_f16, no_subgroups, gemm_tile, gemv_pairs, q4_table) = (
            std::env::var("LLAVA_NO_F16").is_ok_and(|v| v == "1"),
            std::env::var("LLAVA_NO_SUBGROUPS").is_ok_and(|v| v == "1"),
            match std::env::var("LLAVA_WIDE_GEMM").as_deref() {
                Ok("1") => GemmTile::Wide,
                Ok("0") => GemmTile::Narrow,
                _ => GemmTile::Auto,
            },
            switch("LLAVA_GEMV_PAIRS"),
            switch("LLAVA_Q4_TABLE"),
        );
        #[cfg(target_arch = "wasm32")]
        let (no_f16, no_subgroups, gemm_tile, gemv_pairs, q4_table) =
            (false, false, GemmTile::Auto, None, None);
        GpuOptions {
            f16: !no_f16,
            subgroups: !no_subgroups,
            gemm_tile,
            gemv_pairs,
            q4_table,
            ..Default::default()
        }
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
    counters: CounterCells,
    /// Present when dispatches are timed ([`GpuOptions::profile`]).
    profiler: Option<Profiler>,
    gemm_tile: GemmTile,
    gemv_pairs: bool,
    q4_table: bool,
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
        let adapter = instance
            .request_adapter(&adapter_options)
            .await
            .map_err(|_| GpuError::NoAdapter)?;
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
    /// bindings at 128 MiB, less than a 7B model's embedding table), and SUBGROUP and
    /// SHADER_F16 where offered and `options` ask for them.
    pub async fn from_adapter(adapter: wgpu::Adapter, options: GpuOptions) -> Result<Gpu> {
        let offered = adapter.features();
        let mut wanted = wgpu::Features::empty();
        // A browser would want `enable subgroups;` in the kernels, which naga rejects natively.
        if options.subgroups && cfg!(not(target_arch = "wasm32")) {
            wanted |= wgpu::Features::SUBGROUP;
        }
        if options.f16 {
            wanted |= wgpu::Features::SHADER_F16;
        }
        // Timestamps are read back with a blocking wait, which a browser does not have.
        if options.profile && cfg!(not(target_arch = "wasm32")) {
            wanted |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let required_features = offered & wanted;
        let mut limits = adapter.limits();
        if let Some(cap) = options.max_buffer_bytes {
            limits.max_buffer_size = limits.max_buffer_size.min(cap);
            limits.max_storage_buffer_binding_size =
                limits.max_storage_buffer_binding_size.min(cap);
        }
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
        // Every later check, wait and readback reports the loss (a destroyed device too: on the
        // web the browser may destroy it, and a device dropped with its `Gpu` is never checked).
        device.set_device_lost_callback(move |reason, message| {
            let what = match reason {
                wgpu::DeviceLostReason::Destroyed => "it was destroyed",
                wgpu::DeviceLostReason::Unknown => "unknown reason",
            };
            let lost = if message.is_empty() {
                what.to_string()
            } else {
                format!("{what}: {message}")
            };
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(GpuError::DeviceLost(lost));
        });

        let info = adapter.get_info();
        let gemm_tile = options.gemm_tile.for_adapter(info.device_type);
        let gemv_pairs = options
            .gemv_pairs
            .unwrap_or(info.device_type != wgpu::DeviceType::Cpu);
        let q4_table = options
            .q4_table
            .unwrap_or(info.device_type != wgpu::DeviceType::Cpu);
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            features: GpuFeatures {
                shader_f16: required_features.contains(wgpu::Features::SHADER_F16),
                subgroup: required_features.contains(wgpu::Features::SUBGROUP),
            },
            registry: PipelineRegistry::default(),
            error,
            counters: CounterCells::default(),
            profiler: required_features
                .contains(wgpu::Features::TIMESTAMP_QUERY)
                .then(Profiler::default),
            gemm_tile,
            gemv_pairs,
            q4_table,
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

    /// GPU time by kernel since the last call, the longest first; `None` unless the device was
    /// opened with [`GpuOptions::profile`] on an adapter with timestamp queries.
    pub fn take_profile(&self) -> Option<Vec<KernelTime>> {
        self.profiler.as_ref().map(Profiler::take)
    }

    /// What this device has done since it was opened (see [`Counters`]).
    pub fn counters(&self) -> Counters {
        self.counters.snapshot(self.registry.created())
    }

    /// Writes `bytes` into `buffer` at `offset` through the queue (a multiple of 4 bytes).
    pub fn write(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        self.counters
            .add(&self.counters.bytes_written, bytes.len() as u64);
        self.queue.write_buffer(buffer, offset, bytes);
    }

    /// Submits command buffers, counted.
    pub(crate) fn submit(
        &self,
        commands: impl IntoIterator<Item = wgpu::CommandBuffer>,
    ) -> wgpu::SubmissionIndex {
        self.counters.add(&self.counters.submits, 1);
        self.queue.submit(commands)
    }

    /// The GEMM's register tile on this device: `Narrow`, `Wide`, or `Auto` (wide for long K).
    pub fn gemm_tile(&self) -> GemmTile {
        self.gemm_tile
    }

    /// Whether the decode GEMV takes two 16-byte units of each row per step, so that a thread has
    /// eight rows' worth of loads in flight instead of four: where a matrix has few rows for its
    /// length (o_proj, down_proj: 128 workgroups of 32 rows for 4096 rows), a GPU then keeps more
    /// bytes in flight per multiprocessor. Off on CPU adapters, where it costs registers: llvmpipe
    /// ran the Q4 GEMV 1.5x slower with it.
    pub fn gemv_pairs(&self) -> bool {
        self.gemv_pairs
    }

    /// Whether the decode GEMV reads Q4 code book values from a table in workgroup memory (one
    /// copy per bank) instead of computing them (decode.wgsl, `Q4_TABLE`): on GPUs a load there
    /// and an add take the place of seven operations. Off on CPU adapters, where each load is a
    /// gather.
    pub fn q4_table(&self) -> bool {
        self.q4_table
    }

    /// Whether the device has SHADER_F16, so that `SHADER_F16` kernel variants (`enable f16;`)
    /// compile.
    pub fn has_f16(&self) -> bool {
        self.features.shader_f16
    }

    /// The fewest invocations a subgroup of this device has, where it has subgroups (kernels
    /// may then keep a reduction of up to this many consecutive invocations in one subgroup).
    pub fn subgroup_min_size(&self) -> Option<u32> {
        self.features
            .subgroup
            .then_some(self.info.subgroup_min_size)
    }

    /// Most loop iterations one shader invocation may run, counting every loop together, where the
    /// driver caps them: Mesa's llvmpipe silently leaves all loops of an invocation after 65535
    /// iterations (`LP_MAX_TGSI_LOOP_ITERATIONS`), so kernels whose loops grow with the input
    /// split their work across workgroups there.
    pub fn loop_budget(&self) -> Option<u32> {
        let llvmpipe = self.info.name.contains("llvmpipe") || self.info.driver.contains("llvmpipe");
        llvmpipe.then_some(65_535)
    }

    /// Waits until the GPU has finished everything submitted (natively; benchmarks time with it).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        self.check()
    }

    /// Resolves once the GPU has finished everything submitted so far, so that a stage's time
    /// includes its GPU work (natively by waiting on the device; on the web through
    /// `onSubmittedWorkDone`, as `device.poll` does nothing there).
    pub async fn finished(&self) -> Result<()> {
        let (tx, rx) = futures_channel::oneshot::channel();
        self.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        rx.await
            .map_err(|_| GpuError::Readback("the work-done callback was dropped".into()))?;
        self.check()
    }

    /// The alignment of a storage binding's offset (the scales of a quantized tensor start at it).
    pub fn storage_align(&self) -> u64 {
        self.limits.min_storage_buffer_offset_alignment.max(4) as u64
    }

    /// Largest number of bytes one storage binding may cover.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Returns (and clears) the first validation error, out-of-memory or device loss that wgpu
    /// reported since the last call.
    pub fn check(&self) -> Result<()> {
        // One guard for the whole match: locking again inside it would deadlock.
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        match slot.take() {
            Some(GpuError::DeviceLost(lost)) => {
                // A lost device stays lost: keep reporting it.
                *slot = Some(GpuError::DeviceLost(lost.clone()));
                Err(GpuError::DeviceLost(lost))
            }
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The device loss, if the device was lost (it stays lost; other errors are left for
    /// [`Gpu::check`]).
    pub fn check_lost(&self) -> Result<()> {
        match &*self.error.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(GpuError::DeviceLost(lost)) => Err(GpuError::DeviceLost(lost.clone())),
            _ => Ok(()),
        }
    }

    /// The compiled pipeline for `key`, built on first use and cached. A `SHADER_F16` key on a device
    /// without SHADER_F16 is an error, not a shader compilation failure.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if key.flags().contains(&SHADER_F16) && !self.has_f16() {
            return Err(GpuError::Unsupported {
                op: key.entry,
                what: format!(
                    "the f16 variant of {}.wgsl on a device without shader-f16",
                    key.shader.name
                ),
            });
        }
        self.registry.get(&self.device, key)
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

    /// The size of the buffer [`Gpu::create_buffer`] makes for `size` bytes: whole 4-byte words,
    /// at least one.
    pub(crate) fn buffer_size(size: u64) -> u64 {
        size.max(4).next_multiple_of(4)
    }

    pub(crate) fn create_buffer(
        &self,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        if size > self.limits.max_buffer_size {
            return Err(GpuError::TooLarge {
                bytes: size,
                limit: self.limits.max_buffer_size,
                what: "max_buffer_size",
            });
        }
        // A lost device makes invalid buffers without a word: say why here.
        self.check_lost()?;
        self.counters.add(&self.counters.buffers, 1);
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: Gpu::buffer_size(size),
            usage,
            mapped_at_creation: false,
        }))
    }

    /// Copies `size` bytes of `buffer` from `offset` back to the host. Natively this blocks on
    /// the device; on the web it awaits `mapAsync` (where `device.poll` does nothing).
    pub async fn read_buffer(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        size: u64,
    ) -> Result<Vec<u8>> {
        let padded = size.next_multiple_of(4);
        let staging = self.create_buffer(
            padded,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, padded);
        self.submit([encoder.finish()]);
        self.counters.add(&self.counters.bytes_read, size);
        let mut bytes = map_read(self, &staging, staging.size()).await?;
        bytes.truncate(size as usize);
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
        Binding {
            buffer: self.buffer,
            offset: self.offset + offset,
            size,
        }
    }

    /// The same start, `size` bytes long.
    pub fn with_size(self, size: u64) -> Binding<'a> {
        Binding { size, ..self }
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
                self.upload(gpu);
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
    fn upload(&mut self, gpu: &Gpu) {
        if let Some(buffer) = &self.buffer
            && !self.staged.is_empty()
        {
            gpu.write(buffer, self.staged_from, &self.staged);
        }
        self.staged.clear();
        self.staged_from = self.used;
    }
}

/// Buffers that tensors of a batch no longer use, by size, for the batch's later ops to write
/// (see [`Batch::tensor`]).
#[derive(Debug, Default)]
pub(crate) struct FreeBuffers(Mutex<HashMap<u64, Vec<wgpu::Buffer>>>);

impl FreeBuffers {
    pub(crate) fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        self.0.lock().ok()?.get_mut(&size)?.pop()
    }

    pub(crate) fn put(&self, buffer: wgpu::Buffer) {
        if let Ok(mut free) = self.0.lock() {
            free.entry(buffer.size()).or_default().push(buffer);
        }
    }
}

/// Where a batch's dispatches go: into a command encoder now, or into a [`Plan`] to replay.
// One per batch, so boxing the encoder variant would save nothing.
#[allow(clippy::large_enum_variant)]
enum Target {
    /// `pass` is the compute pass being recorded (consecutive dispatches share one), closed
    /// before a copy and before the encoder is submitted.
    Encoder {
        encoder: wgpu::CommandEncoder,
        pass: Option<wgpu::ComputePass<'static>>,
    },
    Plan(Vec<PlanStep>),
    /// [`Gpu::dry_batch`]: the steps are dropped.
    Discard,
}

/// Dispatches recorded into one command encoder and submitted together, so that a whole layer
/// (or a whole decode step) reaches the GPU in one submission. A batch made by [`Gpu::plan`]
/// records into a [`Plan`] instead: the ops run once, allocating their outputs and bind groups
/// once, and the plan replays the same dispatches as often as wanted.
pub struct Batch<'g> {
    gpu: &'g Gpu,
    target: Target,
    uniforms: UniformArena,
    /// When profiling: the timestamps of the dispatches encoded since the last submission.
    timestamps: Option<SubmissionTimestamps>,
    /// The buffers of this batch's dropped tensors (none in a plan, see [`Batch::tensor`]).
    free: Option<Arc<FreeBuffers>>,
}

impl Gpu {
    /// Starts recording a batch of dispatches.
    pub fn batch(&self) -> Batch<'_> {
        self.batch_with_uniform_arena(UNIFORM_ARENA_BYTES)
    }

    /// A batch whose parameter buffers hold `arena_bytes` each (tests use small ones).
    pub(crate) fn batch_with_uniform_arena(&self, arena_bytes: u64) -> Batch<'_> {
        let encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        Batch {
            gpu: self,
            target: Target::Encoder {
                encoder,
                pass: None,
            },
            uniforms: UniformArena::new(arena_bytes),
            timestamps: None,
            free: Some(Arc::default()),
        }
    }

    /// A batch that submits nothing: ops called on it check their inputs, create their pipelines
    /// (compiling them on first use), bind groups and outputs as [`Gpu::batch`]'s do, and their
    /// dispatches and copies are dropped ([`Batch::submit`] only reports errors). For compiling
    /// a model's kernels ahead of its first use.
    pub fn dry_batch(&self) -> Batch<'_> {
        Batch {
            gpu: self,
            target: Target::Discard,
            uniforms: UniformArena::new(UNIFORM_ARENA_BYTES),
            timestamps: None,
            free: Some(Arc::default()),
        }
    }

    /// Starts recording a [`Plan`]: ops called on the returned batch allocate their outputs and
    /// bind groups now, and [`Batch::into_plan`] keeps their dispatches for replay.
    pub fn plan(&self) -> Batch<'_> {
        Batch {
            gpu: self,
            target: Target::Plan(Vec::new()),
            uniforms: UniformArena::new(UNIFORM_ARENA_BYTES),
            timestamps: None,
            free: None,
        }
    }
}

impl UniformArena {
    fn new(capacity: u64) -> Self {
        UniformArena {
            capacity,
            buffer: None,
            used: 0,
            staged: Vec::new(),
            staged_from: 0,
        }
    }
}

impl<'g> Batch<'g> {
    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// A tensor for an op of this batch to write whole (its contents are not zeroed). While the
    /// batch records commands, its buffer is one that a dropped tensor of the batch left, where
    /// one of the same size is free: commands run in the order recorded, so the op writes it
    /// after every command that read it before. A plan's tensors get buffers of their own, since
    /// its dispatches replay.
    pub fn tensor(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::in_buffer_from(self.gpu, shape, dtype, self.free.as_ref())
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
        let mut padded = params.to_vec();
        padded.resize(params.len().max(16).next_multiple_of(16), 0);
        let (uniform, offset) = self.uniforms.push(self.gpu, &padded)?;
        let params = Binding {
            buffer: &uniform,
            offset,
            size: padded.len() as u64,
        };
        let entries: Vec<(u32, Binding)> = std::iter::once(params)
            .chain(buffers.iter().copied())
            .enumerate()
            .map(|(i, b)| (i as u32, b))
            .collect();
        self.dispatch_entries(key, &entries, workgroups)
    }

    /// Packs `params` (padded to 16 bytes) with the batch's other parameters; for
    /// [`Batch::dispatch_entries`].
    pub fn params(&mut self, params: &[u8]) -> Result<Uniform> {
        let mut padded = params.to_vec();
        padded.resize(params.len().max(16).next_multiple_of(16), 0);
        let (buffer, offset) = self.uniforms.push(self.gpu, &padded)?;
        Ok(Uniform {
            buffer,
            offset,
            size: padded.len() as u64,
        })
    }

    /// [`Batch::dispatch`] with every binding given by number, its parameters (a uniform) too:
    /// planned decode kernels also bind a uniform of per-token values (position, cache length)
    /// that is rewritten before each replay.
    pub fn dispatch_entries(
        &mut self,
        key: &PipelineKey,
        entries: &[(u32, Binding<'_>)],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let pipeline = self.gpu.pipeline(key)?;
        for (_, b) in entries {
            if b.size > self.gpu.max_binding() {
                return Err(GpuError::TooLarge {
                    bytes: b.size,
                    limit: self.gpu.max_binding(),
                    what: "max_storage_buffer_binding_size",
                });
            }
        }
        let entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .map(|&(binding, b)| wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: NonZeroU64::new(b.size.next_multiple_of(4)),
                }),
            })
            .collect();
        self.gpu.counters.add(&self.gpu.counters.bind_groups, 1);
        let bind_group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(key.entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
        let step = PlanStep::Dispatch {
            pipeline,
            bind_group,
            workgroups,
            kernel: self.gpu.profiler.as_ref().map(|_| key.describe()),
        };
        match &mut self.target {
            Target::Plan(steps) => steps.push(step),
            Target::Encoder { .. } => self.encode(&step)?,
            Target::Discard => {}
        }
        Ok(())
    }

    /// Records a buffer-to-buffer copy.
    pub fn copy(&mut self, src: Binding<'_>, dst: Binding<'_>) {
        let step = PlanStep::Copy {
            src: src.buffer.clone(),
            src_offset: src.offset,
            dst: dst.buffer.clone(),
            dst_offset: dst.offset,
            size: src.size,
        };
        match &mut self.target {
            Target::Plan(steps) => steps.push(step),
            Target::Encoder { .. } => self.encode_untimed(&step),
            Target::Discard => {}
        }
    }

    /// Records the dispatches (and copies) of `plan`.
    pub fn run(&mut self, plan: &Plan) -> Result<()> {
        if !std::ptr::eq(plan.gpu_id, self.gpu) {
            return Err(GpuError::Validation(
                "a plan ran on another device than it was made for".into(),
            ));
        }
        for step in &plan.steps {
            match &mut self.target {
                Target::Plan(steps) => steps.push(step.clone()),
                Target::Encoder { .. } => self.encode(step)?,
                Target::Discard => {}
            }
        }
        Ok(())
    }

    /// Copies `size` bytes of `src` into `dst`, a buffer the host maps ([`Readback`]).
    pub fn copy_to_host(&mut self, src: Binding<'_>, dst: &Readback) {
        self.copy(
            src,
            Binding {
                buffer: &dst.buffer,
                offset: 0,
                size: src.size,
            },
        );
    }

    fn encode(&mut self, step: &PlanStep) -> Result<()> {
        if let PlanStep::Dispatch {
            kernel: Some(kernel),
            ..
        } = step
        {
            return self.encode_timed(step, kernel.clone());
        }
        self.encode_untimed(step);
        Ok(())
    }

    fn encode_untimed(&mut self, step: &PlanStep) {
        let Target::Encoder { encoder, pass } = &mut self.target else {
            unreachable!("encoding a plan")
        };
        match step {
            PlanStep::Dispatch {
                pipeline,
                bind_group,
                workgroups,
                ..
            } => {
                let pass = pass.get_or_insert_with(|| {
                    self.gpu.counters.add(&self.gpu.counters.passes, 1);
                    encoder
                        .begin_compute_pass(&wgpu::ComputePassDescriptor::default())
                        .forget_lifetime()
                });
                self.gpu.counters.add(&self.gpu.counters.dispatches, 1);
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, bind_group, &[]);
                pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
            }
            PlanStep::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                size,
            } => {
                // A copy cannot happen inside a compute pass.
                *pass = None;
                encoder.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size);
            }
        }
    }

    /// Encodes a dispatch in a compute pass of its own whose beginning and end are timestamped
    /// (profiling), submitting first when this submission's timestamps are all used.
    fn encode_timed(&mut self, step: &PlanStep, kernel: String) -> Result<()> {
        let PlanStep::Dispatch {
            pipeline,
            bind_group,
            workgroups,
            ..
        } = step
        else {
            unreachable!("only dispatches are timed")
        };
        if self
            .timestamps
            .as_ref()
            .is_some_and(SubmissionTimestamps::is_full)
        {
            self.flush()?;
        }
        if self.timestamps.is_none() {
            self.timestamps = Some(SubmissionTimestamps::new(self.gpu)?);
        }
        let (Target::Encoder { encoder, pass }, Some(timestamps)) =
            (&mut self.target, &mut self.timestamps)
        else {
            unreachable!("encoding a plan")
        };
        *pass = None;
        self.gpu.counters.add(&self.gpu.counters.passes, 1);
        self.gpu.counters.add(&self.gpu.counters.dispatches, 1);
        let mut timed = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: Some(timestamps.next(kernel)),
        });
        timed.set_pipeline(pipeline);
        timed.set_bind_group(0, bind_group, &[]);
        timed.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        Ok(())
    }

    /// Ends recording into a plan (see [`Gpu::plan`]).
    pub fn into_plan(mut self) -> Result<Plan> {
        self.uniforms.upload(self.gpu);
        let Target::Plan(steps) = std::mem::replace(&mut self.target, Target::Plan(Vec::new()))
        else {
            return Err(GpuError::Validation(
                "into_plan on a batch that encodes commands".into(),
            ));
        };
        self.gpu.check()?;
        Ok(Plan {
            steps,
            gpu_id: self.gpu,
        })
    }

    /// The commands recorded so far, with the parameters they read written to the GPU, and the
    /// timestamps they write when profiling.
    fn finish_encoder(&mut self) -> Result<(wgpu::CommandBuffer, Option<SubmissionTimestamps>)> {
        let fresh = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        let target = std::mem::replace(
            &mut self.target,
            Target::Encoder {
                encoder: fresh,
                pass: None,
            },
        );
        self.uniforms.upload(self.gpu);
        let timestamps = self.timestamps.take();
        match target {
            Target::Encoder { mut encoder, pass } => {
                drop(pass);
                if let Some(timestamps) = &timestamps {
                    timestamps.resolve(&mut encoder);
                }
                Ok((encoder.finish(), timestamps))
            }
            Target::Plan(_) | Target::Discard => Err(GpuError::Validation(
                "submitting a batch that records a plan or submits nothing".into(),
            )),
        }
    }

    /// Submits what was recorded so far and goes on with a fresh encoder. Long forward passes
    /// flush between layers so that the intermediate buffers of one layer can be freed before
    /// the next is recorded.
    pub fn flush(&mut self) -> Result<()> {
        if matches!(self.target, Target::Discard) {
            return self.gpu.check();
        }
        #[cfg_attr(target_arch = "wasm32", allow(unused_variables))]
        let (commands, timestamps) = self.finish_encoder()?;
        self.gpu.submit([commands]);
        // Timestamps are asked for natively only (Gpu::from_adapter).
        #[cfg(not(target_arch = "wasm32"))]
        if let (Some(timestamps), Some(profiler)) = (timestamps, &self.gpu.profiler) {
            timestamps.collect(self.gpu, profiler)?;
        }
        self.gpu.check()
    }

    /// Submits everything recorded and reports any error wgpu raised while recording.
    pub fn submit(mut self) -> Result<()> {
        self.flush()
    }
}

/// A uniform buffer range: kernel parameters packed by [`Batch::params`], or a small buffer of its
/// own that is rewritten between submissions ([`Uniform::new`]).
pub struct Uniform {
    buffer: wgpu::Buffer,
    offset: u64,
    size: u64,
}

impl Uniform {
    /// A uniform buffer of `size` bytes (a multiple of 16) of its own, written with [`Uniform::write`].
    pub fn new(gpu: &Gpu, size: u64) -> Result<Uniform> {
        let size = size.max(16).next_multiple_of(16);
        let buffer = gpu.create_buffer(
            size,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(Uniform {
            buffer,
            offset: 0,
            size,
        })
    }

    pub fn binding(&self) -> Binding<'_> {
        Binding {
            buffer: &self.buffer,
            offset: self.offset,
            size: self.size,
        }
    }

    /// Writes `bytes` at the start of the range; the next submission sees them.
    pub fn write(&self, gpu: &Gpu, bytes: &[u8]) {
        gpu.write(&self.buffer, self.offset, bytes);
    }
}

/// One recorded command of a [`Plan`].
#[derive(Clone)]
enum PlanStep {
    Dispatch {
        pipeline: Arc<wgpu::ComputePipeline>,
        bind_group: wgpu::BindGroup,
        workgroups: [u32; 3],
        /// The kernel's name when the device profiles ([`PipelineKey::describe`]).
        kernel: Option<String>,
    },
    Copy {
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    },
}

/// Dispatches recorded once, with their pipelines, bind groups and parameters, and replayed by
/// [`Batch::run`] without creating anything: the decode step of a chat is one plan.
pub struct Plan {
    steps: Vec<PlanStep>,
    /// The device the plan's bind groups belong to (compared by address only).
    gpu_id: *const Gpu,
}

// The raw pointer is an identity, never dereferenced.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

impl Plan {
    /// Number of dispatches per replay.
    pub fn dispatches(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, PlanStep::Dispatch { .. }))
            .count()
    }
}

/// A small buffer the host reads back after each submission (a sampled token id), made once and
/// reused: no staging buffer is created per read.
pub struct Readback {
    buffer: wgpu::Buffer,
    size: u64,
}

impl Readback {
    pub fn new(gpu: &Gpu, size: u64) -> Result<Readback> {
        let size = size.next_multiple_of(4);
        let buffer = gpu.create_buffer(
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(Readback { buffer, size })
    }

    /// Waits for the submissions that wrote this buffer and returns its bytes (see
    /// [`map_read`]).
    pub async fn read(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let bytes = map_read(gpu, &self.buffer, self.buffer.size()).await?;
        gpu.counters.add(&gpu.counters.bytes_read, self.size);
        Ok(bytes)
    }
}

/// The first `bytes` of a MAP_READ `buffer`, once the submissions that wrote it are done.
/// Natively this blocks on the device; on the web it awaits `mapAsync`.
pub(crate) async fn map_read(gpu: &Gpu, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
    let (tx, rx) = futures_channel::oneshot::channel();
    buffer
        .slice(..bytes)
        .map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
    #[cfg(not(target_arch = "wasm32"))]
    gpu.device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        })
        .map_err(|e| GpuError::Readback(e.to_string()))?;
    let mapped = rx
        .await
        .map_err(|_| GpuError::Readback("map callback dropped".into()));
    gpu.check()?;
    mapped?.map_err(|e| GpuError::Readback(e.to_string()))?;
    let view = buffer
        .get_mapped_range(..bytes)
        .map_err(|e| GpuError::Readback(e.to_string()))?;
    let out = view.to_vec();
    drop(view);
    buffer.unmap();
    Ok(out)
}

/// What a device has done since it was opened; subtract two snapshots for what happened in
/// between. Counted where this crate creates or submits something, so work done through
/// `device()`/`queue()` directly is not seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Compute dispatches recorded.
    pub dispatches: u64,
    /// Compute passes begun (consecutive dispatches share one).
    pub passes: u64,
    pub submits: u64,
    pub buffers_created: u64,
    pub bind_groups_created: u64,
    /// Bytes written to the GPU through the queue (uploads and parameters).
    pub bytes_written: u64,
    /// Bytes copied back to the host.
    pub bytes_read: u64,
    /// Compute pipelines compiled (each [`crate::registry::PipelineKey`] once per device).
    pub pipelines_created: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            dispatches: self.dispatches - o.dispatches,
            passes: self.passes - o.passes,
            submits: self.submits - o.submits,
            buffers_created: self.buffers_created - o.buffers_created,
            bind_groups_created: self.bind_groups_created - o.bind_groups_created,
            bytes_written: self.bytes_written - o.bytes_written,
            bytes_read: self.bytes_read - o.bytes_read,
            pipelines_created: self.pipelines_created - o.pipelines_created,
        }
    }
}

#[derive(Default)]
pub(crate) struct CounterCells {
    dispatches: AtomicU64,
    passes: AtomicU64,
    submits: AtomicU64,
    buffers: AtomicU64,
    bind_groups: AtomicU64,
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
}

impl CounterCells {
    fn add(&self, cell: &AtomicU64, n: u64) {
        cell.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self, pipelines_created: u64) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            dispatches: get(&self.dispatches),
            passes: get(&self.passes),
            submits: get(&self.submits),
            buffers_created: get(&self.buffers),
            bind_groups_created: get(&self.bind_groups),
            bytes_written: get(&self.bytes_written),
            bytes_read: get(&self.bytes_read),
            pipelines_created,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::elementwise::add;
    use crate::ops::matmul::{LinearEpilogue, LinearKernel, linear_windowed};
    use crate::testing::{assert_close, gpu, random};
    use crate::{DType, Tensor};

    /// A dry batch compiles its kernels and runs nothing: the real batch after it compiles
    /// nothing more, and the dry one's output stays unwritten.
    #[test]
    fn a_dry_batch_compiles_kernels_and_submits_nothing() {
        // A device of its own: its pipeline cache starts empty.
        let gpu = &crate::Gpu::new_blocking().unwrap();
        let (a, b) = (random(300, 1), random(300, 2));
        let ta = Tensor::from_f32(gpu, &[300], &a).unwrap();
        let tb = Tensor::from_f32(gpu, &[300], &b).unwrap();
        let before = gpu.counters();
        let mut dry = gpu.dry_batch();
        let unwritten = add(&mut dry, &ta, &tb).unwrap();
        dry.submit().unwrap();
        let dried = gpu.counters() - before;
        assert_eq!(
            (dried.pipelines_created, dried.dispatches, dried.submits),
            (1, 0, 0)
        );
        let mut batch = gpu.batch();
        let sum = add(&mut batch, &ta, &tb).unwrap();
        batch.submit().unwrap();
        let ran = gpu.counters() - before - dried;
        assert_eq!(
            (ran.pipelines_created, ran.dispatches, ran.submits),
            (0, 1, 1)
        );
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_close(
            &pollster::block_on(sum.to_f32(gpu)).unwrap(),
            &want,
            0.0,
            "add",
        );
        let untouched = pollster::block_on(unwritten.to_f32(gpu)).unwrap();
        assert!(untouched.iter().all(|&x| x == 0.0), "the dry batch ran");
    }

    /// `finished` resolves only once the queue holds nothing: a vision tower's time measured up to
    /// it includes its GPU work.
    #[test]
    fn finished_waits_for_submitted_work() {
        // A device of its own: the shared one takes other tests' work meanwhile.
        let gpu = &crate::Gpu::new_blocking().unwrap();
        let (m, k, n) = (64, 512, 256);
        let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, 3)).unwrap();
        let w = Tensor::from_f32(gpu, &[n, k], &random(n * k, 4)).unwrap();
        let mut batch = gpu.batch();
        let y = crate::ops::matmul::linear(&mut batch, &x, &w, None).unwrap();
        batch.submit().unwrap();
        pollster::block_on(gpu.finished()).unwrap();
        let status = gpu.device().poll(wgpu::PollType::Poll).unwrap();
        assert!(status.is_queue_empty(), "{status:?}");
        assert_eq!(y.shape(), &[m, n]);
    }

    /// A batch's ops write into the buffers of its dropped tensors: a chain of eight additions
    /// that drops each sum once the next is recorded needs two output buffers, and still adds up
    /// right; a plan's eight sums each keep their own.
    #[test]
    fn a_batch_reuses_the_buffers_of_dropped_tensors_and_a_plan_does_not() {
        // A device of its own, so that its counters see only this test's work.
        let gpu = &crate::Gpu::new_blocking().unwrap();
        let n = 1000;
        let (x, a) = (random(n, 5), random(n, 6));
        let tx = Tensor::from_f32(gpu, &[n], &x).unwrap();
        let ta = Tensor::from_f32(gpu, &[n], &a).unwrap();
        let sum_of_eight = |batch: &mut crate::Batch| {
            let mut h = add(batch, &tx, &ta).unwrap();
            for _ in 1..8 {
                h = add(batch, &h, &ta).unwrap();
            }
            h
        };

        let before = gpu.counters();
        let mut batch = gpu.batch();
        let h = sum_of_eight(&mut batch);
        batch.submit().unwrap();
        let created = (gpu.counters() - before).buffers_created;
        // Two sums alive at a time, and the batch's one parameter buffer.
        assert_eq!(created, 2 + 1);
        let want: Vec<f32> = x.iter().zip(&a).map(|(x, a)| x + 8.0 * a).collect();
        assert_close(
            &pollster::block_on(h.to_f32(gpu)).unwrap(),
            &want,
            1e-5,
            "batch",
        );

        let before = gpu.counters();
        let mut plan = gpu.plan();
        let h = sum_of_eight(&mut plan);
        let plan = plan.into_plan().unwrap();
        assert_eq!((gpu.counters() - before).buffers_created, 8 + 1);
        let mut batch = gpu.batch();
        batch.run(&plan).unwrap();
        batch.submit().unwrap();
        assert_close(
            &pollster::block_on(h.to_f32(gpu)).unwrap(),
            &want,
            1e-5,
            "plan",
        );
    }

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
        let row_bytes = DType::F32.data_bytes(k);
        // Windows of one row each need 256-byte offsets to fall on the storage alignment.
        let storage_align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        let window = row_bytes * (storage_align / row_bytes).max(1);
        let rows_per_window = (window / row_bytes) as usize;
        let mut batch = gpu.batch_with_uniform_arena(3 * align);
        let first = linear_windowed(
            &mut batch,
            &tx,
            &tw,
            None,
            LinearKernel::Gemv,
            LinearEpilogue::Store,
            window,
        )
        .unwrap();
        batch.flush().unwrap();
        let second = linear_windowed(
            &mut batch,
            &tx,
            &tw,
            None,
            LinearKernel::Gemm,
            LinearEpilogue::Store,
            window,
        )
        .unwrap();
        batch.submit().unwrap();
        assert!(
            n.div_ceil(rows_per_window) > 3,
            "the test needs more dispatches than slots"
        );
        let want: Vec<f32> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        for (y, what) in [
            (first, "gemv before the flush"),
            (second, "gemm after the flush"),
        ] {
            let got = pollster::block_on(y.to_f32(gpu)).unwrap();
            assert_close(&got, &want, 1e-4, what);
        }
    }
}
