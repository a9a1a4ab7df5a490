//! The wasm-bindgen exports. Every export returns `Result<_, JsError>` so that a failure reaches
//! JavaScript as an `Error` with a message. A Rust panic (a bug) is logged to the console and
//! handed to the handler of [`set_panic_handler`] before the module traps: wasm32 panics abort,
//! so the instance is unusable afterwards, and a trap inside a future would otherwise leave its
//! promise unsettled and reach JavaScript only as `unreachable`.

use std::cell::RefCell;

use js_sys::{Float32Array, Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::image_input::{ImageOptions, ImageSource};

thread_local! {
    static PANIC_HANDLER: RefCell<Option<Function>> = const { RefCell::new(None) };
}

#[wasm_bindgen(start)]
fn start() {
    std::panic::set_hook(Box::new(|info| {
        console_error_panic_hook::hook(info);
        let message = JsValue::from_str(&info.to_string());
        PANIC_HANDLER.with(|handler| {
            if let Ok(handler) = handler.try_borrow()
                && let Some(handler) = handler.as_ref()
            {
                let _ = handler.call1(&JsValue::NULL, &message);
            }
        });
    }));
}

/// Registers `handler(message)`, called with the panic message (`panicked at file:line:col:
/// ...`) when Rust code panics, just before the module traps. After that every call into the
/// module is undefined: the caller must drop it and instantiate the wasm again.
#[wasm_bindgen(js_name = setPanicHandler)]
pub fn set_panic_handler(handler: Option<Function>) {
    PANIC_HANDLER.with(|slot| *slot.borrow_mut() = handler);
}

/// For the tests of the panic path: panics with `message` inside a future (after yielding to the
/// event loop once), where a panic during loading or generation happens.
#[wasm_bindgen(js_name = __testPanic)]
pub async fn test_panic(message: String) -> Result<(), JsError> {
    let _ = JsFuture::from(Promise::resolve(&JsValue::UNDEFINED)).await;
    panic!("{message}");
}

pub(crate) fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// Serialises `value` to a plain JS object (through JSON, so u64 limits become numbers).
pub(crate) fn to_js<T: serde::Serialize>(value: &T) -> Result<JsValue, JsError> {
    let json = serde_json::to_string(value).map_err(js_error)?;
    js_sys::JSON::parse(&json)
        .map_err(|_| JsError::new("could not convert the result to JavaScript"))
}

/// Reads a plain JS options object (`undefined`/`null` = all defaults) into `T`.
pub(crate) fn from_js<T: serde::de::DeserializeOwned + Default>(
    value: &JsValue,
    what: &str,
) -> Result<T, JsError> {
    if value.is_undefined() || value.is_null() {
        return Ok(T::default());
    }
    let json = js_sys::JSON::stringify(value)
        .map_err(|_| JsError::new(&format!("{what} must be a plain object")))?;
    serde_json::from_str(&String::from(json)).map_err(|e| JsError::new(&format!("bad {what}: {e}")))
}

fn get(object: &JsValue, key: &str) -> Result<JsValue, JsError> {
    Reflect::get(object, &JsValue::from_str(key))
        .map_err(|_| JsError::new(&format!("cannot read `{key}`")))
}

pub(crate) fn set(object: &Object, key: &str, value: impl Into<JsValue>) {
    // Setting a property of a fresh plain object cannot fail.
    let _ = Reflect::set(object, &JsValue::from_str(key), &value.into());
}

fn dimension(source: &JsValue, key: &str) -> Result<u32, JsError> {
    get(source, key)?
        .as_f64()
        .filter(|v| v.fract() == 0.0 && *v >= 0.0 && *v <= u32::MAX as f64)
        .map(|v| v as u32)
        .ok_or_else(|| JsError::new(&format!("image `{key}` must be a whole number")))
}

/// `{ encoded: Uint8Array }` or `{ width, height, rgba: Uint8Array | Uint8ClampedArray }`, as
/// pkg/index.js and pkg/worker.js build them from the image types the API accepts.
pub(crate) fn image_source(source: &JsValue) -> Result<ImageSource, JsError> {
    let encoded = get(source, "encoded")?;
    if let Some(bytes) = encoded.dyn_ref::<Uint8Array>() {
        return Ok(ImageSource::Encoded(bytes.to_vec()));
    }
    let rgba = get(source, "rgba")?;
    let data = if let Some(bytes) = rgba.dyn_ref::<Uint8Array>() {
        bytes.to_vec()
    } else if let Some(bytes) = rgba.dyn_ref::<js_sys::Uint8ClampedArray>() {
        bytes.to_vec()
    } else {
        return Err(JsError::new(
            "an image must be { encoded: Uint8Array } or { width, height, rgba }",
        ));
    };
    Ok(ImageSource::Rgba {
        width: dimension(source, "width")?,
        height: dimension(source, "height")?,
        data,
    })
}

/// Opens the WebGPU adapter, runs a few real kernels against CPU references and returns the
/// report (adapter, features, limits, per-kernel errors). See `self_test::run`.
#[wasm_bindgen(js_name = gpuSelfTest)]
pub async fn gpu_self_test(seed: u32) -> Result<JsValue, JsError> {
    let gpu = llava_gpu::Gpu::new().await.map_err(js_error)?;
    let report = crate::self_test::run(&gpu, seed as u64)
        .await
        .map_err(js_error)?;
    to_js(&report)
}

/// Decodes and preprocesses one image as the model would (AnyRes tiling): returns `{ width,
/// height, bestResolution, grid, numPatches, imageTokens, rgb: Uint8Array, pixels:
/// Float32Array }`, where `pixels` is `[numPatches, 3, tile, tile]`.
#[wasm_bindgen(js_name = preprocessImage)]
pub fn preprocess_image(source: JsValue, options: JsValue) -> Result<JsValue, JsError> {
    let config = from_js::<ImageOptions>(&options, "image options")?
        .config()
        .map_err(js_error)?;
    let rgb = image_source(&source)?.to_rgb().map_err(js_error)?;
    let pre = llava_image::preprocess(&rgb, &config).map_err(js_error)?;
    let out = Object::new();
    set(&out, "width", rgb.width);
    set(&out, "height", rgb.height);
    set(&out, "bestResolution", to_js(&pre.best_resolution)?);
    set(&out, "grid", to_js(&pre.grid)?);
    set(&out, "numPatches", pre.num_patches as u32);
    set(
        &out,
        "imageTokens",
        llava_image::image_token_count(pre.original_hw, &config) as u32,
    );
    set(&out, "rgb", Uint8Array::from(&rgb.data[..]));
    set(&out, "pixels", Float32Array::from(&pre.pixels[..]));
    Ok(out.into())
}

/// The model's tokenizer (the same Rust as natively, with the pure-Rust regex backend), for
/// counting and inspecting tokens. Built from a model folder's files.
#[wasm_bindgen]
pub struct Tokenizer(llava_model::Tokenizer);

#[wasm_bindgen]
impl Tokenizer {
    /// `tokenizer.json`, and optionally `tokenizer_config.json` and `config.json`'s `model_type`,
    /// read as transformers' `AutoTokenizer` reads the folder.
    #[wasm_bindgen(constructor)]
    pub fn new(
        tokenizer_json: &[u8],
        tokenizer_config_json: Option<Vec<u8>>,
        model_type: Option<String>,
    ) -> Result<Tokenizer, JsError> {
        llava_model::Tokenizer::from_bytes_with_config(
            tokenizer_json,
            tokenizer_config_json.as_deref(),
            model_type.as_deref(),
        )
        .map(Tokenizer)
        .map_err(js_error)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, JsError> {
        self.0.encode(text, add_special_tokens).map_err(js_error)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, JsError> {
        self.0.decode(ids, skip_special_tokens).map_err(js_error)
    }

    #[wasm_bindgen(getter, js_name = vocabSize)]
    pub fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
}
