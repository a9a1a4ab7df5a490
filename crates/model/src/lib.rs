//! LLaVA-1.6 model: file formats (`files`), text (`text`), the networks (`net`), the model that
//! joins them (`llava`) and generation on top (`generate`).

pub mod error;
pub mod files;
pub mod fuzzing;
pub mod generate;
pub mod image_cache;
pub mod llava;
pub mod net;
pub mod text;

pub use error::{ModelError, Result};
pub use files::checkpoint::{Checkpoint, Dtype, HostTensor, StoredDtype, TensorInfo};
pub use files::config::{GenerationConfig, LlavaConfig, PreprocessorConfig, TextArch};
pub use text::{ChatTemplate, Message, StreamDecoder, Tokenizer};
