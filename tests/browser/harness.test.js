// The harness itself: a WebGPU validation error, in the page or in a worker, must be recorded
// as a problem (otherwise the other browser tests could pass over a broken GPU program).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';

let browser;
before(async () => {
  browser = await openBrowser();
});
after(async () => {
  await browser?.close();
});

for (const where of ['page', 'worker']) {
  test(`a WebGPU validation error in the ${where} is caught`, async () => {
    const { page, url, problems } = browser;
    problems.length = 0;
    await page.goto(`${url}tests/browser/pages/gpu-error.html?where=${where}`);
    await page.waitForFunction(() => window.done, null, { timeout: 60_000 });
    // Chromium delivers uncaptured errors asynchronously.
    const deadline = Date.now() + 10_000;
    while (!problems.some((p) => /MapRead/.test(p)) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(
      problems.some((p) => /MapRead/.test(p)),
      `no problem recorded: ${JSON.stringify(problems)}`,
    );
  });
}
