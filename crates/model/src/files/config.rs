//! Model, preprocessor and generation configs, read the way transformers 5.24 reads them.
//!
//! A checkpoint's `config.json` only stores what differs from the config class defaults, so every
//! missing key takes the default of the class transformers would build (`LlavaNextConfig`,
//! `CLIPVisionConfig`, `LlamaConfig`, `MistralConfig`). Two layouts are understood: llava-hf
//! (`model_type: llava_next` with `vision_config` / `text_config`) and the original LLaVA repo
//! (`model_type: llava_llama` / `llava_mistral`, text fields at the top level, `mm_*` keys).
//!
//! Each file section deserializes (serde derive) into a `*Keys` struct of optional values; leaf
//! types (`Count`, `TokenId`, `Rgb`, ...) check a value's kind, and the rules between keys and the
//! class defaults are applied after. Every error names the file, the key's full path and the rule.

use std::path::Path;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer};
use serde_json::Value;

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
        let root = parse_json_object(json, file)?;
        let model_type: ModelTypeKey = read_keys(file, &root)?;
        match model_type.model_type.as_deref() {
            Some("llava_next") => parse_llava_hf(read_keys(file, &root)?, file),
            Some(arch @ ("llava_llama" | "llava_mistral")) => {
                let arch = match arch {
                    "llava_llama" => TextArch::Llama,
                    _ => TextArch::Mistral,
                };
                let keys = read_keys(file, &root)?;
                let text = read_keys(file, &root)?;
                parse_original(keys, text, arch, file, tower)
            }
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

/// The keys of a llava-hf `config.json` (`LlavaNextConfig`).
#[derive(Deserialize)]
struct LlavaNextKeys {
    vision_config: Option<VisionKeys>,
    text_config: Option<TextKeys>,
    image_token_index: Option<TokenId>,
    /// The attribute-map alias of `image_token_index`.
    image_token_id: Option<TokenId>,
    vision_feature_layer: Option<FeatureLayer>,
    vision_feature_select_strategy: Option<FeatureSelect>,
    multimodal_projector_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    image_grid_pinpoints: Option<Pinpoints>,
    projector_hidden_act: Option<Activation>,
}

fn parse_llava_hf(keys: LlavaNextKeys, file: &str) -> Result<LlavaConfig> {
    let root = Place::root(file);
    let vision = match keys.vision_config {
        Some(section) => {
            let place = root.child("vision_config");
            match section.model_type.as_deref() {
                None | Some("clip_vision_model") => {}
                Some(other) => {
                    return Err(place.error(
                        "model_type",
                        format!("vision tower `{other}` is not supported"),
                    ));
                }
            }
            parse_vision(section, &place, &VisionConfig::CLIP_CLASS_DEFAULTS)?
        }
        None => VisionConfig::CLIP_VIT_L_14_336,
    };

    let text_place = root.child("text_config");
    let text_keys = keys.text_config.unwrap_or_default();
    let arch = match text_keys.model_type.as_deref() {
        None | Some("llama") => TextArch::Llama,
        Some("mistral") => TextArch::Mistral,
        Some(other) => {
            return Err(text_place.error(
                "model_type",
                format!("language model `{other}` is not supported"),
            ));
        }
    };
    let text = parse_text(text_keys, &text_place, arch)?;

    let vision_feature_layer = match keys.vision_feature_layer {
        None => -2,
        Some(FeatureLayer::One(layer)) => layer,
        Some(FeatureLayer::List) => {
            return Err(root.error(
                "vision_feature_layer",
                "a list of feature layers is not supported",
            ));
        }
    };
    if keys.multimodal_projector_bias == Some(false) {
        return Err(root.error(
            "multimodal_projector_bias",
            "a projector without bias is not supported",
        ));
    }
    let config = LlavaConfig {
        layout: ConfigLayout::LlavaHf,
        image_token_index: Some(
            keys.image_token_index
                .or(keys.image_token_id)
                .map_or(32000, |TokenId(id)| id),
        ),
        image_grid_pinpoints: keys
            .image_grid_pinpoints
            .map_or(DEFAULT_PINPOINTS.to_vec(), |Pinpoints(p)| p),
        vision_feature_layer,
        vision_feature_select_strategy: keys
            .vision_feature_select_strategy
            .unwrap_or(FeatureSelect::Default),
        projector_hidden_act: keys.projector_hidden_act.unwrap_or(Activation::Gelu),
        // transformers 5 ties on the top-level flag; a file that only sets it in `text_config`
        // (as 4.x read it) is honoured when the top level is silent.
        tie_word_embeddings: keys.tie_word_embeddings.unwrap_or(text.tie_word_embeddings),
        vision,
        text,
    };
    validate(&config, file)?;
    Ok(config)
}

/// The LLaVA-specific keys of an original-LLaVA `config.json` (the text keys sit beside them).
#[derive(Deserialize)]
struct OriginalKeys {
    mm_vision_tower: Option<String>,
    mm_hidden_size: Option<Count>,
    mm_projector_type: Option<String>,
    mm_patch_merge_type: Option<String>,
    image_aspect_ratio: Option<String>,
    mm_vision_select_feature: Option<SelectFeature>,
    mm_vision_select_layer: Option<Integer>,
    image_grid_pinpoints: Option<Pinpoints>,
}

fn parse_original(
    keys: OriginalKeys,
    text: TextKeys,
    arch: TextArch,
    file: &str,
    tower_file: &TowerFile,
) -> Result<LlavaConfig> {
    let root = Place::root(file);
    let tower = keys
        .mm_vision_tower
        .ok_or_else(|| root.error("mm_vision_tower", "missing"))?;
    let vision = original_vision_tower(&root, &tower, tower_file)?;
    let mm_hidden_size = keys.mm_hidden_size.map_or(vision.hidden_size, |Count(n)| n);
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
    for (key, value, wanted) in [
        ("mm_projector_type", &keys.mm_projector_type, "mlp2x_gelu"),
        (
            "mm_patch_merge_type",
            &keys.mm_patch_merge_type,
            "spatial_unpad",
        ),
        ("image_aspect_ratio", &keys.image_aspect_ratio, "anyres"),
    ] {
        if value.as_deref() != Some(wanted) {
            return Err(root.error(
                key,
                format!("expected \"{wanted}\" (LLaVA-1.6), got {value:?}"),
            ));
        }
    }
    let Pinpoints(image_grid_pinpoints) = keys
        .image_grid_pinpoints
        .ok_or_else(|| root.error("image_grid_pinpoints", "missing (needed for AnyRes)"))?;
    let text = parse_text(text, &root, arch)?;
    let config = LlavaConfig {
        layout: ConfigLayout::OriginalLlava,
        vision,
        image_token_index: None,
        image_grid_pinpoints,
        vision_feature_layer: keys.mm_vision_select_layer.map_or(-2, |Integer(n)| n),
        vision_feature_select_strategy: match keys.mm_vision_select_feature {
            None | Some(SelectFeature::Patch) => FeatureSelect::Default,
            Some(SelectFeature::ClsPatch) => FeatureSelect::Full,
        },
        projector_hidden_act: Activation::Gelu,
        tie_word_embeddings: text.tie_word_embeddings,
        text,
    };
    validate(&config, file)?;
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
    #[derive(Deserialize)]
    struct TowerKeys {
        model_type: String,
        mm_vision_tower: String,
    }
    let keys: TowerKeys = serde_json::from_str(config_json).ok()?;
    match keys.model_type.as_str() {
        "llava_llama" | "llava_mistral" => {
            Some(keys.mm_vision_tower.trim_end_matches('/').to_string())
        }
        _ => None,
    }
}

/// LLaVA builds its tower with `CLIPVisionModel.from_pretrained(mm_vision_tower)`, which takes a
/// local folder as well as a hub name. A folder (absolute, or relative to the model folder) holding
/// a CLIP `config.json` is read; otherwise the name must be the tower LLaVA-1.6 uses,
/// `openai/clip-vit-large-patch14-336`, whose geometry is known.
fn original_vision_tower(
    root: &Place,
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
    #[derive(Deserialize)]
    struct ClipKeys {
        model_type: Option<String>,
        vision_config: Option<VisionKeys>,
    }
    let root_value = parse_json_object(json, file)?;
    let root = Place::root(file);
    let keys: ClipKeys = read_keys(file, &root_value)?;
    match keys.model_type.as_deref() {
        Some("clip") => parse_vision(
            keys.vision_config.unwrap_or_default(),
            &root.child("vision_config"),
            &VisionConfig::CLIP_CLASS_DEFAULTS,
        ),
        None | Some("clip_vision_model") => parse_vision(
            read_keys(file, &root_value)?,
            &root,
            &VisionConfig::CLIP_CLASS_DEFAULTS,
        ),
        Some(other) => Err(root.error(
            "model_type",
            format!("vision tower `{other}` is not supported"),
        )),
    }
}

/// The keys of a `CLIPVisionConfig`.
#[derive(Default, Deserialize)]
#[serde(expecting = "an object")]
struct VisionKeys {
    model_type: Option<String>,
    hidden_size: Option<Count>,
    intermediate_size: Option<Count>,
    num_hidden_layers: Option<Count>,
    num_attention_heads: Option<Count>,
    image_size: Option<Count>,
    patch_size: Option<Count>,
    layer_norm_eps: Option<Number>,
    hidden_act: Option<Activation>,
}

/// `act` where the networks implement it (net/vision.rs, net/language.rs, net/projector.rs), else
/// an error naming the key: refused before any weight is read.
fn supported_act(
    place: &Place,
    key: &str,
    act: Activation,
    supported: &[Activation],
) -> Result<Activation> {
    if supported.contains(&act) {
        return Ok(act);
    }
    let msg = format!("{act:?} is not supported here (supported: {supported:?})");
    Err(place.error(key, msg))
}

fn parse_vision(keys: VisionKeys, place: &Place, defaults: &VisionConfig) -> Result<VisionConfig> {
    let hidden_size = place.size(
        "hidden_size",
        keys.hidden_size,
        defaults.hidden_size,
        MAX_HIDDEN_SIZE,
    )?;
    let num_attention_heads = place.size(
        "num_attention_heads",
        keys.num_attention_heads,
        defaults.num_attention_heads,
        MAX_HEADS,
    )?;
    if !hidden_size.is_multiple_of(num_attention_heads) {
        return Err(place.error(
            "hidden_size",
            format!("{hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"),
        ));
    }
    let image_size = place.size(
        "image_size",
        keys.image_size,
        defaults.image_size,
        MAX_IMAGE_SIZE,
    )?;
    let patch_size = place.size(
        "patch_size",
        keys.patch_size,
        defaults.patch_size,
        image_size,
    )?;
    if !image_size.is_multiple_of(patch_size) || image_size / patch_size > MAX_PATCHES_PER_SIDE {
        return Err(place.error(
            "patch_size",
            format!(
                "image_size {image_size} must be a multiple of patch_size {patch_size}, \
                 with at most {MAX_PATCHES_PER_SIDE} patches per side"
            ),
        ));
    }
    Ok(VisionConfig {
        hidden_size,
        intermediate_size: place.size(
            "intermediate_size",
            keys.intermediate_size,
            defaults.intermediate_size,
            MAX_INTERMEDIATE_SIZE,
        )?,
        num_hidden_layers: place.size(
            "num_hidden_layers",
            keys.num_hidden_layers,
            defaults.num_hidden_layers,
            MAX_LAYERS,
        )?,
        num_attention_heads,
        image_size,
        patch_size,
        layer_norm_eps: place.positive(
            "layer_norm_eps",
            keys.layer_norm_eps,
            defaults.layer_norm_eps,
        )?,
        hidden_act: supported_act(
            place,
            "hidden_act",
            keys.hidden_act.unwrap_or(defaults.hidden_act),
            &[Activation::QuickGelu, Activation::Gelu],
        )?,
    })
}

/// The keys of a `LlamaConfig` / `MistralConfig`.
#[derive(Default, Deserialize)]
#[serde(expecting = "an object")]
struct TextKeys {
    model_type: Option<String>,
    hidden_size: Option<Count>,
    intermediate_size: Option<Count>,
    num_hidden_layers: Option<Count>,
    num_attention_heads: Option<Count>,
    #[serde(default)]
    num_key_value_heads: Written<Count>,
    head_dim: Option<Count>,
    hidden_act: Option<Activation>,
    rms_norm_eps: Option<Number>,
    rope_theta: Option<Number>,
    rope_parameters: Option<RopeKeys>,
    rope_scaling: Option<RopeKeys>,
    vocab_size: Option<Count>,
    max_position_embeddings: Option<Count>,
    #[serde(default)]
    sliding_window: Written<Count>,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    bos_token_id: Written<TokenId>,
    #[serde(default)]
    eos_token_id: Written<TokenIds>,
    pad_token_id: Option<TokenId>,
}

/// `rope_parameters` (5.x files) or `rope_scaling` (4.x files).
#[derive(Deserialize)]
#[serde(expecting = "an object")]
struct RopeKeys {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<Number>,
}

fn parse_text(keys: TextKeys, place: &Place, arch: TextArch) -> Result<TextConfig> {
    // LlamaConfig / MistralConfig class defaults.
    let (intermediate_default, max_positions_default, sliding_default) = match arch {
        TextArch::Llama => (11008, 2048, None),
        TextArch::Mistral => (14336, 4096 * 32, Some(4096)),
    };
    let hidden_size = place.size("hidden_size", keys.hidden_size, 4096, MAX_HIDDEN_SIZE)?;
    let num_attention_heads = place.size(
        "num_attention_heads",
        keys.num_attention_heads,
        32,
        MAX_HEADS,
    )?;
    // An explicit null means "same as the attention heads" in both classes.
    let num_key_value_heads = match (arch, keys.num_key_value_heads) {
        (TextArch::Mistral, Written::Missing) => 8,
        (_, Written::Missing | Written::Null) => num_attention_heads,
        (_, Written::Is(heads)) => place.size(
            "num_key_value_heads",
            Some(heads),
            num_attention_heads,
            num_attention_heads,
        )?,
    };
    if !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(place.error(
            "num_key_value_heads",
            format!(
                "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
            ),
        ));
    }
    // Without `head_dim` the classes use hidden_size / num_attention_heads, which must be exact.
    let head_dim = match keys.head_dim {
        Some(dim) => place.size("head_dim", Some(dim), 0, MAX_HEAD_DIM)?,
        None if hidden_size.is_multiple_of(num_attention_heads) => {
            hidden_size / num_attention_heads
        }
        None => {
            return Err(place.error(
                "hidden_size",
                format!("{hidden_size} is not a multiple of num_attention_heads {num_attention_heads} (and no head_dim is given)"),
            ));
        }
    };
    if !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
        return Err(place.error(
            "head_dim",
            format!("{head_dim} must be even and at most {MAX_HEAD_DIM} (RoPE rotates pairs)"),
        ));
    }
    // LlamaConfig has no sliding window: a stray key in a Llama config is ignored, as there.
    let rope_theta = rope_theta(&keys, place)?;
    let sliding_window = match (arch, keys.sliding_window) {
        (TextArch::Mistral, Written::Is(window)) => {
            Some(place.size("sliding_window", Some(window), 0, usize::MAX)?)
        }
        (TextArch::Mistral, Written::Null) => None,
        _ => sliding_default,
    };
    Ok(TextConfig {
        arch,
        hidden_size,
        intermediate_size: place.size(
            "intermediate_size",
            keys.intermediate_size,
            intermediate_default,
            MAX_INTERMEDIATE_SIZE,
        )?,
        num_hidden_layers: place.size(
            "num_hidden_layers",
            keys.num_hidden_layers,
            32,
            MAX_LAYERS,
        )?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        hidden_act: supported_act(
            place,
            "hidden_act",
            keys.hidden_act.unwrap_or(Activation::Silu),
            &[Activation::Silu],
        )?,
        rms_norm_eps: place.positive("rms_norm_eps", keys.rms_norm_eps, 1e-6)?,
        rope_theta,
        vocab_size: place.size("vocab_size", keys.vocab_size, 32000, MAX_VOCAB_SIZE)?,
        max_position_embeddings: place.size(
            "max_position_embeddings",
            keys.max_position_embeddings,
            max_positions_default,
            usize::MAX,
        )?,
        sliding_window,
        tie_word_embeddings: keys.tie_word_embeddings.unwrap_or(false),
        bos_token_id: match keys.bos_token_id {
            Written::Missing => Some(1),
            Written::Null => None,
            Written::Is(TokenId(id)) => Some(id),
        },
        eos_token_ids: match keys.eos_token_id {
            Written::Missing => vec![2],
            Written::Null => Vec::new(),
            Written::Is(TokenIds(ids)) => ids,
        },
        pad_token_id: keys.pad_token_id.map(|TokenId(id)| id),
    })
}

/// `rope_parameters.rope_theta` (5.x files) or `rope_theta` (4.x files), default 1e4. Scaled
/// RoPE variants change the frequencies, so they are refused rather than silently ignored.
fn rope_theta(keys: &TextKeys, place: &Place) -> Result<f64> {
    for (key, params) in [
        ("rope_parameters", &keys.rope_parameters),
        ("rope_scaling", &keys.rope_scaling),
    ] {
        let Some(params) = params else { continue };
        let params_place = place.child(key);
        match params.rope_type.as_deref().or(params.kind.as_deref()) {
            None | Some("default") => {}
            Some(other) => {
                return Err(params_place.error(
                    "rope_type",
                    format!("RoPE scaling `{other}` is not supported"),
                ));
            }
        }
        if params.rope_theta.is_some() {
            return params_place.positive("rope_theta", params.rope_theta, 0.0);
        }
    }
    place.positive("rope_theta", keys.rope_theta, 10_000.0)
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
    // The original layout's `mm_projector_type` is checked where it is read (always GELU).
    supported_act(
        &Place::root(file),
        "projector_hidden_act",
        config.projector_hidden_act,
        &[Activation::Gelu],
    )?;
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
        let keys: ProcessorKeys = read_keys(file, &parse_json_object(json, file)?)?;
        Ok(keys.image_processor.map(Self::from_keys))
    }

    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_json_named(json, PREPROCESSOR_FILE)
    }

    /// Parses either a `preprocessor_config.json` or a transformers 5 `processor_config.json`
    /// (whose `image_processor` section holds the same keys).
    pub fn from_any_json(json: &str) -> Result<Self> {
        let file = "processor_config.json";
        let root = parse_json_object(json, file)?;
        let keys: ProcessorKeys = read_keys(file, &root)?;
        match keys.image_processor {
            Some(section) => Ok(Self::from_keys(section)),
            None => Ok(Self::from_keys(read_keys(file, &root)?)),
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
        Ok(Self::from_keys(read_keys(
            file,
            &parse_json_object(json, file)?,
        )?))
    }

    fn from_keys(keys: PreprocessorKeys) -> Self {
        // `LlavaNextImageProcessor` class defaults: size {shortest_edge: 224}, crop 224x224.
        let side = |size: Option<ImageSize>| size.map_or([224, 224], |ImageSize(hw)| hw);
        PreprocessorConfig {
            image_mean: keys.image_mean.map_or(CLIP_MEAN, |Rgb(rgb)| rgb),
            image_std: keys.image_std.map_or(CLIP_STD, |Rgb(rgb)| rgb),
            // Tiles are `crop_size.height` squared (the processor's `patch_size`).
            crop_size: side(keys.crop_size),
            overview_size: side(keys.size),
            image_grid_pinpoints: keys.image_grid_pinpoints.map(|Pinpoints(p)| p),
        }
    }
}

/// The keys of a `LlavaNextImageProcessor`.
#[derive(Deserialize)]
#[serde(expecting = "an object")]
struct PreprocessorKeys {
    size: Option<ImageSize>,
    crop_size: Option<ImageSize>,
    image_mean: Option<Rgb>,
    image_std: Option<Rgb>,
    image_grid_pinpoints: Option<Pinpoints>,
}

/// A transformers 5 `processor_config.json`.
#[derive(Deserialize)]
struct ProcessorKeys {
    image_processor: Option<PreprocessorKeys>,
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
        #[derive(Deserialize)]
        struct GenerationKeys {
            bos_token_id: Option<TokenId>,
            eos_token_id: Option<TokenIds>,
            pad_token_id: Option<TokenId>,
        }
        let keys: GenerationKeys = read_keys(file, &parse_json_object(json, file)?)?;
        Ok(GenerationConfig {
            bos_token_id: keys.bos_token_id.map(|TokenId(id)| id),
            eos_token_ids: keys.eos_token_id.map_or(Vec::new(), |TokenIds(ids)| ids),
            pad_token_id: keys.pad_token_id.map(|TokenId(id)| id),
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

fn parse_json_object(json: &str, file: &str) -> Result<Value> {
    match serde_json::from_str::<Value>(json) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(ModelError::config(
            file,
            "expected a JSON object at the top level",
        )),
        Err(e) => Err(ModelError::config(file, format!("malformed JSON: {e}"))),
    }
}

/// Deserializes the keys of `file`'s top-level object; a value of the wrong kind
/// is reported under its full key path.
fn read_keys<T: DeserializeOwned>(file: &str, object: &Value) -> Result<T> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        // serde words a section of the wrong kind "invalid type: integer `3`, expected an
        // object"; say it as every leaf does: "expected an object, got integer `3`".
        let msg = match msg
            .strip_prefix("invalid type: ")
            .and_then(|m| m.split_once(", expected "))
        {
            Some((got, expected)) => format!("expected {expected}, got {got}"),
            None => msg,
        };
        ModelError::config(file, format!("key `{path}`: {msg}"))
    })
}

#[derive(Deserialize)]
struct ModelTypeKey {
    model_type: Option<String>,
}

/// Where in a file a section's keys live, for the rules checked after deserializing.
struct Place<'a> {
    file: &'a str,
    /// Dotted path of this object inside the file ("" at the top level).
    prefix: String,
}

impl<'a> Place<'a> {
    fn root(file: &'a str) -> Self {
        Place {
            file,
            prefix: String::new(),
        }
    }

    fn child(&self, key: &str) -> Place<'a> {
        Place {
            file: self.file,
            prefix: format!("{}{key}.", self.prefix),
        }
    }

    fn error(&self, key: &str, msg: impl std::fmt::Display) -> ModelError {
        ModelError::config(self.file, format!("key `{}{key}`: {msg}", self.prefix))
    }

    /// A size in `1..=max`.
    fn size(&self, key: &str, value: Option<Count>, default: usize, max: usize) -> Result<usize> {
        let value = value.map_or(default, |Count(n)| n);
        if value == 0 || value > max {
            return Err(self.error(key, format!("{value} must be between 1 and {max}")));
        }
        Ok(value)
    }

    /// A finite positive number (an epsilon, a RoPE base).
    fn positive(&self, key: &str, value: Option<Number>, default: f64) -> Result<f64> {
        let value = value.map_or(default, |Number(x)| x);
        if !(value.is_finite() && value > 0.0) {
            return Err(self.error(key, format!("{value} must be a finite positive number")));
        }
        Ok(value)
    }
}

/// A key as written: missing, `null`, or a value. Most keys read `null` as missing (`Option`);
/// these keys are the ones where transformers gives `null` a meaning of its own.
#[derive(Clone, Copy, Default)]
enum Written<T> {
    #[default]
    Missing,
    Null,
    Is(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Written<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Option::<T>::deserialize(d)?.map_or(Written::Null, Written::Is))
    }
}

/// Reads one value as JSON and converts it with `convert`, which names the rule it failed:
/// the error reads "expected <rule>, got <the value in the file>".
fn leaf<'de, D: Deserializer<'de>, T, Rule: std::fmt::Display>(
    d: D,
    convert: impl FnOnce(&Value) -> std::result::Result<T, Rule>,
) -> std::result::Result<T, D::Error> {
    let value = Value::deserialize(d)?;
    convert(&value).map_err(|rule| de::Error::custom(format!("expected {rule}, got {value}")))
}

/// A size or a count.
#[derive(Clone, Copy)]
struct Count(usize);
/// An integer that may be negative (a layer index).
#[derive(Clone, Copy)]
struct Integer(i64);
#[derive(Clone, Copy)]
struct Number(f64);
#[derive(Clone, Copy)]
struct TokenId(u32);
/// A token id or a list of them.
struct TokenIds(Vec<u32>);
/// AnyRes candidate resolutions, `[height, width]` each.
struct Pinpoints(Vec<[usize; 2]>);
/// A normalisation constant per channel, written as one number or three.
struct Rgb([f32; 3]);
/// An image size written as an integer, `{height, width}` or `{shortest_edge}`: `[h, w]`.
struct ImageSize([usize; 2]);

fn as_count(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

fn as_token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| {
            as_count(v).map(Count).ok_or("a non-negative integer")
        })
    }
}

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| v.as_i64().map(Integer).ok_or("an integer"))
    }
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| v.as_f64().map(Number).ok_or("a number"))
    }
}

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| {
            as_token_id(v)
                .map(TokenId)
                .ok_or("a token id (non-negative integer)")
        })
    }
}

impl<'de> Deserialize<'de> for TokenIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| match v {
            Value::Array(items) => items
                .iter()
                .map(as_token_id)
                .collect::<Option<Vec<_>>>()
                .map(TokenIds)
                .ok_or("a list of token ids"),
            _ => as_token_id(v)
                .map(|id| TokenIds(vec![id]))
                .ok_or("a token id or a list of token ids"),
        })
    }
}

impl<'de> Deserialize<'de> for Pinpoints {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let rule = || {
            format!(
                "a list of [height, width] pairs of integers in 1..={}",
                llava_image::MAX_SIDE
            )
        };
        let side = |v: &Value| {
            v.as_u64()
                .filter(|&s| (1..=u64::from(llava_image::MAX_SIDE)).contains(&s))
                .map(|s| s as usize)
        };
        leaf(d, |v| {
            v.as_array()
                .ok_or_else(rule)?
                .iter()
                .map(|pair| match pair.as_array().map(Vec::as_slice) {
                    Some([h, w]) => Some([side(h)?, side(w)?]),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(Pinpoints)
                .ok_or_else(rule)
        })
    }
}

impl<'de> Deserialize<'de> for Rgb {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let finite = |v: &Value| v.as_f64().map(|x| x as f32).filter(|x| x.is_finite());
        leaf(d, |v| match v {
            Value::Number(_) => finite(v).map(|x| Rgb([x; 3])).ok_or("finite numbers"),
            Value::Array(items) if items.len() == 3 => {
                let mut rgb = [0f32; 3];
                for (slot, item) in rgb.iter_mut().zip(items) {
                    *slot = finite(item).ok_or("three finite numbers")?;
                }
                Ok(Rgb(rgb))
            }
            _ => Err("three numbers"),
        })
    }
}

impl<'de> Deserialize<'de> for ImageSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| {
            let side = |key: &str| v.get(key).and_then(as_count);
            match v {
                Value::Number(_) => as_count(v).map(|s| [s, s]),
                Value::Object(_) => match (side("height"), side("width"), side("shortest_edge")) {
                    (Some(h), Some(w), _) => Some([h, w]),
                    (_, _, Some(s)) => Some([s, s]),
                    _ => None,
                },
                _ => None,
            }
            .map(ImageSize)
            .ok_or("an integer, {height, width} or {shortest_edge}")
        })
    }
}

impl<'de> Deserialize<'de> for Activation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Activation::parse(&name)
            .ok_or_else(|| de::Error::custom(format!("activation `{name}` is not supported")))
    }
}

impl<'de> Deserialize<'de> for FeatureSelect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| match v.as_str() {
            Some("default") => Ok(FeatureSelect::Default),
            Some("full") => Ok(FeatureSelect::Full),
            _ => Err("\"default\" or \"full\""),
        })
    }
}

/// The original layout's `mm_vision_select_feature`.
enum SelectFeature {
    Patch,
    ClsPatch,
}

impl<'de> Deserialize<'de> for SelectFeature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| match v.as_str() {
            Some("patch") => Ok(SelectFeature::Patch),
            Some("cls_patch") => Ok(SelectFeature::ClsPatch),
            _ => Err("\"patch\" or \"cls_patch\""),
        })
    }
}

/// `vision_feature_layer`: one layer index, or a list (transformers' multi-layer features,
/// refused after reading).
enum FeatureLayer {
    One(i64),
    List,
}

impl<'de> Deserialize<'de> for FeatureLayer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        leaf(d, |v| match v {
            Value::Array(_) => Ok(FeatureLayer::List),
            _ => v.as_i64().map(FeatureLayer::One).ok_or("an integer"),
        })
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

        // An activation the tower lacks: the tower's own file and key are named.
        std::fs::write(
            tower.join("config.json"),
            r#"{"model_type": "clip_vision_model", "hidden_act": "gelu_new"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("config.json"), &config).unwrap();
        let msg = LlavaConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("tiny-clip")
                && msg.contains("key `hidden_act`: GeluTanh is not supported"),
            "{msg}"
        );
        // Not a tower: named in the error with the folder looked in; without a folder, a name only.
        std::fs::write(
            tower.join("config.json"),
            r#"{"model_type": "siglip_vision_model"}"#,
        )
        .unwrap();
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

    /// Activations the networks do not implement are refused before any weight is read, naming
    /// the key; the ones they do implement parse.
    #[test]
    fn activations_the_networks_do_not_implement_are_refused() {
        let hf = |section: &str, act: &str| {
            format!(r#"{{"model_type": "llava_next", "{section}": {{"hidden_act": "{act}"}}}}"#)
        };
        let text = error(&hf("text_config", "gelu"));
        assert!(
            text.starts_with("config.json: key `text_config.hidden_act`: Gelu is not supported"),
            "{text}"
        );
        let vision = error(&hf("vision_config", "gelu_pytorch_tanh"));
        assert!(
            vision.contains("key `vision_config.hidden_act`: GeluTanh is not supported"),
            "{vision}"
        );
        let projector =
            error(r#"{"model_type": "llava_next", "projector_hidden_act": "quick_gelu"}"#);
        assert!(
            projector.contains("key `projector_hidden_act`: QuickGelu is not supported"),
            "{projector}"
        );
        let original =
            error(&LIUHAOTIAN_VICUNA.replace(r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#));
        assert!(original.contains("key `hidden_act`: Gelu"), "{original}");
        assert_eq!(
            parse(&hf("vision_config", "gelu")).vision.hidden_act,
            Activation::Gelu
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

        // A wrong value inside a section is named by its full key path.
        let nested_bad = PreprocessorConfig::from_processor_json(
            r#"{"image_processor": {"image_std": [0.5, "x", 0.5]}}"#,
            "processor_config.json",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            nested_bad,
            r#"processor_config.json: key `image_processor.image_std`: expected three finite numbers, got [0.5,"x",0.5]"#
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
