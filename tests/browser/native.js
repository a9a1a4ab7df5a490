// The native CLI, the reference the browser tests compare with. `cargo build` runs first in every
// test process (a no-op when the binary is current), so that a stale binary never answers.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import { repoRoot } from './server.js';

let built = false;

/** Runs `llava ARGS...` (release build) in the repository root and returns its stdout. */
export function llava(args) {
  if (!built) {
    execFileSync('cargo', ['build', '--release', '-p', 'llava-cli'], { cwd: repoRoot, stdio: 'inherit' });
    built = true;
  }
  const bin = path.join(repoRoot, 'target/release/llava');
  return execFileSync(bin, args, { cwd: repoRoot, maxBuffer: 1 << 26, stdio: ['ignore', 'pipe', 'inherit'] });
}

/** `llava convert` of the checkpoint folder SOURCE into a fresh OUTPUT (both relative to the
 * repository root) at QUANT, in 1 MiB shards so that even a tiny model spans several; returns
 * the manifest. */
export function convert(source, output, quant) {
  fs.rmSync(path.join(repoRoot, output), { recursive: true, force: true });
  llava(['convert', '--input', source, '--output', output, '--quant', quant, '--shard-mb', '1']);
  return JSON.parse(fs.readFileSync(path.join(repoRoot, output, 'manifest.json'), 'utf8'));
}
