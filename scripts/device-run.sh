#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with .carry/ from device-bundle.sh:
# every GPU check, the benches and PyTorch's anchors in one call. Logs go to $OUT.
set -uo pipefail
c=.carry
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Each step's full log is kept on the device; all of them are appended to $OUT/all.log as the
# steps finish (one file comes back, and what ran before a timeout is in it).
LOGS=/tmp/attn-logs; mkdir -p "$LOGS"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
  if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; break; fi
done
export ATTN_CACHE_DIR=/tmp/attn-cache RUST_BACKTRACE=1
# STEPS limits the run to some steps (names as in run's first argument), e.g. STEPS="gpu-aot bench".
step() { echo; echo "==== $*"; }
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
status=0
run() {
  local name=$1; shift
  want "$name" || { echo "(skipped: not in STEPS)"; return; }
  echo "---- $name"; "$@" > "$LOGS/$name.log" 2>&1; local rc=$?
  tail -n "${TAIL:-25}" "$LOGS/$name.log"; echo "rc=$rc ($name)"; [ $rc -eq 0 ] || status=1
  { echo "==== $name (rc=$rc)"; cat "$LOGS/$name.log"; } >> "$OUT/all.log"
}
step "device"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
step "doctor"; TAIL=40 run doctor $c/doctor
step "unit tests"; [ -x $c/test-attention ] && run unit $c/test-attention || echo "(not carried: the unit tests run on CI)"
# Several tests at once: the f64 references on the host dominate the run time.
step "gpu tests (AOT build)"; run gpu-aot $c/test-gpu --nocapture --test-threads=${THREADS:-8} ${GPU_FILTER:-}
step "mem_efficient gpu tests"; run gpu-me $c/test-gpu_mem_efficient --nocapture --test-threads=${THREADS:-8}
step "decode gpu tests"; TAIL=20 run gpu-decode $c/test-gpu_decode --nocapture --test-threads=4
step "decode gpu tests as sm_75 (the CUDA-core family)"; TAIL=8 ATTN_EMULATE_ARCH=7.5 run gpu-decode-75 $c/test-gpu_decode --test-threads=4
# The two-GPU tests need a machine with two (the bundle leaves their multi-gpu-tests switch off;
# with it on they fail, never skip, on one): here only the rule for an ordinal past the visible
# count.
step "multi-GPU tests (one GPU: the visible-count rule)"; [ -x $c/test-gpu_multi ] && TAIL=12 run gpu-multi $c/test-gpu_multi --test-threads=1 device_past_the_visible_count || echo "(not carried)"
# --include-ignored here runs the append_bandwidth report as well (a report is ignored with no
# switch: it checks nothing). Everywhere else the bundle's features (gpu-tests, nvrtc-tests)
# un-ignore what the steps select.
step "append gpu tests"; [ -x $c/test-gpu_append ] && TAIL=20 run gpu-append $c/test-gpu_append --include-ignored --nocapture --test-threads=1 || echo "(not carried)"
step "hardening gpu tests"; TAIL=30 run gpu-hard $c/test-gpu_hardening --nocapture --test-threads=1
step "gpu tests (sm_80-only build: JIT repair)"; ATTN_TEST_EXPECT_NO_IMAGE=1 run gpu-sm80 $c/test-gpu-sm80 --nocapture --test-threads=1 build_without
step "jit tests"; run jit $c/test-jit
# API errors are expected here: the raw-pointer test hands the driver a host address on purpose.
step "compute-sanitizer memcheck"; TAIL=8 run memcheck sh -c "compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 $c/test-gpu --test-threads=1 raw_pointers tiny_workspace flash_small malformed_device_seqlens && compute-sanitizer --tool memcheck --error-exitcode 9 $c/test-gpu_mem_efficient --test-threads=1 small_cases && compute-sanitizer --tool memcheck --error-exitcode 9 $c/test-gpu_hardening --test-threads=1 nan_inputs zero_stride && compute-sanitizer --tool memcheck --error-exitcode 9 $c/test-gpu_decode --test-threads=1 small_cases dense_decode && compute-sanitizer --tool memcheck --error-exitcode 9 $c/test-gpu_append --test-threads=1 small_cases out_of_range_device malformed_device_prefix_sums"
step "compute-sanitizer racecheck"; TAIL=8 run racecheck sh -c "compute-sanitizer --tool racecheck --error-exitcode 9 $c/test-gpu --test-threads=1 flash_small && compute-sanitizer --tool racecheck --error-exitcode 9 $c/test-gpu_mem_efficient --test-threads=1 small_cases && compute-sanitizer --tool racecheck --error-exitcode 9 $c/test-gpu_decode --test-threads=1 small_cases && compute-sanitizer --tool racecheck --error-exitcode 9 $c/test-gpu_append --test-threads=1 small_cases_for"
step "candle on CUDA"; [ -x $c/candle/test-candle ] && TAIL=30 run candle bash $c/candle-cuda-run.sh || echo "(not carried: CANDLE=1 scripts/device-bundle.sh)"
step "bench"; TAIL=60 ATTN_BENCH_SKIP_CPU=1 run bench $c/bench --bench ${BENCH_FILTER:-}
step "decode bench"; TAIL=20 run bench-decode $c/bench-decode --bench
step "anchors"; TAIL=60 PYTHONUNBUFFERED=1 run anchors python3 $c/torch_sdpa.py ${ANCHORS_ARGS:-}
exit $status
