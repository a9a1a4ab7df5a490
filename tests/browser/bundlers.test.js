// The package in the apps most people build: examples/vite and examples/webpack, each copied to a
// fresh folder, given the `npm pack` tarball and its bundler from the npm registry (cached in
// target/npm-cache), built in production mode, and the built folder served alone. In headless
// Chromium the app asks the bundled tiny model about assets/sample.jpg and gets the native
// CLI's tokens (`llava run --json`).
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { llava } from './native.js';
import { NPM, pack } from './pack.js';
import { repoRoot } from './server.js';

const MODEL = 'tests/fixtures/models/mistral-tiny';
const IMAGE = 'assets/sample.jpg';
const QUESTION = 'What is in this picture?';
const MAX_NEW_TOKENS = 4;
// npm installs from the registry, then the image prefill on SwiftShader.
const SLOW = 900_000;

let work;
let tarball;
let want;
before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'llava-bundlers-'));
  ({ tarball } = pack(work));
  const args = ['run', '--json', '--model', MODEL, '--image', IMAGE, '--prompt', QUESTION];
  want = JSON.parse(llava([...args, '--max-new-tokens', String(MAX_NEW_TOKENS)]).toString());
});
after(() => fs.rmSync(work, { recursive: true, force: true }));

/** Copies examples/NAME, installs the tarball and its devDependencies, builds; returns the output folder. */
function build(name) {
  const app = path.join(work, name);
  fs.cpSync(path.join(repoRoot, 'examples', name), app, {
    recursive: true,
    filter: (src) => !/node_modules|dist/.test(path.relative(repoRoot, src)),
  });
  const npm = (args) =>
    execFileSync(NPM, [...args, '--no-audit', '--no-fund', '--cache', path.join(repoRoot, 'target/npm-cache')], {
      cwd: app,
      stdio: ['ignore', 'inherit', 'inherit'],
    });
  npm(['install', tarball]);
  npm(['run', 'build']);
  const dist = path.join(app, 'dist');
  // What the app serves besides itself: the model folder and the picture.
  fs.symlinkSync(path.join(repoRoot, MODEL), path.join(dist, 'model'), 'dir');
  fs.copyFileSync(path.join(repoRoot, IMAGE), path.join(dist, 'sample.jpg'));
  return dist;
}

/** The built app's answer, through its own `ask`. */
async function answer(dist) {
  const browser = await openBrowser({ root: dist });
  try {
    const { page } = browser;
    page.setDefaultTimeout(SLOW);
    await page.goto(browser.url);
    await page.waitForFunction(() => window.example);
    const got = await page.evaluate(
      async ({ question, maxNewTokens }) => {
        const image = new Uint8Array(await (await fetch('/sample.jpg')).arrayBuffer());
        return window.example.ask({ model: '/model/', image, question, maxNewTokens });
      },
      { question: QUESTION, maxNewTokens: MAX_NEW_TOKENS },
    );
    return { got, problems: browser.problems };
  } finally {
    await browser.close();
  }
}

/** The package's files, as the bundler emitted them (names are hashed: match by extension). */
function emitted(dist) {
  const files = fs.readdirSync(dist, { recursive: true }).map(String);
  return { wasm: files.filter((f) => f.endsWith('.wasm')), js: files.filter((f) => f.endsWith('.js')) };
}

for (const name of ['vite', 'webpack']) {
  test(`examples/${name}: the production build answers as the CLI does`, { timeout: SLOW }, async () => {
    assert.ok(want.tokens.length > 0);
    const dist = build(name);
    const { wasm, js } = emitted(dist);
    assert.equal(wasm.length, 1, `one .wasm emitted: ${wasm}`);
    // The page's bundle and the worker's are separate files.
    assert.ok(js.length >= 2, `${js}`);
    const { got, problems } = await answer(dist);
    assert.deepEqual(got.tokens, want.tokens);
    assert.equal(got.text, want.text);
    assert.deepEqual(problems, []);
  });
}
