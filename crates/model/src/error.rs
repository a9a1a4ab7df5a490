//! The one error type of the model crate. Every variant says which file (or which input) was at
//! fault, so a user with a broken download learns what to fix.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config file (`config.json`, `preprocessor_config.json`, ...) is malformed or describes
    /// something this runtime does not implement.
    #[error("{file}: {msg}")]
    Config { file: String, msg: String },
    /// A safetensors file, index or tensor is malformed, missing or has the wrong shape.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// A `.npy` array is malformed or not of the expected element type.
    #[error("npy {path}: {msg}")]
    Npy { path: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A user input (prompt, image, token id) that cannot be processed as given.
    #[error("{0}")]
    Input(String),
    #[error("the prompt needs {needed} tokens but the context holds {capacity}")]
    ContextOverflow { needed: usize, capacity: usize },
    #[error("image: {0}")]
    Image(#[from] llava_image::ImageError),
    #[error(transparent)]
    Gpu(#[from] llava_gpu::GpuError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn config(file: impl Into<String>, msg: impl Into<String>) -> Self {
        ModelError::Config {
            file: file.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        ModelError::Checkpoint {
            path: path.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
