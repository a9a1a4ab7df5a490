//! LLaVA-1.6 model: config, checkpoints, text, vision tower, projector, language model, generation.

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod error;
pub mod fuzzing;
pub mod generate;
pub mod image_cache;
pub mod language;
pub mod llava;
pub mod loader;
pub mod manifest;
pub mod needs;
pub mod npy;
pub mod projector;
pub mod sentencepiece;
pub mod source;
pub mod text;
pub mod vision;
pub mod weights;

pub use checkpoint::{Checkpoint, Dtype, HostTensor, StoredDtype, TensorInfo};
pub use config::{GenerationConfig, LlavaConfig, PreprocessorConfig, TextArch};
pub use error::{ModelError, Result};
pub use text::{ChatTemplate, Message, StreamDecoder, Tokenizer};
