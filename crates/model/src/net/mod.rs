//! The networks: the CLIP vision tower, the projector and the language model, on shared layers.

pub mod language;
pub mod layers;
pub mod projector;
pub mod vision;
