// The Web Worker that owns the wasm module and the GPU device, so that loading and generation
// never block the page. pkg/index.js talks to it with messages:
//   page -> worker: { id, op, args }            worker -> page: { id, kind: 'result', value }
//                                                                { id, kind: 'error', message }
//                                                                { id, kind: 'event', value }
//                                                                { kind: 'crashed', message }
import { createCachedFetch } from './cache.js';
import init, * as wasm from './wasm/llava_web.js';

// Started by the first message, which says where the wasm is when the page moved it.
let ready = null;

// The Error message once Rust panicked (a bug). wasm32 panics abort: the instance and every
// model in it are gone, so the page is told at once (a panic inside an async call would
// otherwise leave that call pending forever) and every later operation fails with the same text.
let crashed = null;

function onPanic(panic) {
  crashed = `llava-webgpu crashed (a bug, please report it): ${panic}; the model must be reloaded (LlavaModel.load)`;
  self.postMessage({ kind: 'crashed', message: crashed });
}

// The trap that follows the panic surfaces as an uncaught `unreachable` here; the page already
// has the message above.
for (const type of ['error', 'unhandledrejection']) {
  self.addEventListener(type, (event) => {
    if (crashed) event.preventDefault();
  });
}

/** The worker half of pkg/index.js's image conversion: Blobs are read here, off the page. */
async function imageSource(source) {
  if (source?.blob) return { encoded: new Uint8Array(await source.blob.arrayBuffer()) };
  return source;
}

/** The ArrayBuffers of a result's typed arrays, moved to the page instead of copied. */
function transferables(value) {
  if (!value || typeof value !== 'object') return [];
  return Object.values(value)
    .filter((v) => ArrayBuffer.isView(v))
    .map((v) => v.buffer);
}

// Loaded models and open chats by handle, and the flags that cancel a chat's current answer.
const models = new Map();
const chats = new Map();
let nextHandle = 1;

function lookup(table, handle, what) {
  const value = table.get(handle);
  if (!value) throw new Error(`this ${what} was disposed`);
  return value;
}

const ops = {
  async selfTest({ seed }) {
    return wasm.gpuSelfTest(seed >>> 0);
  },
  async preprocessImage({ image, options }) {
    return wasm.preprocessImage(await imageSource(image), options);
  },
  async loadModel({ url, options }, emit) {
    const { cache = true, ...settings } = options ?? {};
    // Every download of the loader goes through `fetch`: with the cache, files already stored
    // are read from disk and new ones are stored as they stream in.
    const cachedFetch = cache ? createCachedFetch({ onWarning: (message) => emit({ type: 'warning', message }) }) : null;
    if (cachedFetch) settings.fetch = cachedFetch;
    const model = await wasm.loadModel(url, settings, (progress) => emit({ type: 'progress', ...progress }));
    // Ready means stored too: a page closed right after loading finds every file in the cache.
    await cachedFetch?.settled();
    const handle = nextHandle++;
    models.set(handle, { model, chats: new Set() });
    return { handle, info: model.info() };
  },
  async chat({ model, system }) {
    const entry = lookup(models, model, 'model');
    const handle = nextHandle++;
    chats.set(handle, { chat: entry.model.chat(system ?? undefined), model, cancelled: false });
    entry.chats.add(handle);
    return { handle };
  },
  async send({ chat, image, text, params, cancelled }, emit) {
    const entry = lookup(chats, chat, 'chat');
    entry.cancelled = Boolean(cancelled);
    const source = image == null ? null : await imageSource(image);
    // Each decode step awaits a GPU readback, so a 'cancel' message is handled between tokens.
    return entry.chat.send(source, text ?? '', params ?? {}, (token) => {
      emit({ type: 'token', ...token });
      return !entry.cancelled;
    });
  },
  async cancel({ chat }) {
    const entry = chats.get(chat);
    if (entry) entry.cancelled = true;
  },
  async reset({ chat }) {
    lookup(chats, chat, 'chat').chat.reset();
  },
  async disposeChat({ chat }) {
    const entry = chats.get(chat);
    if (!entry) return;
    chats.delete(chat);
    models.get(entry.model)?.chats.delete(chat);
    entry.chat.free();
  },
  // Test hook of device loss (tests/browser/panic.test.js).
  async testLoseDevice({ model }) {
    lookup(models, model, 'model').model.__testLoseDevice();
  },
  // Test hook of the panic path (tests/browser/panic.test.js).
  async testPanic({ message }) {
    await wasm.__testPanic(String(message));
  },
  async disposeModel({ model }) {
    const entry = models.get(model);
    if (!entry) return;
    for (const chat of entry.chats) {
      chats.get(chat)?.chat.free();
      chats.delete(chat);
    }
    models.delete(model);
    entry.model.free();
  },
};

self.onmessage = async ({ data }) => {
  const { id, op, args, wasmUrl } = data;
  try {
    ready ??= init(wasmUrl ? { module_or_path: wasmUrl } : undefined).then(() => wasm.setPanicHandler(onPanic));
    await ready;
    if (crashed) throw new Error(crashed);
    if (!Object.hasOwn(ops, op)) throw new Error(`unknown worker operation "${op}"`);
    const value = await ops[op](args ?? {}, (event) => self.postMessage({ id, kind: 'event', value: event }));
    self.postMessage({ id, kind: 'result', value }, transferables(value));
  } catch (e) {
    // A panic in a synchronous call traps right after the handler ran: report the panic, not
    // the trap's `unreachable`.
    const message = crashed ?? (e instanceof Error ? e.message : String(e));
    self.postMessage({ id, kind: 'error', message });
  }
};
