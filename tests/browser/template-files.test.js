// Chat templates are found in the browser as natively (crates/model/tests/model_source.rs): a
// copy of mistral-tiny whose template lives only in tokenizer_config.json, or only in
// chat_template.json, gives the prompt ids and greedy tokens of the fixture's
// chat_template.jinja. And loading any fixture with its file list (the `files` option) makes no
// request that answers 404; mistral-tiny, which has every file the loader looks for, makes none
// without the list either.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { repoRoot } from './server.js';

const MODELS = 'tests/fixtures/models';
const SOURCE = `${MODELS}/mistral-tiny`;
const IN_TOKENIZER_CONFIG = 'target/browser-fixtures/template-in-tokenizer-config';
const IN_JSON = 'target/browser-fixtures/template-in-chat-template-json';
const SYSTEM = 'Answer in one word.';
const QUESTION = 'What is the capital of France?';
const MAX_NEW_TOKENS = 4;
const SLOW = 600_000;

/** A copy of mistral-tiny at `folder` without chat_template.jinja; `place(dir, jinja)` puts the template back elsewhere. */
function withoutJinja(folder, place) {
  const dir = path.join(repoRoot, folder);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.cpSync(path.join(repoRoot, SOURCE), dir, { recursive: true });
  const jinja = fs.readFileSync(path.join(dir, 'chat_template.jinja'), 'utf8');
  fs.rmSync(path.join(dir, 'chat_template.jinja'));
  place(dir, jinja);
}

/** Every file under `folder`, as paths relative to it. */
function listing(folder) {
  const root = path.join(repoRoot, folder);
  return fs.readdirSync(root, { recursive: true }).filter((f) => fs.statSync(path.join(root, f)).isFile()).map((f) => f.split(path.sep).join('/'));
}

let browser;
const notFound = [];
before(async () => {
  withoutJinja(IN_TOKENIZER_CONFIG, (dir, jinja) => {
    const file = path.join(dir, 'tokenizer_config.json');
    const config = JSON.parse(fs.readFileSync(file, 'utf8'));
    fs.writeFileSync(file, JSON.stringify({ ...config, chat_template: jinja }));
  });
  withoutJinja(IN_JSON, (dir, jinja) => {
    fs.writeFileSync(path.join(dir, 'chat_template.json'), JSON.stringify({ chat_template: jinja }));
  });
  browser = await openBrowser();
  browser.page.setDefaultTimeout(SLOW);
  browser.page.on('response', (response) => {
    if (response.status() === 404) notFound.push(response.url());
  });
  await browser.page.goto(`${browser.url}tests/browser/pages/tokenizer.html`);
  await browser.page.waitForFunction(() => window.ready);
});
after(async () => {
  await browser?.close();
});

/** Loads the folder in the page (the wasm module on the main thread; its kernels compiled on
 * first use, which the fixtures without a question never have) and, with `question`, answers one
 * turn (greedy); returns the prompt ids and the tokens. */
function load(folder, files, { system = null, question = null } = {}) {
  return browser.page.evaluate(
    async ([url, files, system, question, maxNewTokens]) => {
      const wasm = await import('/pkg/wasm/llava_web.js');
      const model = await wasm.loadModel(url, { compileKernels: false, ...(files ? { files } : {}) }, null);
      try {
        if (!question) return {};
        const ids = Array.from(model.promptIds(system, question));
        const chat = model.chat(system);
        const reply = await chat.send(null, question, { maxNewTokens, ignoreEos: true }, () => true);
        chat.free();
        return { ids, tokens: Array.from(reply.tokens), promptTokens: reply.promptTokens };
      } finally {
        model.free();
      }
    },
    [`/${folder}/`, files, system, question, MAX_NEW_TOKENS],
  );
}

test('a template only in tokenizer_config.json or chat_template.json answers like chat_template.jinja', { timeout: SLOW }, async () => {
  const turn = { system: SYSTEM, question: QUESTION };
  const reference = await load(SOURCE, listing(SOURCE), turn);
  assert.equal(reference.tokens.length, MAX_NEW_TOKENS);
  assert.equal(reference.promptTokens, reference.ids.length);
  for (const folder of [IN_TOKENIZER_CONFIG, IN_JSON]) {
    notFound.length = 0;
    const got = await load(folder, listing(folder), turn);
    assert.deepEqual(got, reference, folder);
    assert.deepEqual(notFound, [], folder);
  }
  assert.deepEqual(browser.problems, []);
});

test('loading any fixture with its file list makes no request that answers 404', { timeout: SLOW }, async () => {
  const fixtures = fs.readdirSync(path.join(repoRoot, MODELS)).filter((m) => fs.existsSync(path.join(repoRoot, MODELS, m, 'config.json')) && listing(`${MODELS}/${m}`).some((f) => f.endsWith('.safetensors')));
  assert.ok(fixtures.length >= 7, fixtures.join(', '));
  for (const model of fixtures) {
    notFound.length = 0;
    const folder = `${MODELS}/${model}`;
    await load(folder, listing(folder));
    assert.deepEqual(notFound, [], model);
  }
  // Without the list the optional files are probed; mistral-tiny has each one looked for.
  notFound.length = 0;
  await load(SOURCE, null);
  assert.deepEqual(notFound, []);
  assert.deepEqual(browser.problems, []);
});
