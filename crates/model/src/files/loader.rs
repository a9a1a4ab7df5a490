//! The streaming weight loader shared by the native and web front ends.
//!
//! A [`WeightLoader`] is fed the bytes of one shard after another in chunks of any size (file
//! reads natively, `fetch` stream chunks on the web). It parses each shard's safetensors header as
//! soon as it has arrived, checks the entries against what the model (and, for a converted
//! folder, the manifest) expects, and uploads each tensor to the GPU as soon as its bytes are
//! complete: the host holds one chunk plus the tensor being received, never a whole shard. Each
//! converted shard's SHA-256 is computed on the way and checked at its end. The [`Weights`] come
//! out only when every shard has been read and verified, so a failed or interrupted load leaves
//! nothing half-built behind (the uploaded tensors are dropped with the loader).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use half::f16;
use llava_gpu::quant::QuantMatrix;
use llava_gpu::{DType, Gpu, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::files::checkpoint::{
    Dtype, HostTensor, SafetensorsEntry, ShardIndex, StoredDtype, canonical_name, checked_numel,
    header_len, is_ignorable, not_part_of_the_model, parse_header,
};
use crate::files::manifest::{MANIFEST_FILE, Manifest, QWEIGHT_SUFFIX, SCALES_SUFFIX, hex};
use crate::files::weights::{WeightPrecision, Weights};

/// Bytes read from a shard file at a time ([`crate::files::source::DirSource`]).
pub const CHUNK_BYTES: usize = 4 << 20;

/// What a load is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Reading the config, tokenizer and template (or the manifest).
    Config,
    /// Streaming shards to the GPU.
    Weights,
    /// The model is built.
    Ready,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Config => "config",
            Stage::Weights => "weights",
            Stage::Ready => "ready",
        }
    }
}

/// A progress report: weight bytes read so far out of all shards' bytes, and the file at hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress<'a> {
    pub bytes_done: u64,
    /// At least `bytes_done` (a web checkpoint without an index does not know its total up front).
    pub bytes_total: u64,
    pub stage: Stage,
    pub file: &'a str,
}

/// What the shards hold.
#[derive(Clone, Debug)]
pub enum WeightFormat {
    /// HuggingFace safetensors in any name spelling, uploaded at the given precision (quantized
    /// on load where it asks for Q8/Q4). Unknown tensor names are an error.
    Checkpoint(WeightPrecision),
    /// A converted folder: tensors in their stored layout exactly as its manifest lists them,
    /// with each shard's size and SHA-256 checked.
    Converted(Manifest),
}

/// Streams shards into GPU weights; see the module docs.
pub struct WeightLoader<'g> {
    uploads: Uploads<'g>,
    /// Where the shards come from (a folder or base URL), for error messages.
    location: String,
    shard: Option<ShardStream>,
    /// The file of the shard being read, or of the last one.
    file: String,
    loaded: BTreeSet<String>,
    bytes_done: u64,
    bytes_total: u64,
}

impl<'g> WeightLoader<'g> {
    /// A loader for a checkpoint whose shards add up to `bytes_total` bytes (0 if unknown).
    pub fn checkpoint(
        gpu: &'g Gpu,
        precision: WeightPrecision,
        location: &str,
        bytes_total: u64,
    ) -> Self {
        WeightLoader::new(
            gpu,
            WeightFormat::Checkpoint(precision),
            location,
            bytes_total,
        )
    }

    /// A loader for the shards of a converted folder (read in any order, each exactly once).
    pub fn converted(gpu: &'g Gpu, manifest: Manifest, location: &str) -> Self {
        let total = manifest.total_bytes();
        WeightLoader::new(gpu, WeightFormat::Converted(manifest), location, total)
    }

    fn new(gpu: &'g Gpu, format: WeightFormat, location: &str, bytes_total: u64) -> Self {
        WeightLoader {
            uploads: Uploads {
                gpu,
                format,
                weights: Weights::default(),
                path: String::new(),
                file: String::new(),
                roles: BTreeMap::new(),
                held: BTreeMap::new(),
                origin: BTreeMap::new(),
            },
            location: location.to_string(),
            shard: None,
            file: String::new(),
            loaded: BTreeSet::new(),
            bytes_done: 0,
            bytes_total,
        }
    }

    /// Starts the shard `file` (a name relative to the location). `size`, when the source knows
    /// it (file metadata, Content-Length), is checked against the manifest before any byte.
    pub fn begin_shard(&mut self, file: &str, size: Option<u64>) -> Result<()> {
        let path = join(&self.location, file);
        if let Some(open) = &self.shard {
            let msg = format!("started before shard {} was finished", open.path);
            return Err(ModelError::checkpoint(&path, msg));
        }
        if self.loaded.contains(file) {
            return Err(ModelError::checkpoint(
                &path,
                "this shard was already loaded once",
            ));
        }
        let expected = match &self.uploads.format {
            WeightFormat::Checkpoint(_) => size,
            WeightFormat::Converted(manifest) => {
                let entry = manifest
                    .shards
                    .iter()
                    .find(|s| s.file == file)
                    .ok_or_else(|| {
                        ModelError::checkpoint(
                            &path,
                            format!("is not a shard listed in {MANIFEST_FILE}"),
                        )
                    })?;
                if let Some(size) = size.filter(|&s| s != entry.bytes) {
                    return Err(ModelError::checkpoint(
                        &path,
                        size_mismatch(size, entry.bytes),
                    ));
                }
                Some(entry.bytes)
            }
        };
        self.uploads.path = path.clone();
        self.uploads.file = file.to_string();
        self.file = file.to_string();
        self.shard = Some(ShardStream::new(path, expected));
        Ok(())
    }

    /// The next bytes of the current shard.
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        let shard = self.shard.as_mut().ok_or_else(|| {
            ModelError::checkpoint(&self.location, "bytes pushed outside a shard")
        })?;
        shard.push(chunk, &mut self.uploads)?;
        self.bytes_done += chunk.len() as u64;
        Ok(())
    }

    /// Ends the current shard: checks that it was complete and, for a converted folder, its
    /// size and SHA-256; then submits the uploads so that their staging memory can be reused.
    pub fn end_shard(&mut self) -> Result<()> {
        let shard = self
            .shard
            .take()
            .ok_or_else(|| ModelError::checkpoint(&self.location, "no shard to end"))?;
        let path = shard.path.clone();
        if let WeightFormat::Converted(manifest) = &self.uploads.format {
            let entry = manifest
                .shards
                .iter()
                .find(|s| s.file == self.file)
                .expect("checked at begin");
            if shard.received != entry.bytes {
                return Err(ModelError::checkpoint(
                    &path,
                    size_mismatch(shard.received, entry.bytes),
                ));
            }
            let (digest, sha256) = (shard.finish()?, entry.sha256.clone());
            if !digest.eq_ignore_ascii_case(&sha256) {
                let msg = format!(
                    "SHA-256 {digest} does not match the manifest's {sha256} (corrupt file?)"
                );
                return Err(ModelError::checkpoint(&path, msg));
            }
        } else {
            shard.finish()?;
        }
        if let Some(name) = self.uploads.held.keys().next() {
            let msg = format!("quantized tensor {name} is incomplete");
            return Err(ModelError::checkpoint(&path, msg));
        }
        self.uploads.gpu.batch().submit()?;
        self.loaded.insert(self.file.clone());
        Ok(())
    }

    pub fn progress(&self) -> Progress<'_> {
        Progress {
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total.max(self.bytes_done),
            stage: Stage::Weights,
            file: &self.file,
        }
    }

    /// Checks a checkpoint's `model.safetensors.index.json` (named `path` in errors) against
    /// the shards read: each tensor of the model it lists must have been in the shard it names.
    pub fn check_index(&self, index: &ShardIndex, path: &str) -> Result<()> {
        let shard_of: BTreeMap<&str, &str> = self
            .uploads
            .origin
            .values()
            .map(|(name, shard)| (name.as_str(), shard.as_str()))
            .collect();
        for (name, &file) in &index.file_of {
            let listed = &index.files[file];
            if canonical_name(name).is_some()
                && shard_of.get(name.as_str()) != Some(&listed.as_str())
            {
                let msg = format!(
                    "lists `{name}` in {} but that file does not contain it",
                    join(&self.location, listed)
                );
                return Err(ModelError::checkpoint(path, msg));
            }
        }
        Ok(())
    }

    /// The uploaded weights, once every shard (of a converted folder: every listed shard) has
    /// been read completely and verified.
    pub fn finish(self) -> Result<Weights> {
        if let Some(open) = &self.shard {
            return Err(ModelError::checkpoint(
                &open.path,
                "the load ended inside this shard",
            ));
        }
        if let WeightFormat::Converted(manifest) = &self.uploads.format
            && let Some(missing) = manifest
                .shards
                .iter()
                .find(|s| !self.loaded.contains(&s.file))
        {
            let msg = format!(
                "shard {} listed in {MANIFEST_FILE} was not loaded",
                missing.file
            );
            return Err(ModelError::checkpoint(&self.location, msg));
        }
        Ok(self.uploads.weights)
    }
}

fn join(location: &str, file: &str) -> String {
    if location.is_empty() || location.ends_with('/') {
        format!("{location}{file}")
    } else {
        format!("{location}/{file}")
    }
}

fn size_mismatch(got: u64, want: u64) -> String {
    format!("{got} bytes, the manifest says {want} (truncated or incomplete download?)")
}

/// Streams a whole safetensors file through the shard parser `chunk` bytes at a time and returns
/// every entry with its bytes, in file order. The entry point of the shard fuzz target.
pub fn scan_shard(bytes: &[u8], chunk: usize) -> Result<Vec<(SafetensorsEntry, Vec<u8>)>> {
    let mut stream = ShardStream::new("shard.safetensors".into(), Some(bytes.len() as u64));
    let mut sink = Recording::default();
    for part in bytes.chunks(chunk.max(1)) {
        stream.push(part, &mut sink)?;
    }
    stream.finish()?;
    Ok(sink.tensors)
}

/// Keeps every entry and its bytes.
#[derive(Default)]
struct Recording {
    tensors: Vec<(SafetensorsEntry, Vec<u8>)>,
}

impl ShardSink for Recording {
    fn header(&mut self, entries: Vec<SafetensorsEntry>) -> Result<Vec<SafetensorsEntry>> {
        Ok(entries)
    }
    fn tensor(&mut self, entry: SafetensorsEntry, bytes: Cow<'_, [u8]>) -> Result<()> {
        self.tensors.push((entry, bytes.into_owned()));
        Ok(())
    }
}

/// Receives a shard's header entries and then its tensors' bytes.
trait ShardSink {
    /// Checks the header; returns the entries whose bytes are wanted (the rest are skipped).
    fn header(&mut self, entries: Vec<SafetensorsEntry>) -> Result<Vec<SafetensorsEntry>>;
    /// One wanted entry, complete.
    fn tensor(&mut self, entry: SafetensorsEntry, bytes: Cow<'_, [u8]>) -> Result<()>;
}

/// One safetensors file parsed from consecutive chunks of its bytes.
struct ShardStream {
    path: String,
    /// The file's size when known.
    size: Option<u64>,
    received: u64,
    hasher: Sha256,
    /// The 8-byte length prefix and JSON header, until complete.
    header: Vec<u8>,
    /// Wanted entries still to come, by start offset (`None` until the header is parsed).
    entries: Option<VecDeque<SafetensorsEntry>>,
    /// The bytes of the first of `entries` received so far (when it spans chunks).
    current: Vec<u8>,
}

impl ShardStream {
    fn new(path: String, size: Option<u64>) -> ShardStream {
        ShardStream {
            path,
            size,
            received: 0,
            hasher: Sha256::new(),
            header: Vec::new(),
            entries: None,
            current: Vec::new(),
        }
    }

    fn fail(&self, msg: impl Into<String>) -> ModelError {
        ModelError::checkpoint(&self.path, msg)
    }

    fn push(&mut self, chunk: &[u8], sink: &mut dyn ShardSink) -> Result<()> {
        self.hasher.update(chunk);
        self.received += chunk.len() as u64;
        if let Some(size) = self.size.filter(|&s| self.received > s) {
            return Err(self.fail(format!("more than the expected {size} bytes arrived")));
        }
        let mut rest = chunk;
        while self.entries.is_none() && !rest.is_empty() {
            rest = self.take_header(rest, sink)?;
        }
        // File offset of rest[0].
        let mut offset = self.received - rest.len() as u64;
        let Some(entries) = self.entries.as_mut() else {
            return Ok(());
        };
        while let Some(entry) = entries.front() {
            if offset >= entry.end && self.current.is_empty() {
                // Only an empty tensor can end where the previous one ended.
                let entry = entries.pop_front().expect("peeked");
                sink.tensor(entry, Cow::Borrowed(&[]))?;
                continue;
            }
            if rest.is_empty() {
                break;
            }
            if offset < entry.start {
                let gap = (entry.start - offset).min(rest.len() as u64);
                rest = &rest[gap as usize..];
                offset += gap;
                continue;
            }
            let need = entry.end - offset;
            let take = need.min(rest.len() as u64) as usize;
            let (bytes, after) = rest.split_at(take);
            rest = after;
            offset += take as u64;
            if self.current.is_empty() && take as u64 == entry.end - entry.start {
                let entry = entries.pop_front().expect("peeked");
                sink.tensor(entry, Cow::Borrowed(bytes))?;
                continue;
            }
            if self.current.is_empty() {
                self.current
                    .reserve_exact((entry.end - entry.start) as usize);
            }
            self.current.extend_from_slice(bytes);
            if take as u64 == need {
                let entry = entries.pop_front().expect("peeked");
                sink.tensor(entry, Cow::Owned(std::mem::take(&mut self.current)))?;
            }
        }
        Ok(())
    }

    /// Moves header bytes from `chunk` into `self.header`, parses the header once complete and
    /// returns the rest of the chunk.
    fn take_header<'c>(&mut self, chunk: &'c [u8], sink: &mut dyn ShardSink) -> Result<&'c [u8]> {
        let size = self.size.unwrap_or(u64::MAX);
        let want = self.header_end(size)?.unwrap_or(8);
        let take = (want - self.header.len()).min(chunk.len());
        self.header.extend_from_slice(&chunk[..take]);
        if self.header_end(size)? == Some(self.header.len()) {
            let mut all = parse_header(&self.header[8..], size).map_err(|msg| self.fail(msg))?;
            all.sort_by_key(|e| (e.start, e.end));
            if let Some(pair) = all.windows(2).find(|p| p[1].start < p[0].end) {
                let msg = format!("tensors `{}` and `{}` overlap", pair[0].name, pair[1].name);
                return Err(self.fail(msg));
            }
            let mut wanted = sink.header(all)?;
            wanted.sort_by_key(|e| (e.start, e.end));
            self.entries = Some(wanted.into());
            self.header = Vec::new();
        }
        Ok(&chunk[take..])
    }

    /// Where the header ends, once its 8-byte length prefix has arrived.
    fn header_end(&self, size: u64) -> Result<Option<usize>> {
        let Some(prefix) = self.header.get(..8) else {
            return Ok(None);
        };
        let len =
            header_len(prefix.try_into().expect("8 bytes"), size).map_err(|msg| self.fail(msg))?;
        Ok(Some(8 + len as usize))
    }

    /// Checks that the file ended after its last tensor; returns its SHA-256 in hex.
    fn finish(self) -> Result<String> {
        let received = self.received;
        match &self.entries {
            None => Err(self.fail(format!(
                "the file ended inside its safetensors header after {received} bytes (truncated?)"
            ))),
            Some(entries) if !entries.is_empty() => Err(self.fail(format!(
                "the file ended after {received} bytes, before tensor `{}` was complete (truncated?)",
                entries[0].name
            ))),
            Some(_) => match self.size.filter(|&s| s != received) {
                Some(size) => {
                    Err(self.fail(format!("{received} bytes arrived, expected {size} (truncated?)")))
                }
                None => Ok(hex(&self.hasher.finalize())),
            },
        }
    }
}

/// What a wanted entry of the current shard becomes.
enum Role {
    /// A checkpoint tensor: converted to the loader's precision on upload.
    Checkpoint { canonical: String, dtype: Dtype },
    /// A converted tensor stored as the GPU reads it.
    Stored { name: String, dtype: DType },
    /// The packed data of quantized matrix `name`.
    QWeight(String),
    /// The scales of quantized matrix `name`.
    Scales(String),
}

/// A quantized matrix whose two entries have not both arrived.
struct QuantParts {
    dtype: DType,
    rows: usize,
    cols: usize,
    data: Option<Vec<u8>>,
    scales: Option<Vec<f16>>,
}

/// The sink that checks headers and uploads tensors.
struct Uploads<'g> {
    gpu: &'g Gpu,
    format: WeightFormat,
    weights: Weights,
    /// The current shard's path and file name.
    path: String,
    file: String,
    /// Wanted entries of the current shard by their name in the file.
    roles: BTreeMap<String, Role>,
    held: BTreeMap<String, QuantParts>,
    /// Checkpoints: each canonical name seen so far, with its name in the file and its shard.
    origin: BTreeMap<String, (String, String)>,
}

impl Uploads<'_> {
    fn fail(&self, msg: impl Into<String>) -> ModelError {
        ModelError::checkpoint(&self.path, msg)
    }

    fn checkpoint_header(
        &mut self,
        entries: Vec<SafetensorsEntry>,
    ) -> Result<Vec<SafetensorsEntry>> {
        let mut unknown = Vec::new();
        let mut wanted = Vec::new();
        for entry in entries {
            let Some(canonical) = canonical_name(&entry.name) else {
                if !is_ignorable(&entry.name) {
                    unknown.push(entry.name);
                }
                continue;
            };
            let dtype = match &entry.info.dtype {
                StoredDtype::Known(dtype) => *dtype,
                StoredDtype::Unsupported(other) => {
                    return Err(self.fail(format!(
                        "tensor `{}` has dtype {other}; only F32, F16 and BF16 are supported",
                        entry.name
                    )));
                }
            };
            if let Some((other, file)) = self.origin.get(&canonical) {
                let msg = if *other == entry.name {
                    format!(
                        "tensor `{other}` is stored in both {file} and {}",
                        self.file
                    )
                } else {
                    format!(
                        "tensors `{other}` ({file}) and `{}` both map to `{canonical}`",
                        entry.name
                    )
                };
                return Err(self.fail(msg));
            }
            self.origin
                .insert(canonical.clone(), (entry.name.clone(), self.file.clone()));
            self.roles
                .insert(entry.name.clone(), Role::Checkpoint { canonical, dtype });
            wanted.push(entry);
        }
        if !unknown.is_empty() {
            return Err(self.fail(not_part_of_the_model(&unknown)));
        }
        Ok(wanted)
    }

    fn converted_header(
        &mut self,
        entries: Vec<SafetensorsEntry>,
    ) -> Result<Vec<SafetensorsEntry>> {
        let WeightFormat::Converted(manifest) = &self.format else {
            unreachable!("called for converted folders")
        };
        let shard = manifest
            .shards
            .iter()
            .find(|s| s.file == self.file)
            .expect("checked at begin");
        let mut by_name: BTreeMap<String, SafetensorsEntry> =
            entries.into_iter().map(|e| (e.name.clone(), e)).collect();
        let mut wanted = Vec::new();
        let mut roles = Vec::new();
        let mut held = Vec::new();
        for name in &shard.tensors {
            let kind = manifest.quant.tensors.get(name).ok_or_else(|| {
                self.fail(format!(
                    "tensor {name} has no storage kind in {MANIFEST_FILE}"
                ))
            })?;
            match *kind {
                dtype @ (DType::F32 | DType::F16) => {
                    let entry = self.take_entry(
                        &mut by_name,
                        name,
                        if dtype == DType::F32 { "F32" } else { "F16" },
                    )?;
                    roles.push((
                        name.clone(),
                        Role::Stored {
                            name: name.clone(),
                            dtype,
                        },
                    ));
                    wanted.push(entry);
                }
                DType::Q8 | DType::Q6 | DType::Q4 => {
                    let qname = format!("{name}{QWEIGHT_SUFFIX}");
                    let sname = format!("{name}{SCALES_SUFFIX}");
                    let data = self.take_entry(&mut by_name, &qname, "U8")?;
                    let scales = self.take_entry(&mut by_name, &sname, "F16")?;
                    let (qshape, sshape) = (&data.info.shape, &scales.info.shape);
                    // parse_header checks the byte counts of float dtypes only.
                    if checked_numel(qshape) != Some(data.end - data.start) {
                        let msg = format!(
                            "tensor {qname}: {} bytes for U8 shape {qshape:?}",
                            data.end - data.start
                        );
                        return Err(self.fail(msg));
                    }
                    let &[rows, packed] = &qshape[..] else {
                        return Err(
                            self.fail(format!("tensor {qname} has shape {qshape:?}, expected 2-D"))
                        );
                    };
                    let group = kind.group_size();
                    let cols = kind.cols_from_packed(packed).unwrap_or(0);
                    if cols == 0 || cols % group != 0 || *sshape != [rows, cols / group] {
                        return Err(self.fail(format!(
                            "tensor {name}: scales of shape {sshape:?} do not fit {kind:?} weights of {rows}x{cols}"
                        )));
                    }
                    let parts = QuantParts {
                        dtype: *kind,
                        rows,
                        cols,
                        data: None,
                        scales: None,
                    };
                    held.push((name.clone(), parts));
                    roles.push((qname, Role::QWeight(name.clone())));
                    roles.push((sname, Role::Scales(name.clone())));
                    wanted.extend([data, scales]);
                }
                // Manifest::from_json refuses it already; a web load must not panic.
                DType::U32 => {
                    return Err(self.fail(format!("tensor {name}: u32 is not a weight storage")));
                }
            }
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(self.fail(format!(
                "holds tensor {extra}, which the manifest does not list for this shard"
            )));
        }
        self.roles.extend(roles);
        self.held.extend(held);
        Ok(wanted)
    }

    /// Removes entry `name`, which must have safetensors dtype `dtype`.
    fn take_entry(
        &self,
        by_name: &mut BTreeMap<String, SafetensorsEntry>,
        name: &str,
        dtype: &str,
    ) -> Result<SafetensorsEntry> {
        let entry = by_name
            .remove(name)
            .ok_or_else(|| self.fail(format!("has no tensor {name}")))?;
        let stored = match &entry.info.dtype {
            StoredDtype::Known(Dtype::F32) => "F32",
            StoredDtype::Known(Dtype::F16) => "F16",
            StoredDtype::Known(Dtype::BF16) => "BF16",
            StoredDtype::Unsupported(other) => other.as_str(),
        };
        if stored != dtype {
            return Err(self.fail(format!(
                "tensor {name} is stored as {stored}, the format needs {dtype}"
            )));
        }
        Ok(entry)
    }

    /// Uploads quantized matrix `name` once both its entries have arrived.
    fn complete_quant(&mut self, name: &str) -> Result<()> {
        let parts = &self.held[name];
        if parts.data.is_none() || parts.scales.is_none() {
            return Ok(());
        }
        let parts = self.held.remove(name).expect("present");
        let matrix = QuantMatrix {
            dtype: parts.dtype,
            rows: parts.rows,
            cols: parts.cols,
            data: parts.data.expect("checked"),
            scales: parts.scales.expect("checked"),
        };
        let tensor = Tensor::from_quant(self.gpu, &matrix)?;
        self.weights.insert_tensor(name.to_string(), tensor);
        Ok(())
    }
}

impl ShardSink for Uploads<'_> {
    fn header(&mut self, entries: Vec<SafetensorsEntry>) -> Result<Vec<SafetensorsEntry>> {
        self.roles.clear();
        match self.format {
            WeightFormat::Checkpoint(_) => self.checkpoint_header(entries),
            WeightFormat::Converted(_) => self.converted_header(entries),
        }
    }

    fn tensor(&mut self, entry: SafetensorsEntry, bytes: Cow<'_, [u8]>) -> Result<()> {
        let name = entry.name.clone();
        self.upload(entry, bytes)
            .map_err(|e| self.upload_failed(&name, e))
    }
}

impl Uploads<'_> {
    /// A GPU error while uploading tensor `name` (too large for this GPU, out of memory, device
    /// lost), with the file and tensor it happened at.
    fn upload_failed(&self, name: &str, e: ModelError) -> ModelError {
        match e {
            ModelError::Gpu(e) => self.fail(format!("tensor {name}: {e}")),
            other => other,
        }
    }

    fn upload(&mut self, entry: SafetensorsEntry, bytes: Cow<'_, [u8]>) -> Result<()> {
        let role = self
            .roles
            .remove(&entry.name)
            .expect("only wanted entries arrive");
        match role {
            Role::Checkpoint { canonical, dtype } => {
                let WeightFormat::Checkpoint(precision) = self.format else {
                    unreachable!("checkpoint roles come from checkpoint headers")
                };
                let host = HostTensor {
                    shape: entry.info.shape,
                    dtype,
                    bytes: bytes.into_owned(),
                };
                self.weights
                    .insert(self.gpu, &canonical, &host, precision)?;
            }
            Role::Stored { name, dtype } => {
                let tensor = Tensor::from_bytes(self.gpu, &entry.info.shape, dtype, &bytes)?;
                self.weights.insert_tensor(name, tensor);
            }
            Role::QWeight(name) => {
                self.held.get_mut(&name).expect("held at header").data = Some(bytes.into_owned());
                self.complete_quant(&name)?;
            }
            Role::Scales(name) => {
                let scales = bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect();
                self.held.get_mut(&name).expect("held at header").scales = Some(scales);
                self.complete_quant(&name)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use serde_json::json;

    use super::*;
    use crate::files::checkpoint::Checkpoint;
    use crate::files::manifest::sha256_hex;

    const MISTRAL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/mistral-tiny"
    );

    fn gpu() -> &'static Gpu {
        static GPU: OnceLock<Gpu> = OnceLock::new();
        GPU.get_or_init(|| Gpu::new_blocking().expect("a wgpu adapter"))
    }

    fn shard_files() -> Vec<PathBuf> {
        Checkpoint::open(MISTRAL).unwrap().files().to_vec()
    }

    /// Every shard of the bundled checkpoint in chunks of many sizes gives each tensor's bytes as
    /// the file reader reads them, and the file's SHA-256.
    #[test]
    fn any_chunking_gives_the_file_readers_tensors() {
        let checkpoint = Checkpoint::open(MISTRAL).unwrap();
        let files = shard_files();
        assert_eq!(files.len(), 3);
        for (i, path) in files.iter().enumerate() {
            let bytes = std::fs::read(path).unwrap();
            // Byte by byte only for the small first shard.
            let sizes: &[usize] = if i == 0 {
                &[1, 7, 4096, usize::MAX]
            } else {
                &[65_537, 1 << 20, usize::MAX]
            };
            for &size in sizes {
                let mut stream =
                    ShardStream::new(path.display().to_string(), Some(bytes.len() as u64));
                let mut sink = Recording::default();
                for chunk in bytes.chunks(size.min(bytes.len())) {
                    stream.push(chunk, &mut sink).unwrap();
                }
                assert_eq!(stream.finish().unwrap(), sha256_hex(&bytes));
                assert!(!sink.tensors.is_empty());
                for (entry, data) in &sink.tensors {
                    let name = &entry.name;
                    let Some(canonical) = canonical_name(name) else {
                        assert!(is_ignorable(name), "{name}");
                        continue;
                    };
                    assert_eq!(
                        data,
                        &checkpoint.read(&canonical).unwrap().bytes,
                        "{name} in chunks of {size}"
                    );
                }
                let names: BTreeSet<_> = sink.tensors.iter().map(|(e, _)| e.name.clone()).collect();
                assert_eq!(names.len(), sink.tensors.len(), "each tensor once");
            }
        }
    }

    #[test]
    fn a_cut_stream_is_an_error_naming_the_file() {
        let path = &shard_files()[0];
        let bytes = std::fs::read(path).unwrap();
        for (cut, expected) in [
            (bytes.len() - 1, "before tensor"),
            (20, "inside its safetensors header"),
        ] {
            let mut stream = ShardStream::new("shard.safetensors".into(), None);
            let mut sink = Recording::default();
            stream.push(&bytes[..cut], &mut sink).unwrap();
            let msg = stream.finish().unwrap_err().to_string();
            assert!(
                msg.contains("shard.safetensors") && msg.contains(expected),
                "{msg}"
            );
        }
        // Known size: one byte too many is refused as it arrives.
        let mut stream = ShardStream::new("shard.safetensors".into(), Some(bytes.len() as u64 - 1));
        let msg = stream
            .push(&bytes, &mut Recording::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("more than the expected"), "{msg}");
    }

    /// A safetensors file of F32 tensors `(name, values)`.
    fn safetensors(tensors: &[(&str, &[f32])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, values) in tensors {
            let begin = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                name.to_string(),
                json!({"dtype": "F32", "shape": [values.len()], "data_offsets": [begin, data.len()]}),
            );
        }
        let json = serde_json::to_vec(&header).unwrap();
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&json);
        file.extend_from_slice(&data);
        file
    }

    fn push_shard(
        loader: &mut WeightLoader<'_>,
        file: &str,
        bytes: &[u8],
        chunk: usize,
    ) -> Result<()> {
        loader.begin_shard(file, Some(bytes.len() as u64))?;
        for part in bytes.chunks(chunk) {
            loader.push(part)?;
        }
        loader.end_shard()
    }

    #[test]
    fn checkpoint_shards_reject_unknown_and_repeated_tensors() {
        let norm: &[f32] = &[1.0, 2.0, 3.0];
        let unknown = safetensors(&[
            ("model.norm.weight", norm),
            ("text_projection.weight", norm),
        ]);
        let mut loader = WeightLoader::checkpoint(gpu(), WeightPrecision::Native, "remote/", 0);
        let msg = push_shard(&mut loader, "a.safetensors", &unknown, 5)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("remote/a.safetensors") && msg.contains("`text_projection.weight`"),
            "{msg}"
        );

        let first = safetensors(&[("model.norm.weight", norm)]);
        let again = safetensors(&[("language_model.model.norm.weight", norm)]);
        let mut loader = WeightLoader::checkpoint(gpu(), WeightPrecision::Native, "dir", 0);
        push_shard(&mut loader, "a.safetensors", &first, 3).unwrap();
        let msg = push_shard(&mut loader, "b.safetensors", &again, 3)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("both map to `model.norm.weight`"), "{msg}");

        let mut loader = WeightLoader::checkpoint(gpu(), WeightPrecision::Native, "dir", 0);
        push_shard(&mut loader, "a.safetensors", &first, 3).unwrap();
        let msg = push_shard(&mut loader, "a.safetensors", &first, 3)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("already loaded"), "{msg}");
        let msg = push_shard(&mut loader, "c.safetensors", &first, 3)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("stored in both a.safetensors and c.safetensors"),
            "{msg}"
        );
    }

    #[test]
    fn checkpoint_tensors_upload_with_their_values_and_progress() {
        let norm: &[f32] = &[1.5, -2.0, 3.25, 0.0];
        let newline: &[f32] = &[7.0, 8.0];
        let bytes = safetensors(&[
            ("image_newline", newline),
            ("language_model.model.norm.weight", norm),
        ]);
        let total = bytes.len() as u64;
        let mut loader = WeightLoader::checkpoint(gpu(), WeightPrecision::Native, "dir", total);
        loader.begin_shard("model.safetensors", None).unwrap();
        assert_eq!(loader.progress().bytes_done, 0);
        for part in bytes.chunks(11) {
            loader.push(part).unwrap();
        }
        assert_eq!(
            loader.progress(),
            Progress {
                bytes_done: total,
                bytes_total: total,
                stage: Stage::Weights,
                file: "model.safetensors"
            }
        );
        loader.end_shard().unwrap();
        let mut weights = loader.finish().unwrap();
        let norm_t = weights.take("model.norm.weight", &[4]).unwrap();
        assert_eq!(pollster::block_on(norm_t.to_f32(gpu())).unwrap(), norm);
        let newline_t = weights.take("image_newline", &[2]).unwrap();
        assert_eq!(
            pollster::block_on(newline_t.to_f32(gpu())).unwrap(),
            newline
        );
    }

    fn manifest_for(shards: &[(&str, &[u8], &[&str])]) -> Manifest {
        let tensors: BTreeMap<&str, &str> = shards
            .iter()
            .flat_map(|(_, _, names)| names.iter().map(|n| (*n, "f32")))
            .collect();
        let json = json!({
            "format": crate::files::manifest::FORMAT_NAME,
            "version": crate::files::manifest::FORMAT_VERSION,
            "config": {},
            "files": [],
            "quant": {"precision": "f32", "group_sizes": crate::files::manifest::group_sizes(), "tensors": tensors},
            "shards": shards.iter().map(|(file, bytes, names)| json!({
                "file": file, "bytes": bytes.len(), "sha256": sha256_hex(bytes), "tensors": names,
            })).collect::<Vec<_>>(),
        });
        Manifest::from_json(&json.to_string()).unwrap()
    }

    #[test]
    fn converted_shards_are_checked_against_the_manifest() {
        let a = safetensors(&[("model.norm.weight", &[1.0, 2.0])]);
        let b = safetensors(&[("image_newline", &[3.0])]);
        let manifest = manifest_for(&[
            ("a.safetensors", &a, &["model.norm.weight"]),
            ("b.safetensors", &b, &["image_newline"]),
        ]);

        // In any order, in any chunks.
        let mut loader = WeightLoader::converted(gpu(), manifest.clone(), "dir");
        push_shard(&mut loader, "b.safetensors", &b, 1).unwrap();
        push_shard(&mut loader, "a.safetensors", &a, 9).unwrap();
        let mut weights = loader.finish().unwrap();
        let norm = weights.take("model.norm.weight", &[2]).unwrap();
        assert_eq!(pollster::block_on(norm.to_f32(gpu())).unwrap(), [1.0, 2.0]);

        // A shard never read: no weights come out.
        let mut loader = WeightLoader::converted(gpu(), manifest.clone(), "dir");
        push_shard(&mut loader, "a.safetensors", &a, 9).unwrap();
        let msg = loader.finish().map(|_| ()).unwrap_err().to_string();
        assert!(
            msg.contains("shard b.safetensors listed in manifest.json was not loaded"),
            "{msg}"
        );

        // Interrupted inside a shard.
        let mut loader = WeightLoader::converted(gpu(), manifest.clone(), "dir");
        loader.begin_shard("a.safetensors", None).unwrap();
        loader.push(&a[..a.len() / 2]).unwrap();
        let msg = loader.finish().map(|_| ()).unwrap_err().to_string();
        assert!(
            msg.contains("dir/a.safetensors") && msg.contains("ended inside"),
            "{msg}"
        );

        let mut loader = WeightLoader::converted(gpu(), manifest.clone(), "dir");
        let msg = push_shard(&mut loader, "c.safetensors", &a, 9)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a shard listed in manifest.json"), "{msg}");

        // Size known up front (a short file), or only at the end (a stream cut short).
        let msg = push_shard(&mut loader, "a.safetensors", &a[..a.len() - 4], 9)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&format!(
                "{} bytes, the manifest says {}",
                a.len() - 4,
                a.len()
            )),
            "{msg}"
        );
        let mut loader = WeightLoader::converted(gpu(), manifest.clone(), "dir");
        loader.begin_shard("a.safetensors", None).unwrap();
        loader.push(&a[..a.len() - 4]).unwrap();
        let msg = loader.end_shard().unwrap_err().to_string();
        assert!(msg.contains("truncated"), "{msg}");

        // Same size, other bytes: the SHA-256 differs.
        let mut corrupt = a.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        let mut loader = WeightLoader::converted(gpu(), manifest.clone(), "dir");
        let msg = push_shard(&mut loader, "a.safetensors", &corrupt, 9)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("SHA-256") && msg.contains(&manifest.shards[0].sha256),
            "{msg}"
        );

        // A tensor the manifest does not list for the shard.
        let extra = safetensors(&[
            ("model.norm.weight", &[1.0, 2.0]),
            ("lm_head.weight", &[0.0]),
        ]);
        let manifest = manifest_for(&[("a.safetensors", &extra, &["model.norm.weight"])]);
        let mut loader = WeightLoader::converted(gpu(), manifest, "dir");
        let msg = push_shard(&mut loader, "a.safetensors", &extra, 9)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("holds tensor lm_head.weight"), "{msg}");
    }
    #[test]
    fn quantized_shapes_whose_product_overflows_are_refused() {
        // 2^32 x 2^32 U8 values in 4 stored bytes: the product wraps to 0 in u64.
        let header = json!({
            "lm_head.weight.qweight": {"dtype": "U8", "shape": [1u64 << 32, 1u64 << 32], "data_offsets": [0, 4]},
            "lm_head.weight.scales": {"dtype": "F16", "shape": [1, 1], "data_offsets": [4, 6]},
        });
        let json = serde_json::to_vec(&header).unwrap();
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&json);
        file.extend_from_slice(&[0; 6]);
        let manifest = json!({
            "format": crate::files::manifest::FORMAT_NAME,
            "version": crate::files::manifest::FORMAT_VERSION,
            "config": {},
            "files": [],
            "quant": {"precision": "q8", "group_sizes": crate::files::manifest::group_sizes(), "tensors": {"lm_head.weight": "q8"}},
            "shards": [{"file": "a.safetensors", "bytes": file.len(), "sha256": sha256_hex(&file), "tensors": ["lm_head.weight"]}],
        });
        let manifest = Manifest::from_json(&manifest.to_string()).unwrap();
        let mut loader = WeightLoader::converted(gpu(), manifest, "dir");
        let msg = push_shard(&mut loader, "a.safetensors", &file, 7)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("dir/a.safetensors")
                && msg.contains("lm_head.weight.qweight: 4 bytes for U8 shape"),
            "{msg}"
        );
    }
}
