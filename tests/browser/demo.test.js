// The demo page end to end in Chromium: load the bundled tiny model over HTTP (streamed shards),
// pick an image through the real file input, and check that the streamed answer's token ids equal
// the native CLI's (`llava run --json`) for the same image and question; then a follow-up
// question streams new tokens, and Stop cancels a long answer.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { artifactsDir, openBrowser, sharedDir } from './harness.js';
import { llava } from './native.js';
import { repoRoot } from './server.js';

const MODEL = 'tests/fixtures/models/mistral-tiny';
const IMAGE = path.join(sharedDir, 'testdata/images/chelsea.png');
const QUESTION = 'What is in this picture?';
const MAX_NEW_TOKENS = 8;
// llvmpipe/SwiftShader: the image prefill (~2000 tokens) alone takes seconds.
const SLOW = 600_000;

/** The native CLI's greedy answer to the same question about the same file. */
function nativeTokens() {
  const args = ['run', '--json', '--model', MODEL, '--image', IMAGE, '--prompt', QUESTION];
  return JSON.parse(llava([...args, '--max-new-tokens', String(MAX_NEW_TOKENS)]).toString()).tokens;
}

let browser;
before(async () => {
  browser = await openBrowser();
  browser.page.setDefaultTimeout(SLOW);
  await browser.page.goto(`${browser.url}web/index.html`);
});
after(async () => {
  await browser?.close();
});

/** Asks `question` on the page and waits for its answer; returns the turn's record. */
async function ask(page, question, maxNewTokens) {
  const index = await page.evaluate(() => window.__turns.length);
  await page.fill('#question', question);
  await page.fill('#max-tokens', String(maxNewTokens));
  await page.click('#send');
  await page.waitForFunction((i) => window.__turns[i]?.done, index);
  return page.evaluate((i) => window.__turns[i], index);
}

test('load, then the streamed answer equals the native CLI token for token', { timeout: SLOW }, async () => {
  const { page } = browser;
  const want = nativeTokens();
  assert.equal(want.length > 0, true);

  await page.click('#load');
  await page.waitForFunction(() => document.body.dataset.state !== 'loading');
  assert.equal(await page.$eval('#error', (e) => e.textContent), '');
  assert.equal(await page.evaluate(() => document.body.dataset.state), 'ready');
  // The progress bar reached the sum of the shard sizes.
  const shardBytes = fs
    .readdirSync(path.join(repoRoot, MODEL))
    .filter((f) => f.endsWith('.safetensors'))
    .reduce((sum, f) => sum + fs.statSync(path.join(repoRoot, MODEL, f)).size, 0);
  assert.deepEqual(await page.$eval('#progress', (p) => [p.value, p.max]), [shardBytes, shardBytes]);

  await page.setInputFiles('#image-input', IMAGE);
  await page.waitForFunction(() => document.getElementById('preview').complete && !document.getElementById('preview').hidden);

  const turn = await ask(page, QUESTION, MAX_NEW_TOKENS);
  assert.equal(turn.error, undefined);
  // The reply's ids include a final end-of-sequence id, which is not streamed.
  const streamed = turn.stopReason === 'eos' ? want.slice(0, -1) : want;
  assert.deepEqual(turn.tokens, streamed);
  assert.match(await page.$eval('#stats', (e) => e.textContent), /tokens\/s, time to first token/);
  assert.deepEqual(browser.problems, []);
});

test('a follow-up question streams new tokens', { timeout: SLOW }, async () => {
  const { page } = browser;
  const turn = await ask(page, 'And what colour is it?', 3);
  assert.equal(turn.error, undefined);
  assert.ok(turn.tokens.length > 0 && turn.tokens.length <= 3, JSON.stringify(turn));
  assert.equal(await page.$$eval('.turn', (t) => t.length), 4);
  assert.deepEqual(browser.problems, []);
});

test('Stop cancels a long answer', { timeout: SLOW }, async () => {
  const { page } = browser;
  const index = await page.evaluate(() => window.__turns.length);
  await page.fill('#question', 'Describe it in great detail.');
  await page.fill('#max-tokens', '2000');
  await page.click('#send');
  await page.waitForFunction((i) => window.__turns[i]?.tokens.length >= 1, index);
  await page.click('#stop');
  await page.waitForFunction((i) => window.__turns[i]?.done, index);
  const turn = await page.evaluate((i) => window.__turns[i], index);
  assert.equal(turn.error, undefined);
  assert.equal(turn.stopReason, 'cancelled');
  assert.ok(turn.tokens.length < 2000);
  fs.mkdirSync(artifactsDir, { recursive: true });
  await page.screenshot({ path: path.join(artifactsDir, 'demo.png'), fullPage: true });
  assert.deepEqual(browser.problems, []);
});
