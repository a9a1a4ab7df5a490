// The package as an app gets it: `npm pack` of the repository, installed from the tarball into a
// fresh project (offline: the package has no dependencies). Used by pack.test.js and
// package.test.js.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { repoRoot } from './server.js';

export const NPM = process.platform === 'win32' ? 'npm.cmd' : 'npm';

/** `npm pack` of the repository into `dir`; returns { info (npm's JSON), tarball (its path) }. */
export function pack(dir) {
  const packed = execFileSync(NPM, ['pack', '--json', '--pack-destination', dir], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const [info] = JSON.parse(packed.toString());
  return { info, tarball: path.join(dir, info.filename) };
}

/**
 * Packs the repository and installs the tarball into a new project. Returns { tarball, files
 * (paths in the tarball), project (the app's folder), packageDir (the installed package),
 * remove() }.
 */
export function packAndInstall() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'llava-pack-'));
  try {
    const { info, tarball } = pack(dir);
    const project = path.join(dir, 'app');
    fs.mkdirSync(project);
    fs.writeFileSync(
      path.join(project, 'package.json'),
      JSON.stringify({ name: 'llava-webgpu-app', version: '0.0.0', private: true, type: 'module' }),
    );
    execFileSync(NPM, ['install', '--offline', '--no-audit', '--no-fund', '--ignore-scripts', tarball], {
      cwd: project,
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    return {
      tarball,
      files: info.files.map((f) => f.path).sort(),
      project,
      packageDir: path.join(project, 'node_modules', info.name),
      remove: () => fs.rmSync(dir, { recursive: true, force: true }),
    };
  } catch (e) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}
