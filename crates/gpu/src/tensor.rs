//! Tensors in GPU storage buffers.
//!
//! Element layouts (one place, used by every kernel):
//! - `F32`: little-endian f32, row-major.
//! - `F16`: IEEE half, row-major, two per 32-bit word (element `2i` in the low half), read in WGSL
//!   with `unpack2x16float`, so no device feature is needed. The buffer is padded to 4 bytes.
//! - `U32`: token ids and other indices.
//! - `Q8` / `Q6` / `Q4`: group-quantized 2-D weights, see [`crate::quant`]; the packed values
//!   live in the main buffer and the per-group f16 scales in a second one.

use std::sync::Arc;

use crate::context::{Binding, Gpu};
use crate::error::{GpuError, Result, shape_err};
use crate::quant::QuantMatrix;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    U32,
    Q8,
    Q6,
    Q4,
}

impl DType {
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8 | DType::Q6 | DType::Q4)
    }

    /// Values per quantization group (columns per f16 scale); 0 for unquantized dtypes.
    pub fn group_size(self) -> usize {
        match self {
            DType::Q8 => 32,
            DType::Q6 | DType::Q4 => 64,
            _ => 0,
        }
    }

    /// Bytes of the main buffer for `numel` elements (before the 4-byte padding).
    pub fn data_bytes(self, numel: usize) -> u64 {
        let n = numel as u64;
        match self {
            DType::F32 | DType::U32 => 4 * n,
            DType::F16 => 2 * n,
            DType::Q8 => n,
            DType::Q6 => n * 3 / 4,
            DType::Q4 => n / 2,
        }
    }
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A tensor in a GPU buffer. Cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: Arc<wgpu::Buffer>,
    /// Byte offset of element 0 inside `buffer` (non-zero for views).
    offset: u64,
    scales: Option<Arc<wgpu::Buffer>>,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    /// An uninitialised (zeroed) tensor.
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if dtype.is_quantized() {
            return Err(GpuError::Unsupported { op: "Tensor::empty", what: format!("{dtype:?}") });
        }
        let numel = shape.iter().product();
        let buffer = gpu.create_buffer(dtype.data_bytes(numel), STORAGE)?;
        Ok(Tensor { buffer: Arc::new(buffer), offset: 0, scales: None, shape: shape.to_vec(), dtype })
    }

    /// Uploads raw bytes in `dtype`'s layout (not for quantized tensors: see [`Tensor::from_quant`]).
    pub fn from_bytes(gpu: &Gpu, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if bytes.len() as u64 != dtype.data_bytes(numel) {
            return Err(shape_err(
                "Tensor::from_bytes",
                format!("{} bytes for {dtype:?} {shape:?} (want {})", bytes.len(), dtype.data_bytes(numel)),
            ));
        }
        let t = Tensor::empty(gpu, shape, dtype)?;
        write_padded(gpu, &t.buffer, bytes);
        Ok(t)
    }

    pub fn from_f32(gpu: &Gpu, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Tensor::from_bytes(gpu, shape, DType::F32, bytemuck::cast_slice(data))
    }

    pub fn from_f16(gpu: &Gpu, shape: &[usize], data: &[half::f16]) -> Result<Tensor> {
        Tensor::from_bytes(gpu, shape, DType::F16, bytemuck::cast_slice(data))
    }

    pub fn from_u32(gpu: &Gpu, shape: &[usize], data: &[u32]) -> Result<Tensor> {
        Tensor::from_bytes(gpu, shape, DType::U32, bytemuck::cast_slice(data))
    }

    /// Uploads a group-quantized matrix (layout in [`crate::quant`]).
    pub fn from_quant(gpu: &Gpu, q: &QuantMatrix) -> Result<Tensor> {
        let data = gpu.create_buffer(q.data.len() as u64, STORAGE)?;
        write_padded(gpu, &data, &q.data);
        let scales = gpu.create_buffer(q.scales.len() as u64 * 2, STORAGE)?;
        write_padded(gpu, &scales, bytemuck::cast_slice(&q.scales));
        Ok(Tensor {
            buffer: Arc::new(data),
            offset: 0,
            scales: Some(Arc::new(scales)),
            shape: vec![q.rows, q.cols],
            dtype: q.dtype,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Size of the last dimension.
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Number of rows when viewed as 2-D `[rows, last_dim]`.
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }
    /// `(rows, cols)` of a rank-2 tensor.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(shape_err("dims2", format!("expected a matrix, got {:?}", self.shape))),
        }
    }

    /// The same data with another shape (same number of elements).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() || self.dtype.is_quantized() {
            return Err(shape_err("reshape", format!("{:?} -> {shape:?}", self.shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), ..self.clone() })
    }

    /// Rows `start..start + count` of the tensor viewed as `[rows, last_dim]`, without a copy.
    /// The start must fall on the adapter's storage-offset alignment (256 bytes on most GPUs).
    pub fn narrow_rows(&self, gpu: &Gpu, start: usize, count: usize) -> Result<Tensor> {
        if self.dtype.is_quantized() || self.rank() < 2 || start + count > self.rows() {
            return Err(shape_err("narrow_rows", format!("rows {start}+{count} of {:?}", self.shape)));
        }
        let offset = self.offset + self.dtype.data_bytes(start * self.last_dim());
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        if offset % align != 0 {
            return Err(shape_err("narrow_rows", format!("offset {offset} not aligned to {align}")));
        }
        let shape = vec![count, self.last_dim()];
        Ok(Tensor { offset, shape, ..self.clone() })
    }

    /// Bytes of the main buffer this tensor covers.
    pub fn byte_len(&self) -> u64 {
        self.dtype.data_bytes(self.numel())
    }

    /// The main data as a storage binding.
    pub fn binding(&self) -> Binding<'_> {
        Binding { buffer: &self.buffer, offset: self.offset, size: self.byte_len().max(4) }
    }

    /// The f16 group scales of a quantized tensor.
    pub fn scales_binding(&self) -> Option<Binding<'_>> {
        self.scales.as_ref().map(|s| Binding { buffer: s, offset: 0, size: s.size() })
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Reads an F32 or F16 tensor back as f32 values.
    pub async fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let bytes = gpu.read_buffer(&self.buffer, self.offset, self.byte_len()).await?;
        match self.dtype {
            DType::F32 => Ok(bytemuck::pod_collect_to_vec(&bytes)),
            DType::F16 => Ok(bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes)
                .into_iter()
                .map(f32::from)
                .collect()),
            d => Err(GpuError::Unsupported { op: "to_f32", what: format!("{d:?}") }),
        }
    }

    pub async fn to_u32(&self, gpu: &Gpu) -> Result<Vec<u32>> {
        if self.dtype != DType::U32 {
            return Err(GpuError::Unsupported { op: "to_u32", what: format!("{:?}", self.dtype) });
        }
        let bytes = gpu.read_buffer(&self.buffer, self.offset, self.byte_len()).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// `queue.write_buffer` needs a multiple of 4 bytes.
fn write_padded(gpu: &Gpu, buffer: &wgpu::Buffer, bytes: &[u8]) {
    if bytes.len() % 4 == 0 {
        gpu.write(buffer, 0, bytes);
    } else {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4), 0);
        gpu.write(buffer, 0, &padded);
    }
}
