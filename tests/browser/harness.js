// Shared set-up of the browser tests: the static server, headless Debian Chromium with WebGPU
// (SwiftShader here) driven by playwright-core, and a record of everything that must fail a test:
// console warnings and errors (from the page and its workers, including the GPU's own
// validation messages, which only reach the DevTools log), `uncapturederror` events and page errors.
// The download cache's own warnings (storage full) are kept apart, for the tests that expect them.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

import { WARNING_PREFIX as CACHE_WARNING_PREFIX } from '../../pkg/cache.js';
import { repoRoot, startServer } from './server.js';

export const sharedDir = path.resolve(repoRoot, '../shared');
export const artifactsDir = path.join(repoRoot, 'tests/browser/artifacts');

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const FLAGS = [
  '--headless=new',
  '--enable-unsafe-webgpu',
  '--no-sandbox',
  '--disable-gpu-sandbox',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
];

// Devices created in the page itself report uncaptured errors here too (workers are covered by
// the DevTools log, where Chromium writes every uncaptured GPU error as a warning).
const WATCH_UNCAPTURED = () => {
  if (!globalThis.GPUAdapter) return;
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = async function (...args) {
    const device = await requestDevice.apply(this, args);
    device.addEventListener('uncapturederror', (e) => console.error(`WebGPU uncapturederror: ${e.error.message}`));
    return device;
  };
};

/**
 * Starts the server (of `root`, default the repository) and a fresh Chromium profile. Returns { page, url, server, problems,
 * cacheWarnings, close }, where `problems` collects every console warning/error, GPU log warning
 * and page error as text, except the download cache's warnings, which go to `cacheWarnings`.
 */
export async function openBrowser({ root = repoRoot } = {}) {
  if (!fs.existsSync(path.join(repoRoot, 'pkg/wasm/llava_web_bg.wasm'))) {
    throw new Error('pkg/ is not built: run `npm run build` (tests/build-wasm.sh) first');
  }
  const { server, url } = await startServer({ root });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'llava-chromium-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: FLAGS,
      viewport: { width: 1200, height: 900 },
    });
  } catch (e) {
    server.close();
    fs.rmSync(profile, { recursive: true, force: true });
    throw e;
  }
  const problems = [];
  const cacheWarnings = [];
  await context.addInitScript(WATCH_UNCAPTURED);
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (m) => {
    if (m.type() === 'warning' && m.text().startsWith(CACHE_WARNING_PREFIX)) cacheWarnings.push(m.text());
    else if (m.type() === 'error' || m.type() === 'warning') problems.push(`console ${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.stack ?? e}`));
  page.on('crash', () => problems.push('page crashed'));
  const cdp = await context.newCDPSession(page);
  cdp.on('Log.entryAdded', ({ entry }) => {
    // Console-API messages of the page already arrive through 'console'; worker messages and
    // the GPU's validation warnings arrive only here.
    if ((entry.level === 'warning' || entry.level === 'error') && entry.source !== 'javascript') {
      problems.push(`${entry.source} ${entry.level}: ${entry.text}`);
    }
  });
  await cdp.send('Log.enable');
  // The shared test data (outside the served repository) appears under /shared/ for the tests.
  await page.route(`${url}shared/**`, (route) => {
    const rel = decodeURIComponent(new URL(route.request().url()).pathname.slice('/shared/'.length));
    const file = path.resolve(sharedDir, rel);
    if (!file.startsWith(sharedDir + path.sep) || !fs.existsSync(file)) return route.fulfill({ status: 404 });
    return route.fulfill({ path: file });
  });
  return {
    page,
    url,
    server,
    problems,
    cacheWarnings,
    async close() {
      await context.close().catch(() => {});
      server.close();
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}
