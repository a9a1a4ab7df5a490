//! The converted-model format (docs/converted-format.md): a `manifest.json` next to safetensors
//! shards that store each tensor in the layout the GPU reads (f32, f16, or Q8/Q6/Q4 as a packed
//! `<name>.qweight` U8 tensor plus `<name>.scales` F16 `[rows, cols / group]`), so loading is a
//! plain upload. This module reads and checks manifests; [`crate::files::loader`] streams the shards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use llava_gpu::DType;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::files::weights::WeightPrecision;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT_NAME: &str = "llava-webgpu";
/// Version 2: Q4 with a code book and groups of 64, Q6 (version 1 had Q4_0 in groups of 32).
pub const FORMAT_VERSION: u64 = 2;

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
    /// Lowercase hex SHA-256 of each of `files`, by name (absent from manifests written before
    /// it was added, whose small files are read unchecked).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub file_sha256: BTreeMap<String, String>,
    pub quant: QuantScheme,
    pub shards: Vec<ShardEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantScheme {
    /// What the converter was asked for.
    pub precision: WeightPrecision,
    /// Values per f16 scale of each quantized dtype ([`group_sizes`]).
    pub group_sizes: BTreeMap<DType, usize>,
    /// How each tensor is stored, by canonical name (never `u32`).
    pub tensors: BTreeMap<String, DType>,
}

/// The group size of every quantized dtype, as a manifest records them.
pub fn group_sizes() -> BTreeMap<DType, usize> {
    [DType::Q8, DType::Q6, DType::Q4]
        .into_iter()
        .map(|d| (d, d.group_size()))
        .collect()
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
        if self.quant.group_sizes != group_sizes() {
            return Err(bad(format!(
                "group sizes {:?} are not supported (only {:?})",
                self.quant.group_sizes,
                group_sizes()
            )));
        }
        if let Some((name, _)) = self.quant.tensors.iter().find(|&(_, &d)| d == DType::U32) {
            return Err(bad(format!(
                "tensor {name}: u32 is not a weight storage (f32, f16, q8, q6 or q4)"
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
        if self
            .shards
            .iter()
            .try_fold(0u64, |total, s| total.checked_add(s.bytes))
            .is_none()
        {
            return Err(bad(
                "the shard sizes (`shards[].bytes`) add up to more than 2^64 bytes".into(),
            ));
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

    /// Checks that the model may be loaded at `precision`: its weights are used as stored, so
    /// only `Native` or the precision it was converted to.
    pub fn check_precision(&self, precision: WeightPrecision) -> Result<()> {
        if precision != WeightPrecision::Native && precision != self.quant.precision {
            return Err(ModelError::Input(format!(
                "this model was converted to {}; it cannot be loaded as {precision} (convert it again)",
                self.quant.precision
            )));
        }
        Ok(())
    }

    /// Checks the contents of the small file `name` against its hash in the manifest (none:
    /// nothing to check).
    pub fn check_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        match self.file_sha256.get(name) {
            Some(want) if !sha256_hex(bytes).eq_ignore_ascii_case(want) => Err(ModelError::config(
                name,
                format!(
                    "SHA-256 {} does not match the {MANIFEST_FILE}'s {want}: the file was changed after \
                     the conversion (restore it or convert the model again)",
                    sha256_hex(bytes)
                ),
            )),
            _ => Ok(()),
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(shards: Value) -> Value {
        json!({
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": {},
            "files": [],
            "quant": {"precision": "f16", "group_sizes": group_sizes(),
                      "tensors": {"a": "f16", "b": "f16"}},
            "shards": shards,
        })
    }

    #[test]
    fn shard_sizes_that_overflow_are_refused() {
        let shard = |file: &str, bytes: u64, tensor: &str| json!({"file": file, "bytes": bytes, "sha256": "00", "tensors": [tensor]});
        let ok = manifest(json!([
            shard("a.safetensors", 8, "a"),
            shard("b.safetensors", 16, "b")
        ]));
        assert_eq!(
            Manifest::from_json(&ok.to_string()).unwrap().total_bytes(),
            24
        );
        let wraps = manifest(json!([
            shard("a.safetensors", u64::MAX, "a"),
            shard("b.safetensors", 2, "b")
        ]));
        let msg = Manifest::from_json(&wraps.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("manifest.json: ") && msg.contains("`shards[].bytes`"),
            "{msg}"
        );
    }

    #[test]
    fn storage_and_precision_use_the_shared_names() {
        let shard =
            json!([{"file": "a.safetensors", "bytes": 8, "sha256": "00", "tensors": ["a", "b"]}]);
        let mut value = manifest(shard);
        value["quant"]["precision"] = json!("q4");
        value["quant"]["tensors"] = json!({"a": "q6", "b": "f32"});
        let parsed = Manifest::from_json(&value.to_string()).unwrap();
        assert_eq!(parsed.quant.precision, WeightPrecision::Q4);
        assert_eq!(parsed.quant.tensors["a"], DType::Q6);
        assert_eq!(
            serde_json::to_value(&parsed).unwrap()["quant"],
            value["quant"]
        );
        assert!(parsed.check_precision(WeightPrecision::Q8).is_err());

        value["quant"]["tensors"]["b"] = json!("u32");
        let msg = Manifest::from_json(&value.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("tensor b: u32 is not a weight storage"),
            "{msg}"
        );
    }
}
