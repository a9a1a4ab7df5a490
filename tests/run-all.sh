#!/usr/bin/env bash
# Runs every test of the project; `.ci/run` installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== native tests (wgpu on $(command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | grep -m1 deviceName | sed 's/.*= //' || echo 'default adapter'))"
cargo test --workspace

echo "== wasm build (pkg/)"
tests/build-wasm.sh
echo "== browser tests (headless Chromium, WebGPU)"
node --test tests/browser/

# Optional: FUZZ_SECONDS=30 tests/run-all.sh also fuzzes each target briefly (needs nightly and
# cargo-fuzz); the corpus itself is replayed by `cargo test` above.
if [ -n "${FUZZ_SECONDS:-}" ]; then
  echo "== fuzzing (${FUZZ_SECONDS}s per target)"
  tests/fuzz.sh "$FUZZ_SECONDS"
fi
