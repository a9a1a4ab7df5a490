//! Tensors in GPU storage buffers.
//!
//! Element layouts (one place, used by every kernel):
//! - `F32`: little-endian f32, row-major.
//! - `F16`: IEEE half, row-major, two per 32-bit word (element `2i` in the low half), read in WGSL
//!   with `unpack2x16float`, so no device feature is needed. The buffer is padded to 4 bytes.
//! - `U32`: token ids and other indices.
//! - `Q8` / `Q6` / `Q4`: group-quantized 2-D weights, see [`crate::quant`]; the packed values
//!   and, after them at an aligned offset, the per-group f16 scales share one buffer.
//!
//! Several weights can share one buffer ([`Tensor::pack`]): the decode step's fused kernels read
//! q and k (or gate and up) through one binding.

use std::sync::{Arc, Weak};

use crate::context::{Batch, Binding, FreeBuffers, Gpu};
use crate::error::{GpuError, Result, shape_err};
use crate::quant::QuantMatrix;
use serde::{Deserialize, Serialize};

/// Element types of GPU tensors; also the storage kinds a converted model's manifest names
/// ("f32", "f16", "q8", "q6", "q4").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

    /// The columns of a quantized matrix whose packed rows hold `packed` bytes; `None` for
    /// unquantized dtypes and for byte counts no row of this dtype has.
    pub fn cols_from_packed(self, packed: usize) -> Option<usize> {
        match self {
            DType::Q8 => Some(packed),
            DType::Q6 => packed
                .is_multiple_of(3)
                .then(|| (packed / 3).checked_mul(4))
                .flatten(),
            DType::Q4 => packed.checked_mul(2),
            DType::F32 | DType::F16 | DType::U32 => None,
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

    /// Bytes of the buffer a tensor of `shape` takes (a quantized matrix: its data, then its f16
    /// group scales at an offset aligned to `scales_align`, as [`Tensor::from_quant`] places
    /// them), or `None` when that overflows u64. A model's needs are checked with it before any
    /// weight is read.
    pub fn buffer_bytes(self, shape: &[usize], scales_align: u64) -> Option<u64> {
        let numel = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))?;
        let data = match self {
            DType::F32 | DType::U32 => numel.checked_mul(4)?,
            DType::F16 => numel.checked_mul(2)?,
            DType::Q8 => numel,
            DType::Q6 => numel.checked_mul(3)? / 4,
            DType::Q4 => numel / 2,
        };
        let bytes = if self.is_quantized() {
            let scales = (numel / self.group_size() as u64).checked_mul(2)?;
            data.checked_next_multiple_of(scales_align.max(1))?
                .checked_add(scales)?
        } else {
            data
        };
        // `Gpu::create_buffer` pads every buffer to a whole number of 4-byte words.
        bytes.max(4).checked_next_multiple_of(4)
    }
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A tensor's buffer. One that [`Batch::tensor`] made goes back to that batch's free buffers when
/// the last tensor using it is dropped, for a later op of the batch to write.
#[derive(Debug)]
struct TensorBuffer {
    buffer: wgpu::Buffer,
    free: Weak<FreeBuffers>,
}

impl std::ops::Deref for TensorBuffer {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for TensorBuffer {
    fn drop(&mut self) {
        if let Some(free) = self.free.upgrade() {
            free.put(self.buffer.clone());
        }
    }
}

impl TensorBuffer {
    fn owned(buffer: wgpu::Buffer) -> Arc<TensorBuffer> {
        Arc::new(TensorBuffer {
            buffer,
            free: Weak::new(),
        })
    }
}

/// A tensor in a GPU buffer. Cloning shares the buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: Arc<TensorBuffer>,
    /// Byte offset of element 0 inside `buffer` (non-zero for views).
    offset: u64,
    /// Byte offset of the f16 group scales inside `buffer` (quantized tensors only).
    scales: Option<u64>,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    /// A zeroed tensor in a buffer of its own.
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::in_buffer_from(gpu, shape, dtype, None)
    }

    /// A tensor whose buffer is taken from `free` where one of its size is there (its contents
    /// are then what an earlier tensor left), else created; either way it goes back to `free`
    /// when dropped. For [`Batch::tensor`].
    pub(crate) fn in_buffer_from(
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        free: Option<&Arc<FreeBuffers>>,
    ) -> Result<Tensor> {
        if dtype.is_quantized() {
            return Err(GpuError::Unsupported {
                op: "Tensor::empty",
                what: format!("{dtype:?}"),
            });
        }
        let numel = shape.iter().product();
        let bytes = dtype.data_bytes(numel);
        let reused = free.and_then(|f| f.take(Gpu::buffer_size(bytes)));
        let buffer = match reused {
            Some(b) => b,
            None => gpu.create_buffer(bytes, STORAGE)?,
        };
        Ok(Tensor {
            buffer: Arc::new(TensorBuffer {
                buffer,
                free: free.map_or_else(Weak::new, Arc::downgrade),
            }),
            offset: 0,
            scales: None,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// Uploads raw bytes in `dtype`'s layout (not for quantized tensors: see [`Tensor::from_quant`]).
    pub fn from_bytes(gpu: &Gpu, shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if bytes.len() as u64 != dtype.data_bytes(numel) {
            return Err(shape_err(
                "Tensor::from_bytes",
                format!(
                    "{} bytes for {dtype:?} {shape:?} (want {})",
                    bytes.len(),
                    dtype.data_bytes(numel)
                ),
            ));
        }
        let t = Tensor::empty(gpu, shape, dtype)?;
        write_padded(gpu, &t.buffer, 0, bytes);
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
        let scales_at = aligned(gpu, q.data.len() as u64);
        let buffer = gpu.create_buffer(scales_at + q.scales.len() as u64 * 2, STORAGE)?;
        write_padded(gpu, &buffer, 0, &q.data);
        write_padded(gpu, &buffer, scales_at, bytemuck::cast_slice(&q.scales));
        Ok(Tensor {
            buffer: TensorBuffer::owned(buffer),
            offset: 0,
            scales: Some(scales_at),
            shape: vec![q.rows, q.cols],
            dtype: q.dtype,
        })
    }

    /// Moves `tensors` into one new buffer (each part at an aligned offset) and returns views of
    /// it in the same order, so that one binding covers them all. The copies are submitted here;
    /// the old buffers are freed once the caller drops the originals.
    pub fn pack(gpu: &Gpu, tensors: &[&Tensor]) -> Result<Vec<Tensor>> {
        let mut size = 0;
        let mut places = Vec::with_capacity(tensors.len());
        for t in tensors {
            let data = size;
            size = aligned(gpu, data + t.byte_len());
            let scales = t.scales_binding().map(|s| {
                let at = size;
                size = aligned(gpu, at + s.size);
                at
            });
            places.push((data, scales));
        }
        let buffer = TensorBuffer::owned(gpu.create_buffer(size, STORAGE)?);
        let mut batch = gpu.batch();
        let packed = tensors
            .iter()
            .zip(places)
            .map(|(t, (data, scales))| {
                let whole = Binding {
                    buffer: &buffer,
                    offset: 0,
                    size,
                };
                batch.copy(
                    t.binding().with_size(t.byte_len().next_multiple_of(4)),
                    whole.slice(data, 0),
                );
                if let (Some(src), Some(at)) = (t.scales_binding(), scales) {
                    batch.copy(
                        src.with_size(src.size.next_multiple_of(4)),
                        whole.slice(at, 0),
                    );
                }
                Tensor {
                    buffer: buffer.clone(),
                    offset: data,
                    scales,
                    shape: t.shape.clone(),
                    dtype: t.dtype,
                }
            })
            .collect();
        batch.submit()?;
        Ok(packed)
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
            _ => Err(shape_err(
                "dims2",
                format!("expected a matrix, got {:?}", self.shape),
            )),
        }
    }

    /// The same data with another shape (same number of elements).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() || self.dtype.is_quantized() {
            return Err(shape_err(
                "reshape",
                format!("{:?} -> {shape:?}", self.shape),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// Rows `start..start + count` of the tensor viewed as `[rows, last_dim]`, without a copy.
    /// The start must fall on the adapter's storage-offset alignment (256 bytes on most GPUs).
    pub fn narrow_rows(&self, gpu: &Gpu, start: usize, count: usize) -> Result<Tensor> {
        if self.dtype.is_quantized() || self.rank() < 2 || start + count > self.rows() {
            return Err(shape_err(
                "narrow_rows",
                format!("rows {start}+{count} of {:?}", self.shape),
            ));
        }
        let offset = self.offset + self.dtype.data_bytes(start * self.last_dim());
        let align = gpu.limits().min_storage_buffer_offset_alignment as u64;
        if !offset.is_multiple_of(align) {
            return Err(shape_err(
                "narrow_rows",
                format!("offset {offset} not aligned to {align}"),
            ));
        }
        let shape = vec![count, self.last_dim()];
        Ok(Tensor {
            offset,
            shape,
            ..self.clone()
        })
    }

    /// The `shape` tensor of this tensor's dtype starting `offset` bytes into it, without a copy
    /// (for an op that writes several outputs into one buffer; the caller keeps the view inside
    /// the tensor and its offset on the storage-offset alignment).
    pub(crate) fn view(&self, offset: u64, shape: &[usize]) -> Tensor {
        debug_assert!(offset + self.dtype.data_bytes(shape.iter().product()) <= self.byte_len());
        Tensor {
            offset: self.offset + offset,
            shape: shape.to_vec(),
            ..self.clone()
        }
    }

    /// Copies rows `src_start..src_start + count` of `src` into `dst` from row `dst_start`, both
    /// viewed as `[rows, last_dim]` (same dtype and row width). Unlike [`Tensor::narrow_rows`]
    /// any row may start the range: a buffer copy needs only 4-byte aligned rows.
    pub fn copy_rows(
        batch: &mut Batch,
        src: &Tensor,
        src_start: usize,
        dst: &Tensor,
        dst_start: usize,
        count: usize,
    ) -> Result<()> {
        let bad = |why: String| {
            Err(shape_err(
                "copy_rows",
                format!(
                    "rows {src_start}+{count} of {:?} {:?} to row {dst_start} of {:?} {:?}: {why}",
                    src.shape, src.dtype, dst.shape, dst.dtype
                ),
            ))
        };
        if src.dtype != dst.dtype || src.dtype.is_quantized() || src.last_dim() != dst.last_dim() {
            return bad("rows of one unquantized dtype and width are needed".into());
        }
        if src_start + count > src.rows() || dst_start + count > dst.rows() {
            return bad("out of range".into());
        }
        let row = src.dtype.data_bytes(src.last_dim());
        if !row.is_multiple_of(4) {
            return bad(format!("rows of {row} bytes are not 4-byte aligned"));
        }
        if count > 0 {
            let bytes = row * count as u64;
            batch.copy(
                src.binding().slice(row * src_start as u64, bytes),
                dst.binding().slice(row * dst_start as u64, bytes),
            );
        }
        Ok(())
    }

    /// Bytes of the main buffer this tensor covers.
    pub fn byte_len(&self) -> u64 {
        self.dtype.data_bytes(self.numel())
    }

    /// The main data as a storage binding.
    pub fn binding(&self) -> Binding<'_> {
        Binding {
            buffer: &self.buffer,
            offset: self.offset,
            size: self.byte_len().max(4),
        }
    }

    /// The f16 group scales of a quantized tensor.
    pub fn scales_binding(&self) -> Option<Binding<'_>> {
        let groups = self.numel() / self.dtype.group_size().max(1);
        self.scales.map(|at| Binding {
            buffer: &self.buffer,
            offset: at,
            size: groups as u64 * 2,
        })
    }

    /// Whether `other` lives in the same buffer (see [`Tensor::pack`]).
    pub fn shares_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }

    /// Byte offsets of the data and of the scales (0 when unquantized) inside the buffer.
    pub fn offsets(&self) -> (u64, u64) {
        (self.offset, self.scales.unwrap_or(0))
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Reads an F32 or F16 tensor back as f32 values.
    pub async fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let bytes = gpu
            .read_buffer(&self.buffer, self.offset, self.byte_len())
            .await?;
        match self.dtype {
            DType::F32 => Ok(bytemuck::pod_collect_to_vec(&bytes)),
            DType::F16 => Ok(bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes)
                .into_iter()
                .map(f32::from)
                .collect()),
            d => Err(GpuError::Unsupported {
                op: "to_f32",
                what: format!("{d:?}"),
            }),
        }
    }

    pub async fn to_u32(&self, gpu: &Gpu) -> Result<Vec<u32>> {
        if self.dtype != DType::U32 {
            return Err(GpuError::Unsupported {
                op: "to_u32",
                what: format!("{:?}", self.dtype),
            });
        }
        let bytes = gpu
            .read_buffer(&self.buffer, self.offset, self.byte_len())
            .await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// `queue.write_buffer` needs a multiple of 4 bytes.
fn write_padded(gpu: &Gpu, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
    if bytes.len().is_multiple_of(4) {
        gpu.write(buffer, offset, bytes);
    } else {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4), 0);
        gpu.write(buffer, offset, &padded);
    }
}

/// `bytes` rounded up to the storage-binding offset alignment.
fn aligned(gpu: &Gpu, bytes: u64) -> u64 {
    bytes.next_multiple_of(gpu.storage_align())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows land where a host-side copy puts them; mismatched or out-of-range rows are refused.
    #[test]
    fn copy_rows_moves_whole_rows() {
        let gpu = Gpu::new_blocking().expect("a wgpu adapter");
        let src_values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let src = Tensor::from_f32(&gpu, &[4, 3], &src_values).unwrap();
        let dst = Tensor::from_f32(&gpu, &[2, 2, 3], &[-1.0; 12]).unwrap();
        let mut batch = gpu.batch();
        Tensor::copy_rows(&mut batch, &src, 1, &dst, 2, 2).unwrap();
        batch.submit().unwrap();
        let mut want = vec![-1.0; 12];
        want[6..12].copy_from_slice(&src_values[3..9]);
        assert_eq!(pollster::block_on(dst.to_f32(&gpu)).unwrap(), want);

        let mut batch = gpu.batch();
        let wide = Tensor::from_f32(&gpu, &[2, 6], &[0.0; 12]).unwrap();
        for (from, to, start, count) in
            [(&src, &dst, 3, 2), (&src, &dst, 0, 5), (&src, &wide, 0, 1)]
        {
            let msg = Tensor::copy_rows(&mut batch, from, start, to, 0, count)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("copy_rows"), "{msg}");
        }
        let odd = Tensor::from_f16(&gpu, &[2, 3], &[half::f16::ZERO; 6]).unwrap();
        let msg = Tensor::copy_rows(&mut batch, &odd, 0, &odd, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not 4-byte aligned"), "{msg}");
    }

    /// The size a model's needs are checked with is the size an upload allocates.
    #[test]
    fn buffer_bytes_is_what_an_upload_allocates() {
        let gpu = Gpu::new_blocking().expect("a wgpu adapter");
        let (rows, cols) = (3, 192);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        for dtype in [DType::Q8, DType::Q6, DType::Q4] {
            let t = Tensor::from_quant(&gpu, &crate::quant::quantize(dtype, rows, cols, &values))
                .unwrap();
            assert_eq!(
                dtype.buffer_bytes(&[rows, cols], gpu.storage_align()),
                Some(t.buffer.size()),
                "{dtype:?}"
            );
        }
        for dtype in [DType::F32, DType::F16] {
            let t = Tensor::empty(&gpu, &[rows, cols], dtype).unwrap();
            assert_eq!(
                dtype.buffer_bytes(&[rows, cols], gpu.storage_align()),
                Some(t.buffer.size()),
                "{dtype:?}"
            );
        }
        assert_eq!(DType::F16.buffer_bytes(&[usize::MAX, 3], 256), None);
    }

    #[test]
    fn packed_widths_that_overflow_have_no_columns() {
        assert_eq!(DType::Q4.cols_from_packed(6), Some(12));
        assert_eq!(DType::Q6.cols_from_packed(6), Some(8));
        assert_eq!(DType::Q6.cols_from_packed(7), None);
        assert_eq!(DType::Q4.cols_from_packed(usize::MAX), None);
        assert_eq!(DType::Q6.cols_from_packed(usize::MAX / 3 * 3), None);
        assert_eq!(DType::F16.cols_from_packed(6), None);
    }
}
