#!/usr/bin/env bash
# Builds, here (no GPU, no driver, no cuBLAS/cuRAND), the `candle-cuda` binaries the GPU machine
# runs: the test binary of tests/candle.rs and the example candle_kv_cache, for sm_90 (H200).
# Output: .carry/candle/test-candle and .carry/candle/candle_kv_cache; run them there with
# scripts/candle-cuda-run.sh.
#
# candle-core's `cuda` feature turns on cudarc's `dynamic-linking`, and candle-kernels links
# libcudart: the binaries are linked against libcuda, libnvrtc, libcurand, libcublas, libcublasLt
# and libcudart. This machine has the real libnvrtc/libcudart (the pinned CUDA 13.0 wheels in the
# venv) but no libcuda (no driver) and no cuBLAS/cuRAND, so those three are link-time stubs:
# every function cudarc's bindings declare, returning an error code, under the SONAME the real
# library has on the device (libcuda.so.1, libcublas.so.13, libcublasLt.so.13, libcurand.so.10).
# The binaries record only the SONAMEs (no rpath): at run time the device's real libraries are
# found through LD_LIBRARY_PATH. Here, with LD_LIBRARY_PATH=<target>/stubs:<venv cu13/lib>, the
# binaries start and the stub libcuda's cuInit fails, so everything runs on the CPU.
#
# Usage: scripts/candle-cuda-build.sh   (CUDA_VENV: the venv with nvidia-cuda-nvcc 13.0;
#        default target/ci-cuda-venv, the one .ci/run makes)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

venv="${CUDA_VENV:-$root/target/ci-cuda-venv}"
[ -n "$venv" ] && [ -x "$venv/bin/python" ] || { echo "candle-cuda-build: no CUDA venv (set CUDA_VENV)"; exit 1; }
cu13=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export NVCC="$cu13/bin/nvcc"
test -x "$NVCC" || { echo "candle-cuda-build: nvcc not found at $NVCC"; exit 1; }
for f in libnvrtc.so.13 libcudart.so.13; do
  test -e "$cu13/lib/$f" || { echo "candle-cuda-build: $cu13/lib/$f missing"; exit 1; }
done

# candle-kernels (cudaforge) and cudarc's version detection run the nvcc on PATH; our build.rs
# takes NVCC. The device is an H200 with a CUDA 13.0 driver.
export PATH="$cu13/bin:$PATH"
export CUDA_COMPUTE_CAP=90 ATTN_CUDA_ARCH_LIST=9.0a CUDARC_CUDA_VERSION=13000 ATTN_REQUIRE_NVCC=1
export CARGO_TARGET_DIR="$root/target/candle-cuda"
stubs="$CARGO_TARGET_DIR/stubs"
mkdir -p "$stubs"
log="$CARGO_TARGET_DIR/candle-cuda-build.log"
: > "$log"
trap 'rc=$?; [ $rc -eq 0 ] || { echo "candle-cuda-build: failed (rc $rc); the end of $log:"; tail -n 40 "$log"; }' EXIT

# --- link-time stubs -------------------------------------------------------------------------
cudarc_dir=$(cargo metadata --format-version 1 --features candle-cuda 2>>"$log" | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
echo "cudarc sources: $cudarc_dir"
# stub <module> <soname> <link name> <return code>: a shared library exporting every function
# declared in an `extern "C"` block of cudarc's src/<module>/sys/mod.rs (all versions' bindings).
stub() {
  local module=$1 soname=$2 link=$3 rc=$4 src="$stubs/$1_stub.c"
  {
    echo "/* Link-time stub for $soname, generated from cudarc's $module bindings. Not for running on a GPU. */"
    awk '/extern "C" \{/ { grab = 1; next }
         grab && match($0, /^[ \t]*(pub )?fn [A-Za-z0-9_]+\(/) {
           s = substr($0, RSTART, RLENGTH); sub(/^[ \t]*(pub )?fn /, "", s); sub(/\($/, "", s); print s }
         { grab = 0 }' "$cudarc_dir/src/$module/sys/mod.rs" | sort -u |
      while read -r fn; do echo "int $fn(void) { return $rc; }"; done
  } > "$src"
  local n
  n=$(grep -c '^int ' "$src")
  [ "$n" -gt 10 ] || { echo "candle-cuda-build: only $n functions found for $module in $cudarc_dir"; exit 1; }
  cc -shared -fPIC -O1 -Wl,-soname,"$soname" -o "$stubs/$soname" "$src"
  ln -sf "$soname" "$stubs/$link"
  echo "stub $stubs/$soname: $n functions, returns $rc"
}
# CUDA_ERROR_STUB_LIBRARY (34), CUBLAS_STATUS_NOT_INITIALIZED (1), CURAND_STATUS_NOT_INITIALIZED (101)
stub driver libcuda.so.1 libcuda.so 34
stub cublas libcublas.so.13 libcublas.so 1
stub cublaslt libcublasLt.so.13 libcublasLt.so 1
stub curand libcurand.so.10 libcurand.so 101
# The real NVRTC and CUDA runtime of the pinned 13.0 wheels (the device's PyTorch wheels have the
# same SONAMEs): links only, no rpath.
ln -sf "$cu13/lib/libnvrtc.so.13" "$stubs/libnvrtc.so"
ln -sf "$cu13/lib/libcudart.so.13" "$stubs/libcudart.so"
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$stubs"

# --- build -------------------------------------------------------------------------------------
pick() { # cargo json messages -> executable of the named target
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
start=$(date +%s)
echo "building (log: $log) ..."
# gpu-tests un-ignores the CUDA tests; the example takes it too, so the crate is built once.
test_exe=$(cargo test --release --no-run --features candle-cuda,gpu-tests --test candle --message-format=json 2>>"$log" | pick candle)
example_exe=$(cargo build --release --features candle-cuda,gpu-tests --example candle_kv_cache --message-format=json 2>>"$log" | pick candle_kv_cache)
echo "built in $(( $(date +%s) - start )) s"
[ -n "$test_exe" ] && [ -x "$test_exe" ] || { echo "candle-cuda-build: no test executable"; exit 1; }
[ -n "$example_exe" ] && [ -x "$example_exe" ] || { echo "candle-cuda-build: no example executable"; exit 1; }
grep -E '^warning: (attention|candle|cudarc)' "$log" | sort | uniq -c || true

out=.carry/candle
rm -rf "$out" && mkdir -p "$out"
cp "$test_exe" "$out/test-candle"
cp "$example_exe" "$out/candle_kv_cache"
# Not stripped (symbols add ~1.5 MB): a panic's backtrace on the device names its functions.
for b in "$out/test-candle" "$out/candle_kv_cache"; do
  echo "$b NEEDED:"
  readelf -d "$b" | grep -E 'NEEDED|RPATH|RUNPATH' | sed 's/^/  /'
done
ls -la "$out"
