//! Browser bindings of llava-webgpu. The model, kernels and image code are the native crates,
//! compiled to wasm32 and run on WebGPU through wgpu's `webgpu` backend; this crate only adapts
//! them to JavaScript (wasm-bindgen exports, JS values in and out, errors as `JsError`).
//!
//! `tests/build-wasm.sh` builds it into `pkg/`; `pkg/index.js` is the hand-written API on top.

pub mod image_input;
pub mod self_test;

#[cfg(target_arch = "wasm32")]
mod bindings;
#[cfg(target_arch = "wasm32")]
mod model_bindings;
