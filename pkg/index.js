// llava-webgpu: LLaVA-1.6 in the browser on WebGPU. The wasm module runs in a Web Worker shipped
// beside this file (worker.js); this module is the main-thread API that talks to it.
import { clearCache } from './cache.js';

/**
 * A module worker running pkg/worker.js, with request/response bookkeeping. `workerUrl` and
 * `wasmUrl` replace the package's own worker.js and llava_web_bg.wasm, for setups that serve them
 * elsewhere; by default both are found beside this file, through the literal
 * `new URL(..., import.meta.url)` that Vite and webpack recognise and emit.
 */
class WorkerClient {
  #worker;
  #wasmUrl;
  #pending = new Map();
  #nextId = 1;
  #failure = null;

  constructor({ workerUrl, wasmUrl } = {}) {
    // Bundlers look for this exact shape: a literal URL and literal options.
    this.#worker = workerUrl
      ? new Worker(new URL(workerUrl, globalThis.location?.href), { type: 'module', name: 'llava-webgpu' })
      : new Worker(new URL('./worker.js', import.meta.url), { type: 'module', name: 'llava-webgpu' });
    this.#wasmUrl = wasmUrl ? new URL(wasmUrl, globalThis.location?.href).href : undefined;
    this.#worker.onmessage = ({ data }) => {
      // Rust panicked: the worker's wasm instance is dead, and with it every model it held.
      if (data.kind === 'crashed') {
        this.#fail(new Error(data.message));
        this.#worker.terminate();
        return;
      }
      const call = this.#pending.get(data.id);
      if (!call) return;
      if (data.kind === 'event') return call.onEvent?.(data.value);
      this.#pending.delete(data.id);
      if (data.kind === 'result') call.resolve(data.value);
      else call.reject(new Error(data.message));
    };
    // A worker that fails to start (missing files, no module-worker support) reports here.
    this.#worker.onerror = (event) => {
      event.preventDefault?.();
      this.#fail(new Error(`the llava-webgpu worker failed: ${event.message || 'could not load pkg/worker.js'}`));
    };
    this.#worker.onmessageerror = () => this.#fail(new Error('the llava-webgpu worker sent an unreadable message'));
  }

  /** Rejects the pending calls and every later one with the first failure. */
  #fail(error) {
    this.#failure ??= error;
    for (const call of this.#pending.values()) call.reject(this.#failure);
    this.#pending.clear();
  }

  /** Runs `op` in the worker; `onEvent` receives its intermediate events. */
  call(op, args = {}, { onEvent, transfer = [] } = {}) {
    if (this.#failure) return Promise.reject(this.#failure);
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, onEvent });
      this.#worker.postMessage({ id, op, args, wasmUrl: this.#wasmUrl }, transfer);
    });
  }

  terminate() {
    this.#fail(new Error('the llava-webgpu worker was terminated'));
    this.#worker.terminate();
  }
}

/**
 * Checks the GPU: opens WebGPU in the worker, runs a few of the model's kernels on small inputs
 * and compares them with a CPU computation. Resolves to a report of the adapter, its features
 * and limits, and each kernel's error.
 */
export async function gpuSelfTest({ seed = 1, workerUrl, wasmUrl } = {}) {
  const client = new WorkerClient({ workerUrl, wasmUrl });
  try {
    return await client.call('selfTest', { seed });
  } finally {
    client.terminate();
  }
}

/**
 * Converts any image the API accepts into what the worker takes: encoded files stay encoded (and
 * are decoded by the same Rust as natively); decoded images become RGBA pixels. Returns
 * `{ source, transfer }`.
 */
async function toImageSource(image) {
  if (image == null) throw new TypeError('no image given');
  if (typeof Blob !== 'undefined' && image instanceof Blob) return { source: { blob: image }, transfer: [] };
  if (image instanceof ArrayBuffer || ArrayBuffer.isView(image)) {
    // A copy, so that the caller's buffer is not detached by the transfer.
    const bytes = ArrayBuffer.isView(image)
      ? new Uint8Array(image.buffer, image.byteOffset, image.byteLength).slice()
      : new Uint8Array(image.slice(0));
    return { source: { encoded: bytes }, transfer: [bytes.buffer] };
  }
  if (typeof ImageData !== 'undefined' && image instanceof ImageData) {
    const rgba = new Uint8Array(image.data);
    return { source: { width: image.width, height: image.height, rgba }, transfer: [rgba.buffer] };
  }
  if (typeof HTMLImageElement !== 'undefined' && image instanceof HTMLImageElement) {
    try {
      await image.decode();
    } catch {
      throw new Error(`the image element could not be decoded (src: ${image.currentSrc || image.src || 'none'})`);
    }
  }
  const width = image.naturalWidth ?? image.displayWidth ?? image.videoWidth ?? image.width;
  const height = image.naturalHeight ?? image.displayHeight ?? image.videoHeight ?? image.height;
  const drawable = ['HTMLImageElement', 'HTMLCanvasElement', 'OffscreenCanvas', 'ImageBitmap', 'HTMLVideoElement', 'VideoFrame']
    .some((name) => typeof globalThis[name] !== 'undefined' && image instanceof globalThis[name]);
  if (!drawable) {
    throw new TypeError(
      `unsupported image type ${Object.prototype.toString.call(image)}: pass a Blob/File, ImageBitmap, ImageData, ` +
        'HTMLImageElement, HTMLCanvasElement or encoded bytes',
    );
  }
  if (!(width > 0 && height > 0)) throw new Error(`the image has no pixels (${width}x${height})`);
  const context = new OffscreenCanvas(width, height).getContext('2d', { willReadFrequently: true });
  context.drawImage(image, 0, 0);
  const rgba = new Uint8Array(context.getImageData(0, 0, width, height).data.buffer);
  return { source: { width, height, rgba }, transfer: [rgba.buffer] };
}

/**
 * Decodes and preprocesses an image exactly as the model does before the vision tower (AnyRes
 * tiling). `options` overrides preprocessor_config.json values (default LLaVA-1.6's): tileSize,
 * patchSize, gridPinpoints, imageMean, imageStd; `urls`: `{ workerUrl, wasmUrl }` as for `load`.
 */
export async function preprocessImage(image, options, urls) {
  const { source, transfer } = await toImageSource(image);
  const client = new WorkerClient(urls);
  try {
    return await client.call('preprocessImage', { image: source, options }, { transfer });
  } finally {
    client.terminate();
  }
}

/** A LLaVA model loaded into its own worker (and GPU device). */
export class LlavaModel {
  #client;
  #handle;
  /** `{ vocabSize, context }`. */
  info;

  constructor(client, handle, info) {
    this.#client = client;
    this.#handle = handle;
    this.info = info;
  }

  /**
   * Loads a HuggingFace-layout checkpoint folder from `url` (config.json, tokenizer files,
   * safetensors shards), streaming the weights to the GPU one tensor at a time.
   * `onProgress({ stage, loaded, total, file, message })` reports downloaded bytes (stage
   * 'download'), a file loaded without the cache (stage 'warning', also a console warning) and
   * the built model (stage 'ready'); `quant`: 'f32' | 'f16' | 'q8' | 'q4' (default: the
   * checkpoint's precision); `context`: KV-cache size in tokens; `kvCache`: 'f16' or 'f32', what
   * the KV cache stores (default 'f16' where the adapter has shader-f16, else 'f32'); `cache` (default true): keep the
   * downloaded files in the browser's Cache API storage for the next load; `imageCacheMB`
   * (default 256, 0: off): GPU memory for reusing the features of images already seen; `files`:
   * the folder's file names when the app knows them (then nothing the folder lacks is requested);
   * `compileKernels` (default true; false: each on first use): compile the GPU kernels of a first
   * answer once loaded; `workerUrl`, `wasmUrl`: where the package's worker.js and wasm/llava_web_bg.wasm are served,
   * when a setup moves them (default: where this module finds them).
   */
  static async load(url, { onProgress, quant, context, kvCache, cache = true, imageCacheMB, files, compileKernels, workerUrl, wasmUrl } = {}) {
    const client = new WorkerClient({ workerUrl, wasmUrl });
    const absolute = new URL(url, globalThis.location?.href).href;
    let bytes = { loaded: 0, total: 0, file: '' };
    const onEvent = (event) => {
      if (event.type === 'progress') {
        bytes = { loaded: event.loaded, total: event.total, file: event.file };
        onProgress?.({ stage: 'download', ...bytes });
      } else if (event.type === 'warning') {
        console.warn(event.message);
        onProgress?.({ stage: 'warning', ...bytes, message: event.message });
      }
    };
    try {
      const { handle, info } = await client.call(
        'loadModel',
        { url: absolute, options: { quant, context, kvCache, cache: Boolean(cache), imageCacheMB, files, compileKernels } },
        { onEvent },
      );
      onProgress?.({ stage: 'ready', loaded: bytes.loaded, total: bytes.total, file: '' });
      return new LlavaModel(client, handle, info);
    } catch (e) {
      client.terminate();
      throw e;
    }
  }

  /** Deletes the downloaded model files kept by `load` (all models); resolves to whether any were kept. */
  static clearCache() {
    return clearCache();
  }

  /** A new conversation (its own KV cache). */
  async chat({ system } = {}) {
    const { handle } = await this.#client.call('chat', { model: this.#handle, system });
    return new LlavaChat(this.#client, handle);
  }

  /** Test hook: destroys the model's GPU device (tests/browser/panic.test.js). */
  __testLoseDevice() {
    return this.#client.call('testLoseDevice', { model: this.#handle });
  }

  /** Test hook: makes the worker's Rust code panic with `message` (tests/browser/panic.test.js). */
  __testPanic(message) {
    return this.#client.call('testPanic', { message });
  }

  /** Frees the model's GPU memory and stops its worker. */
  dispose() {
    this.#client.terminate();
  }
}

/** A conversation about (at most) one image; follow-up turns reuse the KV cache. */
export class LlavaChat {
  #client;
  #handle;

  constructor(client, handle) {
    this.#client = client;
    this.#handle = handle;
  }

  /**
   * Asks one question. Returns a `ChatReply`: async-iterable over the streamed `{ text, tokenId }`,
   * with `.result` resolving to `{ text, tokens, promptTokens, imageTokens, stopReason, timings, gpu }`.
   * Aborting `signal` (or calling `.cancel()`) stops generation after the current token.
   */
  send({ image, text = '', signal, ...params } = {}) {
    const reply = new ChatReply(() => this.#client.call('cancel', { chat: this.#handle }));
    reply.result = (async () => {
      let transfer = [];
      let source = null;
      if (image != null) ({ source, transfer } = await toImageSource(image));
      if (signal?.aborted) reply.cancel();
      signal?.addEventListener('abort', () => reply.cancel(), { once: true });
      return this.#client.call(
        'send',
        { chat: this.#handle, image: source, text, params, cancelled: reply.start() },
        { transfer, onEvent: (event) => event.type === 'token' && reply.push({ text: event.text, tokenId: event.tokenId }) },
      );
    })();
    reply.result.then(
      () => reply.end(),
      (e) => reply.end(e),
    );
    return reply;
  }

  /** Forgets the conversation and its image. */
  async reset() {
    await this.#client.call('reset', { chat: this.#handle });
  }

  /** Frees the chat's KV cache. */
  async dispose() {
    await this.#client.call('disposeChat', { chat: this.#handle });
  }
}

/** The streamed tokens of one answer (async-iterable) and its final `result`. */
class ChatReply {
  #tokens = [];
  #waiting = null;
  #done = false;
  #error = null;
  #cancel;
  #cancelled = false;
  #started = false;
  /** @type {Promise<object>} */
  result;

  constructor(cancel) {
    this.#cancel = cancel;
  }

  /** Stops generation after the current token; `result` then has stopReason 'cancelled'. */
  cancel() {
    this.#cancelled = true;
    // Before the request is sent (an image still being read), the request itself carries it.
    if (this.#started) this.#cancel().catch(() => {});
  }

  /** Marks the request as sent; returns whether it was cancelled before. */
  start() {
    this.#started = true;
    return this.#cancelled;
  }

  push(token) {
    this.#tokens.push(token);
    this.#wake();
  }

  end(error = null) {
    this.#done = true;
    this.#error = error;
    this.#wake();
  }

  #wake() {
    const waiting = this.#waiting;
    this.#waiting = null;
    waiting?.();
  }

  async *[Symbol.asyncIterator]() {
    for (let i = 0; ; i++) {
      while (i >= this.#tokens.length && !this.#done) await new Promise((resolve) => (this.#waiting = resolve));
      if (i < this.#tokens.length) {
        yield this.#tokens[i];
        continue;
      }
      if (this.#error) throw this.#error;
      return;
    }
  }
}
