#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with .carry/candle/ from
# scripts/candle-cuda-build.sh: the candle-cuda test binary (all tests, the CUDA ones included)
# and the candle_kv_cache example on GPU 0. Exits non-zero if either fails (or cannot start).
#
# The binaries are linked (no rpath) against libcuda.so.1, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libnvrtc.so.13 and libcudart.so.13 (libcublas needs libcublasLt.so.13): this
# finds each in the CUDA toolkit, the system, or PyTorch's nvidia wheels (python3 -c 'import
# nvidia'), and puts its directory on LD_LIBRARY_PATH; the driver's libcuda where ld.so finds it.
set -uo pipefail
cd "$(dirname "$0")/.."
c=.carry/candle
echo "==== candle-cuda: $(pwd)/$c"
ls -la "$c" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "(nvidia-smi failed)"
ldd --version 2>&1 | head -n1

# Candidate library directories, best first: the toolkit, the system, PyTorch's wheels.
# ATTN_CUDA_LIB_DIRS (colon-separated) is searched first.
dirs=()
IFS=: read -r -a extra <<< "${ATTN_CUDA_LIB_DIRS:-}"
for d in "${extra[@]}"; do [ -d "$d" ] && dirs+=("$d"); done
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
         /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu \
         /usr/lib64 /usr/lib/wsl/lib; do
  [ -d "$d" ] && dirs+=("$d")
done
for py in python3 python; do
  nv=$("$py" -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null) || continue
  echo "python nvidia wheels ($py): $nv"
  [ -d "$nv/cu13/lib" ] && dirs+=("$nv/cu13/lib")
  for d in "$nv"/*/lib; do [ -d "$d" ] && [ "$d" != "$nv/cu13/lib" ] && dirs+=("$d"); done
  break
done
[ -n "${nv:-}" ] || echo "(no python nvidia package found: only the toolkit and system directories are searched)"

# The ld.so cache, read once (grep -q on a pipe could end ldconfig by SIGPIPE: pipefail).
ldcache=$( { $(command -v ldconfig || echo /sbin/ldconfig) -p; } 2>/dev/null || true)
ld_path=()
add_dir() {
  local d
  for d in "${ld_path[@]}"; do [ "$d" = "$1" ] && return; done
  ld_path+=("$1")
}
missing=0
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  found=""
  # The driver's libcuda where the loader already finds it (not through LD_LIBRARY_PATH, which
  # would put the system directory ahead of the CUDA ones).
  if [ "$lib" = libcuda.so.1 ] && grep -q " $lib " <<< "$ldcache"; then
    echo "found $lib in the ld.so cache: $(grep " $lib " <<< "$ldcache" | head -n1)"
    continue
  fi
  for d in "${dirs[@]}"; do
    if [ -e "$d/$lib" ]; then found="$d/$lib"; break; fi
  done
  if [ -n "$found" ]; then
    echo "found $lib: $found -> $(readlink -f "$found")"
    case "$found" in *stubs*) echo "  warning: $found looks like a link-time stub, not a library that runs" ;; esac
    add_dir "$(dirname "$found")"
  elif grep -q " $lib " <<< "$ldcache"; then
    echo "found $lib in the ld.so cache: $(grep " $lib " <<< "$ldcache" | head -n1)"
  else
    echo "MISSING $lib (searched: ${dirs[*]} and the ld.so cache)"
    missing=1
  fi
done
if [ ${#ld_path[@]} -gt 0 ]; then
  export LD_LIBRARY_PATH="$(IFS=:; echo "${ld_path[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
export ATTN_CACHE_DIR=${ATTN_CACHE_DIR:-/tmp/attn-cache} RUST_BACKTRACE=${RUST_BACKTRACE:-1}

status=0
for b in test-candle candle_kv_cache; do
  echo "---- ldd $c/$b"
  if [ ! -x "$c/$b" ]; then echo "MISSING binary $c/$b"; status=1; continue; fi
  ldd "$c/$b" 2>&1 | sed 's/^/  /'
  if ldd "$c/$b" 2>&1 | grep -q 'not found'; then echo "  (some libraries are not found: the run below will fail)"; fi
done
[ $missing -eq 0 ] || echo "warning: some CUDA libraries were not found; running anyway for the diagnostics"

run() {
  local name=$1; shift
  echo; echo "==== $name: $*"
  local start=$(date +%s)
  "$@" 2>&1
  local rc=$?
  echo "rc=$rc ($name, $(( $(date +%s) - start )) s)"
  [ $rc -eq 0 ] || status=1
}
[ -x "$c/test-candle" ] && run test-candle "$c/test-candle" --test-threads=1
[ -x "$c/candle_kv_cache" ] && run candle_kv_cache "$c/candle_kv_cache" --cuda
echo; echo "candle-cuda: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
