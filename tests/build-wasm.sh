#!/usr/bin/env bash
# Builds the browser package: crates/web -> wasm32 -> wasm-bindgen (ES module + .d.ts) -> wasm-opt,
# written to pkg/wasm/, apart from the hand-written pkg/index.js, pkg/worker.js, pkg/cache.js and
# pkg/index.d.ts.
# Needs: rustup target wasm32-unknown-unknown, wasm-bindgen-cli 0.2.130, `npm ci` (binaryen).
set -euo pipefail
cd "$(dirname "$0")/.."

bindgen_version=0.2.130 # must equal the `wasm-bindgen = "=..."` pin in crates/web/Cargo.toml
bindgen=$(command -v wasm-bindgen || echo "$HOME/.cargo/bin/wasm-bindgen")
if [[ "$("$bindgen" --version 2>/dev/null)" != "wasm-bindgen $bindgen_version" ]]; then
  echo "error: wasm-bindgen $bindgen_version is required: cargo install wasm-bindgen-cli --version $bindgen_version" >&2
  exit 1
fi
wasm_opt=node_modules/.bin/wasm-opt
if [[ ! -x $wasm_opt ]]; then
  echo "error: $wasm_opt is missing: run npm ci" >&2
  exit 1
fi

cargo build -p llava-web --release --target wasm32-unknown-unknown
"$bindgen" target/wasm32-unknown-unknown/release/llava_web.wasm --target web --typescript --out-dir pkg/wasm
# The features rustc enables by default for wasm32 (all in every browser with WebGPU).
"$wasm_opt" -O2 \
  --enable-bulk-memory --enable-bulk-memory-opt --enable-nontrapping-float-to-int --enable-sign-ext \
  --enable-mutable-globals --enable-reference-types --enable-multivalue \
  pkg/wasm/llava_web_bg.wasm -o pkg/wasm/llava_web_bg.wasm
ls -l pkg/wasm/llava_web_bg.wasm | awk '{ printf "pkg/wasm/llava_web_bg.wasm: %.1f MiB\n", $5 / 1048576 }'
