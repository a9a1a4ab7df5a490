// `npm pack` produces an installable package: the tarball holds every file that the package's
// modules import (followed from the entry point, wasm included) and the types; installed into a
// fresh project, `import('llava-webgpu')` resolves through `exports` and gives every export that
// pkg/index.d.ts declares.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { packAndInstall } from './pack.js';
import { repoRoot } from './server.js';

const manifest = JSON.parse(fs.readFileSync(path.join(repoRoot, 'package.json'), 'utf8'));

// Relative module and asset references: import/export ... from, bare import, import(), and
// `new URL(..., import.meta.url)` (the worker, the wasm).
const REFERENCES = [
  /\b(?:import|export)\b[^'"`;]*?\bfrom\s*['"]([^'"]+)['"]/g,
  /\bimport\s*['"]([^'"]+)['"]/g,
  /\bimport\(\s*['"]([^'"]+)['"]\s*\)/g,
  /\bnew URL\(\s*['"]([^'"]+)['"]\s*,\s*import\.meta\.url\s*\)/g,
];

/** Package-relative paths of the files `file` refers to (relative references only). */
function references(packageDir, file) {
  const text = fs.readFileSync(path.join(packageDir, file), 'utf8');
  const found = new Set();
  for (const pattern of REFERENCES) {
    for (const [, specifier] of text.matchAll(pattern)) {
      if (/^[a-z][a-z0-9+.-]*:/i.test(specifier) || !/^\.\.?\/|^[\w.-]+\.\w+$/.test(specifier)) continue;
      found.add(path.posix.normalize(path.posix.join(path.posix.dirname(file), specifier)));
    }
  }
  return [...found];
}

/** Every file reachable from `entries` through relative references in .js files. */
function closure(packageDir, entries) {
  const seen = new Set();
  const queue = [...entries];
  while (queue.length) {
    const file = queue.pop();
    if (seen.has(file)) continue;
    seen.add(file);
    if (file.endsWith('.js') && fs.existsSync(path.join(packageDir, file))) queue.push(...references(packageDir, file));
  }
  return [...seen].sort();
}

/** Names declared as exports by a module's text (`export function|class|const|interface|type`). */
function declaredExports(text, kinds) {
  const pattern = new RegExp(`^export\\s+(?:declare\\s+)?(?:async\\s+)?(?:${kinds})\\s+(\\w+)`, 'gm');
  return [...text.matchAll(pattern)].map((m) => m[1]).sort();
}

let pack;
before(() => {
  if (!fs.existsSync(path.join(repoRoot, 'pkg/wasm/llava_web_bg.wasm'))) {
    throw new Error('pkg/ is not built: run `npm run build` (tests/build-wasm.sh) first');
  }
  pack = packAndInstall();
});
after(() => pack?.remove());

test('the package has no dependencies, so it installs offline', () => {
  assert.deepEqual(manifest.dependencies ?? {}, {});
  assert.deepEqual(manifest.peerDependencies ?? {}, {});
});

test('the tarball holds everything the entry point loads, and the types', () => {
  const entry = manifest.exports['.'];
  const entries = [entry.default, entry.types, manifest.types].map((p) => path.posix.normalize(p));
  const needed = closure(pack.packageDir, entries);
  // The worker, the generated bindings and the wasm are among them (found, not assumed).
  for (const file of ['pkg/index.js', 'pkg/index.d.ts', 'pkg/worker.js', 'pkg/cache.js', 'pkg/wasm/llava_web.js', 'pkg/wasm/llava_web_bg.wasm']) {
    assert.ok(needed.includes(file), `${file} is not reached from the entry point: ${needed.join(', ')}`);
  }
  const missing = needed.filter((f) => !pack.files.includes(f));
  assert.deepEqual(missing, [], `missing from the tarball (package.json "files"): ${missing.join(', ')}`);
  // Installed, the files are really there and the wasm is whole.
  for (const file of needed) assert.ok(fs.existsSync(path.join(pack.packageDir, file)), file);
  assert.equal(
    fs.statSync(path.join(pack.packageDir, 'pkg/wasm/llava_web_bg.wasm')).size,
    fs.statSync(path.join(repoRoot, 'pkg/wasm/llava_web_bg.wasm')).size,
  );
});

test('the tarball holds nothing but the package', () => {
  const stray = pack.files.filter((f) => !f.startsWith('pkg/') && !/^(package\.json|README\.md|LICENSE[-\w.]*)$/i.test(f));
  assert.deepEqual(stray, []);
});

test("installed, import('llava-webgpu') resolves through exports and has every declared export", () => {
  const script = `
    const resolved = import.meta.resolve('llava-webgpu');
    const module = await import('llava-webgpu');
    console.log(JSON.stringify({
      resolved,
      exports: Object.keys(module).sort(),
      clearCache: typeof module.LlavaModel.clearCache,
    }));`;
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
    cwd: pack.project,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const { resolved, exports, clearCache } = JSON.parse(out.toString());
  assert.equal(resolved, new URL(`file://${path.join(pack.packageDir, 'pkg/index.js')}`).href);
  const js = fs.readFileSync(path.join(pack.packageDir, 'pkg/index.js'), 'utf8');
  const types = fs.readFileSync(path.join(pack.packageDir, 'pkg/index.d.ts'), 'utf8');
  assert.deepEqual(exports, declaredExports(js, 'function|class|const|let'));
  assert.deepEqual(exports, declaredExports(types, 'function|class|const|let'));
  assert.equal(clearCache, 'function');
});
