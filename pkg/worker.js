// The Web Worker that owns the wasm module and the GPU device, so that loading and generation
// never block the page. pkg/index.js talks to it with messages:
//   page -> worker: { id, op, args }            worker -> page: { id, kind: 'result', value }
//                                                                { id, kind: 'error', message }
//                                                                { id, kind: 'event', value }
import init, * as wasm from './llava_web.js';

const ready = init();

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

const ops = {
  async selfTest({ seed }) {
    return wasm.gpuSelfTest(seed >>> 0);
  },
  async preprocessImage({ image, options }) {
    return wasm.preprocessImage(await imageSource(image), options);
  },
};

self.onmessage = async ({ data }) => {
  const { id, op, args } = data;
  try {
    await ready;
    if (!Object.hasOwn(ops, op)) throw new Error(`unknown worker operation "${op}"`);
    const value = await ops[op](args ?? {}, (event) => self.postMessage({ id, kind: 'event', value: event }));
    self.postMessage({ id, kind: 'result', value }, transferables(value));
  } catch (e) {
    self.postMessage({ id, kind: 'error', message: e instanceof Error ? e.message : String(e) });
  }
};
