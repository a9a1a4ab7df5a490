#!/usr/bin/env bash
# The GPU measurements the kernel work is judged by, as one script for a lent GPU machine (the
# `device` tool: no network there, x86-64, a few minutes in all).
#   tests/gpu-check.sh prepare   here: builds `llava` and the kernel bench, fetches the Vulkan
#                                loader, puts them in .device/ (git-ignored through .git/info/exclude)
#   tests/gpu-check.sh run       there, with `.device` carried: the kernel bench (both GEMM tiles,
#                                the attention and decode kernels also without subgroups, and
#                                without the GEMV's pairs of units or its Q4 table) and `llava bench` at
#                                the 7B geometry (q4 and f16 weights, f16 KV),
#                                each step under its own time limit, each table saved under $OUT
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    cargo build --release -p llava-cli
    kernels=$(cargo bench -p llava-gpu --bench kernels --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    rm -rf .device && mkdir -p .device/gl
    cp target/release/llava "$kernels" .device/
    mv .device/"$(basename "$kernels")" .device/kernels
    apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    mkdir -p /tmp/amd64/partial
    apt-get "${apt_opts[@]}" update -qq
    (cd .device/gl && apt-get "${apt_opts[@]}" download libvulkan1)
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qsx "/.device/" "$exclude" || echo "/.device/" >>"$exclude"
    du -sh .device
    ;;
run)
    for deb in .device/gl/*.deb; do dpkg -x "$deb" /; done
    ldconfig
    icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    [ -f "$icd" ] && export VK_DRIVER_FILES=$icd
    out=${OUT:-/tmp/gpu-check}
    mkdir -p "$out"
    # step NAME SECONDS COMMAND...: a step that fails or runs out of time does not stop the rest.
    step() {
        local name=$1 limit=$2
        shift 2
        echo "== $name: $*"
        timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" || echo "== $name: exit $?"
    }
    step kernels-wide 150 env LLAVA_WIDE_GEMM=1 .device/kernels --bench --only gemm,fused,gemv,attention,decode
    step kernels-narrow 70 env LLAVA_WIDE_GEMM=0 .device/kernels --bench --only gemm,fused
    step kernels-no-subgroups 40 env LLAVA_NO_SUBGROUPS=1 .device/kernels --bench --only attention,decode
    step kernels-no-pairs 35 env LLAVA_GEMV_PAIRS=0 .device/kernels --bench --only decode
    step kernels-no-q4-table 35 env LLAVA_Q4_TABLE=0 .device/kernels --bench --only decode
    step bench-q4 150 .device/llava bench --shape mistral-7b --quant q4 --kv f16
    step bench-f16 120 .device/llava bench --shape mistral-7b --quant f16 --kv f16
    ;;
*)
    echo "usage: tests/gpu-check.sh prepare|run" >&2
    exit 2
    ;;
esac
