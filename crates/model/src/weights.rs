//! Model weights on the GPU. Tensors are uploaded one at a time as they are read (by
//! [`crate::loader`], from files or a network stream), converted to the precision the model
//! keeps, then taken by the model's `load` functions by canonical name with a shape check.

use std::collections::HashMap;

use llava_gpu::quant::{self, quantizable};
use llava_gpu::{DType, Gpu, Tensor};

use crate::checkpoint::{Dtype, HostTensor};
use crate::error::{ModelError, Result};

/// How the large matrices of the language model are kept on the GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightPrecision {
    /// The checkpoint's own precision: f32 stays f32, f16 and bf16 become f16.
    #[default]
    Native,
    F32,
    F16,
    /// Group-quantized int8 (see `llava_gpu::quant`).
    Q8,
    /// Group-quantized int4.
    Q4,
}

/// The GPU dtype a tensor is kept in: vectors and the vision embeddings in f32; language-model
/// matrices in the chosen precision; vision and projector matrices at most down to f16 under Q4
/// (they are small, and the image features feed every answer token).
pub fn storage_dtype(name: &str, host: &HostTensor, precision: WeightPrecision) -> DType {
    storage_dtype_of(name, &host.shape, host.dtype, precision)
}

/// [`storage_dtype`] from a tensor's shape and stored dtype alone (for size plans without weights).
pub fn storage_dtype_of(name: &str, shape: &[usize], stored: Dtype, precision: WeightPrecision) -> DType {
    if shape.len() < 2 || name.starts_with("vision_model.embeddings") {
        return DType::F32;
    }
    let cols: usize = shape[1..].iter().product();
    let language = name.starts_with("model.") || name == "lm_head.weight";
    match precision {
        WeightPrecision::Native if stored == Dtype::F32 => DType::F32,
        WeightPrecision::F32 => DType::F32,
        WeightPrecision::Q8 if shape.len() == 2 && quantizable(cols) => DType::Q8,
        WeightPrecision::Q4 if shape.len() == 2 && quantizable(cols) && language => DType::Q4,
        WeightPrecision::Q4 if shape.len() == 2 && quantizable(cols) => DType::Q8,
        _ => DType::F16,
    }
}

/// Converts a host tensor to `dtype` and uploads it.
pub fn upload(gpu: &Gpu, host: &HostTensor, dtype: DType) -> Result<Tensor> {
    let t = match dtype {
        DType::F32 => Tensor::from_f32(gpu, &host.shape, &host.to_f32())?,
        DType::F16 => Tensor::from_bytes(gpu, &host.shape, DType::F16, &host.to_f16_bytes())?,
        DType::Q8 | DType::Q4 => {
            let (rows, cols) = (host.shape[0], host.shape[1]);
            Tensor::from_quant(gpu, &quant::quantize(dtype, rows, cols, &host.to_f32()))?
        }
        DType::U32 => unreachable!("storage_dtype never picks U32"),
    };
    Ok(t)
}

/// Uploaded weights by canonical name, waiting to be taken by the model.
#[derive(Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn insert(&mut self, gpu: &Gpu, name: &str, host: &HostTensor, precision: WeightPrecision) -> Result<()> {
        let tensor = upload(gpu, host, storage_dtype(name, host, precision))?;
        self.tensors.insert(name.to_string(), tensor);
        Ok(())
    }

    /// Adds a tensor already in its storage layout (from a converted folder).
    pub fn insert_tensor(&mut self, name: String, tensor: Tensor) {
        self.tensors.insert(name, tensor);
    }

    /// Takes the tensor `name`, which must have `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::checkpoint("weights", format!("tensor {name} is missing")))?;
        if t.shape() != shape {
            let msg = format!("tensor {name} has shape {:?}, expected {shape:?}", t.shape());
            return Err(ModelError::checkpoint("weights", msg));
        }
        Ok(t)
    }

    /// Whether `name` was loaded (and not yet taken).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
