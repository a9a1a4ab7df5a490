//! The model exports: `loadModel` fetches a HuggingFace-layout folder and streams its weights to
//! the GPU tensor by tensor; `Model.chat` opens a `ChatSession` whose `send` streams tokens to a
//! JavaScript callback. Everything else is the model crate, unchanged.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::{Function, Object, Promise, Uint8Array};
use llava_model::generate::{GenerateParams, Turn};
use llava_model::llava::{FileContents, Llava, LoadOptions, ModelFiles};
use llava_model::weights::{WeightPrecision, Weights};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::bindings::{from_js, image_source, js_error, set, to_js};
use crate::safetensors_stream::SafetensorsStream;

#[wasm_bindgen]
extern "C" {
    /// The worker's global `fetch`.
    #[wasm_bindgen(js_name = fetch)]
    fn fetch_url(url: &str) -> Promise;

    type Response;
    #[wasm_bindgen(method, getter)]
    fn ok(this: &Response) -> bool;
    #[wasm_bindgen(method, getter)]
    fn status(this: &Response) -> u16;
    #[wasm_bindgen(method, getter)]
    fn headers(this: &Response) -> Headers;
    #[wasm_bindgen(method, getter)]
    fn body(this: &Response) -> Option<ReadableStream>;
    #[wasm_bindgen(method)]
    fn text(this: &Response) -> Promise;

    type Headers;
    #[wasm_bindgen(method)]
    fn get(this: &Headers, name: &str) -> Option<String>;

    type ReadableStream;
    #[wasm_bindgen(method, js_name = getReader)]
    fn get_reader(this: &ReadableStream) -> StreamReader;

    type StreamReader;
    #[wasm_bindgen(method)]
    fn read(this: &StreamReader) -> Promise;
}

async fn fetch(url: &str) -> Result<Response, JsError> {
    let response = JsFuture::from(fetch_url(url))
        .await
        .map_err(|e| JsError::new(&format!("could not fetch {url}: {}", describe(&e))))?;
    Ok(response.unchecked_into())
}

fn describe(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .unwrap_or_else(|| format!("{e:?}"))
}

/// The text of `base/name`; `None` on 404 when the file is optional.
async fn fetch_text(base: &str, name: &str, optional: bool) -> Result<Option<String>, JsError> {
    let url = format!("{base}{name}");
    let response = fetch(&url).await?;
    if optional && response.status() == 404 {
        return Ok(None);
    }
    if !response.ok() {
        return Err(JsError::new(&format!("{url}: HTTP {}", response.status())));
    }
    let text = JsFuture::from(response.text())
        .await
        .map_err(|e| JsError::new(&format!("reading {url}: {}", describe(&e))))?;
    Ok(text.as_string())
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct LoadSettings {
    /// "f32" | "f16" | "q8" | "q4"; absent: the checkpoint's own precision.
    quant: Option<String>,
    context: Option<usize>,
}

fn precision(name: Option<&str>) -> Result<WeightPrecision, JsError> {
    Ok(match name {
        None | Some("native") => WeightPrecision::Native,
        Some("f32") => WeightPrecision::F32,
        Some("f16") => WeightPrecision::F16,
        Some("q8") => WeightPrecision::Q8,
        Some("q4") => WeightPrecision::Q4,
        Some(other) => {
            return Err(JsError::new(&format!(
                "unknown quant \"{other}\": use f32, f16, q8 or q4"
            )));
        }
    })
}

/// Reports `{ loaded, total, file }` (bytes) to the page.
struct Progress {
    callback: Option<Function>,
    loaded: u64,
    total: u64,
}

impl Progress {
    fn report(&self, file: &str) {
        if let Some(callback) = &self.callback {
            let event = Object::new();
            set(&event, "loaded", self.loaded as f64);
            set(&event, "total", self.total.max(self.loaded) as f64);
            set(&event, "file", file);
            let _ = callback.call1(&JsValue::NULL, &event);
        }
    }
}

/// The weight files: the index's shards (and its total tensor bytes), or `model.safetensors`.
async fn weight_files(base: &str) -> Result<(Vec<String>, Option<u64>), JsError> {
    let Some(index) = fetch_text(base, "model.safetensors.index.json", true).await? else {
        return Ok((vec!["model.safetensors".into()], None));
    };
    let index: serde_json::Value = serde_json::from_str(&index)
        .map_err(|e| JsError::new(&format!("model.safetensors.index.json: {e}")))?;
    let map = index["weight_map"]
        .as_object()
        .ok_or_else(|| JsError::new("model.safetensors.index.json has no weight_map"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    if files.iter().any(|f| f.contains('/') || f.contains("..")) {
        return Err(JsError::new(
            "model.safetensors.index.json names a shard outside the folder",
        ));
    }
    Ok((files, index["metadata"]["total_size"].as_u64()))
}

/// Streams one safetensors file into `weights`, one tensor in memory at a time.
async fn stream_shard(
    gpu: &llava_gpu::Gpu,
    url: &str,
    file: &str,
    weights: &mut Weights,
    precision: WeightPrecision,
    progress: &mut Progress,
) -> Result<(), JsError> {
    let response = fetch(url).await?;
    if !response.ok() {
        return Err(JsError::new(&format!("{url}: HTTP {}", response.status())));
    }
    let size = response
        .headers()
        .get("content-length")
        .and_then(|v| v.parse::<u64>().ok());
    let body = response
        .body()
        .ok_or_else(|| JsError::new(&format!("{url}: empty response")))?;
    let reader = body.get_reader();
    let mut stream = SafetensorsStream::new(size);
    loop {
        let step = JsFuture::from(reader.read())
            .await
            .map_err(|e| JsError::new(&format!("downloading {url}: {}", describe(&e))))?;
        if js_sys::Reflect::get(&step, &"done".into())
            .map(|d| d.is_truthy())
            .unwrap_or(true)
        {
            break;
        }
        let chunk: Uint8Array = js_sys::Reflect::get(&step, &"value".into())
            .map_err(|_| JsError::new("a stream chunk without a value"))?
            .unchecked_into();
        let chunk = chunk.to_vec();
        progress.loaded += chunk.len() as u64;
        for (name, host) in stream
            .push(&chunk)
            .map_err(|e| JsError::new(&format!("{file}: {e}")))?
        {
            weights
                .insert(gpu, &name, &host, precision)
                .map_err(js_error)?;
        }
        progress.report(file);
    }
    stream
        .finish()
        .map_err(|e| JsError::new(&format!("{file}: {e}")))
}

/// A loaded model on this worker's GPU.
#[wasm_bindgen]
pub struct Model {
    llava: Rc<Llava>,
}

/// Fetches the checkpoint folder at `base_url` (config, tokenizer, template, processor and
/// generation configs, then the weights, streamed) and builds the model. `options`: `{ quant,
/// context }`; `on_progress` receives `{ loaded, total, file }`.
#[wasm_bindgen(js_name = loadModel)]
pub async fn load_model(
    base_url: String,
    options: JsValue,
    on_progress: Option<Function>,
) -> Result<Model, JsError> {
    let settings: LoadSettings = from_js(&options, "load options")?;
    let precision = precision(settings.quant.as_deref())?;
    let base = if base_url.ends_with('/') {
        base_url
    } else {
        format!("{base_url}/")
    };

    let config = fetch_text(&base, "config.json", false)
        .await?
        .unwrap_or_default();
    let tokenizer = fetch_text(&base, "tokenizer.json", false)
        .await?
        .unwrap_or_default();
    let tokenizer_config = fetch_text(&base, "tokenizer_config.json", true).await?;
    let chat_template = fetch_text(&base, "chat_template.jinja", true).await?;
    let processor = match fetch_text(&base, "preprocessor_config.json", true).await? {
        Some(text) => Some(text),
        None => fetch_text(&base, "processor_config.json", true).await?,
    };
    let generation = fetch_text(&base, "generation_config.json", true).await?;
    let files = ModelFiles::from_contents(&FileContents {
        config: &config,
        tokenizer: tokenizer.as_bytes(),
        tokenizer_config: tokenizer_config.as_deref(),
        chat_template: chat_template.as_deref(),
        processor: processor.as_deref(),
        generation: generation.as_deref(),
    })
    .map_err(js_error)?;

    let gpu = Arc::new(llava_gpu::Gpu::new().await.map_err(js_error)?);
    let (shards, total) = weight_files(&base).await?;
    let mut progress = Progress {
        callback: on_progress,
        loaded: 0,
        total: total.unwrap_or(0),
    };
    let mut weights = Weights::default();
    for shard in &shards {
        stream_shard(
            &gpu,
            &format!("{base}{shard}"),
            shard,
            &mut weights,
            precision,
            &mut progress,
        )
        .await?;
    }
    progress.total = progress.loaded;
    progress.report("");
    let options = LoadOptions {
        precision,
        context: settings.context,
    };
    let llava = Llava::new(gpu, files, weights, &options).map_err(js_error)?;
    Ok(Model {
        llava: Rc::new(llava),
    })
}

#[wasm_bindgen]
impl Model {
    /// A new conversation with its own KV cache.
    pub fn chat(&self, system: Option<String>) -> Result<Chat, JsError> {
        let session = self.llava.chat(system).map_err(js_error)?;
        Ok(Chat {
            llava: self.llava.clone(),
            session: Rc::new(RefCell::new(session)),
        })
    }

    /// `{ vocabSize, context }`.
    pub fn info(&self) -> JsValue {
        let info = Object::new();
        set(
            &info,
            "vocabSize",
            self.llava.tokenizer().vocab_size() as u32,
        );
        set(&info, "context", self.llava.context() as u32);
        info.into()
    }
}

/// `GenerateParams` as JavaScript passes them (camelCase, each optional).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct SendParams {
    max_new_tokens: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    repetition_penalty: f32,
    seed: u64,
    stop: Vec<String>,
    ignore_eos: bool,
    raw_prompt: bool,
}

impl Default for SendParams {
    fn default() -> Self {
        let d = GenerateParams::default();
        SendParams {
            max_new_tokens: d.max_new_tokens,
            temperature: d.temperature,
            top_p: d.top_p,
            top_k: d.top_k,
            repetition_penalty: d.repetition_penalty,
            seed: d.seed,
            stop: d.stop,
            ignore_eos: d.ignore_eos,
            raw_prompt: false,
        }
    }
}

/// One conversation about (at most) one image.
#[wasm_bindgen]
pub struct Chat {
    llava: Rc<Llava>,
    session: Rc<RefCell<llava_model::generate::ChatSession>>,
}

#[wasm_bindgen]
impl Chat {
    /// Runs one turn. `image`: `{ encoded }` or `{ width, height, rgba }` (or null); `params`: the
    /// generation settings plus `rawPrompt`; `on_token({ text, tokenId })` is called per token and
    /// cancels generation by returning `false`. Resolves to `{ text, tokens, promptTokens,
    /// imageTokens, stopReason, timings }`.
    pub fn send(
        &self,
        image: JsValue,
        text: String,
        params: JsValue,
        on_token: Function,
    ) -> Promise {
        let llava = self.llava.clone();
        let session = self.session.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let settings: SendParams = from_js(&params, "generation parameters")?;
            let rgb = if image.is_undefined() || image.is_null() {
                None
            } else {
                Some(image_source(&image)?.to_rgb().map_err(js_error)?)
            };
            let params = GenerateParams {
                max_new_tokens: settings.max_new_tokens,
                temperature: settings.temperature,
                top_p: settings.top_p,
                top_k: settings.top_k,
                repetition_penalty: settings.repetition_penalty,
                seed: settings.seed,
                stop: settings.stop,
                ignore_eos: settings.ignore_eos,
            };
            let turn = Turn {
                image: rgb.as_ref(),
                text: &text,
                raw_prompt: settings.raw_prompt,
                want_logits: false,
            };
            let mut session = session.try_borrow_mut().map_err(|_| {
                JsError::new("this chat is already answering; wait for it or cancel it")
            })?;
            let reply = session
                .send(&llava, turn, &params, |event| {
                    let value = Object::new();
                    set(&value, "text", event.text);
                    set(&value, "tokenId", event.token_id);
                    // Anything but an explicit `false` keeps generating.
                    on_token
                        .call1(&JsValue::NULL, &value)
                        .map(|r| r != JsValue::FALSE)
                        .unwrap_or(false)
                })
                .await
                .map_err(js_error)?;
            let out = Object::new();
            set(&out, "text", reply.text.as_str());
            set(&out, "tokens", js_sys::Uint32Array::from(&reply.tokens[..]));
            set(&out, "promptTokens", reply.prompt_tokens as u32);
            set(&out, "imageTokens", reply.image_tokens as u32);
            set(&out, "stopReason", to_js(&reply.stop_reason)?);
            let t = &reply.timings;
            let timings = Object::new();
            set(&timings, "visionS", t.vision_s);
            set(&timings, "prefillS", t.prefill_s);
            set(&timings, "prefillTokens", t.prefill_tokens as u32);
            set(&timings, "decodeS", t.decode_s);
            set(&timings, "decodeTokensPerS", t.decode_tokens_per_s);
            set(&out, "timings", timings);
            Ok::<JsValue, JsValue>(out.into())
        })
    }

    /// Forgets the conversation and its image.
    pub fn reset(&self) -> Result<(), JsError> {
        self.session
            .try_borrow_mut()
            .map_err(|_| JsError::new("cannot reset a chat while it is answering"))?
            .reset();
        Ok(())
    }
}
