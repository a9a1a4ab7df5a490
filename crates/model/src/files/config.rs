//! Model, preprocessor and generation configs, read the way transformers 5.24 reads them.
//!
//! A checkpoint's `config.json` only stores what differs from the config class defaults, so every
//! missing key takes the default of the class transformers would build (`LlavaNextConfig`,
//! `CLIPVisionConfig`, `LlamaConfig`, `MistralConfig`). Two layouts are understood: llava-hf
//! (`model_type: llava_next` with `vision_config` / `text_config`) and the original LLaVA repo
//! (`model_type: llava_llama` / `llava_mistral`, text fields at the top level, `mm_*` keys).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// Activation functions the configs may name (transformers' `ACT2FN` keys we implement).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (`quick_gelu`).
    QuickGelu,
    /// Exact GELU with erf (`gelu`).
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `x * sigmoid(x)` (`silu`, `swish`).
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }
}

/// The CLIP vision tower.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl VisionConfig {
    /// `CLIPVisionConfig` class defaults: what a `vision_config` dict's missing keys become.
    pub const CLIP_CLASS_DEFAULTS: VisionConfig = VisionConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        image_size: 224,
        patch_size: 32,
        layer_norm_eps: 1e-5,
        hidden_act: Activation::QuickGelu,
    };

    /// `openai/clip-vit-large-patch14-336`, which is also what `LlavaNextConfig` builds when
    /// `vision_config` is absent altogether.
    pub const CLIP_VIT_L_14_336: VisionConfig = VisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        image_size: 336,
        patch_size: 14,
        layer_norm_eps: 1e-5,
        hidden_act: Activation::QuickGelu,
    };

    /// Patches per side of one tile (24 for CLIP ViT-L/14-336).
    pub fn grid_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextArch {
    Llama,
    Mistral,
}

/// The Llama / Mistral decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub arch: TextArch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: Activation,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// Mistral's sliding attention window; `None` means full causal attention.
    pub sliding_window: Option<usize>,
    /// The text config's own flag; [`LlavaConfig::tie_word_embeddings`] is what decides.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// Which hidden states the projector reads: `Default` drops the CLS token, `Full` keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSelect {
    Default,
    Full,
}

/// Which layout the checkpoint folder follows (it decides the chat template and the image token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigLayout {
    /// `llava-hf/*`: `model_type: llava_next`.
    LlavaHf,
    /// `liuhaotian/*`: `model_type: llava_llama` or `llava_mistral`.
    OriginalLlava,
}

/// Everything the runtime needs from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    pub layout: ConfigLayout,
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Id of the `<image>` token in the vocabulary. `None` for the original LLaVA layout, whose
    /// tokenizer has no such token: the prompt is split at the literal `<image>` text instead.
    pub image_token_index: Option<u32>,
    /// Candidate `[height, width]` resolutions for AnyRes, in list order.
    pub image_grid_pinpoints: Vec<[usize; 2]>,
    /// Index into the vision tower's hidden states (-2: output of the second-to-last layer).
    pub vision_feature_layer: i64,
    pub vision_feature_select_strategy: FeatureSelect,
    pub projector_hidden_act: Activation,
    /// Whether `lm_head` shares the `embed_tokens` weight.
    pub tie_word_embeddings: bool,
}

pub const CONFIG_FILE: &str = "config.json";

/// Upper bounds on config sizes: far above any LLaVA-1.6 model, low enough that every tensor
/// size and byte count derived from them fits in 64 bits, and that a few edited bytes cannot ask
/// for terabytes.
pub const MAX_HIDDEN_SIZE: usize = 1 << 16;
pub const MAX_INTERMEDIATE_SIZE: usize = 1 << 18;
pub const MAX_LAYERS: usize = 1 << 10;
pub const MAX_HEADS: usize = 1 << 10;
pub const MAX_HEAD_DIM: usize = 1 << 10;
pub const MAX_VOCAB_SIZE: usize = 1 << 22;
/// Largest vision-tower input side (`image_size`), in pixels.
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Most patches per tile side (`image_size / patch_size`; 24 for CLIP ViT-L/14-336).
pub const MAX_PATCHES_PER_SIDE: usize = 128;

/// `LlavaNextConfig.image_grid_pinpoints` default.
const DEFAULT_PINPOINTS: [[usize; 2]; 5] =
    [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]];

/// `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`, written as transformers writes them.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl LlavaConfig {
    /// Reads `dir/config.json` (and, for the original LLaVA layout, the vision tower's
    /// `config.json` when `mm_vision_tower` names a folder).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let tower = match vision_tower_folder(&text) {
            None => TowerFile::NotGiven,
            Some(folder) => {
                let path = dir.join(&folder).join(CONFIG_FILE);
                match read_optional(&path)? {
                    Some(text) => TowerFile::Found {
                        file: path.display().to_string(),
                        text,
                    },
                    None => TowerFile::Absent(dir.join(&folder).display().to_string()),
                }
            }
        };
        Self::from_json_with_tower(&text, &path.display().to_string(), tower)
    }

    /// Parses a `config.json` on its own: an original-LLaVA `mm_vision_tower` must then be a
    /// tower this crate knows by name.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_json_with_tower(json, CONFIG_FILE, TowerFile::NotGiven)
    }

    /// Parses a `config.json` named `file` in messages, with what was found in the
    /// [`vision_tower_folder`].
    pub fn from_json_with_tower(json: &str, file: &str, tower: TowerFile) -> Result<Self> {
        Self::from_json_named(json, file, &tower)
    }

    fn from_json_named(json: &str, file: &str, tower: &TowerFile) -> Result<Self> {
        let root_value = parse_json_object(json, file)?;
        let root = Fields::root(file, &root_value);
        let model_type = root.string("model_type", None)?;
        match model_type.as_deref() {
            Some("llava_next") => parse_llava_hf(&root),
            Some("llava_llama") => parse_original(&root, TextArch::Llama, tower),
            Some("llava_mistral") => parse_original(&root, TextArch::Mistral, tower),
            Some(other) => Err(ModelError::config(
                file,
                format!(
                    "model_type `{other}` is not a LLaVA-1.6 model \
                     (expected llava_next, llava_llama or llava_mistral)"
                ),
            )),
            None => Err(ModelError::config(file, "key `model_type` is missing")),
        }
    }
}

fn parse_llava_hf(root: &Fields) -> Result<LlavaConfig> {
    let vision = match root.object("vision_config")? {
        Some(fields) => {
            match fields.string("model_type", None)?.as_deref() {
                None | Some("clip_vision_model") => {}
                Some(other) => {
                    return Err(fields.error(
                        "model_type",
                        format!("vision tower `{other}` is not supported"),
                    ));
                }
            }
            parse_vision(&fields, &VisionConfig::CLIP_CLASS_DEFAULTS)?
        }
        None => VisionConfig::CLIP_VIT_L_14_336,
    };

    let empty = Map::new();
    let text_fields = root
        .object("text_config")?
        .unwrap_or_else(|| root.child("text_config", &empty));
    let arch = match text_fields.string("model_type", None)?.as_deref() {
        None | Some("llama") => TextArch::Llama,
        Some("mistral") => TextArch::Mistral,
        Some(other) => {
            return Err(text_fields.error(
                "model_type",
                format!("language model `{other}` is not supported"),
            ));
        }
    };
    let text = parse_text(&text_fields, arch)?;

    // `image_token_id` is the attribute-map alias of `image_token_index`.
    let image_token_index = match root.opt_u32("image_token_index")? {
        Some(id) => id,
        None => root.opt_u32("image_token_id")?.unwrap_or(32000),
    };
    let vision_feature_layer = match root.get("vision_feature_layer") {
        Some(Value::Array(_)) => {
            return Err(root.error(
                "vision_feature_layer",
                "a list of feature layers is not supported",
            ));
        }
        _ => root.i64("vision_feature_layer", -2)?,
    };
    let vision_feature_select_strategy = match root
        .string("vision_feature_select_strategy", Some("default"))?
        .as_deref()
    {
        Some("default") => FeatureSelect::Default,
        Some("full") => FeatureSelect::Full,
        other => {
            return Err(root.error(
                "vision_feature_select_strategy",
                format!("expected \"default\" or \"full\", got {other:?}"),
            ));
        }
    };
    if !root.bool("multimodal_projector_bias", true)? {
        return Err(root.error(
            "multimodal_projector_bias",
            "a projector without bias is not supported",
        ));
    }
    // transformers 5 ties on the top-level flag; a file that only sets it in `text_config`
    // (as 4.x read it) is honoured when the top level is silent.
    let tie_word_embeddings = match root.get("tie_word_embeddings") {
        Some(_) => root.bool("tie_word_embeddings", false)?,
        None => text.tie_word_embeddings,
    };

    let config = LlavaConfig {
        layout: ConfigLayout::LlavaHf,
        image_token_index: Some(image_token_index),
        image_grid_pinpoints: root
            .pinpoints("image_grid_pinpoints")?
            .unwrap_or(DEFAULT_PINPOINTS.to_vec()),
        vision_feature_layer,
        vision_feature_select_strategy,
        projector_hidden_act: root.activation("projector_hidden_act", Activation::Gelu)?,
        tie_word_embeddings,
        vision,
        text,
    };
    validate(&config, root.file)?;
    Ok(config)
}

fn parse_original(root: &Fields, arch: TextArch, tower_file: &TowerFile) -> Result<LlavaConfig> {
    let tower = root
        .string("mm_vision_tower", None)?
        .ok_or_else(|| root.error("mm_vision_tower", "missing"))?;
    let vision = original_vision_tower(root, &tower, tower_file)?;
    let mm_hidden_size = root.usize("mm_hidden_size", vision.hidden_size)?;
    if mm_hidden_size != vision.hidden_size {
        return Err(root.error(
            "mm_hidden_size",
            format!(
                "{mm_hidden_size} does not match the vision tower's hidden size {}",
                vision.hidden_size
            ),
        ));
    }
    // The LLaVA repo's own defaults for these keys ("linear", "flat", "pad") describe LLaVA-1.5,
    // so each must name the LLaVA-1.6 behaviour explicitly.
    for (key, wanted) in [
        ("mm_projector_type", "mlp2x_gelu"),
        ("mm_patch_merge_type", "spatial_unpad"),
        ("image_aspect_ratio", "anyres"),
    ] {
        let value = root.string(key, None)?;
        if value.as_deref() != Some(wanted) {
            return Err(root.error(
                key,
                format!("expected \"{wanted}\" (LLaVA-1.6), got {value:?}"),
            ));
        }
    }
    let vision_feature_select_strategy = match root
        .string("mm_vision_select_feature", Some("patch"))?
        .as_deref()
    {
        Some("patch") => FeatureSelect::Default,
        Some("cls_patch") => FeatureSelect::Full,
        other => {
            return Err(root.error(
                "mm_vision_select_feature",
                format!("expected \"patch\" or \"cls_patch\", got {other:?}"),
            ));
        }
    };
    let image_grid_pinpoints = root
        .pinpoints("image_grid_pinpoints")?
        .ok_or_else(|| root.error("image_grid_pinpoints", "missing (needed for AnyRes)"))?;
    let text = parse_text(root, arch)?;
    let config = LlavaConfig {
        layout: ConfigLayout::OriginalLlava,
        vision,
        image_token_index: None,
        image_grid_pinpoints,
        vision_feature_layer: root.i64("mm_vision_select_layer", -2)?,
        vision_feature_select_strategy,
        projector_hidden_act: Activation::Gelu,
        tie_word_embeddings: text.tie_word_embeddings,
        text,
    };
    validate(&config, root.file)?;
    Ok(config)
}

/// What a loader found for an original-LLaVA `mm_vision_tower` folder's `config.json`.
pub enum TowerFile {
    /// No folder to look in (a `config.json` parsed on its own).
    NotGiven,
    /// Looked for and not there: the folder looked in.
    Absent(String),
    Found {
        file: String,
        text: String,
    },
}

/// For an original-LLaVA `config.json`, the folder that may hold its vision tower's `config.json`,
/// relative to the model folder (or absolute); `None` for other layouts and malformed files
/// (which the parse then reports).
pub fn vision_tower_folder(config_json: &str) -> Option<String> {
    let value: Value = serde_json::from_str(config_json).ok()?;
    match value.get("model_type")?.as_str()? {
        "llava_llama" | "llava_mistral" => {}
        _ => return None,
    }
    let tower = value.get("mm_vision_tower")?.as_str()?;
    Some(tower.trim_end_matches('/').to_string())
}

/// LLaVA builds its tower with `CLIPVisionModel.from_pretrained(mm_vision_tower)`, which takes a
/// local folder as well as a hub name. A folder (absolute, or relative to the model folder) holding
/// a CLIP `config.json` is read; otherwise the name must be the tower LLaVA-1.6 uses,
/// `openai/clip-vit-large-patch14-336`, whose geometry is known.
fn original_vision_tower(
    root: &Fields,
    tower: &str,
    tower_file: &TowerFile,
) -> Result<VisionConfig> {
    if let TowerFile::Found { file, text } = tower_file {
        return clip_vision_config(text, file);
    }
    if tower.ends_with("clip-vit-large-patch14-336") {
        return Ok(VisionConfig::CLIP_VIT_L_14_336);
    }
    let looked = match tower_file {
        TowerFile::Absent(folder) => format!("no {CONFIG_FILE} in {folder}"),
        _ => "the model folder was not given".to_string(),
    };
    Err(root.error(
        "mm_vision_tower",
        format!(
            "vision tower `{tower}` is not supported: it is not a folder with a CLIP {CONFIG_FILE} \
             ({looked}) nor openai/clip-vit-large-patch14-336"
        ),
    ))
}

/// A CLIP tower's `config.json`: a `CLIPConfig` (`model_type: clip`, the tower in `vision_config`)
/// or a `CLIPVisionConfig` (`model_type: clip_vision_model`), missing keys taking the class defaults.
fn clip_vision_config(json: &str, file: &str) -> Result<VisionConfig> {
    let root_value = parse_json_object(json, file)?;
    let root = Fields::root(file, &root_value);
    let empty = Map::new();
    match root.string("model_type", None)?.as_deref() {
        Some("clip") => {
            let fields = root
                .object("vision_config")?
                .unwrap_or_else(|| root.child("vision_config", &empty));
            parse_vision(&fields, &VisionConfig::CLIP_CLASS_DEFAULTS)
        }
        None | Some("clip_vision_model") => parse_vision(&root, &VisionConfig::CLIP_CLASS_DEFAULTS),
        Some(other) => Err(root.error(
            "model_type",
            format!("vision tower `{other}` is not supported"),
        )),
    }
}

fn parse_vision(fields: &Fields, defaults: &VisionConfig) -> Result<VisionConfig> {
    let hidden_size = fields.size("hidden_size", defaults.hidden_size, MAX_HIDDEN_SIZE)?;
    let num_attention_heads = fields.size(
        "num_attention_heads",
        defaults.num_attention_heads,
        MAX_HEADS,
    )?;
    if !hidden_size.is_multiple_of(num_attention_heads) {
        return Err(fields.error(
            "hidden_size",
            format!("{hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"),
        ));
    }
    let image_size = fields.size("image_size", defaults.image_size, MAX_IMAGE_SIZE)?;
    let patch_size = fields.size("patch_size", defaults.patch_size, image_size)?;
    if !image_size.is_multiple_of(patch_size) || image_size / patch_size > MAX_PATCHES_PER_SIDE {
        return Err(fields.error(
            "patch_size",
            format!(
                "image_size {image_size} must be a multiple of patch_size {patch_size}, \
                 with at most {MAX_PATCHES_PER_SIDE} patches per side"
            ),
        ));
    }
    Ok(VisionConfig {
        hidden_size,
        intermediate_size: fields.size(
            "intermediate_size",
            defaults.intermediate_size,
            MAX_INTERMEDIATE_SIZE,
        )?,
        num_hidden_layers: fields.size(
            "num_hidden_layers",
            defaults.num_hidden_layers,
            MAX_LAYERS,
        )?,
        num_attention_heads,
        image_size,
        patch_size,
        layer_norm_eps: fields.positive_f64("layer_norm_eps", defaults.layer_norm_eps)?,
        hidden_act: fields.activation("hidden_act", defaults.hidden_act)?,
    })
}

fn parse_text(fields: &Fields, arch: TextArch) -> Result<TextConfig> {
    // LlamaConfig / MistralConfig class defaults.
    let (intermediate_default, max_positions_default, sliding_default) = match arch {
        TextArch::Llama => (11008, 2048, None),
        TextArch::Mistral => (14336, 4096 * 32, Some(4096)),
    };
    let hidden_size = fields.size("hidden_size", 4096, MAX_HIDDEN_SIZE)?;
    let num_attention_heads = fields.size("num_attention_heads", 32, MAX_HEADS)?;
    // An explicit null means "same as the attention heads" in both classes.
    let num_key_value_heads = match (arch, fields.has("num_key_value_heads")) {
        (TextArch::Mistral, false) => 8,
        _ if fields.get("num_key_value_heads").is_none() => num_attention_heads,
        _ => fields.size(
            "num_key_value_heads",
            num_attention_heads,
            num_attention_heads,
        )?,
    };
    if !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(fields.error(
            "num_key_value_heads",
            format!(
                "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
            ),
        ));
    }
    // Without `head_dim` the classes use hidden_size / num_attention_heads, which must be exact.
    let head_dim = match fields.get("head_dim") {
        Some(_) => fields.size("head_dim", 0, MAX_HEAD_DIM)?,
        None if hidden_size.is_multiple_of(num_attention_heads) => {
            hidden_size / num_attention_heads
        }
        None => {
            return Err(fields.error(
                "hidden_size",
                format!("{hidden_size} is not a multiple of num_attention_heads {num_attention_heads} (and no head_dim is given)"),
            ));
        }
    };
    if !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
        return Err(fields.error(
            "head_dim",
            format!("{head_dim} must be even and at most {MAX_HEAD_DIM} (RoPE rotates pairs)"),
        ));
    }
    // LlamaConfig has no sliding window: a stray key in a Llama config is ignored, as there.
    let sliding_window = match arch {
        TextArch::Mistral if fields.get("sliding_window").is_some() => {
            Some(fields.size("sliding_window", 0, usize::MAX)?)
        }
        TextArch::Mistral if fields.has("sliding_window") => None,
        _ => sliding_default,
    };
    let eos_token_ids = if fields.has("eos_token_id") {
        fields.token_ids("eos_token_id")?
    } else {
        vec![2]
    };
    let bos_token_id = if fields.has("bos_token_id") {
        fields.opt_u32("bos_token_id")?
    } else {
        Some(1)
    };
    Ok(TextConfig {
        arch,
        hidden_size,
        intermediate_size: fields.size(
            "intermediate_size",
            intermediate_default,
            MAX_INTERMEDIATE_SIZE,
        )?,
        num_hidden_layers: fields.size("num_hidden_layers", 32, MAX_LAYERS)?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        hidden_act: fields.activation("hidden_act", Activation::Silu)?,
        rms_norm_eps: fields.positive_f64("rms_norm_eps", 1e-6)?,
        rope_theta: rope_theta(fields)?,
        vocab_size: fields.size("vocab_size", 32000, MAX_VOCAB_SIZE)?,
        max_position_embeddings: fields.size(
            "max_position_embeddings",
            max_positions_default,
            usize::MAX,
        )?,
        sliding_window,
        tie_word_embeddings: fields.bool("tie_word_embeddings", false)?,
        bos_token_id,
        eos_token_ids,
        pad_token_id: fields.opt_u32("pad_token_id")?,
    })
}

/// `rope_parameters.rope_theta` (5.x files) or `rope_theta` (4.x files), default 1e4. Scaled
/// RoPE variants change the frequencies, so they are refused rather than silently ignored.
fn rope_theta(fields: &Fields) -> Result<f64> {
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(params) = fields.object(key)? {
            match params
                .string("rope_type", None)?
                .or(params.string("type", None)?)
                .as_deref()
            {
                None | Some("default") => {}
                Some(other) => {
                    return Err(params.error(
                        "rope_type",
                        format!("RoPE scaling `{other}` is not supported"),
                    ));
                }
            }
            if params.get("rope_theta").is_some() {
                return params.positive_f64("rope_theta", 0.0);
            }
        }
    }
    fields.positive_f64("rope_theta", 10_000.0)
}

/// Cross-field rules; each size was range-checked where it was read.
fn validate(config: &LlavaConfig, file: &str) -> Result<()> {
    let v = &config.vision;
    let layers = v.num_hidden_layers as i64;
    let used = match config.vision_feature_layer {
        layer if layer < 0 => layers + 1 + layer,
        layer => layer,
    };
    if !(0..=layers).contains(&used) {
        let key = match config.layout {
            ConfigLayout::LlavaHf => "vision_feature_layer",
            ConfigLayout::OriginalLlava => "mm_vision_select_layer",
        };
        return Err(ModelError::config(
            file,
            format!(
                "key `{key}`: {} is outside the hidden states of the {layers}-layer vision tower \
                 (-{} ..= {layers})",
                config.vision_feature_layer,
                layers + 1
            ),
        ));
    }
    if config.image_grid_pinpoints.is_empty() {
        return Err(ModelError::config(
            file,
            "key `image_grid_pinpoints`: the list is empty",
        ));
    }
    Ok(())
}

/// `preprocessor_config.json` of a `LlavaNextImageProcessor`.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessorConfig {
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// `[height, width]` of each tile (`crop_size`).
    pub crop_size: [usize; 2],
    /// `[height, width]` the whole image is resized to for the overview patch (`size`).
    pub overview_size: [usize; 2],
    /// Overrides the model config's pinpoints when present.
    pub image_grid_pinpoints: Option<Vec<[usize; 2]>>,
}

pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";
pub const PROCESSOR_FILE: &str = "processor_config.json";

impl PreprocessorConfig {
    /// Reads `dir/preprocessor_config.json`, or else the `image_processor` section of
    /// `dir/processor_config.json` (where transformers 5 `save_pretrained` puts it); `Ok(None)`
    /// when the folder has neither.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join(PREPROCESSOR_FILE);
        if let Some(text) = read_optional(&path)? {
            return Self::from_json_named(&text, &path.display().to_string()).map(Some);
        }
        let path = dir.as_ref().join(PROCESSOR_FILE);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        Self::from_processor_json(&text, &path.display().to_string())
    }

    /// The `image_processor` section of a transformers 5 `processor_config.json` (named `file`
    /// in errors); `Ok(None)` when it has none.
    pub fn from_processor_json(json: &str, file: &str) -> Result<Option<Self>> {
        let root_value = parse_json_object(json, file)?;
        let root = Fields::root(file, &root_value);
        match root.object("image_processor")? {
            Some(section) => Self::from_fields(&section).map(Some),
            None => Ok(None),
        }
    }

    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_json_named(json, PREPROCESSOR_FILE)
    }

    /// Parses either a `preprocessor_config.json` or a transformers 5 `processor_config.json`
    /// (whose `image_processor` section holds the same keys).
    pub fn from_any_json(json: &str) -> Result<Self> {
        let file = "processor_config.json";
        let root_value = parse_json_object(json, file)?;
        let root = Fields::root(file, &root_value);
        match root.object("image_processor")? {
            Some(section) => Self::from_fields(&section),
            None => Self::from_fields(&root),
        }
    }

    /// What to use when a folder ships no preprocessor config: CLIP normalisation, tiles and
    /// overview at the vision tower's input size, the model config's pinpoints.
    pub fn for_model(config: &LlavaConfig) -> Self {
        let side = config.vision.image_size;
        PreprocessorConfig {
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            crop_size: [side, side],
            overview_size: [side, side],
            image_grid_pinpoints: None,
        }
    }

    /// Parses a `preprocessor_config.json` named `file` in errors.
    pub fn from_json_named(json: &str, file: &str) -> Result<Self> {
        let root_value = parse_json_object(json, file)?;
        Self::from_fields(&Fields::root(file, &root_value))
    }

    fn from_fields(root: &Fields) -> Result<Self> {
        // `LlavaNextImageProcessor` class defaults: size {shortest_edge: 224}, crop 224x224.
        let size = root.image_size("size", 224)?;
        let crop_size = root.image_size("crop_size", 224)?;
        Ok(PreprocessorConfig {
            image_mean: root.rgb("image_mean", CLIP_MEAN)?,
            image_std: root.rgb("image_std", CLIP_STD)?,
            // Tiles are `crop_size.height` squared (the processor's `patch_size`).
            crop_size,
            overview_size: size,
            image_grid_pinpoints: root.pinpoints("image_grid_pinpoints")?,
        })
    }
}

/// `generation_config.json`: the stop and special tokens generation uses.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

pub const GENERATION_FILE: &str = "generation_config.json";

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; `Ok(None)` when the folder has none.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = dir.as_ref().join(GENERATION_FILE);
        match read_optional(&path)? {
            Some(text) => Self::from_json_named(&text, &path.display().to_string()).map(Some),
            None => Ok(None),
        }
    }

    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_json_named(json, GENERATION_FILE)
    }

    /// Parses a `generation_config.json` named `file` in errors.
    pub fn from_json_named(json: &str, file: &str) -> Result<Self> {
        let root_value = parse_json_object(json, file)?;
        let root = Fields::root(file, &root_value);
        Ok(GenerationConfig {
            bos_token_id: root.opt_u32("bos_token_id")?,
            eos_token_ids: root.token_ids("eos_token_id")?,
            pad_token_id: root.opt_u32("pad_token_id")?,
        })
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

fn parse_json_object(json: &str, file: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ModelError::config(
            file,
            "expected a JSON object at the top level",
        )),
        Err(e) => Err(ModelError::config(file, format!("malformed JSON: {e}"))),
    }
}

/// Typed, defaulting access to one JSON object, with errors naming the file and the key path.
struct Fields<'a> {
    file: &'a str,
    /// Dotted path of this object inside the file ("" at the top level).
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn root(file: &'a str, map: &'a Map<String, Value>) -> Self {
        Fields {
            file,
            prefix: String::new(),
            map,
        }
    }

    fn child(&self, key: &str, map: &'a Map<String, Value>) -> Fields<'a> {
        Fields {
            file: self.file,
            prefix: format!("{}{key}.", self.prefix),
            map,
        }
    }

    fn error(&self, key: &str, msg: impl std::fmt::Display) -> ModelError {
        ModelError::config(self.file, format!("key `{}{key}`: {msg}", self.prefix))
    }

    fn type_error(&self, key: &str, expected: &str, got: &Value) -> ModelError {
        self.error(key, format!("expected {expected}, got {got}"))
    }

    /// The value of `key`, treating an explicit `null` like a missing key.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is written in the file at all (even as `null`).
    fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.type_error(key, "a non-negative integer", v))
            })
            .transpose()
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    /// A size in `1..=max`.
    fn size(&self, key: &str, default: usize, max: usize) -> Result<usize> {
        let value = self.usize(key, default)?;
        if value == 0 || value > max {
            return Err(self.error(key, format!("{value} must be between 1 and {max}")));
        }
        Ok(value)
    }

    /// A finite positive number (an epsilon, a RoPE base).
    fn positive_f64(&self, key: &str, default: f64) -> Result<f64> {
        let value = self.f64(key, default)?;
        if !(value.is_finite() && value > 0.0) {
            return Err(self.error(key, format!("{value} must be a finite positive number")));
        }
        Ok(value)
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| self.type_error(key, "a token id (non-negative integer)", v))
            })
            .transpose()
    }

    /// A token id or a list of token ids; missing or null gives an empty list.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| self.type_error(key, "a list of token ids", v))
                })
                .collect(),
            Some(_) => Ok(self.opt_u32(key)?.into_iter().collect()),
        }
    }

    fn i64(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| self.type_error(key, "an integer", v)),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.type_error(key, "a number", v)),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.type_error(key, "true or false", v)),
        }
    }

    fn string(&self, key: &str, default: Option<&str>) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(default.map(str::to_string)),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.type_error(key, "a string", v)),
        }
    }

    fn activation(&self, key: &str, default: Activation) -> Result<Activation> {
        match self.string(key, None)? {
            None => Ok(default),
            Some(name) => Activation::parse(&name)
                .ok_or_else(|| self.error(key, format!("activation `{name}` is not supported"))),
        }
    }

    fn object(&self, key: &str) -> Result<Option<Fields<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(self.child(key, map))),
            Some(v) => Err(self.type_error(key, "an object", v)),
        }
    }

    fn pinpoints(&self, key: &str) -> Result<Option<Vec<[usize; 2]>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let bad = || {
            let rule = format!(
                "a list of [height, width] pairs of integers in 1..={}",
                llava_image::MAX_SIDE
            );
            self.type_error(key, &rule, value)
        };
        let side = |v: &Value| {
            v.as_u64()
                .filter(|&s| (1..=u64::from(llava_image::MAX_SIDE)).contains(&s))
                .map(|s| s as usize)
        };
        let items = value.as_array().ok_or_else(bad)?;
        items
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([h, w]) => match (side(h), side(w)) {
                    (Some(h), Some(w)) => Ok([h, w]),
                    _ => Err(bad()),
                },
                _ => Err(bad()),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn rgb(&self, key: &str, default: [f32; 3]) -> Result<[f32; 3]> {
        match self.get(key) {
            None => Ok(default),
            // A single number applies to all three channels.
            Some(value @ Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN) as f32;
                if !x.is_finite() {
                    return Err(self.type_error(key, "finite numbers", value));
                }
                Ok([x; 3])
            }
            Some(value @ Value::Array(items)) if items.len() == 3 => {
                let mut out = [0f32; 3];
                for (slot, item) in out.iter_mut().zip(items) {
                    *slot = item
                        .as_f64()
                        .map(|x| x as f32)
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| self.type_error(key, "three finite numbers", value))?;
                }
                Ok(out)
            }
            Some(value) => Err(self.type_error(key, "three numbers", value)),
        }
    }

    /// An image size written as an integer, `{height, width}` or `{shortest_edge}`: `[h, w]`.
    fn image_size(&self, key: &str, default: usize) -> Result<[usize; 2]> {
        let Some(value) = self.get(key) else {
            return Ok([default, default]);
        };
        let bad = || self.type_error(key, "an integer, {height, width} or {shortest_edge}", value);
        match value {
            Value::Number(n) => n
                .as_u64()
                .and_then(|s| usize::try_from(s).ok())
                .map(|s| [s; 2])
                .ok_or_else(bad),
            Value::Object(map) => {
                let size = self.child(key, map);
                match (
                    size.opt_usize("height")?,
                    size.opt_usize("width")?,
                    size.opt_usize("shortest_edge")?,
                ) {
                    (Some(h), Some(w), _) => Ok([h, w]),
                    (_, _, Some(s)) => Ok([s, s]),
                    _ => Err(bad()),
                }
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values below were printed by transformers 5.24 (`LlavaNextConfig.from_dict`) for
    // the same JSON.

    fn parse(json: &str) -> LlavaConfig {
        LlavaConfig::from_json(json).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(json: &str) -> String {
        LlavaConfig::from_json(json)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn empty_llava_next_takes_class_defaults() {
        let c = parse(r#"{"model_type": "llava_next"}"#);
        assert_eq!(c.layout, ConfigLayout::LlavaHf);
        // No vision_config at all: LlavaNextConfig's own CLIP-L/336 init kwargs.
        assert_eq!(c.vision, VisionConfig::CLIP_VIT_L_14_336);
        let t = &c.text;
        assert_eq!(t.arch, TextArch::Llama);
        assert_eq!(
            (
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers,
                t.num_attention_heads
            ),
            (4096, 11008, 32, 32)
        );
        assert_eq!(
            (
                t.num_key_value_heads,
                t.head_dim,
                t.vocab_size,
                t.max_position_embeddings
            ),
            (32, 128, 32000, 2048)
        );
        assert_eq!((t.rms_norm_eps, t.rope_theta), (1e-6, 10_000.0));
        assert_eq!(t.sliding_window, None);
        assert_eq!(
            (t.bos_token_id, t.eos_token_ids.as_slice(), t.pad_token_id),
            (Some(1), &[2][..], None)
        );
        assert_eq!(t.hidden_act, Activation::Silu);
        assert_eq!(c.image_token_index, Some(32000));
        assert_eq!(
            c.image_grid_pinpoints,
            vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        );
        assert_eq!(c.vision_feature_layer, -2);
        assert_eq!(c.vision_feature_select_strategy, FeatureSelect::Default);
        assert_eq!(c.projector_hidden_act, Activation::Gelu);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn mistral_model_type_alone_gives_mistral_defaults() {
        let c = parse(r#"{"model_type": "llava_next", "text_config": {"model_type": "mistral"}}"#);
        let t = &c.text;
        assert_eq!(t.arch, TextArch::Mistral);
        assert_eq!(
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers),
            (4096, 14336, 32)
        );
        assert_eq!(
            (t.num_attention_heads, t.num_key_value_heads, t.head_dim),
            (32, 8, 128)
        );
        assert_eq!(t.sliding_window, Some(4096));
        assert_eq!(t.max_position_embeddings, 131072);
        assert_eq!((t.rms_norm_eps, t.rope_theta), (1e-6, 10_000.0));
    }

    #[test]
    fn explicit_null_sliding_window_disables_it() {
        let c = parse(
            r#"{"model_type": "llava_next", "text_config": {"model_type": "mistral", "sliding_window": null}}"#,
        );
        assert_eq!(c.text.sliding_window, None);
        assert_eq!(c.text.num_key_value_heads, 8);
    }

    #[test]
    fn partial_vision_config_takes_clip_class_defaults() {
        // A vision_config dict is built as CLIPVisionConfig(**dict): 768/3072/12/patch 32 defaults.
        let c = parse(
            r#"{"model_type": "llava_next",
                "vision_config": {"hidden_size": 1024, "image_size": 448, "num_attention_heads": 16}}"#,
        );
        let v = &c.vision;
        assert_eq!(
            (
                v.hidden_size,
                v.intermediate_size,
                v.num_hidden_layers,
                v.num_attention_heads
            ),
            (1024, 3072, 12, 16)
        );
        assert_eq!(
            (v.image_size, v.patch_size, v.layer_norm_eps),
            (448, 32, 1e-5)
        );
        assert_eq!(v.hidden_act, Activation::QuickGelu);
    }

    #[test]
    fn llama_text_options() {
        let c = parse(
            r#"{"model_type": "llava_next", "text_config": {"model_type": "llama", "sliding_window": 77,
                "eos_token_id": [2, 7], "head_dim": 256, "bos_token_id": null, "pad_token_id": 0}}"#,
        );
        // Llama ignores sliding_window.
        assert_eq!(c.text.sliding_window, None);
        assert_eq!(c.text.eos_token_ids, vec![2, 7]);
        assert_eq!(c.text.head_dim, 256);
        assert_eq!(c.text.bos_token_id, None);
        assert_eq!(c.text.pad_token_id, Some(0));
    }

    #[test]
    fn both_rope_theta_spellings() {
        let v4 = parse(r#"{"model_type": "llava_next", "text_config": {"rope_theta": 5000000.0}}"#);
        assert_eq!(v4.text.rope_theta, 5e6);
        let v5 = parse(
            r#"{"model_type": "llava_next",
                "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}}"#,
        );
        assert_eq!(v5.text.rope_theta, 1e6);
        let null_scaling = parse(
            r#"{"model_type": "llava_next", "text_config": {"rope_scaling": null, "rope_theta": 3.0}}"#,
        );
        assert_eq!(null_scaling.text.rope_theta, 3.0);
    }

    #[test]
    fn scaled_rope_is_refused() {
        let msg = error(
            r#"{"model_type": "llava_next",
                "text_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}"#,
        );
        assert!(
            msg.contains("text_config.rope_scaling.rope_type") && msg.contains("linear"),
            "{msg}"
        );
    }

    #[test]
    fn tie_word_embeddings_top_level_decides() {
        // transformers 5.24 ties on the top-level flag only when both are written.
        let top = parse(r#"{"model_type": "llava_next", "tie_word_embeddings": true}"#);
        assert!(top.tie_word_embeddings);
        let both = parse(
            r#"{"model_type": "llava_next", "tie_word_embeddings": false,
                "text_config": {"tie_word_embeddings": true}}"#,
        );
        assert!(!both.tie_word_embeddings);
        let text_only =
            parse(r#"{"model_type": "llava_next", "text_config": {"tie_word_embeddings": true}}"#);
        assert!(text_only.tie_word_embeddings);
    }

    /// Shaped like llava-hf/llava-v1.6-mistral-7b-hf's config.json (4.x era, sparse).
    const MISTRAL_HF: &str = r#"{
      "architectures": ["LlavaNextForConditionalGeneration"],
      "ignore_index": -100,
      "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
      "image_token_index": 32000,
      "model_type": "llava_next",
      "projector_hidden_act": "gelu",
      "text_config": {
        "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "architectures": ["MistralForCausalLM"],
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": null,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064
      },
      "tie_word_embeddings": false,
      "torch_dtype": "float16",
      "transformers_version": "4.39.0.dev0",
      "use_image_newline_parameter": true,
      "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000
      },
      "vision_feature_layer": -2,
      "vision_feature_select_strategy": "default",
      "vocab_size": 32064
    }"#;

    #[test]
    fn mistral_7b_hf_matches_spec_table() {
        let c = parse(MISTRAL_HF);
        assert_eq!(c.vision, VisionConfig::CLIP_VIT_L_14_336);
        let t = &c.text;
        assert_eq!(
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers),
            (4096, 14336, 32)
        );
        assert_eq!((t.num_attention_heads, t.num_key_value_heads), (32, 8));
        assert_eq!(
            (t.rms_norm_eps, t.rope_theta, t.vocab_size),
            (1e-5, 1e6, 32064)
        );
        assert_eq!(t.sliding_window, None);
        assert_eq!(c.image_token_index, Some(32000));
        assert_eq!(t.eos_token_ids, vec![2]);
        assert_eq!(c.vision.grid_side(), 24);
    }

    /// liuhaotian/llava-v1.6-vicuna-7b's config.json layout (original LLaVA repo).
    const LIUHAOTIAN_VICUNA: &str = r#"{
      "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
      "architectures": ["LlavaLlamaForCausalLM"],
      "attention_bias": false,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "freeze_mm_mlp_adapter": false,
      "hidden_act": "silu",
      "hidden_size": 4096,
      "image_aspect_ratio": "anyres",
      "image_crop_resolution": 224,
      "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
      "image_split_resolution": 224,
      "intermediate_size": 11008,
      "max_position_embeddings": 4096,
      "mm_hidden_size": 1024,
      "mm_patch_merge_type": "spatial_unpad",
      "mm_projector_lr": 2e-05,
      "mm_projector_type": "mlp2x_gelu",
      "mm_resampler_type": null,
      "mm_use_im_patch_token": false,
      "mm_use_im_start_end": false,
      "mm_vision_select_feature": "patch",
      "mm_vision_select_layer": -2,
      "mm_vision_tower": "openai/clip-vit-large-patch14-336",
      "model_type": "llava_llama",
      "num_attention_heads": 32,
      "num_hidden_layers": 32,
      "num_key_value_heads": 32,
      "pad_token_id": 0,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": null,
      "rope_theta": 10000.0,
      "tie_word_embeddings": false,
      "tokenizer_model_max_length": 4096,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.36.2",
      "use_cache": true,
      "use_mm_proj": true,
      "vocab_size": 32000
    }"#;

    #[test]
    fn original_llava_layout() {
        let c = parse(LIUHAOTIAN_VICUNA);
        assert_eq!(c.layout, ConfigLayout::OriginalLlava);
        assert_eq!(c.vision, VisionConfig::CLIP_VIT_L_14_336);
        let t = &c.text;
        assert_eq!(t.arch, TextArch::Llama);
        assert_eq!(
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers),
            (4096, 11008, 32)
        );
        assert_eq!(
            (t.num_key_value_heads, t.rms_norm_eps, t.rope_theta),
            (32, 1e-5, 1e4)
        );
        assert_eq!(
            (t.vocab_size, t.max_position_embeddings, t.pad_token_id),
            (32000, 4096, Some(0))
        );
        assert_eq!(c.image_token_index, None);
        assert_eq!(c.vision_feature_layer, -2);
        assert_eq!(c.vision_feature_select_strategy, FeatureSelect::Default);
        assert_eq!(c.image_grid_pinpoints.len(), 5);
        assert!(!c.tie_word_embeddings);

        let mistral = parse(&LIUHAOTIAN_VICUNA.replace("\"llava_llama\"", "\"llava_mistral\""));
        assert_eq!(mistral.text.arch, TextArch::Mistral);
        // Not written in the file, so MistralConfig's default applies.
        assert_eq!(mistral.text.sliding_window, Some(4096));
    }

    #[test]
    fn original_llava_vision_tower_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let tower = dir.path().join("tiny-clip");
        std::fs::create_dir(&tower).unwrap();
        let config = LIUHAOTIAN_VICUNA
            .replace("openai/clip-vit-large-patch14-336", "tiny-clip")
            .replace("\"mm_hidden_size\": 1024", "\"mm_hidden_size\": 64");
        std::fs::write(dir.path().join("config.json"), &config).unwrap();

        // A CLIPConfig (as openai/clip-vit-large-patch14-336 ships): the tower is `vision_config`,
        // its missing keys take CLIPVisionConfig's defaults.
        std::fs::write(
            tower.join("config.json"),
            r#"{"model_type": "clip", "text_config": {"hidden_size": 512},
                "vision_config": {"hidden_size": 64, "num_attention_heads": 4, "image_size": 336, "patch_size": 14}}"#,
        )
        .unwrap();
        let c = LlavaConfig::from_dir(dir.path()).unwrap();
        let expected = VisionConfig {
            hidden_size: 64,
            num_attention_heads: 4,
            image_size: 336,
            patch_size: 14,
            ..VisionConfig::CLIP_CLASS_DEFAULTS
        };
        assert_eq!(c.vision, expected);

        // A CLIPVisionConfig, named by an absolute path.
        std::fs::write(
            tower.join("config.json"),
            r#"{"model_type": "clip_vision_model", "hidden_size": 64, "num_attention_heads": 2,
                "num_hidden_layers": 3, "image_size": 336, "patch_size": 14, "hidden_act": "gelu"}"#,
        )
        .unwrap();
        let absolute = config.replace(
            "\"tiny-clip\"",
            &format!("{:?}", tower.display().to_string()),
        );
        std::fs::write(dir.path().join("config.json"), &absolute).unwrap();
        let c = LlavaConfig::from_dir(dir.path()).unwrap();
        assert_eq!((c.vision.hidden_size, c.vision.num_hidden_layers), (64, 3));
        assert_eq!(
            (c.vision.num_attention_heads, c.vision.hidden_act),
            (2, Activation::Gelu)
        );

        // mm_hidden_size must agree with the tower.
        let wrong = absolute.replace("\"mm_hidden_size\": 64", "\"mm_hidden_size\": 1024");
        std::fs::write(dir.path().join("config.json"), wrong).unwrap();
        let msg = LlavaConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("mm_hidden_size") && msg.contains("64"),
            "{msg}"
        );

        // Not a tower: named in the error with the folder looked in; without a folder, a name only.
        std::fs::write(
            tower.join("config.json"),
            r#"{"model_type": "siglip_vision_model"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        let msg = LlavaConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("siglip_vision_model") && msg.contains("tiny-clip"),
            "{msg}"
        );
        std::fs::remove_file(tower.join("config.json")).unwrap();
        let msg = LlavaConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("`tiny-clip`") && msg.contains("no config.json in"),
            "{msg}"
        );
        let msg = error(&config);
        assert!(
            msg.contains("`tiny-clip`") && msg.contains("model folder was not given"),
            "{msg}"
        );
    }

    #[test]
    fn original_llava_refuses_llava_1_5_settings() {
        let flat = error(&LIUHAOTIAN_VICUNA.replace("spatial_unpad", "flat"));
        assert!(
            flat.contains("mm_patch_merge_type") && flat.contains("flat"),
            "{flat}"
        );
        let tower =
            error(&LIUHAOTIAN_VICUNA.replace("openai/clip-vit-large-patch14-336", "google/siglip"));
        assert!(
            tower.contains("mm_vision_tower") && tower.contains("google/siglip"),
            "{tower}"
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        let malformed = error(r#"{"model_type": "llava_next", "#);
        assert!(
            malformed.starts_with("config.json: malformed JSON"),
            "{malformed}"
        );

        let wrong_type =
            error(r#"{"model_type": "llava_next", "text_config": {"hidden_size": "big"}}"#);
        assert!(
            wrong_type.contains("config.json") && wrong_type.contains("`text_config.hidden_size`"),
            "{wrong_type}"
        );
        assert!(wrong_type.contains("\"big\""), "{wrong_type}");

        let negative =
            error(r#"{"model_type": "llava_next", "vision_config": {"num_hidden_layers": -1}}"#);
        assert!(
            negative.contains("`vision_config.num_hidden_layers`"),
            "{negative}"
        );

        let not_object = error(r#"{"model_type": "llava_next", "text_config": 3}"#);
        assert!(
            not_object.contains("`text_config`: expected an object"),
            "{not_object}"
        );

        let pinpoints =
            error(r#"{"model_type": "llava_next", "image_grid_pinpoints": [[336, 672], [672]]}"#);
        assert!(pinpoints.contains("`image_grid_pinpoints`"), "{pinpoints}");

        let other_model = error(r#"{"model_type": "qwen2_vl"}"#);
        assert!(other_model.contains("qwen2_vl"), "{other_model}");

        let missing_type = error(r#"{"hidden_size": 4096}"#);
        assert!(missing_type.contains("model_type"), "{missing_type}");

        let heads =
            error(r#"{"model_type": "llava_next", "vision_config": {"hidden_size": 1024}}"#);
        assert!(
            heads.contains("not a multiple of num_attention_heads 12"),
            "{heads}"
        );
    }

    /// One test per rule: each hostile value is refused with the file, the key and the rule.
    #[test]
    fn values_outside_the_models_invariants_are_refused() {
        let cases = [
            (
                r#"{"text_config": {"hidden_size": 1099511627776}}"#,
                "`text_config.hidden_size`: 1099511627776 must be between 1 and 65536",
            ),
            (
                r#"{"text_config": {"hidden_size": 0}}"#,
                "`text_config.hidden_size`: 0 must be between 1",
            ),
            (
                r#"{"text_config": {"vocab_size": 0}}"#,
                "`text_config.vocab_size`: 0 must be between 1",
            ),
            (
                r#"{"text_config": {"num_hidden_layers": 100000}}"#,
                "`text_config.num_hidden_layers`: 100000 must be between 1 and 1024",
            ),
            (
                r#"{"text_config": {"intermediate_size": 4294967296}}"#,
                "`text_config.intermediate_size`",
            ),
            (
                r#"{"text_config": {"num_attention_heads": 0}}"#,
                "`text_config.num_attention_heads`: 0 must be between 1",
            ),
            (
                r#"{"text_config": {"hidden_size": 100, "num_attention_heads": 3}}"#,
                "`text_config.hidden_size`: 100 is not a multiple of num_attention_heads 3",
            ),
            (
                r#"{"text_config": {"num_key_value_heads": 5}}"#,
                "`text_config.num_key_value_heads`: 5 does not divide num_attention_heads 32",
            ),
            (
                r#"{"text_config": {"num_key_value_heads": 64}}"#,
                "`text_config.num_key_value_heads`: 64 must be between 1 and 32",
            ),
            (
                r#"{"text_config": {"head_dim": 7}}"#,
                "`text_config.head_dim`: 7 must be even",
            ),
            (
                r#"{"text_config": {"rms_norm_eps": -1e-6}}"#,
                "`text_config.rms_norm_eps`: -0.000001 must be a finite positive number",
            ),
            (
                r#"{"text_config": {"rms_norm_eps": 0}}"#,
                "`text_config.rms_norm_eps`: 0 must be a finite positive",
            ),
            (
                r#"{"text_config": {"rope_theta": -10000}}"#,
                "`text_config.rope_theta`: -10000 must be a finite positive",
            ),
            (
                r#"{"text_config": {"rope_parameters": {"rope_theta": 0}}}"#,
                "`text_config.rope_parameters.rope_theta`: 0 must be",
            ),
            (
                r#"{"text_config": {"max_position_embeddings": 0}}"#,
                "`text_config.max_position_embeddings`: 0 must be between 1",
            ),
            (
                r#"{"text_config": {"model_type": "mistral", "sliding_window": 0}}"#,
                "`text_config.sliding_window`: 0 must be between 1",
            ),
            (
                r#"{"vision_config": {"patch_size": 0}}"#,
                "`vision_config.patch_size`: 0 must be between 1 and 224",
            ),
            (
                r#"{"vision_config": {"image_size": 336, "patch_size": 15}}"#,
                "`vision_config.patch_size`: image_size 336 must be a multiple of patch_size 15",
            ),
            (
                r#"{"vision_config": {"image_size": 336, "patch_size": 1}}"#,
                "with at most 128 patches per side",
            ),
            (
                r#"{"vision_config": {"image_size": 1000000}}"#,
                "`vision_config.image_size`: 1000000 must be between 1 and 4096",
            ),
            (
                r#"{"vision_config": {"layer_norm_eps": -1}}"#,
                "`vision_config.layer_norm_eps`: -1 must be a finite positive",
            ),
            (
                r#"{"vision_config": {"hidden_size": 0}}"#,
                "`vision_config.hidden_size`: 0 must be between 1",
            ),
            (
                r#"{"vision_feature_layer": 25}"#,
                "`vision_feature_layer`: 25 is outside the hidden states of the 24-layer vision tower",
            ),
            (
                r#"{"vision_feature_layer": -26}"#,
                "`vision_feature_layer`: -26 is outside",
            ),
            (
                r#"{"image_grid_pinpoints": [[336, 4294967632]]}"#,
                "`image_grid_pinpoints`: expected a list of [height, width] pairs of integers in 1..=16384",
            ),
            (
                r#"{"image_grid_pinpoints": []}"#,
                "`image_grid_pinpoints`: the list is empty",
            ),
        ];
        for (fields, expected) in cases {
            let mut json: Value = serde_json::from_str(fields).unwrap();
            json["model_type"] = "llava_next".into();
            let msg = error(&json.to_string());
            assert!(
                msg.starts_with("config.json: key ") && msg.contains(expected),
                "{fields}: {msg}"
            );
        }
        // The limits themselves are accepted.
        parse(
            r#"{"model_type": "llava_next", "vision_feature_layer": 24, "text_config": {"hidden_size": 65536, "num_attention_heads": 64},
                  "image_grid_pinpoints": [[16384, 16384]]}"#,
        );
        let msg = PreprocessorConfig::from_json(r#"{"image_mean": [1e300, 0, 0]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`image_mean`: expected three finite numbers"),
            "{msg}"
        );
    }

    #[test]
    fn from_dir_reads_config_json_and_names_path_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), MISTRAL_HF).unwrap();
        assert_eq!(
            LlavaConfig::from_dir(dir.path()).unwrap(),
            parse(MISTRAL_HF)
        );
        std::fs::write(dir.path().join("config.json"), "[1, 2]").unwrap();
        let msg = LlavaConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains(&dir.path().join("config.json").display().to_string()),
            "{msg}"
        );
        let missing = LlavaConfig::from_dir(dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, ModelError::Io { .. }), "{missing}");
    }

    #[test]
    fn preprocessor_config() {
        // llava-hf/llava-v1.6-*-hf preprocessor_config.json layout.
        let hf = PreprocessorConfig::from_json(
            r#"{"aspect_ratio_setting": "anyres", "crop_size": {"height": 336, "width": 336},
                "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true, "do_rescale": true,
                "do_resize": true,
                "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_processor_type": "LlavaNextImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
                "size": {"shortest_edge": 336}}"#,
        )
        .unwrap();
        assert_eq!(hf.crop_size, [336, 336]);
        assert_eq!(hf.overview_size, [336, 336]);
        assert_eq!(hf.image_mean, CLIP_MEAN);
        assert_eq!(hf.image_std, CLIP_STD);
        assert_eq!(hf.image_grid_pinpoints.as_ref().map(Vec::len), Some(5));

        // CLIP-style file with integer sizes and custom normalisation; pinpoints absent.
        let clip = PreprocessorConfig::from_json(
            r#"{"crop_size": 336, "size": {"height": 400, "width": 500}, "image_mean": [0.5, 0.5, 0.5],
                "image_std": 0.25}"#,
        )
        .unwrap();
        assert_eq!(
            (clip.crop_size, clip.overview_size),
            ([336, 336], [400, 500])
        );
        assert_eq!((clip.image_mean, clip.image_std), ([0.5; 3], [0.25; 3]));
        assert_eq!(clip.image_grid_pinpoints, None);

        // LlavaNextImageProcessor class defaults.
        let empty = PreprocessorConfig::from_json("{}").unwrap();
        assert_eq!(
            (empty.crop_size, empty.overview_size),
            ([224, 224], [224, 224])
        );

        let bad = PreprocessorConfig::from_json(r#"{"image_mean": [0.5, 0.5]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("preprocessor_config.json") && bad.contains("`image_mean`"),
            "{bad}"
        );

        // transformers 5 saves the image processor inside processor_config.json.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(PreprocessorConfig::from_dir(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join("processor_config.json"),
            r#"{"image_processor": {"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336},
                "image_std": [0.5, 0.5, 0.5]}, "patch_size": 14, "processor_class": "LlavaNextProcessor"}"#,
        )
        .unwrap();
        let nested = PreprocessorConfig::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(
            (nested.crop_size, nested.image_std, nested.image_mean),
            ([336, 336], [0.5; 3], CLIP_MEAN)
        );
        std::fs::write(
            dir.path().join("preprocessor_config.json"),
            r#"{"crop_size": 224}"#,
        )
        .unwrap();
        assert_eq!(
            PreprocessorConfig::from_dir(dir.path())
                .unwrap()
                .unwrap()
                .crop_size,
            [224, 224]
        );

        let fallback = PreprocessorConfig::for_model(&parse(MISTRAL_HF));
        assert_eq!(
            (fallback.crop_size, fallback.overview_size),
            ([336, 336], [336, 336])
        );
    }

    #[test]
    fn generation_config() {
        let single = GenerationConfig::from_json(
            r#"{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}"#,
        )
        .unwrap();
        assert_eq!(
            single,
            GenerationConfig {
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                pad_token_id: Some(0)
            }
        );
        let list = GenerationConfig::from_json(r#"{"eos_token_id": [2, 7]}"#).unwrap();
        assert_eq!(
            list,
            GenerationConfig {
                bos_token_id: None,
                eos_token_ids: vec![2, 7],
                pad_token_id: None
            }
        );
        let bad = GenerationConfig::from_json(r#"{"eos_token_id": [2, "x"]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("generation_config.json") && bad.contains("`eos_token_id`"),
            "{bad}"
        );

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(GenerationConfig::from_dir(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": 7}"#,
        )
        .unwrap();
        assert_eq!(
            GenerationConfig::from_dir(dir.path())
                .unwrap()
                .unwrap()
                .eos_token_ids,
            vec![7]
        );
    }
}
