//! Converts a HuggingFace checkpoint folder to the converted format (docs/converted-format.md),
//! tensor by tensor: each is read, converted to the dtype [`storage_dtype_keeping`] picks (with
//! the default [`KeepOptions`], the same rule as quantize-on-load, so both give the same bytes),
//! and appended to its shard. Shard
//! headers depend only on names and shapes, so the whole layout, with exact file sizes, is
//! planned before any weight is read; `--dry-run` prints that plan from a config alone.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use llava_gpu::{DType, quant};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::files::checkpoint::{Checkpoint, Dtype, StoredDtype};
use crate::files::config::LlavaConfig;
use crate::files::manifest::{
    FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, Manifest, QWEIGHT_SUFFIX, QuantScheme,
    SCALES_SUFFIX, ShardEntry, group_sizes, hex, sha256_hex,
};
use crate::files::weights::{KeepOptions, WeightPrecision, storage_dtype_keeping};

/// Default shard size: 64 MiB.
pub const DEFAULT_SHARD_BYTES: u64 = 64 << 20;

/// Small files copied next to the shards when the checkpoint has them.
pub const COPIED_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
];

/// One tensor of the plan and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub storage: DType,
}

impl PlannedTensor {
    /// The safetensors entries it becomes: (name, dtype, shape, bytes).
    fn entries(&self) -> Vec<(String, &'static str, Vec<usize>, u64)> {
        // In u64: sizes from a validated config fit it, but not a 32-bit usize (wasm).
        let numel: u64 = self.shape.iter().map(|&d| d as u64).product();
        match self.storage {
            DType::F32 => vec![(self.name.clone(), "F32", self.shape.clone(), 4 * numel)],
            DType::U32 => unreachable!("storage_dtype never picks u32"),
            DType::F16 => vec![(self.name.clone(), "F16", self.shape.clone(), 2 * numel)],
            DType::Q8 | DType::Q6 | DType::Q4 => {
                let (rows, cols) = (self.shape[0], self.shape[1]);
                let dtype = self.storage;
                let packed = dtype.data_bytes(cols) as usize;
                let groups = cols / dtype.group_size();
                vec![
                    (
                        format!("{}{QWEIGHT_SUFFIX}", self.name),
                        "U8",
                        vec![rows, packed],
                        rows as u64 * packed as u64,
                    ),
                    (
                        format!("{}{SCALES_SUFFIX}", self.name),
                        "F16",
                        vec![rows, groups],
                        2 * rows as u64 * groups as u64,
                    ),
                ]
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.entries().iter().map(|e| e.3).sum()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedShard {
    pub file: String,
    pub tensors: Vec<PlannedTensor>,
    /// The 8-byte length prefix and the JSON header, padded to 8 bytes.
    pub header: Vec<u8>,
    /// Size of the whole file.
    pub bytes: u64,
}

/// Where every tensor goes and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ConversionPlan {
    pub precision: WeightPrecision,
    pub shards: Vec<PlannedShard>,
}

impl ConversionPlan {
    /// Plans shards for `(canonical name, shape, stored dtype)` tensors in the given order:
    /// a shard is closed when the next tensor would take it past `shard_bytes` (a tensor larger
    /// than that gets a shard of its own).
    pub fn new(
        tensors: &[(String, Vec<usize>, Dtype)],
        precision: WeightPrecision,
        keep: KeepOptions,
        shard_bytes: u64,
    ) -> ConversionPlan {
        let mut groups: Vec<Vec<PlannedTensor>> = Vec::new();
        let mut current = 0u64;
        for (name, shape, stored) in tensors {
            let dtype = storage_dtype_keeping(name, shape, *stored, precision, keep);
            let storage = dtype;
            let tensor = PlannedTensor {
                name: name.clone(),
                shape: shape.clone(),
                storage,
            };
            let size = tensor.bytes();
            match groups.last_mut() {
                Some(group) if current.saturating_add(size) <= shard_bytes => group.push(tensor),
                _ => {
                    groups.push(vec![tensor]);
                    current = 0;
                }
            }
            current += size;
        }
        let count = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(i, tensors)| {
                let header = shard_header(&tensors);
                let bytes =
                    header.len() as u64 + tensors.iter().map(PlannedTensor::bytes).sum::<u64>();
                let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
                PlannedShard {
                    file,
                    tensors,
                    header,
                    bytes,
                }
            })
            .collect();
        ConversionPlan { precision, shards }
    }

    /// The plan for a model described by its config alone (every tensor stored as `stored`).
    pub fn for_config(
        config: &LlavaConfig,
        stored: Dtype,
        precision: WeightPrecision,
        keep: KeepOptions,
        shard_bytes: u64,
    ) -> Self {
        let tensors: Vec<_> = model_tensors(config)
            .into_iter()
            .map(|(name, shape)| (name, shape, stored))
            .collect();
        ConversionPlan::new(&tensors, precision, keep, shard_bytes)
    }

    pub fn summary(&self) -> SizeSummary {
        let mut summary = SizeSummary::default();
        for shard in &self.shards {
            summary.shards += 1;
            summary.headers += shard.header.len() as u64;
            summary.total += shard.bytes;
            for t in &shard.tensors {
                let row = summary.by_storage.entry(t.storage).or_default();
                row.tensors += 1;
                row.params += t.shape.iter().map(|&d| d as u64).product::<u64>();
                row.bytes += t.bytes();
            }
        }
        summary
    }
}

/// The safetensors header of a shard: length prefix plus JSON, padded with spaces to 8 bytes.
fn shard_header(tensors: &[PlannedTensor]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({ "format": FORMAT_NAME }));
    let mut offset = 0u64;
    for t in tensors {
        for (name, dtype, shape, bytes) in t.entries() {
            map.insert(
                name,
                json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes] }),
            );
            offset += bytes;
        }
    }
    let mut json = serde_json::to_vec(&Value::Object(map)).expect("a JSON map serializes");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    header
}

/// Per storage kind: tensors, parameters and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SizeRow {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SizeSummary {
    pub by_storage: BTreeMap<DType, SizeRow>,
    pub shards: usize,
    pub headers: u64,
    /// All shard files together.
    pub total: u64,
}

impl fmt::Display for SizeSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (storage, row) in &self.by_storage {
            writeln!(
                f,
                "{:>4}: {:>5} tensors {:>14} params {:>15} bytes ({:.3} GB)",
                format!("{storage:?}").to_lowercase(),
                row.tensors,
                row.params,
                row.bytes,
                row.bytes as f64 / 1e9
            )?;
        }
        write!(
            f,
            "total: {} shards, {} bytes ({:.3} GB, {:.3} GiB) incl. {} header bytes",
            self.shards,
            self.total,
            self.total as f64 / 1e9,
            self.total as f64 / (1u64 << 30) as f64,
            self.headers
        )
    }
}

/// Canonical names and shapes of every tensor a LLaVA-1.6 checkpoint with `config` holds (the
/// whole vision tower, as checkpoints store it, though the last layer's output goes unused).
pub fn model_tensors(config: &LlavaConfig) -> Vec<(String, Vec<usize>)> {
    let v = &config.vision;
    let t = &config.text;
    let (vd, vm) = (v.hidden_size, v.intermediate_size);
    let positions = (v.image_size / v.patch_size).pow(2) + 1;
    let mut out: Vec<(String, Vec<usize>)> = vec![
        ("vision_model.embeddings.class_embedding".into(), vec![vd]),
        (
            "vision_model.embeddings.patch_embedding.weight".into(),
            vec![vd, 3, v.patch_size, v.patch_size],
        ),
        (
            "vision_model.embeddings.position_embedding.weight".into(),
            vec![positions, vd],
        ),
        ("vision_model.pre_layrnorm.weight".into(), vec![vd]),
        ("vision_model.pre_layrnorm.bias".into(), vec![vd]),
    ];
    for i in 0..v.num_hidden_layers {
        let p = format!("vision_model.encoder.layers.{i}");
        for (module, rows, cols) in [
            ("self_attn.q_proj", vd, vd),
            ("self_attn.k_proj", vd, vd),
            ("self_attn.v_proj", vd, vd),
            ("self_attn.out_proj", vd, vd),
            ("mlp.fc1", vm, vd),
            ("mlp.fc2", vd, vm),
        ] {
            out.push((format!("{p}.{module}.weight"), vec![rows, cols]));
            out.push((format!("{p}.{module}.bias"), vec![rows]));
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            out.push((format!("{p}.{norm}.weight"), vec![vd]));
            out.push((format!("{p}.{norm}.bias"), vec![vd]));
        }
    }
    let d = t.hidden_size;
    out.extend([
        ("multi_modal_projector.linear_1.weight".into(), vec![d, vd]),
        ("multi_modal_projector.linear_1.bias".into(), vec![d]),
        ("multi_modal_projector.linear_2.weight".into(), vec![d, d]),
        ("multi_modal_projector.linear_2.bias".into(), vec![d]),
        ("image_newline".into(), vec![d]),
        ("model.embed_tokens.weight".into(), vec![t.vocab_size, d]),
    ]);
    let (q_dim, kv_dim) = (
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
    );
    for i in 0..t.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q_dim, d]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv_dim, d]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv_dim, d]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q_dim]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        out.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![t.intermediate_size, d],
        ));
        out.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![t.intermediate_size, d],
        ));
        out.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![d, t.intermediate_size],
        ));
    }
    out.push(("model.norm.weight".into(), vec![d]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![t.vocab_size, d]));
    }
    out
}

/// The plan for a checkpoint folder's tensors (sorted by canonical name).
pub fn plan_checkpoint(
    checkpoint: &Checkpoint,
    precision: WeightPrecision,
    keep: KeepOptions,
    shard_bytes: u64,
) -> Result<ConversionPlan> {
    let mut tensors = Vec::new();
    for name in checkpoint.names() {
        let info = checkpoint.info(name).expect("names() lists stored tensors");
        let dtype = match &info.dtype {
            StoredDtype::Known(dtype) => *dtype,
            StoredDtype::Unsupported(other) => {
                let msg = format!(
                    "tensor {name} has dtype {other}; only F32, F16 and BF16 can be converted"
                );
                return Err(ModelError::Input(msg));
            }
        };
        tensors.push((name.to_string(), info.shape.clone(), dtype));
    }
    Ok(ConversionPlan::new(&tensors, precision, keep, shard_bytes))
}

/// `<tower>/config.json` when an original-LLaVA config's `mm_vision_tower` names a folder inside
/// `input` with a CLIP config: the converted folder needs it too, at the same place, to read the
/// same config.
fn local_tower_config(config: &Value, input: &Path) -> Option<String> {
    let tower = config.get("mm_vision_tower")?.as_str()?;
    let inside = Path::new(tower)
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    let file = format!("{tower}/config.json");
    (inside && input.join(&file).is_file()).then_some(file)
}

/// Converts the checkpoint folder `input` into `output` (created if needed), one tensor in host
/// memory at a time. The manifest is written last, so an interrupted conversion leaves a folder
/// that does not load as a converted model.
pub fn convert(
    input: &Path,
    output: &Path,
    precision: WeightPrecision,
    keep: KeepOptions,
    shard_bytes: u64,
) -> Result<Converted> {
    if input.join(MANIFEST_FILE).is_file() {
        return Err(ModelError::Input(format!(
            "{} is already a converted folder (it has {MANIFEST_FILE}); convert takes a checkpoint \
             folder, and a converted one loads as it is",
            input.display()
        )));
    }
    let config_path = input.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let config: Value = serde_json::from_str(&config_text)
        .map_err(|e| ModelError::config("config.json", e.to_string()))?;
    LlavaConfig::from_dir(input)?;
    let checkpoint = Checkpoint::open(input)?;
    let plan = plan_checkpoint(&checkpoint, precision, keep, shard_bytes)?;
    std::fs::create_dir_all(output).map_err(|e| ModelError::io(output, e))?;
    if std::fs::canonicalize(input).ok() == std::fs::canonicalize(output).ok() {
        return Err(ModelError::Input(
            "the output folder must differ from the input folder".into(),
        ));
    }
    clear_previous_conversion(input, output)?;

    let mut files = Vec::new();
    for name in COPIED_FILES {
        let from = input.join(name);
        if from.is_file() {
            let to = output.join(name);
            std::fs::copy(&from, &to).map_err(|e| ModelError::io(&to, e))?;
            files.push(name.to_string());
        }
    }
    if let Some(tower_config) = local_tower_config(&config, input) {
        let to = output.join(&tower_config);
        let folder = to.parent().expect("a file in a folder");
        std::fs::create_dir_all(folder).map_err(|e| ModelError::io(folder, e))?;
        std::fs::copy(input.join(&tower_config), &to).map_err(|e| ModelError::io(&to, e))?;
        files.push(tower_config);
    }
    let mut shards = Vec::with_capacity(plan.shards.len());
    let mut storage = BTreeMap::new();
    for planned in &plan.shards {
        shards.push(write_shard(
            &checkpoint,
            &output.join(&planned.file),
            planned,
        )?);
        storage.extend(planned.tensors.iter().map(|t| (t.name.clone(), t.storage)));
    }
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        config,
        file_sha256: files_sha256(output, &files)?,
        files,
        quant: QuantScheme {
            precision,
            group_sizes: group_sizes(),
            tensors: storage,
        },
        shards,
    };
    let json = serde_json::to_string_pretty(&manifest).expect("the manifest serializes");
    let path = output.join(MANIFEST_FILE);
    std::fs::write(&path, json).map_err(|e| ModelError::io(&path, e))?;
    Ok(Converted {
        manifest,
        summary: plan.summary(),
    })
}

/// The SHA-256 of each copied file, as written to `output`.
fn files_sha256(output: &Path, files: &[String]) -> Result<BTreeMap<String, String>> {
    files
        .iter()
        .map(|name| {
            let path = output.join(name);
            let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
            Ok((name.clone(), sha256_hex(&bytes)))
        })
        .collect()
}

/// Removes what an earlier conversion in `output` would leave mixed into this one: its manifest
/// first (so an interrupted run leaves no loadable mix), then the shards it lists and the copied
/// files this input does not have (a stale `chat_template.jinja` would be read as this model's).
fn clear_previous_conversion(input: &Path, output: &Path) -> Result<()> {
    let manifest_path = output.join(MANIFEST_FILE);
    let Ok(text) = std::fs::read_to_string(&manifest_path) else {
        return Ok(());
    };
    std::fs::remove_file(&manifest_path).map_err(|e| ModelError::io(&manifest_path, e))?;
    // Read leniently: a manifest of another version still names its shards.
    let previous: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let shards = previous["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["file"].as_str());
    let plain = |name: &&str| Path::new(name).components().count() == 1 && !name.starts_with('.');
    let copied = COPIED_FILES
        .iter()
        .copied()
        .filter(|name| !input.join(name).is_file());
    for name in shards.filter(plain).chain(copied) {
        let path = output.join(name);
        if path.is_file() {
            std::fs::remove_file(&path).map_err(|e| ModelError::io(&path, e))?;
        }
    }
    Ok(())
}

/// What [`convert`] wrote.
pub struct Converted {
    pub manifest: Manifest,
    pub summary: SizeSummary,
}

/// Writes one shard, hashing as it goes, and checks its size against the plan.
fn write_shard(checkpoint: &Checkpoint, path: &Path, planned: &PlannedShard) -> Result<ShardEntry> {
    let file = File::create(path).map_err(|e| ModelError::io(path, e))?;
    let mut out = HashingWriter {
        inner: BufWriter::new(file),
        hasher: Sha256::new(),
        written: 0,
    };
    out.write_all(&planned.header)
        .map_err(|e| ModelError::io(path, e))?;
    for t in &planned.tensors {
        let host = checkpoint.read(&t.name)?;
        if host.shape != t.shape {
            let msg = format!("tensor {} changed shape while converting", t.name);
            return Err(ModelError::checkpoint(path, msg));
        }
        let io = |e| ModelError::io(path, e);
        match t.storage {
            DType::F32 => out
                .write_all(bytemuck::cast_slice(&host.to_f32()))
                .map_err(io)?,
            DType::F16 => out.write_all(&host.to_f16_bytes()).map_err(io)?,
            DType::U32 => unreachable!("storage_dtype never picks u32"),
            DType::Q8 | DType::Q6 | DType::Q4 => {
                let q = quant::quantize(t.storage, t.shape[0], t.shape[1], &host.to_f32());
                out.write_all(&q.data).map_err(io)?;
                out.write_all(bytemuck::cast_slice(&q.scales)).map_err(io)?;
            }
        }
    }
    out.inner.flush().map_err(|e| ModelError::io(path, e))?;
    if out.written != planned.bytes {
        let msg = format!("wrote {} bytes, planned {}", out.written, planned.bytes);
        return Err(ModelError::checkpoint(path, msg));
    }
    Ok(ShardEntry {
        file: planned.file.clone(),
        bytes: out.written,
        sha256: hex(&out.hasher.finalize()),
        tensors: planned.tensors.iter().map(|t| t.name.clone()).collect(),
    })
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
