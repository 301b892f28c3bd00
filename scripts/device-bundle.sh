#!/usr/bin/env bash
# Builds, here, everything the GPU machine runs (it has no Rust): test, example and bench
# binaries, with kernels compiled by nvcc for the default list, plus a second gpu-test binary
# built for sm_80 only (to exercise the JIT repair of a missing arch). Output: .carry/
# The test binaries are built with the switches the GPU machine satisfies (a GPU, libnvrtc), so
# its tests run without --include-ignored; every cargo call here takes the same features, so
# the library and its kernels are built once for all of them.
# Usage: NVCC=/path/to/nvcc scripts/device-bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NVCC:?set NVCC to a CUDA 13.0 nvcc}"
out=.carry
rm -rf "$out" && mkdir -p "$out"
# Cargo's messages go to a log (stdout carries the JSON); on a failed build, show its end.
log=target/device-bundle.log
mkdir -p target && : > "$log"
trap 'rc=$?; [ $rc -eq 0 ] || { echo "device-bundle: build failed; the end of $log:"; tail -n 40 "$log"; }' EXIT
pick() { # cargo json messages -> executables of the named targets
  python3 -c '
import json, sys
want = set(sys.argv[1].split(","))
kind = sys.argv[2] if len(sys.argv) > 2 else None
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in want \
            and (kind is None or kind in m["target"]["kind"]):
        print(m["target"]["name"], m["executable"])' "$@"
}
export NVCC ATTN_DENY_SPILLS=1 ATTN_REQUIRE_NVCC=1
features=(--features gpu-tests,nvrtc-tests)
# cudarc picks its bindings from the nvcc on PATH: the device's driver is CUDA 13.0, like it.
export PATH="$(dirname "$NVCC"):$PATH"
# The anchors script lives beside the checkout (../shared), or where SHARED points.
shared="${SHARED:-$(cd .. && pwd)/shared}"
if [ -n "${QUICK:-}" ]; then
  # Iterating on a kernel: the gpu tests and the bench, built for sm_90a only, in a target of
  # their own (a different arch list would rebuild the main target's kernels).
  export ATTN_CUDA_ARCH_LIST=9.0a CARGO_TARGET_DIR=target/quick
  cargo test --release --no-run "${features[@]}" --test gpu --test gpu_mem_efficient --test gpu_decode --test gpu_append --message-format=json 2>>"$log" |
    pick gpu,gpu_mem_efficient,gpu_decode,gpu_append | while read -r name exe; do cp "$exe" "$out/test-$name"; done
  cargo bench --no-run "${features[@]}" --message-format=json 2>>"$log" | pick attention bench |
    while read -r name exe; do cp "$exe" "$out/bench"; done
  cargo bench --no-run "${features[@]}" --message-format=json 2>>"$log" | pick decode bench |
    while read -r name exe; do cp "$exe" "$out/bench-decode"; done
  cp "$shared/anchors/torch_sdpa.py" "$out/"
  strip "$out"/test-* "$out"/bench 2>>"$log" || true
  ls -la "$out"; exit 0
fi
cargo test --release --no-run "${features[@]}" --message-format=json 2>>"$log" | pick gpu,jit,gpu_mem_efficient,gpu_hardening,gpu_decode,gpu_multi,gpu_append |
  while read -r name exe; do cp "$exe" "$out/test-$name"; done
cargo build --release "${features[@]}" --bin attention-doctor --message-format=json 2>>"$log" | pick attention-doctor |
  while read -r name exe; do cp "$exe" "$out/doctor"; done
cargo bench --no-run "${features[@]}" --message-format=json 2>>"$log" | pick attention bench |
  while read -r name exe; do cp "$exe" "$out/bench"; done
cargo bench --no-run "${features[@]}" --message-format=json 2>>"$log" | pick decode bench |
  while read -r name exe; do cp "$exe" "$out/bench-decode"; done
ATTN_CUDA_ARCH_LIST=8.0 CARGO_TARGET_DIR=target/sm80 cargo test --release --no-run "${features[@]}" --test gpu --message-format=json 2>>"$log" |
  pick gpu | while read -r name exe; do cp "$exe" "$out/test-gpu-sm80"; done
cp "$shared/anchors/torch_sdpa.py" "$out/"
strip "$out"/test-* "$out"/doctor "$out"/bench* 2>>"$log" || true
# CANDLE=1: also the candle-cuda test and example (.carry/candle/; needs ~20 min the first time).
if [ -n "${CANDLE:-}" ]; then
  bash scripts/candle-cuda-build.sh >>"$log" 2>&1  # CUDA_VENV: the venv holding $NVCC
  cp scripts/candle-cuda-run.sh "$out/"
fi
ls -la "$out"; du -sh "$out"
