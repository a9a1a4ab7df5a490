//! The model exports: `loadModel` runs the model crate's loading sequence (`Llava::load`, the
//! native loader's code) over a fetch source, which streams each shard one fetch chunk at a time;
//! `Model.chat` opens a `ChatSession` whose `send` streams tokens to a JavaScript callback. Which
//! files are looked for, and how they are read, is the model crate's: this file only fetches.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::{Function, Object, Promise, Uint8Array};
use llava_model::files::loader::Progress;
use llava_model::files::manifest::MANIFEST_FILE;
use llava_model::files::source::{LayoutHint, ModelSource, ShardReader};
use llava_model::files::weights::WeightPrecision;
use llava_model::generate::{GenerateParams, Turn};
use llava_model::llava::{KvPrecision, Llava, LoadOptions};
use llava_model::{Message, ModelError};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::bindings::{from_js, image_source, js_error, set, to_js};

#[wasm_bindgen]
extern "C" {
    /// The worker's global `fetch`.
    #[wasm_bindgen(js_name = fetch)]
    fn global_fetch(url: &str) -> Promise;

    type Response;
    #[wasm_bindgen(method, getter)]
    fn ok(this: &Response) -> bool;
    #[wasm_bindgen(method, getter)]
    fn status(this: &Response) -> u16;
    #[wasm_bindgen(method, getter)]
    fn headers(this: &Response) -> Headers;
    #[wasm_bindgen(method, getter)]
    fn body(this: &Response) -> Option<ReadableStream>;
    #[wasm_bindgen(method, js_name = arrayBuffer)]
    fn array_buffer(this: &Response) -> Promise;

    type Headers;
    #[wasm_bindgen(method)]
    fn get(this: &Headers, name: &str) -> Option<String>;

    type ReadableStream;
    #[wasm_bindgen(method, js_name = getReader)]
    fn get_reader(this: &ReadableStream) -> StreamReader;

    type StreamReader;
    #[wasm_bindgen(method)]
    fn read(this: &StreamReader) -> Promise;

    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(callback: &Function, ms: i32);
}

/// The error of a failed reply, naming a lost device as such: the browser rejects the pending
/// buffer mappings of a destroyed device before it resolves `device.lost`, so a readback error
/// waits up to two seconds (a busy machine takes more than a few event-loop turns) for the loss
/// to be reported.
async fn reply_error(llava: &Llava, e: llava_model::ModelError) -> JsError {
    if matches!(
        e,
        llava_model::ModelError::Gpu(llava_gpu::GpuError::Readback(_))
    ) {
        for _ in 0..100 {
            let tick = Promise::new(&mut |resolve, _| set_timeout(&resolve, 20));
            let _ = JsFuture::from(tick).await;
            if let Err(lost) = llava.gpu().check_lost() {
                return js_error(lost);
            }
        }
    }
    js_error(e)
}

/// Downloads through the global `fetch`, or through the caller's `fetch` option (a caching
/// fetch, say): any `(url) => Promise<Response>`.
struct Fetcher {
    custom: Option<Function>,
}

impl Fetcher {
    async fn fetch(&self, url: &str) -> Result<Response, ModelError> {
        let promise = match &self.custom {
            None => global_fetch(url),
            Some(fetch) => {
                let value = fetch
                    .call1(&JsValue::NULL, &JsValue::from_str(url))
                    .map_err(|e| failed(url, format!("could not fetch: {}", describe(&e))))?;
                Promise::resolve(&value)
            }
        };
        let response = JsFuture::from(promise)
            .await
            .map_err(|e| failed(url, format!("could not fetch: {}", describe(&e))))?;
        if !response.is_object() {
            return Err(failed(url, "fetching it did not give a Response".into()));
        }
        Ok(response.unchecked_into())
    }
}

/// A download that failed, naming its URL.
fn failed(url: &str, msg: String) -> ModelError {
    ModelError::Io {
        path: url.to_string(),
        source: std::io::Error::other(msg),
    }
}

/// A model folder at a base URL (ending in `/`). `files`, when the caller knows the folder's
/// file names, answers [`ModelSource::has`], so nothing is requested that is not there.
struct FetchSource {
    fetcher: Fetcher,
    base: String,
    files: Option<BTreeSet<String>>,
}

impl ModelSource for FetchSource {
    type Shard = FetchShard;

    fn locate(&self, file: &str) -> String {
        format!("{}{file}", self.base)
    }

    fn location(&self) -> String {
        self.base.clone()
    }

    fn has(&self, file: &str) -> Option<bool> {
        // Only files inside the folder are fetched (an original LLaVA config may name a local
        // path as its vision tower).
        if file.starts_with('/') || file.split('/').any(|part| part == "..") {
            return Some(false);
        }
        self.files.as_ref().map(|files| files.contains(file))
    }

    fn list(&self) -> Option<Vec<String>> {
        self.files
            .as_ref()
            .map(|files| files.iter().cloned().collect())
    }

    fn size(&self, _file: &str) -> Option<u64> {
        None
    }

    async fn read(&self, file: &str, optional: bool) -> Result<Option<Vec<u8>>, ModelError> {
        let url = self.locate(file);
        let response = self.fetcher.fetch(&url).await?;
        if optional && response.status() == 404 {
            return Ok(None);
        }
        if !response.ok() {
            return Err(failed(&url, format!("HTTP {}", response.status())));
        }
        let buffer = JsFuture::from(response.array_buffer())
            .await
            .map_err(|e| failed(&url, format!("reading: {}", describe(&e))))?;
        Ok(Some(Uint8Array::new(&buffer).to_vec()))
    }

    async fn open_shard(&self, file: &str) -> Result<FetchShard, ModelError> {
        let url = self.locate(file);
        let response = self.fetcher.fetch(&url).await?;
        if !response.ok() {
            return Err(failed(&url, format!("HTTP {}", response.status())));
        }
        // A compressed response's Content-Length counts the compressed bytes.
        let headers = response.headers();
        let size = match headers.get("content-encoding") {
            Some(encoding) if encoding != "identity" => None,
            _ => headers
                .get("content-length")
                .and_then(|v| v.parse::<u64>().ok()),
        };
        let body = response
            .body()
            .ok_or_else(|| failed(&url, "empty response".into()))?;
        Ok(FetchShard {
            url,
            size,
            reader: body.get_reader(),
            chunk: Vec::new(),
        })
    }
}

/// A shard's response body, one stream chunk at a time.
struct FetchShard {
    url: String,
    size: Option<u64>,
    reader: StreamReader,
    chunk: Vec<u8>,
}

impl ShardReader for FetchShard {
    fn size(&self) -> Option<u64> {
        self.size
    }

    async fn next_chunk(&mut self) -> Result<Option<&[u8]>, ModelError> {
        let step = JsFuture::from(self.reader.read())
            .await
            .map_err(|e| failed(&self.url, format!("downloading: {}", describe(&e))))?;
        if js_sys::Reflect::get(&step, &"done".into())
            .map(|d| d.is_truthy())
            .unwrap_or(true)
        {
            return Ok(None);
        }
        let chunk: Uint8Array = js_sys::Reflect::get(&step, &"value".into())
            .map_err(|_| failed(&self.url, "a stream chunk without a value".into()))?
            .unchecked_into();
        self.chunk.resize(chunk.length() as usize, 0);
        chunk.copy_to(&mut self.chunk);
        Ok(Some(&self.chunk))
    }
}

fn describe(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .unwrap_or_else(|| format!("{e:?}"))
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct LoadSettings {
    /// "f32" | "f16" | "q8" | "q4"; absent: the checkpoint's own precision.
    quant: Option<String>,
    context: Option<usize>,
    /// "f32" (default) | "f16": what the KV cache stores.
    kv_cache: Option<String>,
    /// GPU memory for reusing images' features across chats, in MiB (0: off).
    #[serde(rename = "imageCacheMB")]
    image_cache_mb: Option<u64>,
    /// The folder's file names, when the app knows them: only those are requested.
    files: Option<Vec<String>>,
    /// Compile the kernels a first answer uses at load (default true; false: on first use).
    compile_kernels: Option<bool>,
}

/// The model crate's names parse the option; the message keeps the words of the JS docs.
fn precision(name: Option<&str>) -> Result<WeightPrecision, JsError> {
    name.map_or(Ok(WeightPrecision::Native), |name| {
        name.parse()
            .map_err(|_| JsError::new(&format!("unknown quant \"{name}\": use f32, f16, q8 or q4")))
    })
}

/// Reports `{ loaded, total, file, stage }` (weight bytes; stage "config" | "weights" | "ready").
fn report(callback: Option<&Function>, progress: Progress<'_>) {
    if let Some(callback) = callback {
        let event = Object::new();
        set(&event, "loaded", progress.bytes_done as f64);
        set(&event, "total", progress.bytes_total as f64);
        set(&event, "file", progress.file);
        set(&event, "stage", progress.stage.as_str());
        let _ = callback.call1(&JsValue::NULL, &event);
    }
}

/// A loaded model on this worker's GPU.
#[wasm_bindgen]
pub struct Model {
    llava: Rc<Llava>,
}

/// Fetches the model at `base_url` and builds it: a HuggingFace-layout folder (config,
/// tokenizer, template, processor and generation configs, safetensors shards) or a converted
/// folder (its `manifest.json`, the files it lists, shards checked against their SHA-256);
/// `base_url` may also name the `manifest.json` itself. `options`: `{ quant, context, kvCache,
/// imageCacheMB, files, fetch }`, where `files` lists the folder's file names when the app knows
/// them (then no file the folder lacks is requested; otherwise optional files are probed, see
/// `llava_model::files::source`) and `fetch(url) => Promise<Response>` replaces the global fetch for
/// every download; `on_progress` receives `{ loaded, total, file, stage }`.
#[wasm_bindgen(js_name = loadModel)]
pub async fn load_model(
    base_url: String,
    options: JsValue,
    on_progress: Option<Function>,
) -> Result<Model, JsError> {
    let custom = if options.is_object() {
        let value = js_sys::Reflect::get(&options, &"fetch".into()).unwrap_or(JsValue::UNDEFINED);
        match value.dyn_into::<Function>() {
            Ok(fetch) => Some(fetch),
            Err(value) if value.is_undefined() || value.is_null() => None,
            Err(_) => return Err(JsError::new("the `fetch` option must be a function")),
        }
    } else {
        None
    };
    // JSON.stringify drops the function, so the other settings parse as before.
    let settings: LoadSettings = from_js(&options, "load options")?;
    let precision = precision(settings.quant.as_deref())?;
    let kv_cache = settings
        .kv_cache
        .map(|name| {
            name.parse::<KvPrecision>()
                .map_err(|_| JsError::new(&format!("unknown kvCache \"{name}\": use f32 or f16")))
        })
        .transpose()?;
    let (base, hint) = match base_url.strip_suffix(MANIFEST_FILE) {
        Some(base) => (base.to_string(), LayoutHint::Converted),
        None if base_url.ends_with('/') => (base_url, LayoutHint::Probe),
        None => (format!("{base_url}/"), LayoutHint::Probe),
    };
    let source = FetchSource {
        fetcher: Fetcher { custom },
        base,
        files: settings.files.map(|files| files.into_iter().collect()),
    };
    let options = LoadOptions {
        precision,
        context: settings.context,
    };
    let gpu = Arc::new(llava_gpu::Gpu::new().await.map_err(js_error)?);
    let on_progress = on_progress.as_ref();
    let mut llava = Llava::load(gpu, &source, hint, &options, &mut |p| {
        report(on_progress, p)
    })
    .await
    .map_err(js_error)?;
    llava.set_kv_cache(kv_cache.unwrap_or_else(|| KvPrecision::preferred(llava.gpu())));
    if let Some(mb) = settings.image_cache_mb {
        llava.set_image_cache_limit(mb.saturating_mul(1 << 20));
    }
    // The GPU process compiles the kernels while the page waits for a question.
    if settings.compile_kernels.unwrap_or(true) {
        llava.compile_kernels().map_err(js_error)?;
    }
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

    /// The token ids of a first turn's prompt: the optional `system` prompt and the user's
    /// `text` through the checkpoint's chat template and tokenizer (what `send` prefills).
    #[wasm_bindgen(js_name = promptIds)]
    pub fn prompt_ids(&self, system: Option<String>, text: &str) -> Result<Vec<u32>, JsError> {
        let prompt = self
            .llava
            .render_chat(system.as_deref(), &[Message::user(0, text)])
            .map_err(js_error)?;
        Ok(self
            .llava
            .tokenize_prompt(&prompt, None)
            .map_err(js_error)?
            .0)
    }

    /// For the tests of device loss: destroys this model's GPU device, as a browser does when
    /// the GPU process crashes or the device is reclaimed.
    #[wasm_bindgen(js_name = __testLoseDevice)]
    pub fn test_lose_device(&self) {
        self.llava.gpu().device().destroy();
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
    /// imageTokens, stopReason, timings, gpu }` (`gpu`: the GPU work per decode token).
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
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => return Err(reply_error(&llava, e).await.into()),
            };
            let out = Object::new();
            set(&out, "text", reply.text.as_str());
            set(&out, "tokens", js_sys::Uint32Array::from(&reply.tokens[..]));
            set(&out, "promptTokens", reply.prompt_tokens as u32);
            set(&out, "imageTokens", reply.image_tokens as u32);
            set(&out, "stopReason", to_js(&reply.stop_reason)?);
            let t = &reply.timings;
            let timings = Object::new();
            set(&timings, "visionS", t.vision_s);
            set(&timings, "imageCached", t.image_cached);
            set(&timings, "prefillS", t.prefill_s);
            set(&timings, "prefillTokens", t.prefill_tokens as u32);
            set(&timings, "decodeS", t.decode_s);
            set(&timings, "decodeTokensPerS", t.decode_tokens_per_s);
            set(&out, "timings", timings);
            let g = &reply.gpu;
            let gpu = Object::new();
            set(&gpu, "planned", g.planned);
            set(&gpu, "dispatches", g.dispatches);
            set(&gpu, "passes", g.passes);
            set(&gpu, "submits", g.submits);
            set(&gpu, "buffersCreated", g.buffers_created);
            set(&gpu, "bindGroupsCreated", g.bind_groups_created);
            set(&gpu, "bytesWritten", g.bytes_written);
            set(&gpu, "bytesRead", g.bytes_read);
            set(&out, "gpu", gpu);
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
