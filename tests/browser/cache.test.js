// The download cache (pkg/cache.js) in Chromium, against a file server of its own that counts
// requests and can cut a download short: a file is fetched once and then served from the Cache
// API; an interrupted, cancelled or short download stores nothing, so the next visit refetches
// only that file; and when storage is full the file still arrives whole, with a warning.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import http from 'node:http';
import { after, before, beforeEach, test } from 'node:test';

import { WARNING_PREFIX } from '../../pkg/cache.js';
import { openBrowser } from './harness.js';

/** Deterministic file contents. */
function pattern(length, seed) {
  const bytes = Buffer.alloc(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 31 + seed * 7 + (i >> 9)) & 255;
  return bytes;
}

const FILES = { 'a.bin': pattern(300_000, 1), 'b.bin': pattern(700_000, 2) };
const described = (name) => ({
  status: 200,
  length: FILES[name].length,
  sha256: createHash('sha256').update(FILES[name]).digest('hex'),
});

// The file server (another origin than the page, as a model host is): requests by path, and
// the files whose next download breaks off halfway. Under /slow/ a file arrives in small pieces.
const requests = new Map();
const breakNext = new Set();
const files = http.createServer((req, res) => {
  const requested = new URL(req.url, 'http://x').pathname.slice(1);
  requests.set(requested, (requests.get(requested) ?? 0) + 1);
  const slow = requested.startsWith('slow/');
  const name = slow ? requested.slice('slow/'.length) : requested;
  const headers = { 'access-control-allow-origin': '*', 'cache-control': 'no-store' };
  const body = FILES[name];
  if (!body) {
    res.writeHead(404, headers);
    return res.end();
  }
  res.writeHead(200, { ...headers, 'content-type': 'application/octet-stream', 'content-length': body.length });
  if (breakNext.delete(name)) return res.write(body.subarray(0, body.length >> 1), () => res.socket.destroy());
  if (!slow) return res.end(body);
  const PIECE = 16 << 10;
  const sendFrom = (offset) => {
    if (offset >= body.length || res.destroyed) return res.end();
    res.write(body.subarray(offset, offset + PIECE));
    setTimeout(() => sendFrom(offset + PIECE), 20);
  };
  sendFrom(0);
});
let filesUrl;
// A cache write that never settles would hang a test: fail it instead.
const LIMIT = { timeout: 60_000 };

let browser;
let cacheCount = 0;
let cacheName;
before(async () => {
  await new Promise((resolve) => files.listen(0, '127.0.0.1', resolve));
  filesUrl = `http://127.0.0.1:${files.address().port}/`;
  browser = await openBrowser();
  await browser.page.goto(`${browser.url}tests/browser/pages/cache.html`);
  await browser.page.waitForFunction(() => window.ready);
});
after(async () => {
  await browser?.close();
  files.close();
});
beforeEach(() => {
  requests.clear();
  breakNext.clear();
  cacheName = `llava-webgpu-test-${++cacheCount}`;
});

function visit(names, options = {}) {
  return browser.page.evaluate(
    ([urls, name, opts]) => window.cacheTest.visit(urls, name, opts),
    [names.map((n) => filesUrl + n), cacheName, options],
  );
}

const counts = () => Object.fromEntries(requests);

test('the first fetch goes to the network, the next visit is answered from the cache', LIMIT, async () => {
  const first = await visit(['a.bin', 'b.bin']);
  assert.deepEqual(first.files, [described('a.bin'), described('b.bin')]);
  assert.deepEqual(first.stored, [filesUrl + 'a.bin', filesUrl + 'b.bin']);
  assert.deepEqual(counts(), { 'a.bin': 1, 'b.bin': 1 });

  const second = await visit(['a.bin', 'b.bin']);
  assert.deepEqual(second.files, [described('a.bin'), described('b.bin')]);
  assert.deepEqual(counts(), { 'a.bin': 1, 'b.bin': 1 }, 'no new requests');
  assert.deepEqual([...first.warnings, ...second.warnings], []);
  assert.deepEqual(browser.problems, []);
});

test('an interrupted download stores nothing; the retry refetches only that file', LIMIT, async () => {
  breakNext.add('b.bin');
  const first = await visit(['a.bin', 'b.bin']);
  assert.deepEqual(first.files[0], described('a.bin'));
  assert.ok(first.files[1].error, `the cut download must fail: ${JSON.stringify(first.files[1])}`);
  assert.deepEqual(first.stored, [filesUrl + 'a.bin']);

  const retry = await visit(['a.bin', 'b.bin']);
  assert.deepEqual(retry.files, [described('a.bin'), described('b.bin')]);
  assert.deepEqual(counts(), { 'a.bin': 1, 'b.bin': 2 });
  assert.deepEqual(retry.stored, [filesUrl + 'a.bin', filesUrl + 'b.bin']);
  assert.deepEqual([...first.warnings, ...retry.warnings], [], 'an interruption is the caller\'s error, not a warning');
  // Chromium reports the cut connection itself, and nothing else.
  assert.ok(browser.problems.every((p) => /ERR_CONTENT_LENGTH_MISMATCH/.test(p)), browser.problems.join('\n'));
  browser.problems.length = 0;
});

test('a download cancelled by the reader stores nothing', LIMIT, async () => {
  const result = await browser.page.evaluate(
    ([url, name]) => window.cacheTest.cancelEarly(url, name),
    [filesUrl + 'slow/b.bin', cacheName],
  );
  assert.ok(result.firstChunk > 0 && result.firstChunk < FILES['b.bin'].length, JSON.stringify(result));
  assert.deepEqual(result.stored, []);
});

test('a body shorter than its Content-Length reaches the caller but is not stored', LIMIT, async () => {
  const result = await visit(['a.bin'], { setup: 'shortBody' });
  assert.equal(result.files[0].length, 1000);
  assert.deepEqual(result.stored, []);
  assert.deepEqual(counts(), {}, 'the injected network answered');
});

test('a 404 is passed through and not stored', LIMIT, async () => {
  const result = await visit(['missing.bin', 'missing.bin']);
  assert.deepEqual(
    result.files.map((f) => f.status),
    [404, 404],
  );
  assert.deepEqual(result.stored, []);
  assert.deepEqual(counts(), { 'missing.bin': 2 });
  assert.ok(browser.problems.every((p) => /404/.test(p)), browser.problems.join('\n'));
  browser.problems.length = 0;
});

test('a full storage (QuotaExceededError) still gives every byte, with one warning', LIMIT, async () => {
  const result = await visit(['a.bin', 'b.bin'], { setup: 'fullStorage' });
  assert.deepEqual(result.files, [described('a.bin'), described('b.bin')]);
  assert.deepEqual(result.stored, []);
  assert.equal(result.warnings.length, 1, result.warnings.join('\n'));
  assert.match(result.warnings[0], /^llava-webgpu cache: storage is full \(while storing a\.bin\); loading without the cache$/);
});

test('too little room by the storage estimate skips the cache, with a warning', LIMIT, async () => {
  const result = await visit(['a.bin'], { setup: 'noRoom' });
  assert.deepEqual(result.files, [described('a.bin')]);
  assert.deepEqual(result.stored, []);
  assert.deepEqual(result.warnings, [
    `${WARNING_PREFIX} storage has no room for a.bin (${FILES['a.bin'].length} bytes); loading without the cache`,
  ]);
});

test('by default the warning goes to the console, told apart from GPU warnings', LIMIT, async () => {
  const result = await visit(['a.bin'], { setup: 'fullStorage', console: true });
  assert.deepEqual(result.files, [described('a.bin')]);
  assert.deepEqual(result.warnings, []);
  assert.equal(browser.cacheWarnings.length, 1, browser.cacheWarnings.join('\n'));
  assert.match(browser.cacheWarnings[0], /^llava-webgpu cache: storage is full/);
  assert.deepEqual(browser.problems, []);
  browser.cacheWarnings.length = 0;
});

test('clearCache deletes the stored files', LIMIT, async () => {
  await visit(['a.bin']);
  const [deleted, stored, deletedAgain] = await browser.page.evaluate(async (name) => {
    const { cache } = window.cacheTest;
    const deleted = await cache.clearCache({ cacheName: name });
    return [deleted, (await caches.keys()).includes(name), await cache.clearCache({ cacheName: name })];
  }, cacheName);
  assert.deepEqual([deleted, stored, deletedAgain], [true, false, false]);
  const again = await visit(['a.bin']);
  assert.deepEqual(again.files, [described('a.bin')]);
  assert.deepEqual(counts(), { 'a.bin': 2 });
});
