// The model crate's tokenizer compiled to wasm (pure-Rust regex backend) gives transformers' ids:
// tests/fixtures/tokenizer_cases.json, run in Chromium.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { repoRoot } from './server.js';

const cases = JSON.parse(fs.readFileSync(path.join(repoRoot, 'tests/fixtures/tokenizer_cases.json'), 'utf8'));

let browser;
before(async () => {
  browser = await openBrowser();
  await browser.page.goto(`${browser.url}tests/browser/pages/tokenizer.html`);
  await browser.page.waitForFunction(() => window.ready);
});
after(async () => {
  await browser?.close();
});

for (const name of [...new Set(cases.map((c) => c.tokenizer))]) {
  test(`${name}: encode and decode match transformers`, async () => {
    const mine = cases.filter((c) => c.tokenizer === name);
    const { vocabSize, out } = await browser.page.evaluate(([n, c]) => window.tokenize(n, c), [name, mine]);
    assert.ok(vocabSize >= 32000, `vocab ${vocabSize}`);
    mine.forEach((c, i) => {
      assert.deepEqual(out[i].ids, c.ids, JSON.stringify(c.text));
      assert.equal(out[i].decoded, c.decoded, JSON.stringify(c.text));
    });
    assert.deepEqual(browser.problems, []);
  });
}

test('a malformed tokenizer.json is an Error, not a trap', async () => {
  const error = await browser.page.evaluate(() => window.badTokenizer());
  assert.equal(error?.isError, true);
  assert.match(error.message, /tokenizer/i);
});
