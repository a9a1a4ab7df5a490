// The GPU core in real Chromium on WebGPU: the same kernels as native, run from the built package
// on the main thread and in the package's worker, each compared in Rust with a CPU computation.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';

const KERNELS = ['add', 'rms_norm', 'layer_norm', 'argmax', 'embedding_f16', 'embedding_q8', 'embedding_q6', 'embedding_q4',
  'linear_q6_gemv', 'linear_q6_gemm', 'linear_q4_gemv', 'linear_q4_gemm', 'patch_embed_f16', 'attention_causal'];

let browser;
before(async () => {
  browser = await openBrowser();
});
after(async () => {
  await browser?.close();
});

function assertReport(report, where) {
  assert.equal(report.adapter.backend, 'BrowserWebGpu', `${where}: wgpu's WebGPU backend`);
  assert.deepEqual(report.checks.map((c) => c.name), KERNELS, where);
  for (const c of report.checks) {
    assert.ok(c.elements > 0, `${where} ${c.name}: compared nothing`);
    assert.ok(Number.isFinite(c.maxError), `${where} ${c.name}: error ${c.maxError}`);
    assert.ok(c.maxError <= c.tolerance, `${where} ${c.name}: error ${c.maxError} > ${c.tolerance}`);
    assert.equal(c.passed, true, `${where} ${c.name}`);
  }
  assert.equal(report.passed, true, where);
  assert.equal(typeof report.features.shaderF16, 'boolean');
  // WebGPU guarantees at least 128 MiB per storage binding; the device asks for the adapter's own.
  assert.ok(report.limits.maxStorageBufferBindingSize >= 128 << 20, JSON.stringify(report.limits));
  assert.ok(report.limits.maxComputeWorkgroupsPerDimension >= 65535);
}

test('GPU kernels match the CPU in Chromium, on the main thread and in the worker', async () => {
  const { page, url, problems } = browser;
  await page.goto(`${url}tests/browser/pages/selftest.html?seed=11`);
  const result = await page.waitForFunction(() => window.selfTest, null, { timeout: 120_000 });
  const { main, worker, error } = await result.jsonValue();
  assert.equal(error, undefined, `self-test failed: ${error}`);
  assertReport(main, 'main thread');
  assertReport(worker, 'worker');
  assert.deepEqual(worker.adapter, main.adapter);
  assert.deepEqual(problems, [], 'console warnings, GPU errors or page errors');
});
