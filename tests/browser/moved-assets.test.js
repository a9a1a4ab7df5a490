// Setups that serve the package's worker and wasm somewhere else (a CDN, a copy step) pass their
// URLs: `workerUrl` and `wasmUrl`. Here the installed package's own wasm is deleted and a copy of
// the worker (with its modules) and of the wasm, renamed, is served from /moved/: the package
// preprocesses an image through them exactly as `llava preprocess` does.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { llava } from './native.js';
import { packAndInstall } from './pack.js';
import { repoRoot } from './server.js';

const IMAGE = 'assets/sample.jpg';

let pack;
let browser;
const requests = [];
before(async () => {
  pack = packAndInstall();
  const { project, packageDir } = pack;
  const moved = path.join(project, 'moved');
  fs.mkdirSync(path.join(moved, 'wasm'), { recursive: true });
  for (const file of ['worker.js', 'cache.js', 'wasm/llava_web.js']) {
    fs.copyFileSync(path.join(packageDir, 'pkg', file), path.join(moved, file));
  }
  fs.renameSync(path.join(packageDir, 'pkg/wasm/llava_web_bg.wasm'), path.join(moved, 'runtime.wasm'));
  fs.copyFileSync(path.join(repoRoot, 'tests/browser/pages/moved.html'), path.join(project, 'index.html'));
  fs.copyFileSync(path.join(repoRoot, IMAGE), path.join(project, 'sample.jpg'));
  browser = await openBrowser({ root: project });
  browser.server.on('request', (req) => requests.push(new URL(req.url, browser.url).pathname));
});
after(async () => {
  await browser?.close();
  pack?.remove();
});

test('workerUrl and wasmUrl start the worker and the wasm from where they are served', async () => {
  const npy = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'llava-moved-')), 'pixels.npy');
  const want = JSON.parse(llava(['preprocess', '--image', IMAGE, '--json', '--pixels-out', npy]).toString());
  // .npy v1: 6-byte magic, 2-byte version, 2-byte header length, header, then the float32 data.
  const file = fs.readFileSync(npy);
  fs.rmSync(path.dirname(npy), { recursive: true });
  const pixels = crypto.createHash('sha256').update(file.subarray(10 + file.readUInt16LE(8))).digest('hex');
  const { page } = browser;
  await page.goto(browser.url);
  await page.waitForFunction(() => window.ready);
  const got = await page.evaluate(() =>
    window.movedTest.preprocess('/sample.jpg', { workerUrl: '/moved/worker.js', wasmUrl: '/moved/runtime.wasm' }),
  );
  assert.deepEqual(got.grid, want.grid);
  assert.equal(got.imageTokens, want.image_tokens);
  assert.equal(got.pixels, pixels);
  assert.ok(requests.includes('/moved/worker.js') && requests.includes('/moved/runtime.wasm'), requests.join('\n'));
  assert.ok(!requests.some((p) => p.startsWith('/node_modules/llava-webgpu/pkg/worker')), requests.join('\n'));
  assert.deepEqual(browser.problems, []);
});
