// The package the way an app uses it: `npm pack`, installed from the tarball into a fresh
// project whose plain page imports 'llava-webgpu' through an import map. The page loads the
// bundled tiny model converted to q4 by `llava convert` (written at test time under target/, in
// several shards; progress events up to 'ready'), sends an image's bytes and a question, and the
// streamed tokens equal the native CLI's for the same converted folder, image and prompt. After a reload the model loads again from the Cache API, without one request for a
// model file, and answers the same.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser, sharedDir } from './harness.js';
import { packAndInstall } from './pack.js';
import { convert, llava } from './native.js';
import { repoRoot } from './server.js';

const SOURCE = 'tests/fixtures/models/mistral-tiny';
const MODEL = 'target/browser-fixtures/mistral-tiny-q4';
const IMAGE = 'testdata/images/chelsea.png';
const QUESTION = 'What is in this picture?';
const QUANT = 'q4';
const MAX_NEW_TOKENS = 4;
// SwiftShader: the image prefill alone takes a while.
const SLOW = 600_000;

/** The native CLI's greedy answer ({ tokens, text }) to the same question about the same file. */
function nativeAnswer() {
  const args = ['run', '--json', '--model', MODEL, '--image', path.join(sharedDir, IMAGE), '--prompt', QUESTION];
  return JSON.parse(llava([...args, '--max-new-tokens', String(MAX_NEW_TOKENS)]).toString());
}

convert(SOURCE, MODEL, QUANT);

const modelFiles = fs.readdirSync(path.join(repoRoot, MODEL));
const shards = modelFiles.filter((f) => f.endsWith('.safetensors')).sort();
const shardBytes = shards.reduce((sum, f) => sum + fs.statSync(path.join(repoRoot, MODEL, f)).size, 0);

let pack;
let browser;
// Paths the server was asked for since the last clear.
const requests = [];
before(async () => {
  pack = packAndInstall();
  // The app: its page, its installed package, and the model folder it serves.
  fs.copyFileSync(path.join(repoRoot, 'tests/browser/pages/package.html'), path.join(pack.project, 'index.html'));
  fs.symlinkSync(path.join(repoRoot, MODEL), path.join(pack.project, 'model'), 'dir');
  browser = await openBrowser({ root: pack.project });
  browser.page.setDefaultTimeout(SLOW);
  browser.server.on('request', (req) => requests.push(new URL(req.url, browser.url).pathname));
});
after(async () => {
  await browser?.close();
  pack?.remove();
});

/** Opens the app page (again) and asks the question; returns what the page reports. */
// The converted folder's manifest.json itself: with a base URL the loader first probes for an HF
// index (a 404, which is never cached, so a reload would request it again).
async function askOnFreshPage() {
  const { page } = browser;
  await page.goto(browser.url);
  await page.waitForFunction(() => window.ready);
  return page.evaluate(
    (args) => window.packageTest.ask(args),
    { model: '/model/manifest.json', quant: QUANT, image: `/shared/${IMAGE}`, question: QUESTION, maxNewTokens: MAX_NEW_TOKENS },
  );
}

/** The progress events: bytes never go back, the shards are all read, and 'ready' ends them. */
function checkProgress(progress) {
  const downloads = progress.filter((p) => p.stage === 'download');
  assert.ok(downloads.length >= shards.length, JSON.stringify(progress));
  for (let i = 1; i < downloads.length; i++) {
    assert.ok(downloads[i].loaded >= downloads[i - 1].loaded, `bytes went back at event ${i}`);
  }
  for (const p of downloads) assert.ok(p.loaded <= p.total, JSON.stringify(p));
  // Every shard is read (besides them: config.json, tokenizer files).
  const files = new Set(downloads.map((p) => p.file));
  assert.deepEqual(shards.filter((f) => !files.has(f)), [], JSON.stringify([...files]));
  assert.deepEqual(progress.at(-1), { stage: 'ready', loaded: shardBytes, total: shardBytes, file: '' });
  assert.deepEqual(
    progress.filter((p) => !['download', 'ready'].includes(p.stage)),
    [],
    'no warnings (the cache works here)',
  );
}

/** The streamed pieces and the result equal the native answer. */
function checkAnswer({ pieces, result }, want) {
  assert.deepEqual(result.tokens, want.tokens);
  assert.equal(result.text, want.text);
  assert.equal(result.imageTokens > 0 && result.promptTokens > result.imageTokens, true, JSON.stringify(result));
  // The final end-of-sequence id is in the result but not streamed.
  const streamed = result.stopReason === 'eos' ? want.tokens.slice(0, -1) : want.tokens;
  assert.deepEqual(
    pieces.map((p) => p.tokenId),
    streamed,
  );
  assert.equal(pieces.map((p) => p.text).join(''), result.text);
  // The browser runs the planned decode step too: per token after the first, nothing created,
  // one submit of one pass, the token id read back.
  assert.ok(result.tokens.length > 1, 'more than one token to count');
  const { planned, buffersCreated, bindGroupsCreated, submits, passes, bytesRead } = result.gpu;
  assert.deepEqual(
    { planned, buffersCreated, bindGroupsCreated, submits, passes, bytesRead },
    { planned: true, buffersCreated: 0, bindGroupsCreated: 0, submits: 1, passes: 1, bytesRead: 4 },
  );
}

let want;
let first;
test('the installed package loads the model with progress and answers as natively', { timeout: SLOW }, async () => {
  assert.ok(shards.length > 1, `${shards.length} shards`);
  want = nativeAnswer();
  assert.ok(want.tokens.length > 0);
  requests.length = 0;
  first = await askOnFreshPage();
  checkProgress(first.progress);
  checkAnswer(first, want);
  // The package's own files came from the installed copy, and each model file was fetched once.
  assert.ok(requests.includes('/node_modules/llava-webgpu/pkg/wasm/llava_web_bg.wasm'), requests.join('\n'));
  const modelRequests = requests.filter((p) => p.startsWith('/model/'));
  for (const shard of shards) assert.equal(modelRequests.filter((p) => p === `/model/${shard}`).length, 1, shard);
  assert.deepEqual(browser.problems, []);
  assert.deepEqual(browser.cacheWarnings, []);
});

test('after a reload the model loads from the cache, without requests, and answers the same', { timeout: SLOW }, async () => {
  assert.ok(first, 'needs the first test');
  requests.length = 0;
  const second = await askOnFreshPage();
  assert.deepEqual(
    requests.filter((p) => p.startsWith('/model/')),
    [],
    'model files requested again: the loader does not read through the cache (LoadOptions.fetch)',
  );
  checkProgress(second.progress);
  checkAnswer(second, want);
  assert.deepEqual(browser.problems, []);
  assert.deepEqual(browser.cacheWarnings, []);
});

/** The number of files in the package's cache. */
function cachedFiles() {
  return browser.page.evaluate(async () =>
    (await caches.has('llava-webgpu-v1')) ? (await (await caches.open('llava-webgpu-v1')).keys()).length : 0,
  );
}

test('clearCache deletes the stored files', async () => {
  assert.ok((await cachedFiles()) >= shards.length);
  assert.equal(await browser.page.evaluate(() => window.packageTest.clearCache()), true);
  assert.equal(await cachedFiles(), 0);
});

test('with cache: false every file comes from the network and nothing is stored', { timeout: SLOW }, async () => {
  requests.length = 0;
  const info = await browser.page.evaluate(() => window.packageTest.load('/model/manifest.json', { cache: false }));
  assert.ok(info.vocabSize > 0, JSON.stringify(info));
  for (const shard of shards) assert.ok(requests.includes(`/model/${shard}`), requests.join('\n'));
  assert.equal(await cachedFiles(), 0);
  assert.deepEqual(browser.problems, []);
});
