// Chats survive every per-turn error through the package API, as natively
// (crates/model/tests/hostile_chat.rs): after an over-long message, a bad image, a typed
// `<image>`, a second image, or a cancelled turn, the next question gets the answer transformers
// gives for the conversation as it stands (tests/fixtures/expected/mistral-tiny.json).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { repoRoot } from './server.js';

const MODEL = '/tests/fixtures/models/mistral-tiny/';
const CASES = JSON.parse(fs.readFileSync(path.join(repoRoot, 'tests/fixtures/expected/mistral-tiny.json'), 'utf8')).cases;
const MULTI_TURN = CASES.find((c) => c.id === 'multi_turn');
const TEXT_ONLY = CASES.find((c) => c.id === 'text_only');
const SLOW = 900_000;

let browser;
before(async () => {
  browser = await openBrowser();
  browser.page.setDefaultTimeout(SLOW);
  await browser.page.goto(`${browser.url}web/index.html`);
});
after(async () => {
  await browser?.close();
});

/** Runs the conversations in the page; returns every reply's tokens and every error. */
function converse() {
  const turn1 = MULTI_TURN.turn1;
  return browser.page.evaluate(
    async ({ model, image, question1, question2, prompt, answer1, poemQuestion }) => {
      const { LlavaModel } = await import('/pkg/index.js');
      const settle = (reply) =>
        reply.result.then(
          (r) => ({ tokens: [...r.tokens] }),
          (e) => ({ isError: e instanceof Error, message: e.message }),
        );
      // 16 greedy steps without stopping at eos, as the fixtures were generated.
      const greedy16 = { maxNewTokens: 16, ignoreEos: true };
      const bytes = new Uint8Array(await (await fetch(image)).arrayBuffer());
      // Kernels compile on first use: this test is about errors (and SwiftShader compiles
      // the ones a first answer never uses slowly).
      const loaded = await LlavaModel.load(model, { cache: false, compileKernels: false });
      const long = 'sea '.repeat(loaded.info.context);
      const out = {};

      const chat = await loaded.chat();
      out.longFirst = await settle(chat.send({ image: bytes, text: long, ...greedy16 }));
      out.badImage = await settle(chat.send({ image: new Uint8Array([0x89, 0x50, 0x4e, 0x47, 1, 2, 3]), text: question1, ...greedy16 }));
      out.first = await settle(chat.send({ image: bytes, text: question1, ...greedy16 }));
      out.typedImage = await settle(chat.send({ text: 'What is <image> here?', ...greedy16 }));
      out.longFollowUp = await settle(chat.send({ text: long, ...greedy16 }));
      out.secondImage = await settle(chat.send({ image: bytes, text: question2, ...greedy16 }));
      out.followUp = await settle(chat.send({ text: question2, ...greedy16 }));

      // A text-only turn (an image would add minutes on SwiftShader) cancelled after its 5th token,
      // then a follow-up; the reference is a fresh chat given the conversation as it stands as
      // one raw prompt: transformers' rendering of the fixture conversation, without the image
      // and with this question and the cancelled answer.
      const cancelling = await loaded.chat();
      const reply = cancelling.send({ text: poemQuestion, ...greedy16 });
      let streamed = 0;
      for await (const _ of reply) if (++streamed === 5) reply.cancel();
      const cancelled = await reply.result;
      out.cancelled = { tokens: [...cancelled.tokens], stopReason: cancelled.stopReason };
      out.afterCancel = await settle(cancelling.send({ text: question2, ...greedy16 }));
      const raw = prompt.replace(answer1, cancelled.text).replace('<image>\n', '').replace(question1, poemQuestion);
      out.fromScratch = await settle((await loaded.chat()).send({ text: raw, rawPrompt: true, ...greedy16 }));
      loaded.dispose();
      return out;
    },
    {
      model: MODEL,
      image: `/shared/testdata/images/${MULTI_TURN.image}`,
      question1: turn1.question,
      question2: MULTI_TURN.question,
      prompt: MULTI_TURN.prompt,
      answer1: turn1.greedy_text,
      poemQuestion: TEXT_ONLY.question,
    },
  );
}

test('a chat survives each per-turn error and then answers as transformers does', { timeout: SLOW }, async () => {
  assert.ok(MULTI_TURN.prompt.includes(MULTI_TURN.turn1.greedy_text), 'the fixture prompt holds the first answer');
  const out = await converse();
  const refused = (what, pattern) => {
    assert.equal(out[what].isError, true, `${what}: ${JSON.stringify(out[what])}`);
    assert.match(out[what].message, pattern, what);
  };
  refused('longFirst', /the prompt needs \d+ tokens but the context holds \d+/);
  refused('badImage', /PNG|image/i);
  refused('typedImage', /the message contains the text `<image>`/);
  refused('longFollowUp', /the prompt needs \d+ tokens but the context holds \d+/);
  refused('secondImage', /already has an image/);
  // Each refusal left no trace: the first question is answered as the first, the follow-up as
  // the second turn of the fixture conversation.
  assert.deepEqual(out.first.tokens, MULTI_TURN.turn1.greedy_tokens);
  assert.deepEqual(out.followUp.tokens, MULTI_TURN.greedy_tokens);

  // The cancel takes effect after the 5th token or a little later (it crosses to the worker).
  const { tokens, stopReason } = out.cancelled;
  assert.equal(stopReason, 'cancelled');
  assert.ok(tokens.length >= 5 && tokens.length < 16, `${tokens.length} tokens`);
  assert.deepEqual(tokens, TEXT_ONLY.greedy_tokens.slice(0, tokens.length));
  assert.ok(out.afterCancel.tokens, JSON.stringify(out.afterCancel));
  assert.deepEqual(out.afterCancel.tokens, out.fromScratch.tokens);
  assert.deepEqual(browser.problems, []);
});
