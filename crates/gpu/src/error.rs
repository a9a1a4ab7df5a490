//! Errors of the GPU core. wgpu reports validation errors and device loss through callbacks;
//! [`crate::Gpu`] collects them and turns them into these values instead of panicking.

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter found (WebGPU unavailable or no Vulkan/Metal/DX12 driver)")]
    NoAdapter,
    #[error("could not open the GPU device: {0}")]
    RequestDevice(String),
    #[error("GPU validation error: {0}")]
    Validation(String),
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
    #[error("reading back from the GPU failed: {0}")]
    Readback(String),
    #[error("shape error in {op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op} does not support {what}")]
    Unsupported { op: &'static str, what: String },
    /// `what`: the WebGPU limit exceeded.
    #[error("a GPU buffer of {bytes} bytes exceeds this GPU's {what} of {limit} bytes")]
    TooLarge {
        bytes: u64,
        limit: u64,
        what: &'static str,
    },
}

pub type Result<T, E = GpuError> = std::result::Result<T, E>;

/// Shorthand for a shape error inside an op.
pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> GpuError {
    GpuError::Shape {
        op,
        msg: msg.into(),
    }
}
