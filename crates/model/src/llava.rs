//! The whole LLaVA-1.6 model: vision tower + projector + language model, tokenizer and template.

use std::path::Path;
use std::sync::Arc;

use llava_gpu::ops::embed::gather_rows;
use llava_gpu::ops::reduce::argmax;
use llava_gpu::{Batch, DType, Gpu, Tensor};
use llava_image::{ImageConfig, Rgb8};

use crate::error::{ModelError, Result};
use crate::files::checkpoint::{Dtype, INDEX_FILE};
use crate::files::config::{
    CONFIG_FILE, GENERATION_FILE, GenerationConfig, LlavaConfig, PREPROCESSOR_FILE, PROCESSOR_FILE,
    PreprocessorConfig, TowerFile, vision_tower_folder,
};
use crate::files::loader::{Progress, Stage, WeightLoader};
use crate::files::manifest::{MANIFEST_FILE, Manifest};
use crate::files::needs::{self, GpuLimits, WeightFormats};
use crate::files::source::{
    self, DirSource, HashedSource, Layout, LayoutHint, ModelSource, read_text,
};
use crate::files::weights::{WeightPrecision, Weights, named_precision};
use crate::generate::{ChatSession, Sampler};
use crate::image_cache::{self, DEFAULT_IMAGE_CACHE_BYTES, ImageCache, ImageCacheStats};
use crate::net::language::{DecodePlan, KvCache, LanguageModel};
use crate::net::projector::Projector;
use crate::net::vision::VisionTower;
use crate::text::{
    BuiltinTemplate, ChatTemplate, Message, SENTENCEPIECE_FILE, TEMPLATE_JINJA_FILE,
    TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TemplateFiles, Tokenizer,
};

/// Default KV-cache size: room for the largest AnyRes image (2928 tokens) plus a conversation.
pub const DEFAULT_CONTEXT: usize = 4096;

/// Marks image positions in [`Llava::tokenize_prompt`]'s ids for checkpoints whose vocabulary has no
/// image token (the original LLaVA layout, where LLaVA itself uses the id -200). It is outside every
/// vocabulary; those positions take the image features, never an embedding row.
pub const IMAGE_MARKER: u32 = u32::MAX;

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub precision: WeightPrecision,
    /// KV-cache capacity in tokens (default: [`DEFAULT_CONTEXT`], capped by the model's limits).
    pub context: Option<usize>,
}

/// The KV cache's element type. f16 halves its memory and the bytes a decode step reads from it
/// (greedy tokens unchanged on every fixture, first-step logits cosine >= 0.9999 against f32:
/// tests/kv_cache.rs); f32 keeps logits within 1e-4 of transformers', and is what a loaded
/// [`Llava`] starts with. The `llava` command and the JS package take [`KvPrecision::preferred`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvPrecision {
    #[default]
    F32,
    F16,
}

named_precision!(
    KvPrecision,
    "KV-cache precision",
    [(F32, "f32"), (F16, "f16")]
);

impl KvPrecision {
    /// f16 where the adapter has shader-f16 (the decode kernels' f16 variants read it as such),
    /// f32 elsewhere: the entry points' default.
    pub fn preferred(gpu: &Gpu) -> KvPrecision {
        if gpu.features().shader_f16 {
            KvPrecision::F16
        } else {
            KvPrecision::F32
        }
    }

    /// The element type of the cache's tensors.
    pub fn dtype(self) -> DType {
        match self {
            KvPrecision::F32 => DType::F32,
            KvPrecision::F16 => DType::F16,
        }
    }
}

/// A sequence on the GPU: its KV cache, the ids whose keys and values the cache holds, and the
/// decode step planned over it at its first prefill; and of the reply being decoded, how far it
/// is and whether a step ran ahead.
pub struct Sequence {
    cache: KvCache,
    /// `Some(None)`: the step could not be planned (it runs op by op).
    plan: Option<Option<DecodePlan>>,
    ids: Vec<u32>,
    /// The reply's tokens so far (the plan's slot of the next step).
    slot: usize,
    /// The step of the token after the latest one was submitted already.
    ahead: bool,
    /// Decode steps submitted for the reply (a step run ahead and undone counts too).
    steps: usize,
}

impl Sequence {
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Forgets what the sequence holds (its GPU buffers are kept).
    pub fn clear(&mut self) {
        self.cache.truncate(0);
        self.ids.clear();
    }

    /// Whether the decode step runs planned (else op by op).
    pub fn planned(&self) -> bool {
        matches!(self.plan, Some(Some(_)))
    }

    /// Whether the cache has room for the step of the reply's latest token.
    pub fn has_room(&self) -> bool {
        self.cache.len() - usize::from(self.ahead) < self.cache.capacity()
    }

    /// Ends the reply: undoes a step that ran ahead of it. Returns the decode steps it submitted.
    pub fn end_reply(&mut self) -> usize {
        if std::mem::take(&mut self.ahead) {
            self.cache.truncate(self.cache.len() - 1);
            self.steps += 1;
        }
        self.steps
    }
}

/// A reply's first token, from [`Llava::prefill`].
pub struct Prefill {
    pub token: u32,
    /// The logits at the last prompt position, when asked for.
    pub logits: Option<Vec<f32>>,
    /// The prompt ids run (those after the reused prefix).
    pub tokens_run: usize,
}

/// One image run through the vision tower and projector, packed into LLM tokens. Cloning shares
/// the features' GPU buffer.
#[derive(Clone)]
pub struct EncodedImage {
    /// `[tokens, hidden]` rows that replace the image's placeholder ids.
    pub features: Tensor,
    pub tokens: usize,
    pub best_resolution: [u32; 2],
    pub grid: [u32; 2],
}

/// Everything but the weights: config, tokenizer, chat template, image settings, stop ids.
pub struct ModelFiles {
    pub config: LlavaConfig,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub image_config: ImageConfig,
    pub eos_ids: Vec<u32>,
    /// The weights' dtype as `config.json` declares it (`torch_dtype` or `dtype`), if it does.
    pub declared_dtype: Option<Dtype>,
}

impl ModelFiles {
    /// Reads a checkpoint folder's config, tokenizer, template and processor files.
    pub fn from_dir(dir: &Path) -> Result<ModelFiles> {
        pollster::block_on(ModelFiles::read(&DirSource::new(dir), None))
    }

    /// Reads the config, tokenizer, template, processor and generation files from `source`, by
    /// the rules in [`crate::files::source`]. A converted folder's `manifest` lists the files it has
    /// (so nothing is probed) and carries the config when `config.json` is not among them.
    pub async fn read<S: ModelSource>(
        source: &S,
        manifest: Option<&Manifest>,
    ) -> Result<ModelFiles> {
        let listed = |name: &str| match manifest {
            Some(manifest) => Some(manifest.files.iter().any(|f| f == name)),
            None => source.has(name),
        };
        let optional = |name: &'static str| read_text(source, name, listed(name), true);

        let config_file = source.locate(CONFIG_FILE);
        let config_text = match manifest {
            Some(manifest) if listed(CONFIG_FILE) == Some(false) => manifest.config.to_string(),
            _ => read_text(source, CONFIG_FILE, None, false)
                .await?
                .unwrap_or_default(),
        };
        let tower = match vision_tower_folder(&config_text) {
            None => TowerFile::NotGiven,
            Some(folder) => {
                let file = format!("{folder}/{CONFIG_FILE}");
                match read_text(source, &file, listed(&file), true).await? {
                    Some(text) => TowerFile::Found {
                        file: source.locate(&file),
                        text,
                    },
                    None => TowerFile::Absent(source.locate(&folder)),
                }
            }
        };
        let config = LlavaConfig::from_json_with_tower(&config_text, &config_file, tower)?;

        // A folder without tokenizer.json (like the original LLaVA checkpoints) has tokenizer.model;
        // a folder with neither is told of the missing tokenizer.json.
        let sentencepiece_only =
            listed(TOKENIZER_FILE) == Some(false) && listed(SENTENCEPIECE_FILE) == Some(true);
        let tokenizer_json = if sentencepiece_only {
            None
        } else {
            source
                .read(TOKENIZER_FILE, listed(SENTENCEPIECE_FILE) != Some(false))
                .await?
        };
        let tokenizer_config = optional(TOKENIZER_CONFIG_FILE).await?;
        let model_type = serde_json::from_str::<serde_json::Value>(&config_text)
            .ok()
            .and_then(|v| v.get("model_type")?.as_str().map(str::to_string));
        let tokenizer_config_bytes = tokenizer_config.as_deref().map(str::as_bytes);
        let tokenizer = match tokenizer_json {
            Some(json) => Tokenizer::from_bytes_with_config(
                &json,
                tokenizer_config_bytes,
                model_type.as_deref(),
            ),
            None => {
                let model = source
                    .read(SENTENCEPIECE_FILE, false)
                    .await?
                    .unwrap_or_default();
                Tokenizer::from_sentencepiece_with_config(
                    &model,
                    tokenizer_config_bytes,
                    model_type.as_deref(),
                )
            }
        }
        .map_err(|e| match e {
            ModelError::Tokenizer(msg) => {
                ModelError::Tokenizer(format!("{}: {msg}", source.location()))
            }
            other => other,
        })?;
        check_image_token(&config, &tokenizer, &config_file)?;

        let jinja = optional(TEMPLATE_JINJA_FILE).await?;
        let json = match jinja {
            Some(_) => None,
            None => optional(TEMPLATE_JSON_FILE).await?,
        };
        let (json_file, tokenizer_config_file) = (
            source.locate(TEMPLATE_JSON_FILE),
            source.locate(TOKENIZER_CONFIG_FILE),
        );
        let template = ChatTemplate::from_files(&TemplateFiles {
            jinja: jinja.as_deref(),
            json: json.as_deref().map(|text| (json_file.as_str(), text)),
            tokenizer_config: tokenizer_config
                .as_deref()
                .map(|text| (tokenizer_config_file.as_str(), text)),
        })?
        .unwrap_or_else(|| ChatTemplate::builtin(BuiltinTemplate::for_config(&config)));

        let (preprocessor, preprocessor_file) = match optional(PREPROCESSOR_FILE).await? {
            Some(text) => {
                let file = source.locate(PREPROCESSOR_FILE);
                (
                    Some(PreprocessorConfig::from_json_named(&text, &file)?),
                    file,
                )
            }
            None => {
                let file = source.locate(PROCESSOR_FILE);
                match optional(PROCESSOR_FILE).await? {
                    Some(text) => (PreprocessorConfig::from_processor_json(&text, &file)?, file),
                    None => (None, source.locate(PREPROCESSOR_FILE)),
                }
            }
        };
        let generation = match optional(GENERATION_FILE).await? {
            Some(text) => Some(GenerationConfig::from_json_named(
                &text,
                &source.locate(GENERATION_FILE),
            )?),
            None => None,
        };
        Ok(ModelFiles {
            tokenizer,
            template,
            image_config: image_config(
                &config,
                preprocessor.as_ref(),
                [&config_file, &preprocessor_file],
            )?,
            eos_ids: eos_ids(&config, generation.as_ref()),
            declared_dtype: needs::declared_dtype(&config_text),
            config,
        })
    }
}

/// The image token must be a row of the embedding table and, where the tokenizer has `<image>`,
/// that token (each cause named here rather than as a prompt without `<image>`). A tokenizer
/// without `<image>` (a SentencePiece `tokenizer.model` alone) still answers text; an image is
/// refused when it is given ([`Llava::tokenize_prompt`]).
fn check_image_token(config: &LlavaConfig, tokenizer: &Tokenizer, file: &str) -> Result<()> {
    let Some(id) = config.image_token_index else {
        return Ok(());
    };
    let vocab = config.text.vocab_size;
    if id as usize >= vocab {
        return Err(ModelError::config(
            file,
            format!(
                "key `image_token_index`: {id} is outside the vocabulary of {vocab} tokens (text_config.vocab_size)"
            ),
        ));
    }
    match tokenizer.token_id("<image>") {
        Some(found) if found == id => Ok(()),
        Some(found) => Err(ModelError::config(
            file,
            format!(
                "key `image_token_index`: {id}, but the tokenizer's `<image>` token is {found}"
            ),
        )),
        None => Ok(()),
    }
}

/// The image settings, checked: `files` names the config and preprocessor files for errors.
/// The config caps image and pinpoint sizes far below `u32::MAX`, so the casts are exact.
pub(crate) fn image_config(
    config: &LlavaConfig,
    pre: Option<&PreprocessorConfig>,
    files: [&str; 2],
) -> Result<ImageConfig> {
    let pinpoints_file = if pre.is_some_and(|p| p.image_grid_pinpoints.is_some()) {
        files[1]
    } else {
        files[0]
    };
    let pre = pre
        .cloned()
        .unwrap_or_else(|| PreprocessorConfig::for_model(config));
    let pinpoints = pre
        .image_grid_pinpoints
        .as_ref()
        .unwrap_or(&config.image_grid_pinpoints);
    let image_config = ImageConfig {
        tile_size: config.vision.image_size as u32,
        patch_size: config.vision.patch_size as u32,
        grid_pinpoints: pinpoints
            .iter()
            .map(|&[h, w]| [h as u32, w as u32])
            .collect(),
        image_mean: pre.image_mean,
        image_std: pre.image_std,
    };
    image_config
        .validate()
        .map_err(|e| ModelError::config(pinpoints_file, e.to_string()))?;
    Ok(image_config)
}

/// The KV cache's capacity: as asked, within the model's limits. By default
/// [`DEFAULT_CONTEXT`], or less where the GPU's limits hold less (an asked-for context that does
/// not fit is refused by [`check_fits`]).
fn context_for(gpu: &Gpu, config: &LlavaConfig, options: &LoadOptions) -> usize {
    let mut limit = config.text.max_position_embeddings;
    if let Some(window) = config.text.sliding_window {
        // Past its window Mistral attends to a sliding span; contexts stay within it.
        limit = limit.min(window);
    }
    let fits = needs::max_context(&config.text, DType::F16, GpuLimits::of(gpu));
    options
        .context
        .unwrap_or(DEFAULT_CONTEXT.min(fits))
        .min(limit)
}

/// Refuses, before any weight is read, a model that this GPU's limits cannot hold ([`needs`]);
/// the KV cache is checked at its smallest (f16), as the precision is chosen after loading.
fn check_fits(
    gpu: &Gpu,
    files: &ModelFiles,
    formats: WeightFormats<'_>,
    options: &LoadOptions,
    location: &str,
) -> Result<()> {
    let context = context_for(gpu, &files.config, options);
    let limits = GpuLimits::of(gpu);
    needs::check(
        &files.config,
        &files.image_config,
        formats,
        context,
        DType::F16,
        limits,
        location,
    )
}

fn eos_ids(config: &LlavaConfig, generation: Option<&GenerationConfig>) -> Vec<u32> {
    let mut ids = config.text.eos_token_ids.clone();
    if let Some(g) = generation {
        ids.extend(&g.eos_token_ids);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

pub struct Llava {
    gpu: Arc<Gpu>,
    files: ModelFiles,
    image_token: u32,
    vision: VisionTower,
    projector: Projector,
    language: LanguageModel,
    context: usize,
    kv_cache: KvPrecision,
    image_cache: ImageCache,
}

impl Llava {
    /// Loads a HuggingFace-layout checkpoint folder (llava-hf or liuhaotian), uploading one
    /// tensor at a time, or a converted folder (recognised by its `manifest.json`).
    pub fn load_dir(gpu: Arc<Gpu>, dir: &Path, options: &LoadOptions) -> Result<Llava> {
        Llava::load_dir_with_progress(gpu, dir, options, &mut |_| {})
    }

    /// [`Llava::load_dir`], reporting the stages and the weight bytes read to `progress`.
    pub fn load_dir_with_progress(
        gpu: Arc<Gpu>,
        dir: &Path,
        options: &LoadOptions,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Llava> {
        pollster::block_on(Llava::load(
            gpu,
            &DirSource::new(dir),
            LayoutHint::Probe,
            options,
            progress,
        ))
    }

    /// Loads a converted folder. Its weights are used as stored: `options.precision` must be
    /// `Native` or the precision it was converted to.
    pub fn load_converted(gpu: Arc<Gpu>, dir: &Path, options: &LoadOptions) -> Result<Llava> {
        let source = DirSource::new(dir);
        pollster::block_on(Llava::load(
            gpu,
            &source,
            LayoutHint::Converted,
            options,
            &mut |_| {},
        ))
    }

    /// The one loading sequence, natively and on the web: finds the layout and the small files
    /// by the rules of [`crate::files::source`], then streams the shards through [`WeightLoader`], so
    /// the host holds one chunk and one tensor at a time; the model exists only once every
    /// shard has been read and verified. `progress` hears the stages and the weight bytes read.
    pub async fn load<S: ModelSource>(
        gpu: Arc<Gpu>,
        source: &S,
        hint: LayoutHint,
        options: &LoadOptions,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Llava> {
        let first_file = if hint == LayoutHint::Converted {
            MANIFEST_FILE
        } else {
            CONFIG_FILE
        };
        progress(Progress {
            bytes_done: 0,
            bytes_total: 0,
            stage: Stage::Config,
            file: first_file,
        });
        let layout = source::find_layout(source, hint).await?;
        let location = source.location();
        let (files, mut weights, shards, index) = match layout {
            Layout::Converted(manifest) => {
                manifest
                    .check_precision(options.precision)
                    .map_err(|e| match e {
                        ModelError::Input(msg) => ModelError::Input(format!("{location}: {msg}")),
                        other => other,
                    })?;
                // The small files are checked against the manifest's hashes as they are read.
                let files =
                    ModelFiles::read(&HashedSource::new(source, &manifest), Some(&manifest))
                        .await?;
                check_fits(
                    &gpu,
                    &files,
                    WeightFormats::Converted(&manifest.quant.tensors),
                    options,
                    &location,
                )?;
                let shards: Vec<String> = manifest.shards.iter().map(|s| s.file.clone()).collect();
                (
                    files,
                    WeightLoader::converted(&gpu, manifest, &location),
                    shards,
                    None,
                )
            }
            Layout::Checkpoint {
                shards,
                bytes_total,
                index,
            } => {
                let files = ModelFiles::read(source, None).await?;
                if shards.is_empty() {
                    return Err(source::no_shards(source));
                }
                let stored = files.declared_dtype.unwrap_or(Dtype::F16);
                check_fits(
                    &gpu,
                    &files,
                    WeightFormats::Checkpoint {
                        stored,
                        precision: options.precision,
                    },
                    options,
                    &location,
                )?;
                let loader = WeightLoader::checkpoint(
                    &gpu,
                    options.precision,
                    &location,
                    bytes_total.unwrap_or(0),
                );
                (files, loader, shards, index)
            }
        };
        source::stream_shards(source, &shards, &mut weights, progress).await?;
        if let Some(index) = &index {
            weights.check_index(index, &source.locate(INDEX_FILE))?;
        }
        let loaded = weights.progress().bytes_done;
        let weights = weights.finish()?;
        let llava = Llava::new(gpu, files, weights, options)?;
        progress(Progress {
            bytes_done: loaded,
            bytes_total: loaded,
            stage: Stage::Ready,
            file: "",
        });
        Ok(llava)
    }

    /// Assembles the model from its files and uploaded weights.
    pub fn new(
        gpu: Arc<Gpu>,
        files: ModelFiles,
        mut weights: Weights,
        options: &LoadOptions,
    ) -> Result<Llava> {
        let config = &files.config;
        // The original LLaVA layout names no image token: its prompts are split at "<image>".
        let image_token = config.image_token_index.unwrap_or(IMAGE_MARKER);
        let w = &mut weights;
        let vision = VisionTower::load(w, &gpu, &config.vision, config.vision_feature_layer)?;
        let projector = Projector::load(w, config.vision.hidden_size, config.text.hidden_size)?;
        let language = LanguageModel::load(w, &gpu, &config.text, config.tie_word_embeddings)?;
        let context = context_for(&gpu, config, options);
        gpu.check()?;
        let image_cache = ImageCache::new(DEFAULT_IMAGE_CACHE_BYTES);
        let kv_cache = KvPrecision::default();
        Ok(Llava {
            gpu,
            files,
            image_token,
            vision,
            projector,
            language,
            context,
            kv_cache,
            image_cache,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    pub fn config(&self) -> &LlavaConfig {
        &self.files.config
    }
    pub fn image_config(&self) -> &ImageConfig {
        &self.files.image_config
    }
    pub fn language(&self) -> &LanguageModel {
        &self.language
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.files.tokenizer
    }
    pub fn context(&self) -> usize {
        self.context
    }

    /// The id that marks image positions in [`Llava::tokenize_prompt`]'s output: the checkpoint's
    /// `<image>` token, or [`IMAGE_MARKER`] for the original LLaVA layout.
    pub fn image_token(&self) -> u32 {
        self.image_token
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.files.eos_ids.contains(&id)
    }

    /// What the KV caches of chats started from now on store.
    pub fn set_kv_cache(&mut self, kv_cache: KvPrecision) {
        self.kv_cache = kv_cache;
    }

    /// A new conversation with its own KV cache.
    pub fn chat(&self, system: Option<String>) -> Result<ChatSession> {
        Ok(ChatSession::new(system, self.sequence()?))
    }

    /// A new, empty sequence with a KV cache of the model's context.
    pub fn sequence(&self) -> Result<Sequence> {
        let dtype = self.kv_cache.dtype();
        let fits = needs::max_context(&self.config().text, dtype, GpuLimits::of(&self.gpu));
        if self.context > fits {
            return Err(ModelError::Input(format!(
                "a {dtype:?} KV cache of {} tokens does not fit this GPU's max_storage_buffer_binding_size of {} bytes \
                 per layer: load the model with a context of at most {fits} tokens{}",
                self.context,
                self.gpu.max_binding(),
                if dtype == DType::F16 {
                    ""
                } else {
                    ", or use an f16 KV cache"
                }
            )));
        }
        Ok(Sequence {
            cache: self.language.new_cache(&self.gpu, self.context, dtype)?,
            plan: None,
            ids: Vec::new(),
            slot: 0,
            ahead: false,
            steps: 0,
        })
    }

    /// Runs the part of `ids` the sequence does not hold yet (the longest common prefix with what
    /// it holds is reused), with `image`'s features in place of the ids from `image.1` on, and
    /// picks the reply's first token: on the GPU with the planned step (the step is planned here,
    /// at the sequence's first prefill), else by `sampler`. `want_logits` also reads back the
    /// logits at the last prompt position.
    pub async fn prefill(
        &self,
        seq: &mut Sequence,
        ids: &[u32],
        image: Option<(&EncodedImage, usize)>,
        sampler: &mut Sampler<'_>,
        want_logits: bool,
    ) -> Result<Prefill> {
        let common = seq
            .ids
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        seq.cache.truncate(common);
        seq.ids.truncate(common);
        (seq.slot, seq.ahead, seq.steps) = (1, false, 0);
        let gpu = self.gpu();
        let mut batch = gpu.batch();
        let new_ids = &ids[common..];
        let x = self.embed_prompt(&mut batch, new_ids)?;
        if let Some((image, image_start)) = image {
            self.splice_image(&mut batch, &x, common, image_start, image)?;
        }
        if seq.plan.is_none() {
            seq.plan = Some(self.language.plan_decode(gpu, &seq.cache)?);
        }
        let last = self.language.forward_last(&mut batch, &x, &mut seq.cache)?;
        seq.ids.extend_from_slice(new_ids);
        let (token, logits) = match seq.plan.as_ref().and_then(Option::as_ref) {
            Some(plan) => {
                plan.set_sampling(gpu, sampler.params.sampling(), ids);
                plan.record_head(&mut batch, &last)?;
                plan.submit_sampled(batch, want_logits).await?
            }
            None => {
                let hidden = self.language.final_norm(&mut batch, &last)?;
                let logits = self.language.logits(&mut batch, &hidden)?;
                if want_logits || !sampler.params.greedy() {
                    batch.submit()?;
                    let logits = logits.to_f32(gpu).await?;
                    (sampler.sample(&logits), want_logits.then_some(logits))
                } else {
                    let best = argmax(&mut batch, &logits)?;
                    batch.submit()?;
                    (best.to_u32(gpu).await?[0], None)
                }
            }
        };
        Ok(Prefill {
            token,
            logits,
            tokens_run: new_ids.len(),
        })
    }

    /// One decode step: runs `token` (the reply's latest) and picks the next one. With the
    /// planned step, the step of the token after that is submitted before this one is read back
    /// (the GPU sampler leaves each token where the next step reads it), so the GPU never waits
    /// for the host; [`Sequence::end_reply`] undoes it when the reply stops.
    pub async fn step(
        &self,
        seq: &mut Sequence,
        token: u32,
        sampler: &mut Sampler<'_>,
    ) -> Result<u32> {
        seq.steps += 1;
        let gpu = self.gpu();
        let mut batch = gpu.batch();
        let slot = seq.slot;
        let next = match seq.plan.as_ref().and_then(Option::as_ref) {
            Some(plan) => {
                if !seq.ahead {
                    plan.record_step(&mut batch, &mut seq.cache, slot)?;
                    plan.submit(batch, slot)?;
                }
                // The step of the token `slot` will bring, if the reply can take it.
                seq.ahead = slot + 1 < sampler.params.max_new_tokens
                    && seq.cache.len() < seq.cache.capacity();
                if seq.ahead {
                    let mut batch = gpu.batch();
                    plan.record_step(&mut batch, &mut seq.cache, slot + 1)?;
                    plan.submit(batch, slot + 1)?;
                }
                plan.read(gpu, slot).await?
            }
            None => {
                let x = self.language.embed(&mut batch, &[token])?;
                let hidden = self.language.forward(&mut batch, &x, &mut seq.cache)?;
                let logits = self.language.logits(&mut batch, &hidden)?;
                if sampler.params.greedy() {
                    let best = argmax(&mut batch, &logits)?;
                    batch.submit()?;
                    best.to_u32(gpu).await?[0]
                } else {
                    batch.submit()?;
                    sampler.sample(&logits.to_f32(gpu).await?)
                }
            }
        };
        seq.ids.push(token);
        seq.slot += 1;
        Ok(next)
    }

    /// The prompt for a conversation, from the checkpoint's chat template.
    pub fn render_chat(&self, system: Option<&str>, messages: &[Message]) -> Result<String> {
        let mut all = Vec::with_capacity(messages.len() + 1);
        if let Some(system) = system {
            all.push(Message::system(system));
        }
        all.extend_from_slice(messages);
        self.files.template.render(&all, true)
    }

    /// Token ids of `prompt` with its `<image>` expanded to `image_tokens` ids of
    /// [`Llava::image_token`], and where the image starts.
    pub fn tokenize_prompt(
        &self,
        prompt: &str,
        image_tokens: Option<usize>,
    ) -> Result<(Vec<u32>, Option<usize>)> {
        let image_id = self.image_token;
        let ids = match self.files.config.image_token_index {
            Some(_) => self.files.tokenizer.encode(prompt, true)?,
            None => self.tokenize_image_text(prompt)?,
        };
        let slots: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|&(_, &id)| id == image_id)
            .map(|(i, _)| i)
            .collect();
        match (slots.as_slice(), image_tokens) {
            ([], None) => Ok((ids, None)),
            ([slot], Some(n)) => {
                let mut expanded = Vec::with_capacity(ids.len() + n - 1);
                expanded.extend_from_slice(&ids[..*slot]);
                expanded.extend(std::iter::repeat_n(image_id, n));
                expanded.extend_from_slice(&ids[slot + 1..]);
                Ok((expanded, Some(*slot)))
            }
            ([], Some(_)) => match self.files.config.image_token_index {
                Some(id) if self.files.tokenizer.token_id("<image>").is_none() => {
                    Err(ModelError::Tokenizer(format!(
                        "the tokenizer has no `<image>` token, which config.json (image_token_index {id}) needs to place the image"
                    )))
                }
                _ => Err(ModelError::Input(
                    "an image was given but the prompt has no <image>".into(),
                )),
            },
            (_, None) => Err(ModelError::Input(
                "the prompt has <image> but no image was given".into(),
            )),
            (many, Some(_)) => Err(ModelError::Input(format!(
                "the prompt has {} <image> placeholders but one image was given",
                many.len()
            ))),
        }
    }

    /// LLaVA's `tokenizer_image_token` (llava/mm_utils.py): the text between `<image>`s is tokenized
    /// piece by piece, the first piece's BOS is kept once, the later pieces' leading BOS dropped, and
    /// one [`IMAGE_MARKER`] goes between pieces.
    fn tokenize_image_text(&self, prompt: &str) -> Result<Vec<u32>> {
        let tokenizer = &self.files.tokenizer;
        let chunks = prompt
            .split("<image>")
            .map(|chunk| tokenizer.encode(chunk, true))
            .collect::<Result<Vec<_>>>()?;
        let bos = self
            .files
            .config
            .text
            .bos_token_id
            .or_else(|| tokenizer.token_id("<s>"));
        let skip = usize::from(bos.is_some() && chunks[0].first().copied() == bos);
        let mut ids = chunks[0][..skip].to_vec();
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                ids.push(IMAGE_MARKER);
            }
            ids.extend_from_slice(chunk.get(skip..).unwrap_or_default());
        }
        Ok(ids)
    }

    /// Embeddings of prompt ids; image positions get a placeholder row that
    /// [`Llava::splice_image`] overwrites.
    pub(crate) fn embed_prompt(&self, batch: &mut Batch, ids: &[u32]) -> Result<Tensor> {
        if self.image_token != IMAGE_MARKER || !ids.contains(&IMAGE_MARKER) {
            return self.language.embed(batch, ids);
        }
        let ids: Vec<u32> = ids
            .iter()
            .map(|&id| if id == IMAGE_MARKER { 0 } else { id })
            .collect();
        self.language.embed(batch, &ids)
    }

    /// The image's features from this model's cache, or [`Llava::encode_image`] (then cached);
    /// the flag says whether they came from the cache.
    pub async fn encode_image_cached(&self, image: &Rgb8) -> Result<(EncodedImage, bool)> {
        let key = image_cache::image_key(image, &self.files.image_config);
        if let Some(hit) = self.image_cache.get(&key) {
            return Ok((hit, true));
        }
        let encoded = self.encode_image(image).await?;
        self.image_cache.insert(key, encoded.clone());
        Ok((encoded, false))
    }

    /// Runs prompts at most `tokens` at a time (`None`: as many as one GPU storage binding
    /// holds), bounding the prefill's activation memory; the answer stays the same.
    pub fn set_prefill_chunk(&mut self, tokens: Option<usize>) {
        self.language.set_prefill_cap(tokens);
    }

    /// Bounds the GPU memory of the cached image features ([`DEFAULT_IMAGE_CACHE_BYTES`] unless
    /// set; 0 turns the cache off).
    pub fn set_image_cache_limit(&self, bytes: u64) {
        self.image_cache.set_limit(bytes);
    }

    pub fn image_cache_stats(&self) -> ImageCacheStats {
        self.image_cache.stats()
    }

    /// Runs the vision tower and projector on an image.
    pub async fn encode_image(&self, image: &Rgb8) -> Result<EncodedImage> {
        let mut batch = self.gpu.batch();
        let encoded = self.record_image(&mut batch, image)?;
        batch.submit()?;
        Ok(encoded)
    }

    /// Records [`Llava::encode_image`]'s work into `batch`.
    fn record_image(&self, batch: &mut Batch, image: &Rgb8) -> Result<EncodedImage> {
        let cfg = &self.files.image_config;
        let pre = llava_image::preprocess(image, cfg)?;
        let size = cfg.tile_size as usize;
        let gpu = &*self.gpu;
        let pixels = Tensor::from_f32(gpu, &[pre.num_patches, 3, size, size], &pre.pixels)?;
        let hidden = self.vision.forward(batch, &pixels)?;
        // Strategy "default": drop each tile's CLS token.
        let (tiles, positions) = (hidden.shape()[0], hidden.shape()[1]);
        let keep: Vec<u32> = (0..tiles)
            .flat_map(|t| (1..positions).map(move |p| (t * positions + p) as u32))
            .collect();
        let keep = Tensor::from_u32(gpu, &[keep.len()], &keep)?;
        let flat = hidden.reshape(&[tiles * positions, hidden.last_dim()])?;
        let features = gather_rows(batch, &flat, &keep)?;
        let projected = self.projector.forward(batch, &features)?;
        let side = (cfg.tile_size / cfg.patch_size) as usize;
        let layout = llava_image::unpad_layout(pre.original_hw, cfg);
        let packed = self
            .projector
            .pack(batch, &projected, pre.grid, side, &layout)?;
        let tokens = packed.shape()[0];
        let expected = llava_image::image_token_count(pre.original_hw, cfg);
        if tokens != expected {
            return Err(ModelError::Input(format!(
                "packed {tokens} image tokens, expected {expected}"
            )));
        }
        Ok(EncodedImage {
            features: packed,
            tokens,
            best_resolution: pre.best_resolution,
            grid: pre.grid,
        })
    }

    /// Creates the GPU pipelines a first answer uses (vision tower, projector, prefill, the
    /// planned decode step and its sampler, for the KV cache set now) by recording that work for
    /// a blank image and a short prompt in a small cache of its own on a batch that submits
    /// nothing ([`Gpu::dry_batch`]): the first answer then does not wait for shader compilation
    /// (natively it happens here; in a browser the GPU process compiles them while the page
    /// waits for a question). Kernels of rarer shapes, as prompts of at most 8 tokens, are still
    /// created when first used.
    pub fn compile_kernels(&self) -> Result<()> {
        const PROMPT: usize = 16;
        let gpu = &*self.gpu;
        let side = self.files.image_config.tile_size;
        let blank = Rgb8 {
            width: side,
            height: side,
            data: vec![0; 3 * side as usize * side as usize],
        };
        let mut batch = gpu.dry_batch();
        self.record_image(&mut batch, &blank)?;
        let mut cache = self
            .language
            .new_cache(gpu, PROMPT, self.kv_cache.dtype())?;
        let x = self.language.embed(&mut batch, &[0; PROMPT])?;
        let plan = self.language.plan_decode(gpu, &cache)?;
        let last = self.language.forward_last(&mut batch, &x, &mut cache)?;
        match plan {
            Some(plan) => plan.record_head(&mut batch, &last)?,
            None => {
                let hidden = self.language.final_norm(&mut batch, &last)?;
                let logits = self.language.logits(&mut batch, &hidden)?;
                argmax(&mut batch, &logits)?;
            }
        }
        Ok(batch.submit()?)
    }

    /// Overwrites the embedding rows of the image placeholders inside `x` (the embeddings of
    /// the ids from absolute position `x_start` on) with the image's features.
    pub(crate) fn splice_image(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        x_start: usize,
        image_start: usize,
        image: &EncodedImage,
    ) -> Result<()> {
        let image_end = image_start + image.tokens;
        let x_end = x_start + x.shape()[0];
        let (from, to) = (image_start.max(x_start), image_end.min(x_end));
        if from < to {
            Tensor::copy_rows(
                batch,
                &image.features,
                from - image_start,
                x,
                from - x_start,
                to - from,
            )?;
        }
        Ok(())
    }
}
