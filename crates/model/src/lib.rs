//! LLaVA-1.6 model: config, checkpoints, text, vision tower, projector, language model, generation.
