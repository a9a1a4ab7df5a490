//! LLaVA-NeXT AnyRes image preprocessing (decode, best resolution, Pillow bicubic, pad, tiles, normalise).
