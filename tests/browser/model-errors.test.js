// The model API's failures reach the caller as JS Errors with a useful message: a folder without
// config.json and an unknown precision.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';

let browser;
before(async () => {
  browser = await openBrowser();
  await browser.page.goto(`${browser.url}web/index.html`);
});
after(async () => {
  await browser?.close();
});

/** Runs `LlavaModel.load(url, options)` in the page; returns the error as { isError, message }. */
function loadError(url, options) {
  return browser.page.evaluate(
    async ([u, o]) => {
      const { LlavaModel } = await import('/pkg/index.js');
      try {
        await LlavaModel.load(u, o);
        return null;
      } catch (e) {
        return { isError: e instanceof Error, message: e.message };
      }
    },
    [url, options],
  );
}

test('a folder without config.json is an Error naming the file', async () => {
  const error = await loadError('/tests/fixtures/no-such-model/', {});
  assert.equal(error?.isError, true);
  assert.match(error.message, /no-such-model\/config\.json: HTTP 404/);
  // The 404 itself is the only problem the browser reports.
  assert.ok(browser.problems.every((p) => /404/.test(p)), browser.problems.join('\n'));
});

test('an unknown precision is an Error listing the valid ones', async () => {
  const error = await loadError('/tests/fixtures/models/mistral-tiny/', { quant: 'int3' });
  assert.equal(error?.isError, true);
  assert.match(error.message, /unknown quant "int3": use f32, f16, q8 or q4/);
});
