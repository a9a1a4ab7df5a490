// Images in the browser go through the same Rust decoder and AnyRes preprocessing as natively:
// files picked in a real <input type=file>, bytes, ImageData, canvases and bitmaps, compared with
// transformers' outputs in tests/fixtures/preprocess.json.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openBrowser } from './harness.js';
import { repoRoot } from './server.js';

const fixtures = JSON.parse(fs.readFileSync(path.join(repoRoot, 'tests/fixtures/preprocess.json'), 'utf8'));
const imagesDir = path.join(repoRoot, '../shared/testdata/images');
const FIELDS = ['width', 'height', 'best_resolution', 'grid', 'num_patches', 'image_tokens', 'rgb_sha256', 'pixels_sha256'];

function fixture(name) {
  const entry = fixtures.find((f) => f.name === name);
  assert.ok(entry, `no fixture named ${name}`);
  return entry;
}

/** The fixture's summary of `name`, as the page reports it when asked for no pixel samples. */
function expected(name) {
  return Object.fromEntries(FIELDS.map((k) => [k, fixture(name)[k]]));
}

function expectedSummary(name) {
  return { samples: [], ...expected(name) };
}

/** A file's result in the browser: decoded and preprocessed bit-exactly like transformers. */
function checkFile(name, { samples, ...got }) {
  assert.deepEqual(samples, fixture(name).samples, name);
  assert.deepEqual(got, expected(name), name);
}

let browser;
before(async () => {
  browser = await openBrowser();
  await browser.page.goto(`${browser.url}tests/browser/pages/image.html`);
  await browser.page.waitForFunction(() => window.ready);
});
after(async () => {
  await browser?.close();
});

test('files from the file input (PNG and JPEG) are bit-exact with transformers', async () => {
  const { page, problems } = browser;
  const names = fs.readdirSync(imagesDir).filter((n) => fixtures.some((f) => f.name === n)).sort();
  assert.ok(names.length >= 5, `test images in ${imagesDir}: ${names}`);
  await page.setInputFiles('#file', names.map((n) => path.join(imagesDir, n)));
  const samples = Object.fromEntries(names.map((n) => [n, fixture(n).samples.map(([i]) => i)]));
  const got = await page.evaluate((s) => window.imageTest.files(s), samples);
  assert.deepEqual(Object.keys(got).sort(), names);
  for (const name of names) checkFile(name, got[name]);
  assert.deepEqual(problems, []);
});

test('encoded bytes (ArrayBuffer, Uint8Array) give the same result as the file', async () => {
  const { page, problems } = browser;
  await page.setInputFiles('#file', path.join(imagesDir, 'grace_hopper.jpg'));
  const file = await page.evaluate(() => window.imageTest.files());
  for (const kind of ['buffer', 'bytes']) {
    assert.deepEqual(await page.evaluate((k) => window.imageTest.fileAs(k), kind), file['grace_hopper.jpg'], kind);
  }
  assert.deepEqual(problems, []);
});

test('ImageData with alpha matches the synthetic RGBA fixtures', async () => {
  const { page, problems } = browser;
  for (const [w, h] of [[37, 53], [800, 600]]) {
    const got = await page.evaluate(([w, h]) => window.imageTest.syntheticRgba(w, h), [w, h]);
    assert.deepEqual(got, expectedSummary(`synthetic_RGBA_${w}x${h}`));
  }
  assert.deepEqual(problems, []);
});

test('a canvas and an ImageBitmap give the pixels that were drawn', async () => {
  const { page, problems } = browser;
  const got = await page.evaluate(() => window.imageTest.drawn(24, 6));
  // Opaque pixels of the synthetic pattern are exactly synthetic_RGB_24x6.
  assert.deepEqual(got.imageData, expectedSummary('synthetic_RGB_24x6'));
  assert.deepEqual(got.canvas, got.imageData);
  assert.deepEqual(got.bitmap, got.imageData);
  assert.deepEqual(problems, []);
});

test('bad images and options are rejected with clear Errors', async () => {
  const { page } = browser;
  const garbage = await page.evaluate(() => window.imageTest.error('garbage'));
  assert.equal(garbage?.isError, true);
  assert.match(garbage.message, /image|format|decode/i);
  const options = await page.evaluate(() => window.imageTest.error('options'));
  assert.equal(options?.isError, true);
  assert.match(options.message, /30|tile|patch/i);
  const type = await page.evaluate(() => window.imageTest.error('type'));
  assert.equal(type?.isError, true);
  assert.match(type.message, /unsupported image type/);
});
