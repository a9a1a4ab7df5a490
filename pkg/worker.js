// The Web Worker that owns the wasm module and the GPU device, so that loading and generation
// never block the page. pkg/index.js talks to it with messages:
//   page -> worker: { id, op, args }            worker -> page: { id, kind: 'result', value }
//                                                                { id, kind: 'error', message }
//                                                                { id, kind: 'event', value }
import init, * as wasm from './llava_web.js';

const ready = init();

const ops = {
  async selfTest({ seed }) {
    return wasm.gpuSelfTest(seed >>> 0);
  },
};

self.onmessage = async ({ data }) => {
  const { id, op, args } = data;
  try {
    await ready;
    if (!Object.hasOwn(ops, op)) throw new Error(`unknown worker operation "${op}"`);
    const value = await ops[op](args ?? {}, (event) => self.postMessage({ id, kind: 'event', value: event }));
    self.postMessage({ id, kind: 'result', value });
  } catch (e) {
    self.postMessage({ id, kind: 'error', message: e instanceof Error ? e.message : String(e) });
  }
};
