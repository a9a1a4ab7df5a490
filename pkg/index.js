// llava-webgpu: LLaVA-1.6 in the browser on WebGPU. The wasm module runs in a Web Worker shipped
// beside this file (worker.js); this module is the main-thread API that talks to it.

/** A module worker running pkg/worker.js, with request/response bookkeeping. */
class WorkerClient {
  #worker;
  #pending = new Map();
  #nextId = 1;
  #failure = null;

  constructor() {
    this.#worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module', name: 'llava-webgpu' });
    this.#worker.onmessage = ({ data }) => {
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

  #fail(error) {
    this.#failure = error;
    for (const call of this.#pending.values()) call.reject(error);
    this.#pending.clear();
  }

  /** Runs `op` in the worker; `onEvent` receives its intermediate events. */
  call(op, args = {}, { onEvent, transfer = [] } = {}) {
    if (this.#failure) return Promise.reject(this.#failure);
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, onEvent });
      this.#worker.postMessage({ id, op, args }, transfer);
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
export async function gpuSelfTest({ seed = 1 } = {}) {
  const client = new WorkerClient();
  try {
    return await client.call('selfTest', { seed });
  } finally {
    client.terminate();
  }
}
