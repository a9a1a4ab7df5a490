// A converted (q8) model in Chromium: `llava convert` writes it at test time under target/, the page
// loads it through its manifest.json (shards streamed through the shared loader, SHA-256 checked),
// and a text-only greedy answer equals the native CLI's on the same converted folder token for
// token. A corrupted shard fails the load with an Error naming the file and the checksum. A folder
// with the SentencePiece tokenizer.model instead of tokenizer.json (as the original LLaVA
// checkpoints ship it) is converted in the page as natively. A config.json edited after the
// conversion fails the load with an Error naming the file and its hash in the manifest.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { convert, llava } from './native.js';
import { repoRoot } from './server.js';

const SOURCE = 'tests/fixtures/models/mistral-tiny';
const CONVERTED = 'target/browser-fixtures/mistral-tiny-q8';
const CORRUPT = 'target/browser-fixtures/mistral-tiny-q8-corrupt';
const SENTENCEPIECE = 'target/browser-fixtures/mistral-tiny-q8-sentencepiece';
const TAMPERED = 'target/browser-fixtures/mistral-tiny-q8-tampered-config';
// Mistral-7B v0.1's tokenizer.model: the tokenizer of mistral-tiny's tokenizer.json.
const TOKENIZER_MODEL = 'tests/fixtures/sentencepiece/mistral-7b-v0.1/tokenizer.model';
const PROMPT = 'What is the capital of France?';
const MAX_NEW_TOKENS = 8;
const SLOW = 300_000;

let browser;
let manifest;
before(async () => {
  manifest = convert(SOURCE, CONVERTED, 'q8');
  const corrupt = convert(SOURCE, CORRUPT, 'q8');
  const shard = path.join(repoRoot, CORRUPT, corrupt.shards[1].file);
  const bytes = fs.readFileSync(shard);
  bytes[bytes.length - 1] ^= 0x40;
  fs.writeFileSync(shard, bytes);
  const sentencepiece = convert(SOURCE, SENTENCEPIECE, 'q8');
  fs.rmSync(path.join(repoRoot, SENTENCEPIECE, 'tokenizer.json'));
  fs.copyFileSync(path.join(repoRoot, TOKENIZER_MODEL), path.join(repoRoot, SENTENCEPIECE, 'tokenizer.model'));
  sentencepiece.files = sentencepiece.files.map((f) => (f === 'tokenizer.json' ? 'tokenizer.model' : f));
  fs.writeFileSync(path.join(repoRoot, SENTENCEPIECE, 'manifest.json'), JSON.stringify(sentencepiece));
  convert(SOURCE, TAMPERED, 'q8');
  const config = path.join(repoRoot, TAMPERED, 'config.json');
  fs.writeFileSync(config, fs.readFileSync(config, 'utf8').replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'));
  browser = await openBrowser();
  browser.page.setDefaultTimeout(SLOW);
  await browser.page.goto(`${browser.url}web/index.html`);
});
after(async () => {
  await browser?.close();
});

function nativeRun(folder, prompt) {
  return JSON.parse(
    llava(['run', '--json', '--model', folder, '--prompt', prompt, '--max-new-tokens', String(MAX_NEW_TOKENS)]).toString(),
  );
}

async function browserRun(url, prompt) {
  return browser.page.evaluate(
    async ([url, prompt, maxNewTokens]) => {
      const { LlavaModel } = await import('/pkg/index.js');
      const progress = [];
      const model = await LlavaModel.load(url, { onProgress: (p) => progress.push(p) });
      const chat = await model.chat();
      const { tokens, stopReason } = await chat.send({ text: prompt, maxNewTokens }).result;
      model.dispose();
      return { tokens: Array.from(tokens), stopReason, last: progress.at(-1), files: [...new Set(progress.map((p) => p.file))] };
    },
    [url, prompt, MAX_NEW_TOKENS],
  );
}

test('a converted q8 model answers like the native CLI', { timeout: SLOW }, async () => {
  assert.ok(manifest.shards.length > 1, `${manifest.shards.length} shards`);
  const native = nativeRun(CONVERTED, PROMPT).tokens;
  const got = await browserRun(`/${CONVERTED}/manifest.json`, PROMPT);
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

test('a config.json changed after the conversion is an Error naming the file and its SHA-256', async () => {
  const tampered = JSON.parse(fs.readFileSync(path.join(repoRoot, TAMPERED, 'manifest.json'), 'utf8'));
  assert.ok(tampered.file_sha256['config.json'], 'the manifest hashes config.json');
  const error = await browser.page.evaluate(async (url) => {
    const { LlavaModel } = await import('/pkg/index.js');
    try {
      await LlavaModel.load(url, {});
      return null;
    } catch (e) {
      return { isError: e instanceof Error, message: e.message };
    }
  }, `/${TAMPERED}/manifest.json`);
  assert.equal(error?.isError, true);
  assert.ok(error.message.includes(`/${TAMPERED}/config.json: SHA-256 `), error.message);
  assert.ok(error.message.includes(`manifest.json's ${tampered.file_sha256['config.json']}`), error.message);
});

test('a folder with tokenizer.model and no tokenizer.json answers like the native CLI', { timeout: SLOW }, async () => {
  // Spaces, accents and an emoji (byte fallback) go through the converted tokenizer.
  const prompt = `${PROMPT} Ünïcode 🚀  spaces`;
  const native = nativeRun(SENTENCEPIECE, prompt);
  const got = await browserRun(`/${SENTENCEPIECE}/manifest.json`, prompt);
  assert.deepEqual(got.tokens, native.tokens);
  assert.deepEqual(browser.problems, []);
});
