//! Model weights on the GPU. Tensors are uploaded one at a time as they are read (by
//! [`crate::files::loader`], from files or a network stream), converted to the precision the model
//! keeps, then taken by the model's `load` functions by canonical name with a shape check.

use std::collections::HashMap;

use llava_gpu::quant::{self, quantizable};
use llava_gpu::{DType, Gpu, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::files::checkpoint::{Dtype, HostTensor};

/// How the large matrices of the language model are kept on the GPU. Its names ("native",
/// "f32", "f16", "q8", "q4") are a manifest's `quant.precision`, the `llava` command's `--quant`
/// and the JS package's `precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightPrecision {
    /// The checkpoint's own precision: f32 stays f32, f16 and bf16 become f16.
    #[default]
    Native,
    F32,
    F16,
    /// Group-quantized int8 (see `llava_gpu::quant`).
    Q8,
    /// Group-quantized 4-bit, with the attention value/output matrices and the token embeddings
    /// at 6 bits (see [`storage_dtype_keeping`]).
    Q4,
}

/// What the vision tower and projector, or the vocabulary matrices (`lm_head` and
/// `model.embed_tokens`), are kept in instead of the default (`llava convert --keep-vision`,
/// `--keep-lm-head`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepPrecision {
    F16,
    Q8,
}

/// Gives a precision enum its names: `NAMED` (each value and how it is spelt), `name`,
/// `FromStr` (an error lists the names) and `Display`, so the command line, the JS package and
/// the files share one vocabulary.
macro_rules! named_precision {
    ($ty:ident, $what:literal, [$(($variant:ident, $name:literal)),+ $(,)?]) => {
        impl $ty {
            pub const NAMED: &'static [($ty, &'static str)] = &[$(($ty::$variant, $name)),+];

            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = ModelError;

            fn from_str(name: &str) -> Result<Self> {
                Self::NAMED
                    .iter()
                    .find(|&&(_, n)| n == name)
                    .map(|&(value, _)| value)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Self::NAMED.iter().map(|&(_, n)| n).collect();
                        ModelError::Input(format!(
                            "{} `{name}` is not one of {}",
                            $what,
                            names.join(", ")
                        ))
                    })
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}
pub(crate) use named_precision;

named_precision!(
    WeightPrecision,
    "weight precision",
    [
        (Native, "native"),
        (F32, "f32"),
        (F16, "f16"),
        (Q8, "q8"),
        (Q4, "q4")
    ]
);
named_precision!(KeepPrecision, "kept precision", [(F16, "f16"), (Q8, "q8")]);

/// Per-part overrides of the default storage; `None` keeps the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepOptions {
    pub vision: Option<KeepPrecision>,
    pub lm_head: Option<KeepPrecision>,
}

/// The GPU dtype a tensor is kept in (the default choices, as quantize-on-load uses them).
pub fn storage_dtype(name: &str, host: &HostTensor, precision: WeightPrecision) -> DType {
    storage_dtype_of(name, &host.shape, host.dtype, precision)
}

/// [`storage_dtype`] from a tensor's shape and stored dtype alone (for size plans without weights).
pub fn storage_dtype_of(
    name: &str,
    shape: &[usize],
    stored: Dtype,
    precision: WeightPrecision,
) -> DType {
    storage_dtype_keeping(name, shape, stored, precision, KeepOptions::default())
}

/// The GPU dtype of a tensor. Vectors and the vision embeddings: f32. Under F32 (and Native on
/// an f32 checkpoint) everything is f32. Otherwise by part (measured in
/// docs/converted-format.md, "Quality"):
/// - language-model linear layers: the chosen precision (f16 unless Q8 or Q4); under Q4 the
///   attention value and output matrices are Q6 (their errors add up along the residual stream:
///   at Q4 they cost more than all other layers together);
/// - `lm_head`: Q8 under Q4 and Q8, else f16. Its error reaches every logit directly;
/// - `model.embed_tokens`: Q8 under Q8, Q6 under Q4 (a tied table is this one), else f16;
/// - vision tower and projector: Q8 under Q4 and Q8, else f16 (Q4 there costs image answers
///   several times the error of the whole language model at Q8, for 0.16 GB).
///
/// A matrix whose rows do not split into its dtype's groups falls back to Q8 (groups of 32),
/// or f16 when that does not fit either. `keep.lm_head` sets both vocabulary matrices,
/// `keep.vision` the vision tower and projector.
pub fn storage_dtype_keeping(
    name: &str,
    shape: &[usize],
    stored: Dtype,
    precision: WeightPrecision,
    keep: KeepOptions,
) -> DType {
    if shape.len() < 2 || name.starts_with("vision_model.embeddings") {
        return DType::F32;
    }
    match precision {
        WeightPrecision::F32 => return DType::F32,
        WeightPrecision::Native if stored == Dtype::F32 => return DType::F32,
        _ => {}
    }
    if shape.len() != 2 {
        return DType::F16;
    }
    let language = match precision {
        WeightPrecision::Q8 => DType::Q8,
        WeightPrecision::Q4 if is_six_bit_under_q4(name) => DType::Q6,
        WeightPrecision::Q4 => DType::Q4,
        _ => DType::F16,
    };
    let (keep, default) = match name {
        "lm_head.weight" => (keep.lm_head, at_least_q8(language)),
        "model.embed_tokens.weight" => (keep.lm_head, language),
        _ if name.starts_with("model.") => (None, language),
        _ => (keep.vision, at_least_q8(language)),
    };
    let dtype = match keep {
        Some(KeepPrecision::F16) => DType::F16,
        Some(KeepPrecision::Q8) => DType::Q8,
        None => default,
    };
    match dtype {
        DType::F16 => DType::F16,
        d if quantizable(d, shape[1]) => d,
        _ if quantizable(DType::Q8, shape[1]) => DType::Q8,
        _ => DType::F16,
    }
}

/// The language-model matrices that Q4 keeps at Q6.
fn is_six_bit_under_q4(name: &str) -> bool {
    name == "model.embed_tokens.weight"
        || name.ends_with(".self_attn.v_proj.weight")
        || name.ends_with(".self_attn.o_proj.weight")
}

/// Q4 and Q6 raised to Q8; other dtypes as they are.
fn at_least_q8(dtype: DType) -> DType {
    if dtype.is_quantized() {
        DType::Q8
    } else {
        dtype
    }
}

/// Converts a host tensor to `dtype` and uploads it.
pub fn upload(gpu: &Gpu, host: &HostTensor, dtype: DType) -> Result<Tensor> {
    let t = match dtype {
        DType::F32 => Tensor::from_f32(gpu, &host.shape, &host.to_f32())?,
        DType::F16 => Tensor::from_bytes(gpu, &host.shape, DType::F16, &host.to_f16_bytes())?,
        DType::Q8 | DType::Q6 | DType::Q4 => {
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
    /// Made up on [`Weights::take`] instead (see [`Weights::random`]).
    random: Option<RandomWeights>,
}

/// Random weights in a precision's storage dtypes, made one tensor at a time as the model takes
/// them: a model of any geometry straight into GPU memory, for benchmarks (`llava bench`).
struct RandomWeights {
    gpu: std::sync::Arc<Gpu>,
    precision: WeightPrecision,
    state: u64,
}

impl RandomWeights {
    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// Values of magnitude ~0.03-0.06 (f16 exponent 10) with random signs and mantissas; vectors
    /// (norm weights, biases) near 1; quantized codes uniformly random with scales of ~2e-4.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let dtype = storage_dtype_of(name, shape, Dtype::F16, self.precision);
        let numel: usize = shape.iter().product();
        let gpu = self.gpu.clone();
        let gpu = &*gpu;
        let half_bits = |r: u64, exponent: u64| ((r & 0x83ff) | (exponent << 10)) as u16;
        let t = match dtype {
            DType::F32 => {
                let base = if shape.len() == 1 { 1.0 } else { 0.0 };
                let values: Vec<f32> = (0..numel)
                    .map(|_| base + (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 0.1 - 0.05)
                    .collect();
                Tensor::from_f32(gpu, shape, &values)?
            }
            DType::F16 => {
                let mut bits = Vec::with_capacity(numel + 3);
                while bits.len() < numel {
                    let r = self.next();
                    bits.extend((0..4).map(|i| half_bits(r >> (16 * i), 10)));
                }
                bits.truncate(numel);
                Tensor::from_bytes(gpu, shape, DType::F16, bytemuck::cast_slice(&bits))?
            }
            _ => {
                let (rows, cols) = (shape[0], shape[1]);
                let mut data = vec![0u8; dtype.data_bytes(numel) as usize];
                for chunk in data.chunks_mut(8) {
                    let r = self.next().to_le_bytes();
                    chunk.copy_from_slice(&r[..chunk.len()]);
                }
                let groups = numel / dtype.group_size();
                let scales = (0..groups)
                    .map(|_| half::f16::from_bits(half_bits(self.next(), 3) & 0x7fff))
                    .collect();
                Tensor::from_quant(
                    gpu,
                    &quant::QuantMatrix {
                        dtype,
                        rows,
                        cols,
                        data,
                        scales,
                    },
                )?
            }
        };
        Ok(t)
    }
}

impl Weights {
    pub fn insert(
        &mut self,
        gpu: &Gpu,
        name: &str,
        host: &HostTensor,
        precision: WeightPrecision,
    ) -> Result<()> {
        let tensor = upload(gpu, host, storage_dtype(name, host, precision))?;
        self.tensors.insert(name.to_string(), tensor);
        Ok(())
    }

    /// Adds a tensor already in its storage layout (from a converted folder).
    pub fn insert_tensor(&mut self, name: String, tensor: Tensor) {
        self.tensors.insert(name, tensor);
    }

    /// Weights that do not come from a checkpoint: every [`Weights::take`] makes a random tensor of
    /// the asked shape in `precision`'s storage dtype for that name (as for an f16 checkpoint).
    pub fn random(gpu: std::sync::Arc<Gpu>, precision: WeightPrecision, seed: u64) -> Weights {
        let state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Weights {
            tensors: HashMap::new(),
            random: Some(RandomWeights {
                gpu,
                precision,
                state,
            }),
        }
    }

    /// Takes the tensor `name`, which must have `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(random) = &mut self.random {
            return random.tensor(name, shape);
        }
        let t = self.tensors.remove(name).ok_or_else(|| {
            ModelError::checkpoint("weights", format!("tensor {name} is missing"))
        })?;
        if t.shape() != shape {
            // The expected shape comes from the config's sizes.
            let msg = format!(
                "tensor {name} has shape {:?}, but config.json's sizes make it {shape:?} \
                 (the config does not describe these weights)",
                t.shape()
            );
            return Err(ModelError::checkpoint("weights", msg));
        }
        Ok(t)
    }

    /// Whether `name` was loaded (and not yet taken).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llava::KvPrecision;

    #[test]
    fn precision_names_round_trip_and_match_the_manifest_spelling() {
        for &(precision, name) in WeightPrecision::NAMED {
            assert_eq!(name.parse::<WeightPrecision>().unwrap(), precision);
            assert_eq!(precision.to_string(), name);
            assert_eq!(serde_json::to_value(precision).unwrap(), name);
        }
        for &(keep, name) in KeepPrecision::NAMED {
            assert_eq!(name.parse::<KeepPrecision>().unwrap(), keep);
        }
        for &(kv, name) in KvPrecision::NAMED {
            assert_eq!(name.parse::<KvPrecision>().unwrap(), kv);
        }
        let msg = "int3".parse::<WeightPrecision>().unwrap_err().to_string();
        assert_eq!(
            msg,
            "weight precision `int3` is not one of native, f32, f16, q8, q4"
        );
        let msg = "q4".parse::<KvPrecision>().unwrap_err().to_string();
        assert_eq!(msg, "KV-cache precision `q4` is not one of f32, f16");
    }
}
