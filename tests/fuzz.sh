#!/usr/bin/env bash
# Fuzzes each target in fuzz/ for a bounded time with cargo-fuzz (nightly), growing
# fuzz/corpus/<target>/ with the inputs that reach new code. Crashing inputs land in
# fuzz/artifacts/<target>/: fix the bug, then copy the input into the corpus so that
# `cargo test -p llava-model --test fuzz_corpus` replays it from then on.
#
#   tests/fuzz.sh [seconds per target (default 60)] [target ...]
# Needs: rustup toolchain install nightly; cargo install cargo-fuzz
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
for target in "${targets[@]}"; do
  echo "== $target: ${seconds}s"
  # -max_len bounds one input; -rss_limit_mb catches an input that makes a parser allocate
  # without bound; -timeout one that makes it spin.
  cargo +nightly fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
done
