// The native CLI, the reference the browser tests compare with. `cargo build` runs first in every
// test process (a no-op when the binary is current), so that a stale binary never answers.
import { execFileSync } from 'node:child_process';
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
