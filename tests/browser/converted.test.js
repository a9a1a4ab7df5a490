// A converted (q8) model in Chromium: `llava convert` writes it at test time under target/, the page
// loads it through its manifest.json (shards streamed through the shared loader, SHA-256 checked),
// and a text-only greedy answer equals the native CLI's on the same converted folder token for
// token. A corrupted shard fails the load with an Error naming the file and the checksum.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { llava } from './native.js';
import { repoRoot } from './server.js';

const SOURCE = 'tests/fixtures/models/mistral-tiny';
const CONVERTED = 'target/browser-fixtures/mistral-tiny-q8';
const CORRUPT = 'target/browser-fixtures/mistral-tiny-q8-corrupt';
const PROMPT = 'What is the capital of France?';
const MAX_NEW_TOKENS = 8;
const SLOW = 300_000;

function convert(output) {
  fs.rmSync(path.join(repoRoot, output), { recursive: true, force: true });
  // Small shards, so that the model spans several.
  llava(['convert', '--input', SOURCE, '--output', output, '--quant', 'q8', '--shard-mb', '1']);
  return JSON.parse(fs.readFileSync(path.join(repoRoot, output, 'manifest.json'), 'utf8'));
}

let browser;
let manifest;
before(async () => {
  manifest = convert(CONVERTED);
  const corrupt = convert(CORRUPT);
  const shard = path.join(repoRoot, CORRUPT, corrupt.shards[1].file);
  const bytes = fs.readFileSync(shard);
  bytes[bytes.length - 1] ^= 0x40;
  fs.writeFileSync(shard, bytes);
  browser = await openBrowser();
  browser.page.setDefaultTimeout(SLOW);
  await browser.page.goto(`${browser.url}web/index.html`);
});
after(async () => {
  await browser?.close();
});

test('a converted q8 model answers like the native CLI', { timeout: SLOW }, async () => {
  assert.ok(manifest.shards.length > 1, `${manifest.shards.length} shards`);
  const native = JSON.parse(
    llava(['run', '--json', '--model', CONVERTED, '--prompt', PROMPT, '--max-new-tokens', String(MAX_NEW_TOKENS)]).toString(),
  ).tokens;
  const got = await browser.page.evaluate(
    async ([url, prompt, maxNewTokens]) => {
      const { LlavaModel } = await import('/pkg/index.js');
      const progress = [];
      const model = await LlavaModel.load(url, { onProgress: (p) => progress.push(p) });
      const chat = await model.chat();
      const { tokens, stopReason } = await chat.send({ text: prompt, maxNewTokens }).result;
      model.dispose();
      return { tokens: Array.from(tokens), stopReason, last: progress.at(-1), files: [...new Set(progress.map((p) => p.file))] };
    },
    [`/${CONVERTED}/manifest.json`, PROMPT, MAX_NEW_TOKENS],
  );
  assert.deepEqual(got.tokens, native);
  const total = manifest.shards.reduce((sum, s) => sum + s.bytes, 0);
  assert.equal(got.last.loaded, total);
  assert.equal(got.last.total, total);
  for (const shard of manifest.shards) assert.ok(got.files.includes(shard.file), `${shard.file} reported`);
  assert.deepEqual(browser.problems, []);
});

test('a corrupted shard is an Error naming the file and its SHA-256', { timeout: SLOW }, async () => {
  const corrupt = JSON.parse(fs.readFileSync(path.join(repoRoot, CORRUPT, 'manifest.json'), 'utf8'));
  const error = await browser.page.evaluate(async (url) => {
    const { LlavaModel } = await import('/pkg/index.js');
    try {
      await LlavaModel.load(url, {});
      return null;
    } catch (e) {
      return { isError: e instanceof Error, message: e.message };
    }
  }, `/${CORRUPT}/`);
  assert.equal(error?.isError, true);
  assert.ok(error.message.includes(corrupt.shards[1].file), error.message);
  assert.ok(error.message.includes(`SHA-256`) && error.message.includes(corrupt.shards[1].sha256), error.message);
});
