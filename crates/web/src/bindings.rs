//! The wasm-bindgen exports. Every export returns `Result<_, JsError>` so that a failure reaches
//! JavaScript as an `Error` with a message; a Rust panic (a bug) is logged to the console by
//! `console_error_panic_hook` before the module traps.

use wasm_bindgen::prelude::*;

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// Serialises `value` to a plain JS object (through JSON, so u64 limits become numbers).
fn to_js<T: serde::Serialize>(value: &T) -> Result<JsValue, JsError> {
    let json = serde_json::to_string(value).map_err(|e| JsError::new(&e.to_string()))?;
    js_sys::JSON::parse(&json)
        .map_err(|_| JsError::new("could not convert the result to JavaScript"))
}

/// Opens the WebGPU adapter, runs a few real kernels against CPU references and returns the
/// report (adapter, features, limits, per-kernel errors). See `self_test::run`.
#[wasm_bindgen(js_name = gpuSelfTest)]
pub async fn gpu_self_test(seed: u32) -> Result<JsValue, JsError> {
    let gpu = llava_gpu::Gpu::new()
        .await
        .map_err(|e| JsError::new(&e.to_string()))?;
    let report = crate::self_test::run(&gpu, seed as u64)
        .await
        .map_err(|e| JsError::new(&e.to_string()))?;
    to_js(&report)
}
