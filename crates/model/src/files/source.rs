//! Where a model's files come from, and the one set of rules that finds them.
//!
//! A [`ModelSource`] hands out a checkpoint folder's files by name and streams its shards: a
//! [`DirSource`] reads a local folder, the web crate's source fetches from a base URL. The
//! loading sequence ([`crate::llava::Llava::load`]) is written once over this trait, as `async`
//! code: the browser awaits its fetches, native code drives the same futures with a blocking
//! executor (a folder's reads complete at once).
//!
//! Probing. Every optional file is looked up through [`ModelSource::has`]: a source that can list
//! its folder (a directory; a web source given the folder's file list; any folder once its
//! `manifest.json` is read) answers it and is never asked for a file it lacks; a source that
//! cannot list answers `None`, and the file is requested, a missing file (HTTP 404) meaning
//! absent. The lookups, in order: the weights' layout (`model.safetensors.index.json`, then
//! `manifest.json`, then `model.safetensors`, then a listing's `*.safetensors`), `config.json`,
//! `tokenizer.json` (else `tokenizer.model`), `tokenizer_config.json`, the chat template
//! (`chat_template.jinja`, else `chat_template.json`, else the `chat_template` key of
//! `tokenizer_config.json`, else a built-in), `preprocessor_config.json` (else the
//! `image_processor` section of `processor_config.json`) and `generation_config.json`.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use crate::error::{ModelError, Result};
use crate::files::checkpoint::{INDEX_FILE, SINGLE_FILE, ShardIndex};
use crate::files::loader::{CHUNK_BYTES, Progress, WeightLoader};
use crate::files::manifest::{MANIFEST_FILE, Manifest};

/// A checkpoint folder's files, by name relative to the folder (`config.json`,
/// `model-00001-of-00002.safetensors`, `tower/config.json`).
// The futures are driven on one thread (the browser's event loop, or a blocking executor
// natively), so they need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait ModelSource {
    type Shard: ShardReader;

    /// `file` as messages name it: its path, or its URL.
    fn locate(&self, file: &str) -> String;

    /// The folder (or base URL) as messages name it.
    fn location(&self) -> String;

    /// Whether the folder has `file`, when the source knows without a request; `None` when only
    /// reading it tells.
    fn has(&self, file: &str) -> Option<bool>;

    /// The folder's files, when the source can list them.
    fn list(&self) -> Option<Vec<String>>;

    /// The size of `file` in bytes, when known without reading it (for progress totals).
    fn size(&self, file: &str) -> Option<u64>;

    /// The bytes of `file`; `Ok(None)` when `optional` and the file does not exist (a missing
    /// required file is an error naming it).
    async fn read(&self, file: &str, optional: bool) -> Result<Option<Vec<u8>>>;

    /// Opens `file` for streaming.
    async fn open_shard(&self, file: &str) -> Result<Self::Shard>;
}

/// A converted folder's source whose small files are checked against the manifest's hashes as
/// they are read ([`Manifest::check_file`]); shards are checked by the weight loader.
pub struct HashedSource<'a, S> {
    source: &'a S,
    manifest: &'a Manifest,
}

impl<'a, S: ModelSource> HashedSource<'a, S> {
    pub fn new(source: &'a S, manifest: &'a Manifest) -> HashedSource<'a, S> {
        HashedSource { source, manifest }
    }
}

impl<S: ModelSource> ModelSource for HashedSource<'_, S> {
    type Shard = S::Shard;

    fn locate(&self, file: &str) -> String {
        self.source.locate(file)
    }
    fn location(&self) -> String {
        self.source.location()
    }
    fn has(&self, file: &str) -> Option<bool> {
        self.source.has(file)
    }
    fn list(&self) -> Option<Vec<String>> {
        self.source.list()
    }
    fn size(&self, file: &str) -> Option<u64> {
        self.source.size(file)
    }
    async fn read(&self, file: &str, optional: bool) -> Result<Option<Vec<u8>>> {
        let bytes = self.source.read(file, optional).await?;
        if let Some(bytes) = &bytes {
            self.manifest.check_file(file, bytes).map_err(|e| match e {
                ModelError::Config { msg, .. } => ModelError::config(self.source.locate(file), msg),
                other => other,
            })?;
        }
        Ok(bytes)
    }
    async fn open_shard(&self, file: &str) -> Result<Self::Shard> {
        self.source.open_shard(file).await
    }
}

/// One shard's bytes, chunk by chunk.
#[allow(async_fn_in_trait)]
pub trait ShardReader {
    /// The file's size, when the source knows it before the bytes (file metadata, a
    /// `Content-Length`).
    fn size(&self) -> Option<u64>;

    /// The next bytes; `Ok(None)` at the end.
    async fn next_chunk(&mut self) -> Result<Option<&[u8]>>;
}

/// A local checkpoint folder.
pub struct DirSource {
    dir: PathBuf,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> DirSource {
        DirSource { dir: dir.into() }
    }
}

impl ModelSource for DirSource {
    type Shard = FileShard;

    fn locate(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn has(&self, file: &str) -> Option<bool> {
        Some(self.dir.join(file).is_file())
    }

    fn list(&self) -> Option<Vec<String>> {
        let entries = std::fs::read_dir(&self.dir).ok()?;
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().is_file())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        names.sort();
        Some(names)
    }

    fn size(&self, file: &str) -> Option<u64> {
        std::fs::metadata(self.dir.join(file)).ok().map(|m| m.len())
    }

    async fn read(&self, file: &str, optional: bool) -> Result<Option<Vec<u8>>> {
        let path = self.dir.join(file);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ModelError::io(&path, e)),
        }
    }

    async fn open_shard(&self, file: &str) -> Result<FileShard> {
        let path = self.dir.join(file);
        let handle = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let size = handle
            .metadata()
            .map_err(|e| ModelError::io(&path, e))?
            .len();
        Ok(FileShard {
            path,
            file: handle,
            size,
            buffer: vec![0; CHUNK_BYTES],
        })
    }
}

/// A shard file read [`CHUNK_BYTES`] at a time into one reused buffer.
pub struct FileShard {
    path: PathBuf,
    file: File,
    size: u64,
    buffer: Vec<u8>,
}

impl ShardReader for FileShard {
    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    async fn next_chunk(&mut self) -> Result<Option<&[u8]>> {
        loop {
            return match self.file.read(&mut self.buffer) {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(&self.buffer[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(ModelError::io(&self.path, e)),
            };
        }
    }
}

/// How a folder stores its weights.
pub enum Layout {
    /// A converted folder (docs/converted-format.md).
    Converted(Manifest),
    /// HuggingFace safetensors: the shard files (none when the folder has none), when known up
    /// front their total bytes, and the index that listed them (checked against the shards).
    Checkpoint {
        shards: Vec<String>,
        bytes_total: Option<u64>,
        index: Option<ShardIndex>,
    },
}

/// What the caller already knows of the layout (a URL that names `manifest.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LayoutHint {
    #[default]
    Probe,
    Converted,
}

/// The text of `file` (optional: `None` when the source has none); `listed` is what the
/// folder is known to hold, when known.
pub(crate) async fn read_text<S: ModelSource>(
    source: &S,
    file: &str,
    listed: Option<bool>,
    optional: bool,
) -> Result<Option<String>> {
    if optional && listed == Some(false) {
        return Ok(None);
    }
    let Some(bytes) = source.read(file, optional).await? else {
        return Ok(None);
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| ModelError::config(source.locate(file), "is not UTF-8 text"))
}

/// Finds how the folder stores its weights (see the module docs for the order).
pub async fn find_layout<S: ModelSource>(source: &S, hint: LayoutHint) -> Result<Layout> {
    let manifest = |text: String| {
        Manifest::from_json(&text).map_err(|e| match e {
            ModelError::Config { msg, .. } => ModelError::config(source.locate(MANIFEST_FILE), msg),
            other => other,
        })
    };
    if hint == LayoutHint::Converted {
        let text = read_text(source, MANIFEST_FILE, None, false)
            .await?
            .unwrap_or_default();
        return Ok(Layout::Converted(manifest(text)?));
    }
    if let Some(text) = read_text(source, INDEX_FILE, source.has(INDEX_FILE), true).await? {
        let index = ShardIndex::parse(&text, &source.locate(INDEX_FILE))?;
        let sizes: Option<u64> = index.files.iter().map(|f| source.size(f)).sum();
        return Ok(Layout::Checkpoint {
            bytes_total: sizes.or(index.total_size),
            shards: index.files.clone(),
            index: Some(index),
        });
    }
    if let Some(text) = read_text(source, MANIFEST_FILE, source.has(MANIFEST_FILE), true).await? {
        return Ok(Layout::Converted(manifest(text)?));
    }
    if source.has(SINGLE_FILE) != Some(false) {
        return Ok(Layout::Checkpoint {
            shards: vec![SINGLE_FILE.into()],
            bytes_total: source.size(SINGLE_FILE),
            index: None,
        });
    }
    // None at all is reported once the config has been read (a folder without config.json is
    // told of that first).
    let shards: Vec<String> = source
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter(|name| name.ends_with(".safetensors"))
        .collect();
    let bytes_total = shards.iter().map(|f| source.size(f)).sum();
    Ok(Layout::Checkpoint {
        shards,
        bytes_total,
        index: None,
    })
}

/// The error for a folder without weights.
pub(crate) fn no_shards<S: ModelSource>(source: &S) -> ModelError {
    ModelError::checkpoint(
        source.location(),
        "no model.safetensors, index or *.safetensors file",
    )
}

/// Streams each shard through `loader`, chunk by chunk, reporting progress after each chunk.
pub async fn stream_shards<S: ModelSource>(
    source: &S,
    shards: &[String],
    loader: &mut WeightLoader<'_>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<()> {
    for file in shards {
        let mut shard = source.open_shard(file).await?;
        loader.begin_shard(file, shard.size())?;
        while let Some(chunk) = shard.next_chunk().await? {
            loader.push(chunk)?;
            progress(loader.progress());
        }
        loader.end_shard()?;
    }
    Ok(())
}
