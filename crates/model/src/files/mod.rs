//! File formats: checkpoints and converted folders, configs, where files come from, how weights
//! are read, converted and checked against the GPU's limits.

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod loader;
pub mod manifest;
pub mod needs;
pub mod npy;
pub mod source;
pub mod weights;
