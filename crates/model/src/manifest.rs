//! The converted-model format (docs/converted-format.md): a `manifest.json` next to safetensors
//! shards that store each tensor in the layout the GPU reads (f32, f16, or Q8/Q4 as a packed
//! `<name>.qweight` U8 tensor plus `<name>.scales` F16 `[rows, cols / 32]`), so loading is a
//! plain upload. This module reads and checks manifests and loads shards into [`Weights`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use half::f16;
use llava_gpu::quant::{QUANT_GROUP, QuantMatrix};
use llava_gpu::{DType, Gpu, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Dtype, SafetensorsEntry, StoredDtype, header_len, parse_header};
use crate::error::{ModelError, Result};
use crate::weights::{WeightPrecision, Weights};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT_NAME: &str = "llava-webgpu";
pub const FORMAT_VERSION: u64 = 1;

/// Suffixes of the two safetensors entries of a quantized matrix.
pub const QWEIGHT_SUFFIX: &str = ".qweight";
pub const SCALES_SUFFIX: &str = ".scales";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u64,
    /// The checkpoint's `config.json` object.
    pub config: Value,
    /// The small files copied alongside (tokenizer, templates, processor and generation configs).
    pub files: Vec<String>,
    pub quant: QuantScheme,
    pub shards: Vec<ShardEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantScheme {
    /// What the converter was asked for: "f32", "f16", "q8" or "q4".
    pub precision: String,
    pub group_size: usize,
    /// How each tensor is stored, by canonical name.
    pub tensors: BTreeMap<String, Storage>,
}

/// How one tensor is stored in a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    F32,
    F16,
    Q8,
    Q4,
}

impl Storage {
    pub fn gpu_dtype(self) -> DType {
        match self {
            Storage::F32 => DType::F32,
            Storage::F16 => DType::F16,
            Storage::Q8 => DType::Q8,
            Storage::Q4 => DType::Q4,
        }
    }

    /// `None` for U32, which no weight uses.
    pub fn from_gpu_dtype(dtype: DType) -> Option<Storage> {
        match dtype {
            DType::F32 => Some(Storage::F32),
            DType::F16 => Some(Storage::F16),
            DType::Q8 => Some(Storage::Q8),
            DType::Q4 => Some(Storage::Q4),
            DType::U32 => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name relative to the manifest's folder.
    pub file: String,
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
    /// Canonical names of the tensors stored in this shard.
    pub tensors: Vec<String>,
}

/// The precision name written in [`QuantScheme::precision`].
pub fn precision_name(precision: WeightPrecision) -> &'static str {
    match precision {
        WeightPrecision::Native => "native",
        WeightPrecision::F32 => "f32",
        WeightPrecision::F16 => "f16",
        WeightPrecision::Q8 => "q8",
        WeightPrecision::Q4 => "q4",
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    /// Parses and checks a manifest: format and version first (so a newer format is named as
    /// such), then that every tensor sits in exactly one shard and no shard is listed twice.
    pub fn from_json(json: &str) -> Result<Manifest> {
        let bad = |msg: String| ModelError::config(MANIFEST_FILE, msg);
        let value: Value =
            serde_json::from_str(json).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let format = value.get("format").and_then(Value::as_str);
        if format != Some(FORMAT_NAME) {
            return Err(bad(format!(
                "format is {format:?}, expected \"{FORMAT_NAME}\""
            )));
        }
        match value.get("version").and_then(Value::as_u64) {
            Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(bad(format!(
                    "format version {v} is not supported (this build reads version {FORMAT_VERSION}); \
                     convert the model again or update the runtime"
                )));
            }
            None => return Err(bad("missing or invalid `version`".into())),
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| bad(format!("{e}")))?;
        manifest.check()?;
        Ok(manifest)
    }

    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let json = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        Manifest::from_json(&json)
    }

    fn check(&self) -> Result<()> {
        let bad = |msg: String| ModelError::config(MANIFEST_FILE, msg);
        if self.quant.group_size != QUANT_GROUP {
            return Err(bad(format!(
                "group size {} is not supported (only {QUANT_GROUP})",
                self.quant.group_size
            )));
        }
        let mut files = BTreeSet::new();
        let mut shard_of: BTreeMap<&str, &str> = BTreeMap::new();
        for shard in &self.shards {
            if !files.insert(shard.file.as_str()) {
                return Err(bad(format!("shard {} is listed twice", shard.file)));
            }
            if shard.file.contains('/') || shard.file.contains('\\') || shard.file.starts_with('.')
            {
                return Err(bad(format!(
                    "shard file name {:?} must be a plain file name",
                    shard.file
                )));
            }
            for name in &shard.tensors {
                if let Some(other) = shard_of.insert(name, &shard.file) {
                    return Err(bad(format!(
                        "tensor {name} is listed in both {other} and {}",
                        shard.file
                    )));
                }
                if !self.quant.tensors.contains_key(name) {
                    return Err(bad(format!(
                        "tensor {name} of shard {} has no entry in quant.tensors",
                        shard.file
                    )));
                }
            }
        }
        if let Some(name) = self
            .quant
            .tensors
            .keys()
            .find(|n| !shard_of.contains_key(n.as_str()))
        {
            return Err(bad(format!("tensor {name} is missing from every shard")));
        }
        Ok(())
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

/// Loads every shard of a converted folder into GPU tensors, one shard in host memory at a time:
/// checks its size and SHA-256, parses its header and uploads each tensor's bytes as stored.
pub fn load_weights(gpu: &Gpu, dir: &Path, manifest: &Manifest) -> Result<Weights> {
    let mut weights = Weights::default();
    for shard in &manifest.shards {
        let path = dir.join(&shard.file);
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        check_shard(&path, shard, &bytes)?;
        for (name, tensor) in shard_tensors(gpu, &path, shard, &manifest.quant.tensors, &bytes)? {
            weights.insert_tensor(name, tensor);
        }
    }
    Ok(weights)
}

/// Size and SHA-256 of a shard's bytes against its manifest entry.
pub fn check_shard(path: &Path, shard: &ShardEntry, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != shard.bytes {
        let msg = format!(
            "{} bytes, the manifest says {} (truncated or incomplete download?)",
            bytes.len(),
            shard.bytes
        );
        return Err(ModelError::checkpoint(path, msg));
    }
    let digest = sha256_hex(bytes);
    if !digest.eq_ignore_ascii_case(&shard.sha256) {
        let msg = format!(
            "SHA-256 {digest} does not match the manifest's {} (corrupt file?)",
            shard.sha256
        );
        return Err(ModelError::checkpoint(path, msg));
    }
    Ok(())
}

/// Parses a verified shard and uploads its tensors, checking that its header holds exactly the
/// entries the manifest's storage kinds call for.
pub fn shard_tensors(
    gpu: &Gpu,
    path: &Path,
    shard: &ShardEntry,
    storage: &BTreeMap<String, Storage>,
    bytes: &[u8],
) -> Result<Vec<(String, Tensor)>> {
    let fail = |msg: String| ModelError::checkpoint(path, msg);
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| fail("too short".into()))?;
    let size = bytes.len() as u64;
    let len = header_len(prefix, size).map_err(fail)?;
    let entries = parse_header(&bytes[8..8 + len as usize], size).map_err(fail)?;
    let mut by_name: BTreeMap<String, SafetensorsEntry> =
        entries.into_iter().map(|e| (e.name.clone(), e)).collect();
    let mut tensors = Vec::with_capacity(shard.tensors.len());
    for name in &shard.tensors {
        let kind = storage
            .get(name)
            .ok_or_else(|| fail(format!("tensor {name} has no storage kind")))?;
        let tensor = match *kind {
            Storage::F32 => {
                let (shape, data) = take_entry(&mut by_name, bytes, path, name, "F32")?;
                Tensor::from_bytes(gpu, &shape, DType::F32, data)?
            }
            Storage::F16 => {
                let (shape, data) = take_entry(&mut by_name, bytes, path, name, "F16")?;
                Tensor::from_bytes(gpu, &shape, DType::F16, data)?
            }
            kind @ (Storage::Q8 | Storage::Q4) => {
                let (qshape, data) = take_entry(
                    &mut by_name,
                    bytes,
                    path,
                    &format!("{name}{QWEIGHT_SUFFIX}"),
                    "U8",
                )?;
                let (sshape, scales) = take_entry(
                    &mut by_name,
                    bytes,
                    path,
                    &format!("{name}{SCALES_SUFFIX}"),
                    "F16",
                )?;
                let per_byte = if kind == Storage::Q4 { 2 } else { 1 };
                let [rows, packed] = qshape[..] else {
                    return Err(fail(format!(
                        "tensor {name}{QWEIGHT_SUFFIX} has shape {qshape:?}, expected 2-D"
                    )));
                };
                let cols = packed * per_byte;
                if cols % QUANT_GROUP != 0 || sshape != [rows, cols / QUANT_GROUP] {
                    return Err(fail(format!(
                        "tensor {name}: scales of shape {sshape:?} do not fit {kind:?} weights of {rows}x{cols}"
                    )));
                }
                let scales = scales
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect();
                let matrix = QuantMatrix {
                    dtype: kind.gpu_dtype(),
                    rows,
                    cols,
                    data: data.to_vec(),
                    scales,
                };
                Tensor::from_quant(gpu, &matrix)?
            }
        };
        tensors.push((name.clone(), tensor));
    }
    if let Some(extra) = by_name.keys().next() {
        return Err(fail(format!(
            "holds tensor {extra}, which the manifest does not list for this shard"
        )));
    }
    Ok(tensors)
}

/// Removes entry `name` from a shard's header entries; it must have safetensors dtype `dtype`.
fn take_entry<'a>(
    by_name: &mut BTreeMap<String, SafetensorsEntry>,
    bytes: &'a [u8],
    path: &Path,
    name: &str,
    dtype: &str,
) -> Result<(Vec<usize>, &'a [u8])> {
    let fail = |msg: String| ModelError::checkpoint(path, msg);
    let entry = by_name
        .remove(name)
        .ok_or_else(|| fail(format!("has no tensor {name}")))?;
    let stored = match &entry.info.dtype {
        StoredDtype::Known(Dtype::F32) => "F32",
        StoredDtype::Known(Dtype::F16) => "F16",
        StoredDtype::Known(Dtype::BF16) => "BF16",
        StoredDtype::Unsupported(other) => other.as_str(),
    };
    if stored != dtype {
        return Err(fail(format!(
            "tensor {name} is stored as {stored}, the format needs {dtype}"
        )));
    }
    let numel: usize = entry.info.shape.iter().product();
    // parse_header checks the byte counts of float dtypes only.
    if dtype == "U8" && (entry.end - entry.start) as usize != numel {
        let msg = format!(
            "tensor {name}: {} bytes for U8 shape {:?}",
            entry.end - entry.start,
            entry.info.shape
        );
        return Err(fail(msg));
    }
    Ok((
        entry.info.shape,
        &bytes[entry.start as usize..entry.end as usize],
    ))
}
