//! The model exports: `loadModel` fetches a HuggingFace-layout or converted folder and streams
//! its shards through the model crate's `WeightLoader` (the same code as the native loader), one
//! fetch chunk at a time; `Model.chat` opens a `ChatSession` whose `send` streams tokens to a
//! JavaScript callback. Everything else is the model crate, unchanged.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use js_sys::{Function, Object, Promise, Uint8Array};
use llava_model::generate::{GenerateParams, Turn};
use llava_model::llava::{FileContents, KvPrecision, Llava, LoadOptions, ModelFiles, TokenizerFile};
use llava_model::loader::{Progress, Stage, WeightLoader};
use llava_model::manifest::{MANIFEST_FILE, Manifest};
use llava_model::weights::WeightPrecision;
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
    #[wasm_bindgen(method)]
    fn text(this: &Response) -> Promise;
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
/// waits a few event-loop turns for the loss to be reported.
async fn reply_error(llava: &Llava, e: llava_model::ModelError) -> JsError {
    if matches!(e, llava_model::ModelError::Gpu(llava_gpu::GpuError::Readback(_))) {
        for _ in 0..5 {
            let tick = Promise::new(&mut |resolve, _| set_timeout(&resolve, 0));
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
    async fn fetch(&self, url: &str) -> Result<Response, JsError> {
        let promise = match &self.custom {
            None => global_fetch(url),
            Some(fetch) => {
                let value = fetch
                    .call1(&JsValue::NULL, &JsValue::from_str(url))
                    .map_err(|e| {
                        JsError::new(&format!("could not fetch {url}: {}", describe(&e)))
                    })?;
                Promise::resolve(&value)
            }
        };
        let response = JsFuture::from(promise)
            .await
            .map_err(|e| JsError::new(&format!("could not fetch {url}: {}", describe(&e))))?;
        if !response.is_object() {
            return Err(JsError::new(&format!(
                "fetching {url} did not give a Response"
            )));
        }
        Ok(response.unchecked_into())
    }

    /// The response for `base/name`; `None` on 404 when the file is optional.
    async fn file(&self, base: &str, name: &str, optional: bool) -> Result<Option<Response>, JsError> {
        let url = format!("{base}{name}");
        let response = self.fetch(&url).await?;
        if optional && response.status() == 404 {
            return Ok(None);
        }
        if !response.ok() {
            return Err(JsError::new(&format!("{url}: HTTP {}", response.status())));
        }
        Ok(Some(response))
    }

    /// The text of `base/name`; `None` on 404 when the file is optional.
    async fn text(&self, base: &str, name: &str, optional: bool) -> Result<Option<String>, JsError> {
        let Some(response) = self.file(base, name, optional).await? else {
            return Ok(None);
        };
        let text = JsFuture::from(response.text())
            .await
            .map_err(|e| JsError::new(&format!("reading {base}{name}: {}", describe(&e))))?;
        Ok(text.as_string())
    }

    /// The bytes of `base/name` (a required file).
    async fn bytes(&self, base: &str, name: &str) -> Result<Vec<u8>, JsError> {
        let response = self
            .file(base, name, false)
            .await?
            .ok_or_else(|| JsError::new(&format!("{base}{name}: not found")))?;
        let buffer = JsFuture::from(response.array_buffer())
            .await
            .map_err(|e| JsError::new(&format!("reading {base}{name}: {}", describe(&e))))?;
        Ok(Uint8Array::new(&buffer).to_vec())
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

/// How the folder stores its weights.
enum Layout {
    Converted(Manifest),
    /// Shard files and, from the index, their total tensor bytes.
    Checkpoint(Vec<String>, Option<u64>),
}

/// Finds the layout: an HF index, else a `manifest.json`, else a single `model.safetensors`
/// (probed in that order so that a sharded HF folder triggers no 404).
async fn layout(fetcher: &Fetcher, base: &str, manifest_url: bool) -> Result<Layout, JsError> {
    let parse_manifest =
        |text: &str| Manifest::from_json(text).map_err(|e| JsError::new(&format!("{base}{e}")));
    if manifest_url {
        let text = fetcher
            .text(base, MANIFEST_FILE, false)
            .await?
            .unwrap_or_default();
        return Ok(Layout::Converted(parse_manifest(&text)?));
    }
    if let Some(index) = fetcher
        .text(base, "model.safetensors.index.json", true)
        .await?
    {
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
        return Ok(Layout::Checkpoint(
            files,
            index["metadata"]["total_size"].as_u64(),
        ));
    }
    if let Some(text) = fetcher.text(base, MANIFEST_FILE, true).await? {
        return Ok(Layout::Converted(parse_manifest(&text)?));
    }
    Ok(Layout::Checkpoint(vec!["model.safetensors".into()], None))
}

enum FetchedTokenizer {
    Json(String),
    SentencePiece(Vec<u8>),
}

/// Fetches the config, tokenizer, template, processor and generation files. A converted folder
/// lists the ones it has (and carries the config in its manifest), so nothing is probed.
async fn model_files(
    fetcher: &Fetcher,
    base: &str,
    layout: &Layout,
) -> Result<ModelFiles, JsError> {
    let listed = |name: &str| match layout {
        Layout::Converted(manifest) => manifest.files.iter().any(|f| f == name),
        Layout::Checkpoint(..) => true,
    };
    let optional = |name: &'static str| async move {
        if listed(name) {
            fetcher.text(base, name, true).await
        } else {
            Ok(None)
        }
    };
    let config = match layout {
        Layout::Converted(manifest) if !listed("config.json") => manifest.config.to_string(),
        _ => fetcher
            .text(base, "config.json", false)
            .await?
            .unwrap_or_default(),
    };
    // A folder without tokenizer.json (like the original LLaVA checkpoints) has tokenizer.model.
    let tokenizer_json = match layout {
        Layout::Converted(_) if !listed("tokenizer.json") => None,
        _ => fetcher.text(base, "tokenizer.json", listed("tokenizer.model")).await?,
    };
    let tokenizer = match tokenizer_json {
        Some(json) => FetchedTokenizer::Json(json),
        None => FetchedTokenizer::SentencePiece(fetcher.bytes(base, "tokenizer.model").await?),
    };
    let tokenizer_config = optional("tokenizer_config.json").await?;
    let chat_template = optional("chat_template.jinja").await?;
    let processor = match optional("preprocessor_config.json").await? {
        Some(text) => Some(text),
        None => optional("processor_config.json").await?,
    };
    let generation = optional("generation_config.json").await?;
    let contents = FileContents {
        config: &config,
        tokenizer: match &tokenizer {
            FetchedTokenizer::Json(json) => TokenizerFile::Json(json.as_bytes()),
            FetchedTokenizer::SentencePiece(model) => TokenizerFile::SentencePiece(model),
        },
        tokenizer_config: tokenizer_config.as_deref(),
        chat_template: chat_template.as_deref(),
        processor: processor.as_deref(),
        generation: generation.as_deref(),
    };
    if let Layout::Converted(manifest) = layout {
        manifest.check_contents(&contents).map_err(|e| JsError::new(&format!("{base}{e}")))?;
    }
    ModelFiles::from_contents(&contents).map_err(js_error)
}

/// Streams one shard through the loader, one fetch chunk at a time.
async fn stream_shard(
    fetcher: &Fetcher,
    base: &str,
    file: &str,
    loader: &mut WeightLoader<'_>,
    on_progress: Option<&Function>,
) -> Result<(), JsError> {
    let url = format!("{base}{file}");
    let response = fetcher.fetch(&url).await?;
    if !response.ok() {
        return Err(JsError::new(&format!("{url}: HTTP {}", response.status())));
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
        .ok_or_else(|| JsError::new(&format!("{url}: empty response")))?;
    loader.begin_shard(file, size).map_err(js_error)?;
    let reader = body.get_reader();
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
        loader.push(&chunk.to_vec()).map_err(js_error)?;
        report(on_progress, loader.progress());
    }
    loader.end_shard().map_err(js_error)
}

/// A loaded model on this worker's GPU.
#[wasm_bindgen]
pub struct Model {
    llava: Rc<Llava>,
}

/// Fetches the model at `base_url` and builds it: a HuggingFace-layout folder (config,
/// tokenizer, template, processor and generation configs, safetensors shards) or a converted
/// folder (its `manifest.json`, the files it lists, shards checked against their SHA-256);
/// `base_url` may also name the `manifest.json` itself. `options`: `{ quant, context, fetch }`,
/// where `fetch(url) => Promise<Response>` replaces the global fetch for every download;
/// `on_progress` receives `{ loaded, total, file, stage }`.
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
    let fetcher = Fetcher { custom };
    let on_progress = on_progress.as_ref();
    let manifest_url = base_url.ends_with(MANIFEST_FILE);
    let base = if manifest_url {
        base_url[..base_url.len() - MANIFEST_FILE.len()].to_string()
    } else if base_url.ends_with('/') {
        base_url
    } else {
        format!("{base_url}/")
    };

    let config_file = if manifest_url {
        MANIFEST_FILE
    } else {
        "config.json"
    };
    report(
        on_progress,
        Progress {
            bytes_done: 0,
            bytes_total: 0,
            stage: Stage::Config,
            file: config_file,
        },
    );
    let layout = layout(&fetcher, &base, manifest_url).await?;
    let files = model_files(&fetcher, &base, &layout).await?;
    let gpu = Arc::new(llava_gpu::Gpu::new().await.map_err(js_error)?);
    let (mut loader, shards) = match layout {
        Layout::Converted(manifest) => {
            manifest.check_precision(precision).map_err(js_error)?;
            let shards: Vec<String> = manifest.shards.iter().map(|s| s.file.clone()).collect();
            (WeightLoader::converted(&gpu, manifest, &base), shards)
        }
        Layout::Checkpoint(shards, total) => (
            WeightLoader::checkpoint(&gpu, precision, &base, total.unwrap_or(0)),
            shards,
        ),
    };
    for shard in &shards {
        stream_shard(&fetcher, &base, shard, &mut loader, on_progress).await?;
    }
    let loaded = loader.progress().bytes_done;
    let weights = loader.finish().map_err(js_error)?;
    let kv_cache = match settings.kv_cache.as_deref() {
        None | Some("f32") => KvPrecision::F32,
        Some("f16") => KvPrecision::F16,
        Some(other) => return Err(JsError::new(&format!("unknown kvCache \"{other}\": use f32 or f16"))),
    };
    let options = LoadOptions {
        precision,
        context: settings.context,
    };
    let mut llava = Llava::new(gpu, files, weights, &options).map_err(js_error)?;
    llava.set_kv_cache(kv_cache);
    if let Some(mb) = settings.image_cache_mb {
        llava.set_image_cache_limit(mb.saturating_mul(1 << 20));
    }
    report(
        on_progress,
        Progress {
            bytes_done: loaded,
            bytes_total: loaded,
            stage: Stage::Ready,
            file: "",
        },
    );
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
