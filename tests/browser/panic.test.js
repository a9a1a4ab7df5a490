// Runtime and GPU faults in the browser. A Rust panic (a bug) never reaches JavaScript as
// `unreachable` or as a call that never settles: the worker hands the panic message to the page,
// which rejects the pending call and every later one with an Error saying the model must be reloaded; loading again gives a working model. The
// panic is made by the package's test hook, inside a future, while an answer is streaming. A GPU
// device destroyed while an answer streams ends it with an Error naming the loss.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { repoRoot } from './server.js';

const MODEL = '/tests/fixtures/models/mistral-tiny/';
// transformers' greedy answer (tests/fixtures/expected), the reference after the reload.
const TEXT_ONLY = JSON.parse(fs.readFileSync(path.join(repoRoot, 'tests/fixtures/expected/mistral-tiny.json'), 'utf8'))
  .cases.find((c) => c.id === 'text_only');
const SLOW = 600_000;

let browser;
before(async () => {
  browser = await openBrowser();
  browser.page.setDefaultTimeout(SLOW);
  await browser.page.goto(`${browser.url}web/index.html`);
});
after(async () => {
  await browser?.close();
});

test('a panic rejects pending and later calls with its message, and the model loads again', { timeout: SLOW }, async () => {
  const outcome = await browser.page.evaluate(
    async ({ model, question }) => {
      const { LlavaModel } = await import('/pkg/index.js');
      const settle = (promise) =>
        promise.then(
          () => ({ settled: 'resolved' }),
          (e) => ({ isError: e instanceof Error, message: e.message }),
        );
      // Kernels compile on first use: the turns here are text only.
      const loaded = await LlavaModel.load(model, { cache: false, compileKernels: false });
      const chat = await loaded.chat();
      const reply = chat.send({ text: question, maxNewTokens: 200, ignoreEos: true });
      await reply[Symbol.asyncIterator]().next();
      const panic = await settle(loaded.__testPanic('deliberate test panic'));
      const pending = await settle(reply.result);
      const laterSend = await settle(chat.send({ text: question }).result);
      const laterChat = await settle(loaded.chat());
      loaded.dispose();

      const again = await LlavaModel.load(model, { cache: false, compileKernels: false });
      const answer = await (await again.chat()).send({ text: question, maxNewTokens: 16, ignoreEos: true }).result;
      again.dispose();
      return { panic, pending, laterSend, laterChat, tokens: [...answer.tokens] };
    },
    { model: MODEL, question: TEXT_ONLY.question },
  );
  const expected = /^llava-webgpu crashed \(a bug, please report it\): panicked at crates\/web\/src\/bindings\.rs:\d+:\d+:\ndeliberate test panic; the model must be reloaded \(LlavaModel\.load\)$/;
  for (const what of ['panic', 'pending', 'laterSend', 'laterChat']) {
    assert.equal(outcome[what].isError, true, `${what}: ${JSON.stringify(outcome[what])}`);
    assert.match(outcome[what].message, expected, what);
  }
  assert.deepEqual(outcome.tokens, TEXT_ONLY.greedy_tokens);
  // The only problems reported are the panic itself (logged to the console as a bug report).
  const unexpected = browser.problems.filter((p) => !p.includes('deliberate test panic'));
  assert.deepEqual(unexpected, []);
});

test('a GPU device lost mid-answer ends it with an Error saying so, and the model loads again', { timeout: SLOW }, async () => {
  const outcome = await browser.page.evaluate(
    async ({ model, question }) => {
      const { LlavaModel } = await import('/pkg/index.js');
      const settle = (promise) =>
        promise.then(
          (r) => ({ stopReason: r.stopReason, tokens: r.tokens.length }),
          (e) => ({ isError: e instanceof Error, message: e.message }),
        );
      // Kernels compile on first use: the turns here are text only.
      const loaded = await LlavaModel.load(model, { cache: false, compileKernels: false });
      const chat = await loaded.chat();
      const reply = chat.send({ text: question, maxNewTokens: 200, ignoreEos: true });
      await reply[Symbol.asyncIterator]().next();
      await loaded.__testLoseDevice();
      const pending = await settle(reply.result);
      const later = await settle(chat.send({ text: question }).result);
      loaded.dispose();

      const again = await LlavaModel.load(model, { cache: false, compileKernels: false });
      const answer = await (await again.chat()).send({ text: question, maxNewTokens: 16, ignoreEos: true }).result;
      again.dispose();
      return { pending, later, tokens: [...answer.tokens] };
    },
    { model: MODEL, question: TEXT_ONLY.question },
  );
  for (const what of ['pending', 'later']) {
    assert.equal(outcome[what].isError, true, `${what}: ${JSON.stringify(outcome[what])}`);
    assert.match(outcome[what].message, /^the GPU device was lost: it was destroyed/, what);
  }
  assert.deepEqual(outcome.tokens, TEXT_ONLY.greedy_tokens);
});
