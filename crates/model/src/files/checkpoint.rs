//! Safetensors checkpoints: header parsing, sharded indexes, and the one table that maps every
//! tensor-name spelling in the wild onto canonical names.
//!
//! Canonical names are the plain CLIP / Llama module names: `vision_model.*`,
//! `multi_modal_projector.linear_{1,2}.*`, `image_newline`, `model.*` (decoder) and
//! `lm_head.weight`. Opening a folder reads only the headers; [`Checkpoint::read`] then reads one
//! tensor's bytes, so the host never holds the whole model.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Element types the runtime loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    fn parse(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            _ => None,
        }
    }
}

/// The dtype a safetensors header declares. Unsupported ones only fail when the tensor is read,
/// so a checkpoint carrying e.g. an unused I64 buffer still opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    Known(Dtype),
    Unsupported(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub dtype: StoredDtype,
}

/// One tensor's raw little-endian bytes on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// Little-endian f16 bytes, rounding to nearest even. BF16 values beyond f16's range
    /// (|x| > 65504) become infinities, and tiny ones lose precision as f16 subnormals.
    pub fn to_f16_bytes(&self) -> Vec<u8> {
        match self.dtype {
            Dtype::F16 => self.bytes.clone(),
            Dtype::F32 | Dtype::BF16 => self
                .to_f32()
                .into_iter()
                .flat_map(|x| f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
}

/// The ways checkpoints in the wild spell tensor names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spelling {
    /// llava-hf files on the Hub: `vision_tower.vision_model.*`, `language_model.model.*`.
    Hub,
    /// Files written by transformers 5 `save_pretrained`: `vision_tower.*` (no `vision_model.`).
    Transformers5,
    /// transformers >= 4.52 module names: `model.vision_tower.*`, `model.language_model.*`.
    InMemory,
    /// The original LLaVA repo (liuhaotian): `model.vision_tower.vision_tower.vision_model.*`,
    /// `model.mm_projector.{0,2}`, `model.layers.*`.
    OriginalLlava,
}

impl Spelling {
    fn describe(self) -> &'static str {
        match self {
            Spelling::Hub => "hub files",
            Spelling::Transformers5 => "transformers 5 files",
            Spelling::InMemory => "transformers in-memory names",
            Spelling::OriginalLlava => "original LLaVA",
        }
    }
}

/// THE name table: per spelling, `(prefix in the file, canonical prefix)` rules.
const NAME_TABLE: [(Spelling, &[(&str, &str)]); 4] = [
    (
        Spelling::Hub,
        &[
            ("vision_tower.vision_model.", "vision_model."),
            ("multi_modal_projector.", "multi_modal_projector."),
            ("image_newline", "image_newline"),
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
        ],
    ),
    (
        Spelling::Transformers5,
        &[
            ("vision_tower.", "vision_model."),
            ("multi_modal_projector.", "multi_modal_projector."),
            ("image_newline", "image_newline"),
            ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."),
        ],
    ),
    (
        Spelling::InMemory,
        &[
            ("model.vision_tower.", "vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.image_newline", "image_newline"),
            ("model.language_model.", "model."),
            ("lm_head.", "lm_head."),
        ],
    ),
    (
        Spelling::OriginalLlava,
        &[
            (
                "model.vision_tower.vision_tower.vision_model.",
                "vision_model.",
            ),
            ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
            ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
            ("model.image_newline", "image_newline"),
            ("model.", "model."),
            ("lm_head.", "lm_head."),
        ],
    ),
];

/// The canonical name of a tensor as spelled in a file, if it is one the model uses.
pub fn canonical_name(file_name: &str) -> Option<String> {
    map_name(file_name, is_canonical)
}

/// Applies the table to `file_name`. Where several rules apply, the longest matching file prefix
/// whose result passes `accept` wins (`model.vision_tower.vision_tower.vision_model.X` is
/// original LLaVA, not the in-memory `model.vision_tower.` rule).
fn map_name(file_name: &str, accept: impl Fn(&str) -> bool) -> Option<String> {
    NAME_TABLE
        .iter()
        .flat_map(|(_, rules)| rules.iter())
        .filter_map(|(file_prefix, canonical_prefix)| {
            let rest = file_name.strip_prefix(file_prefix)?;
            let canonical = format!("{canonical_prefix}{rest}");
            accept(&canonical).then_some((file_prefix.len(), canonical))
        })
        .max_by_key(|(prefix_len, _)| *prefix_len)
        .map(|(_, canonical)| canonical)
}

/// How each spelling would write a canonical name (for error messages and remote loaders).
pub fn file_names(canonical: &str) -> Vec<(Spelling, String)> {
    NAME_TABLE
        .iter()
        .filter_map(|(spelling, rules)| {
            rules
                .iter()
                .filter_map(|(file_prefix, canonical_prefix)| {
                    let rest = canonical.strip_prefix(canonical_prefix)?;
                    Some((canonical_prefix.len(), format!("{file_prefix}{rest}")))
                })
                .max_by_key(|(prefix_len, _)| *prefix_len)
                .map(|(_, name)| (*spelling, name))
        })
        .collect()
}

/// Buffers and unused weights some checkpoints carry: skipped without complaint.
pub(crate) fn is_ignorable(file_name: &str) -> bool {
    file_name.ends_with("rotary_emb.inv_freq")
        || file_name.ends_with("position_ids")
        || map_name(file_name, |c| {
            matches!(
                c,
                "vision_model.post_layernorm.weight" | "vision_model.post_layernorm.bias"
            )
        })
        .is_some()
}

/// Whether `name` is a canonical tensor name the model uses.
pub fn is_canonical(name: &str) -> bool {
    const WEIGHT_BIAS: [&str; 2] = ["weight", "bias"];
    if let Some(rest) = name.strip_prefix("vision_model.") {
        if matches!(
            rest,
            "embeddings.class_embedding"
                | "embeddings.patch_embedding.weight"
                | "embeddings.position_embedding.weight"
                | "pre_layrnorm.weight"
                | "pre_layrnorm.bias"
        ) {
            return true;
        }
        return layer_member(rest, "encoder.layers.").is_some_and(|member| {
            member.rsplit_once('.').is_some_and(|(module, param)| {
                WEIGHT_BIAS.contains(&param)
                    && matches!(
                        module,
                        "self_attn.q_proj"
                            | "self_attn.k_proj"
                            | "self_attn.v_proj"
                            | "self_attn.out_proj"
                            | "layer_norm1"
                            | "layer_norm2"
                            | "mlp.fc1"
                            | "mlp.fc2"
                    )
            })
        });
    }
    if let Some(rest) = name.strip_prefix("multi_modal_projector.") {
        return matches!(
            rest,
            "linear_1.weight" | "linear_1.bias" | "linear_2.weight" | "linear_2.bias"
        );
    }
    if matches!(
        name,
        "image_newline" | "model.embed_tokens.weight" | "model.norm.weight" | "lm_head.weight"
    ) {
        return true;
    }
    layer_member(name, "model.layers.").is_some_and(|member| {
        matches!(
            member,
            "self_attn.q_proj.weight"
                | "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.o_proj.weight"
                | "mlp.gate_proj.weight"
                | "mlp.up_proj.weight"
                | "mlp.down_proj.weight"
                | "input_layernorm.weight"
                | "post_attention_layernorm.weight"
        )
    })
}

/// For `"{prefix}{digits}.{member}"` returns `member`.
fn layer_member<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let (index, member) = name.strip_prefix(prefix)?.split_once('.')?;
    (!index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())).then_some(member)
}

/// One tensor entry of a safetensors header, with absolute byte offsets into its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetensorsEntry {
    pub name: String,
    pub info: TensorInfo,
    pub start: u64,
    pub end: u64,
}

/// safetensors caps the header at 100 MB; a larger length prefix means a corrupt file.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Length of the JSON header from the file's first 8 bytes, checked against the file size.
pub fn header_len(prefix: [u8; 8], file_size: u64) -> std::result::Result<u64, String> {
    let len = u64::from_le_bytes(prefix);
    if len > MAX_HEADER_LEN || len > file_size.saturating_sub(8) {
        return Err(format!(
            "header length {len} does not fit a file of {file_size} bytes (truncated or not safetensors)"
        ));
    }
    Ok(len)
}

/// Parses the JSON header (the `header_len` bytes after the 8-byte prefix) and checks every
/// tensor's byte range against the file size and, for known dtypes, against its shape.
pub fn parse_header(
    json: &[u8],
    file_size: u64,
) -> std::result::Result<Vec<SafetensorsEntry>, String> {
    let data_start = 8 + json.len() as u64;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(json)
        .map_err(|e| format!("malformed safetensors header JSON: {e}"))?;
    let mut entries = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor `{name}`: {what} in header entry {value}");
        let dtype_name = value
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing dtype"))?;
        let shape: Vec<usize> = value
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            })
            .ok_or_else(|| bad("missing or invalid shape"))?;
        let (begin, end) = match value
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            Some([b, e]) => (b.as_u64(), e.as_u64()),
            _ => (None, None),
        };
        let (Some(begin), Some(end)) = (begin, end) else {
            return Err(bad("missing or invalid data_offsets"));
        };
        // Offsets come from the file: an `end` near 2^64 must not wrap into the header.
        if begin > end
            || end
                .checked_add(data_start)
                .is_none_or(|end| end > file_size)
        {
            return Err(format!(
                "tensor `{name}`: bytes {begin}..{end} after the header lie outside the file of {file_size} \
                 bytes (truncated file?)"
            ));
        }
        let dtype = match Dtype::parse(dtype_name) {
            Some(dtype) => {
                let expected =
                    checked_numel(&shape).and_then(|n| n.checked_mul(dtype.size() as u64));
                if expected != Some(end - begin) {
                    return Err(format!(
                        "tensor `{name}`: {} bytes stored for shape {shape:?} of {dtype_name}",
                        end - begin
                    ));
                }
                StoredDtype::Known(dtype)
            }
            None => StoredDtype::Unsupported(dtype_name.to_string()),
        };
        entries.push(SafetensorsEntry {
            name,
            info: TensorInfo { shape, dtype },
            start: data_start + begin,
            end: data_start + end,
        });
    }
    Ok(entries)
}

pub(crate) fn checked_numel(shape: &[usize]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))
}

/// Reads one file's header from disk.
fn read_file_header(path: &Path) -> Result<Vec<SafetensorsEntry>> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_size = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| {
        ModelError::checkpoint(
            path,
            format!("file of {file_size} bytes is too short for a safetensors header"),
        )
    })?;
    let len = header_len(prefix, file_size).map_err(|msg| ModelError::checkpoint(path, msg))?;
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json)
        .map_err(|e| ModelError::io(path, e))?;
    parse_header(&json, file_size).map_err(|msg| ModelError::checkpoint(path, msg))
}

struct StoredTensor {
    file: usize,
    /// The name as written in the file.
    file_name: String,
    info: TensorInfo,
    start: u64,
    end: u64,
}

/// A checkpoint folder whose headers have been read and whose names are mapped.
pub struct Checkpoint {
    files: Vec<PathBuf>,
    tensors: BTreeMap<String, StoredTensor>,
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    /// Opens `dir`: `model.safetensors.index.json` if present, else `model.safetensors`, else
    /// every `*.safetensors` file in the folder. Reads only headers.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index_path = dir.join(INDEX_FILE);
        let (files, index) = if index_path.is_file() {
            let (files, map) = read_index(dir, &index_path)?;
            (files, Some(map))
        } else if dir.join(SINGLE_FILE).is_file() {
            (vec![dir.join(SINGLE_FILE)], None)
        } else {
            let listing = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
            let mut files = Vec::new();
            for entry in listing {
                let path = entry.map_err(|e| ModelError::io(dir, e))?.path();
                if path.extension().is_some_and(|ext| ext == "safetensors") && path.is_file() {
                    files.push(path);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(ModelError::checkpoint(
                    dir,
                    "no model.safetensors, index or *.safetensors file",
                ));
            }
            (files, None)
        };

        let mut tensors = BTreeMap::new();
        let mut file_of_name: BTreeMap<String, usize> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (file_index, path) in files.iter().enumerate() {
            for entry in read_file_header(path)? {
                if let Some(previous) = file_of_name.insert(entry.name.clone(), file_index) {
                    return Err(ModelError::checkpoint(
                        dir,
                        format!(
                            "tensor `{}` is stored in both {} and {}",
                            entry.name,
                            files[previous].display(),
                            path.display()
                        ),
                    ));
                }
                let Some(canonical) = canonical_name(&entry.name) else {
                    if !is_ignorable(&entry.name) {
                        unknown.push(entry.name);
                    }
                    continue;
                };
                let stored = StoredTensor {
                    file: file_index,
                    file_name: entry.name,
                    info: entry.info,
                    start: entry.start,
                    end: entry.end,
                };
                if let Some(other) = tensors.insert(canonical.clone(), stored) {
                    return Err(ModelError::checkpoint(
                        dir,
                        format!(
                            "tensors `{}` and `{}` both map to `{canonical}`",
                            other.file_name, tensors[&canonical].file_name
                        ),
                    ));
                }
            }
        }
        if !unknown.is_empty() {
            return Err(ModelError::checkpoint(dir, not_part_of_the_model(&unknown)));
        }
        if let Some(index) = index {
            for (name, file_index) in index {
                if file_of_name.get(&name) != Some(&file_index) {
                    return Err(ModelError::checkpoint(
                        &index_path,
                        format!(
                            "lists `{name}` in {} but that file does not contain it",
                            files[file_index].display()
                        ),
                    ));
                }
            }
        }
        Ok(Checkpoint { files, tensors })
    }

    /// The safetensors files, in the order they are read.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Canonical names of all tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, canonical: &str) -> Option<&TensorInfo> {
        self.tensors.get(canonical).map(|t| &t.info)
    }

    /// Reads one tensor's bytes from its file.
    pub fn read(&self, canonical: &str) -> Result<HostTensor> {
        let stored = self
            .tensors
            .get(canonical)
            .ok_or_else(|| self.missing(canonical))?;
        let path = &self.files[stored.file];
        let dtype = match &stored.info.dtype {
            StoredDtype::Known(dtype) => *dtype,
            StoredDtype::Unsupported(name) => {
                return Err(ModelError::checkpoint(
                    path,
                    format!(
                        "tensor `{}` has dtype {name}; only F32, F16 and BF16 are supported",
                        stored.file_name
                    ),
                ));
            }
        };
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        file.seek(SeekFrom::Start(stored.start))
            .map_err(|e| ModelError::io(path, e))?;
        let mut bytes = vec![0u8; (stored.end - stored.start) as usize];
        file.read_exact(&mut bytes)
            .map_err(|e| ModelError::io(path, e))?;
        Ok(HostTensor {
            shape: stored.info.shape.clone(),
            dtype,
            bytes,
        })
    }

    /// Reads a tensor that must exist with exactly `shape`.
    pub fn expect(&self, canonical: &str, shape: &[usize]) -> Result<HostTensor> {
        let stored = self
            .tensors
            .get(canonical)
            .ok_or_else(|| self.missing(canonical))?;
        if stored.info.shape != shape {
            return Err(ModelError::checkpoint(
                &self.files[stored.file],
                format!(
                    "tensor `{canonical}` (stored as `{}`) has shape {:?}, expected {shape:?}",
                    stored.file_name, stored.info.shape
                ),
            ));
        }
        self.read(canonical)
    }

    fn missing(&self, canonical: &str) -> ModelError {
        let tried = file_names(canonical)
            .into_iter()
            .map(|(spelling, name)| format!("`{name}` ({})", spelling.describe()))
            .collect::<Vec<_>>()
            .join(", ");
        let folder = self
            .files
            .first()
            .and_then(|f| f.parent())
            .unwrap_or(Path::new("."));
        ModelError::checkpoint(
            folder,
            format!("tensor `{canonical}` is missing; looked for {tried}"),
        )
    }
}

/// The error message for file tensor names that no LLaVA-1.6 tensor maps from.
pub(crate) fn not_part_of_the_model(unknown: &[String]) -> String {
    const SHOWN: usize = 20;
    let more = unknown.len().saturating_sub(SHOWN);
    let list = unknown
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("tensors not part of a LLaVA-1.6 model: {list}{tail}")
}

/// Reads `model.safetensors.index.json`: the shard files (sorted) and the file index of each name.
fn read_index(dir: &Path, path: &Path) -> Result<(Vec<PathBuf>, BTreeMap<String, usize>)> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let index = ShardIndex::parse(&text, &path.display().to_string())?;
    Ok((
        index.files.iter().map(|f| dir.join(f)).collect(),
        index.file_of,
    ))
}

/// A `model.safetensors.index.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardIndex {
    /// The shard files, sorted, each a plain file name beside the index.
    pub files: Vec<String>,
    /// Each tensor name's position in `files`.
    pub file_of: BTreeMap<String, usize>,
    /// `metadata.total_size`: the tensors' bytes (a little less than the files').
    pub total_size: Option<u64>,
}

impl ShardIndex {
    /// Parses the index text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<ShardIndex> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::checkpoint(path, format!("malformed JSON: {e}")))?;
        let weight_map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                ModelError::checkpoint(path, "key `weight_map` is missing or not an object")
            })?;
        let mut entries: Vec<(&str, &str)> = Vec::with_capacity(weight_map.len());
        for (name, file) in weight_map {
            let file = file.as_str().ok_or_else(|| {
                ModelError::checkpoint(
                    path,
                    format!("key `weight_map.{name}`: expected a file name"),
                )
            })?;
            // Shards live beside the index; anything else would let an index point outside the folder.
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(ModelError::checkpoint(
                    path,
                    format!("shard `{file}` is not a plain file name"),
                ));
            }
            entries.push((name, file));
        }
        let mut files: Vec<&str> = entries.iter().map(|(_, file)| *file).collect();
        files.sort_unstable();
        files.dedup();
        let file_of = entries
            .into_iter()
            .map(|(name, file)| (name.to_string(), files.partition_point(|f| *f < file)))
            .collect();
        Ok(ShardIndex {
            files: files.into_iter().map(str::to_string).collect(),
            file_of,
            total_size: value
                .pointer("/metadata/total_size")
                .and_then(Value::as_u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fake<'a> {
        name: &'a str,
        dtype: &'a str,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    }

    fn f32_tensor<'a>(name: &'a str, shape: &[usize], first: f32) -> Fake<'a> {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|i| (first + i as f32).to_le_bytes())
            .collect();
        Fake {
            name,
            dtype: "F32",
            shape: shape.to_vec(),
            bytes,
        }
    }

    /// A minimal safetensors writer: 8-byte LE header length, JSON header padded with spaces to
    /// a multiple of 8, then the concatenated tensor bytes.
    fn write_safetensors(path: &Path, tensors: &[Fake]) {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut data = Vec::new();
        for t in tensors {
            let begin = data.len();
            data.extend_from_slice(&t.bytes);
            header.insert(
                t.name.to_string(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let mut json = serde_json::to_vec(&header).unwrap();
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&json);
        file.extend_from_slice(&data);
        std::fs::write(path, file).unwrap();
    }

    fn open_err(dir: &Path) -> String {
        match Checkpoint::open(dir) {
            Ok(_) => panic!("checkpoint should not open"),
            Err(e) => e.to_string(),
        }
    }

    /// The same five tensors in each spelling, as `(spelling's file name, canonical name)`.
    const SPELLED: [(Spelling, [(&str, &str); 6]); 4] = [
        (
            Spelling::Hub,
            [
                (
                    "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                    "vision_model.encoder.layers.0.self_attn.q_proj.weight",
                ),
                (
                    "vision_tower.vision_model.pre_layrnorm.weight",
                    "vision_model.pre_layrnorm.weight",
                ),
                (
                    "multi_modal_projector.linear_1.weight",
                    "multi_modal_projector.linear_1.weight",
                ),
                ("image_newline", "image_newline"),
                (
                    "language_model.model.layers.3.mlp.gate_proj.weight",
                    "model.layers.3.mlp.gate_proj.weight",
                ),
                ("language_model.lm_head.weight", "lm_head.weight"),
            ],
        ),
        (
            // Names as transformers 5.24 `save_pretrained` wrote them for a tiny random
            // LlavaNextForConditionalGeneration.
            Spelling::Transformers5,
            [
                (
                    "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
                    "vision_model.encoder.layers.0.self_attn.q_proj.weight",
                ),
                (
                    "vision_tower.pre_layrnorm.weight",
                    "vision_model.pre_layrnorm.weight",
                ),
                (
                    "multi_modal_projector.linear_1.weight",
                    "multi_modal_projector.linear_1.weight",
                ),
                ("image_newline", "image_newline"),
                (
                    "language_model.model.layers.3.mlp.gate_proj.weight",
                    "model.layers.3.mlp.gate_proj.weight",
                ),
                ("language_model.lm_head.weight", "lm_head.weight"),
            ],
        ),
        (
            Spelling::InMemory,
            [
                (
                    "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
                    "vision_model.encoder.layers.0.self_attn.q_proj.weight",
                ),
                (
                    "model.vision_tower.pre_layrnorm.weight",
                    "vision_model.pre_layrnorm.weight",
                ),
                (
                    "model.multi_modal_projector.linear_1.weight",
                    "multi_modal_projector.linear_1.weight",
                ),
                ("model.image_newline", "image_newline"),
                (
                    "model.language_model.layers.3.mlp.gate_proj.weight",
                    "model.layers.3.mlp.gate_proj.weight",
                ),
                ("lm_head.weight", "lm_head.weight"),
            ],
        ),
        (
            Spelling::OriginalLlava,
            [
                (
                    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                    "vision_model.encoder.layers.0.self_attn.q_proj.weight",
                ),
                (
                    "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight",
                    "vision_model.pre_layrnorm.weight",
                ),
                (
                    "model.mm_projector.0.weight",
                    "multi_modal_projector.linear_1.weight",
                ),
                ("model.image_newline", "image_newline"),
                (
                    "model.layers.3.mlp.gate_proj.weight",
                    "model.layers.3.mlp.gate_proj.weight",
                ),
                ("lm_head.weight", "lm_head.weight"),
            ],
        ),
    ];

    #[test]
    fn name_table_maps_every_spelling_both_ways() {
        for (spelling, pairs) in SPELLED {
            for (file_name, canonical) in pairs {
                assert_eq!(
                    canonical_name(file_name).as_deref(),
                    Some(canonical),
                    "{spelling:?} {file_name}"
                );
                let spelled = file_names(canonical);
                assert!(
                    spelled.contains(&(spelling, file_name.to_string())),
                    "{spelling:?}: {canonical} -> {spelled:?}"
                );
            }
        }
        assert_eq!(
            canonical_name("model.mm_projector.2.bias").as_deref(),
            Some("multi_modal_projector.linear_2.bias")
        );
        assert_eq!(
            canonical_name("model.norm.weight").as_deref(),
            Some("model.norm.weight")
        );
        assert_eq!(
            canonical_name("model.language_model.norm.weight").as_deref(),
            Some("model.norm.weight")
        );
        assert_eq!(
            canonical_name("model.language_model.embed_tokens.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(
            canonical_name("vision_tower.embeddings.class_embedding").as_deref(),
            Some("vision_model.embeddings.class_embedding")
        );
        for not_model in [
            "model.mm_projector.1.weight",
            "vision_tower.post_layernorm.weight",
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "image_newline_extra",
            "language_model.model.layers.0.mlp.fc1.weight",
        ] {
            assert_eq!(canonical_name(not_model), None, "{not_model}");
        }
    }

    #[test]
    fn opens_every_spelling_and_reads_values() {
        for (spelling, pairs) in SPELLED {
            let dir = tempfile::tempdir().unwrap();
            let fakes: Vec<Fake> = pairs
                .iter()
                .enumerate()
                .map(|(i, (name, _))| f32_tensor(name, &[2, 3], 10.0 * i as f32))
                .collect();
            write_safetensors(&dir.path().join("model.safetensors"), &fakes);
            let checkpoint = Checkpoint::open(dir.path()).unwrap();
            let mut expected: Vec<&str> = pairs.iter().map(|(_, c)| *c).collect();
            expected.sort_unstable();
            assert_eq!(
                checkpoint.names().collect::<Vec<_>>(),
                expected,
                "{spelling:?}"
            );
            for (i, (_, canonical)) in pairs.iter().enumerate() {
                let tensor = checkpoint.expect(canonical, &[2, 3]).unwrap();
                let first = 10.0 * i as f32;
                assert_eq!(
                    tensor.to_f32(),
                    (0..6).map(|k| first + k as f32).collect::<Vec<_>>(),
                    "{canonical}"
                );
                assert_eq!(tensor.dtype, Dtype::F32);
            }
            assert_eq!(
                checkpoint.info("image_newline"),
                Some(&TensorInfo {
                    shape: vec![2, 3],
                    dtype: StoredDtype::Known(Dtype::F32)
                })
            );
        }
    }

    #[test]
    fn offsets_that_wrap_past_2_pow_64_are_refused() {
        // `end` + the header length wraps to a small number: without checked arithmetic the debug
        // build panics and the release build reads the header text as the tensor's bytes.
        let end = u64::MAX - 20;
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[1],"data_offsets":[{},{end}]}}}}"#,
            end - 4
        );
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&[0; 64]);
        let msg = parse_header(header.as_bytes(), file.len() as u64).unwrap_err();
        assert!(
            msg.contains("tensor `w`") && msg.contains("outside the file"),
            "{msg}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &file).unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("model.safetensors") && msg.contains("outside the file"),
            "{msg}"
        );
    }

    #[test]
    fn sharded_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let shard1 = "model-00001-of-00002.safetensors";
        let shard2 = "model-00002-of-00002.safetensors";
        write_safetensors(
            &dir.path().join(shard1),
            &[
                f32_tensor("language_model.model.embed_tokens.weight", &[4, 2], 0.0),
                f32_tensor("image_newline", &[2], 50.0),
            ],
        );
        write_safetensors(
            &dir.path().join(shard2),
            &[f32_tensor("language_model.lm_head.weight", &[4, 2], 100.0)],
        );
        let index = json!({"metadata": {"total_size": 80}, "weight_map": {
            "language_model.model.embed_tokens.weight": shard1, "image_newline": shard1,
            "language_model.lm_head.weight": shard2}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(
            checkpoint.names().collect::<Vec<_>>(),
            [
                "image_newline",
                "lm_head.weight",
                "model.embed_tokens.weight"
            ]
        );
        assert_eq!(
            checkpoint.read("lm_head.weight").unwrap().to_f32()[7],
            107.0
        );
        assert_eq!(
            checkpoint.read("image_newline").unwrap().to_f32(),
            [50.0, 51.0]
        );
        assert_eq!(
            checkpoint
                .read("model.embed_tokens.weight")
                .unwrap()
                .to_f32()[3],
            3.0
        );

        // The index claims a tensor the shard lacks.
        let wrong = json!({"weight_map": {"image_newline": shard2}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            wrong.to_string(),
        )
        .unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("`image_newline`") && msg.contains(shard2),
            "{msg}"
        );

        // The index names a shard that is not there.
        let absent = json!({"weight_map": {"image_newline": "model-00003-of-00003.safetensors"}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            absent.to_string(),
        )
        .unwrap();
        let msg = open_err(dir.path());
        assert!(msg.contains("model-00003-of-00003.safetensors"), "{msg}");

        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            "{\"weight_map\": [",
        )
        .unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("model.safetensors.index.json") && msg.contains("malformed JSON"),
            "{msg}"
        );
    }

    #[test]
    fn shards_without_index_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("a.safetensors"),
            &[f32_tensor("model.norm.weight", &[3], 1.0)],
        );
        write_safetensors(
            &dir.path().join("b.safetensors"),
            &[f32_tensor("lm_head.weight", &[3, 1], 5.0)],
        );
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(
            checkpoint.names().collect::<Vec<_>>(),
            ["lm_head.weight", "model.norm.weight"]
        );
        assert_eq!(
            checkpoint.read("model.norm.weight").unwrap().to_f32(),
            [1.0, 2.0, 3.0]
        );

        // Same canonical tensor under two spellings.
        write_safetensors(
            &dir.path().join("c.safetensors"),
            &[f32_tensor("model.language_model.norm.weight", &[3], 1.0)],
        );
        let msg = open_err(dir.path());
        assert!(msg.contains("both map to `model.norm.weight`"), "{msg}");

        // Same file name in two shards.
        write_safetensors(
            &dir.path().join("c.safetensors"),
            &[f32_tensor("model.norm.weight", &[3], 1.0)],
        );
        let msg = open_err(dir.path());
        assert!(
            msg.contains("`model.norm.weight` is stored in both"),
            "{msg}"
        );

        let empty = tempfile::tempdir().unwrap();
        assert!(open_err(empty.path()).contains("no model.safetensors"));
    }

    #[test]
    fn truncated_and_malformed_files_fail_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_safetensors(&path, &[f32_tensor("model.norm.weight", &[16], 0.0)]);
        let full = std::fs::read(&path).unwrap();

        std::fs::write(&path, &full[..full.len() - 4]).unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("model.safetensors") && msg.contains("truncated"),
            "{msg}"
        );

        // Cut inside the header: the length prefix no longer fits.
        std::fs::write(&path, &full[..20]).unwrap();
        assert!(open_err(dir.path()).contains("header length"));

        std::fs::write(&path, &full[..5]).unwrap();
        assert!(open_err(dir.path()).contains("too short"));

        let mut bad_json = 6u64.to_le_bytes().to_vec();
        bad_json.extend_from_slice(b"{\"a\": ");
        std::fs::write(&path, bad_json).unwrap();
        assert!(open_err(dir.path()).contains("malformed safetensors header JSON"));

        // Byte range disagrees with the shape.
        let mut wrong_len = f32_tensor("model.norm.weight", &[16], 0.0);
        wrong_len.shape = vec![15];
        write_safetensors(&path, &[wrong_len]);
        let msg = open_err(dir.path());
        assert!(
            msg.contains("64 bytes stored for shape [15] of F32"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_tensors_are_listed_and_buffers_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_safetensors(
            &path,
            &[
                f32_tensor("model.norm.weight", &[2], 0.0),
                f32_tensor("vision_tower.vision_model.post_layernorm.weight", &[2], 0.0),
                f32_tensor("vision_tower.post_layernorm.bias", &[2], 0.0),
                f32_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", &[2], 0.0),
                Fake {
                    name: "vision_tower.vision_model.embeddings.position_ids",
                    dtype: "I64",
                    shape: vec![1, 2],
                    bytes: vec![0; 16],
                },
            ],
        );
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(
            checkpoint.names().collect::<Vec<_>>(),
            ["model.norm.weight"]
        );

        write_safetensors(
            &path,
            &[
                f32_tensor("model.norm.weight", &[2], 0.0),
                f32_tensor("model.layers.0.self_attn.q_proj.bias", &[2], 0.0),
                f32_tensor("text_projection.weight", &[2], 0.0),
            ],
        );
        let msg = open_err(dir.path());
        assert!(
            msg.contains("`model.layers.0.self_attn.q_proj.bias`")
                && msg.contains("`text_projection.weight`"),
            "{msg}"
        );
    }

    #[test]
    fn missing_and_misshapen_tensors() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[f32_tensor("model.mm_projector.0.weight", &[4, 2], 0.0)],
        );
        let checkpoint = Checkpoint::open(dir.path()).unwrap();

        let shape = checkpoint
            .expect("multi_modal_projector.linear_1.weight", &[2, 4])
            .unwrap_err()
            .to_string();
        assert!(
            shape.contains("`model.mm_projector.0.weight`")
                && shape.contains("[4, 2], expected [2, 4]"),
            "{shape}"
        );

        let missing = checkpoint
            .expect("multi_modal_projector.linear_2.weight", &[4, 4])
            .unwrap_err()
            .to_string();
        for tried in [
            "`multi_modal_projector.linear_2.weight` (hub files)",
            "`model.multi_modal_projector.linear_2.weight` (transformers in-memory names)",
            "`model.mm_projector.2.weight` (original LLaVA)",
        ] {
            assert!(missing.contains(tried), "{missing}");
        }
        assert!(
            checkpoint
                .read("lm_head.weight")
                .unwrap_err()
                .to_string()
                .contains("`language_model.lm_head.weight`")
        );
        assert_eq!(checkpoint.info("lm_head.weight"), None);
    }

    #[test]
    fn unsupported_dtype_fails_on_read() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[Fake {
                name: "model.norm.weight",
                dtype: "I8",
                shape: vec![4],
                bytes: vec![1, 2, 3, 4],
            }],
        );
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(
            checkpoint.info("model.norm.weight").unwrap().dtype,
            StoredDtype::Unsupported("I8".into())
        );
        let msg = checkpoint
            .read("model.norm.weight")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dtype I8"), "{msg}");
    }

    #[test]
    fn half_precision_conversions() {
        // Bit patterns worked out by hand from the IEEE layouts.
        let bf16_bits: [u16; 5] = [0x3FC0, 0x4049, 0xC120, 0x47C3, 0x0000];
        // 1.5, 3.140625, -10.0, 99840 (beyond f16: +inf), 0
        let bf16 = HostTensor {
            shape: vec![5],
            dtype: Dtype::BF16,
            bytes: bf16_bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
        };
        assert_eq!(bf16.to_f32(), [1.5, 3.140625, -10.0, 99840.0, 0.0]);
        let as_f16: Vec<u16> = bf16
            .to_f16_bytes()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(as_f16, [0x3E00, 0x4248, 0xC900, 0x7C00, 0x0000]);

        let f16_bits: [u16; 4] = [0x3C00, 0xC500, 0x7BFF, 0x0001]; // 1, -5, 65504, 2^-24
        let f16 = HostTensor {
            shape: vec![2, 2],
            dtype: Dtype::F16,
            bytes: f16_bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
        };
        assert_eq!(f16.to_f32(), [1.0, -5.0, 65504.0, 2f32.powi(-24)]);
        assert_eq!(f16.to_f16_bytes(), f16.bytes);

        // 0.1 rounds to 0x2E66; 1 + 2^-11 is a tie that rounds to even (1.0).
        let f32 = HostTensor {
            shape: vec![2],
            dtype: Dtype::F32,
            bytes: [0.1f32, 1.0 + 2f32.powi(-11)]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        };
        let as_f16: Vec<u16> = f32
            .to_f16_bytes()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(as_f16, [0x2E66, 0x3C00]);
        assert_eq!(f32.numel(), 2);
    }

    #[test]
    fn reads_bf16_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let bits: [u16; 2] = [0x3FC0, 0xC120];
        write_safetensors(
            &dir.path().join("model.safetensors"),
            &[Fake {
                name: "image_newline",
                dtype: "BF16",
                shape: vec![2],
                bytes: bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
            }],
        );
        let tensor = Checkpoint::open(dir.path())
            .unwrap()
            .expect("image_newline", &[2])
            .unwrap();
        assert_eq!(tensor.dtype, Dtype::BF16);
        assert_eq!(tensor.to_f32(), [1.5, -10.0]);
    }
}
