import { defineConfig } from 'vite';

export default defineConfig({
  // The package's worker is a module worker with imports of its own.
  worker: { format: 'es' },
  // Pre-bundling would move the package's modules away from its worker.js and .wasm (dev server).
  optimizeDeps: { exclude: ['llava-webgpu'] },
});
