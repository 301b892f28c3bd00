#!/usr/bin/env python3
"""The CPU backend beside PyTorch's CPU scaled_dot_product_attention, shape by shape, in one run.

For each thread count, each shape is timed with our criterion bench (`benches/attention.rs`, group
`cpu`, with ATTN_CPU_THREADS=n) and then with torch (torch.set_num_threads(n)), alternately, so
both see the same machine load. Decode shapes (one query token, GQA 32/8, d128, 4k-32k cache) are
reported with the K/V read rate beside the streaming read bandwidth measured by the same bench.

    python3 -m venv /tmp/torchcpu && /tmp/torchcpu/bin/pip install torch
    /tmp/torchcpu/bin/python scripts/cpu_vs_torch.py --threads 1,2 [--filter bf16/d64]

--quick: the issue's table in about three minutes on a 16-core machine: threads 1, 2 and 16 (those
above the machine's core count skipped; --threads overrides), prefill bf16 at every shape (b=1,
16 heads, seq 512/1024/2048, d64/d128, causal on and off) and f16/f32 at seq1024, decode (bf16 GQA
32/8 d128, one token) over 4k/16k/32k caches heads-first, seq-major and paged (16-key pages), with
torch timed once per shape and thread count (its decode gets the heads-first cache whatever ours
reads). On a machine without cargo (the GPU host):

    ATTN_BENCH_EXE=/path/to/attention-<hash> python3 scripts/cpu_vs_torch.py --quick --budget 280

(--budget: stop starting rows after that many seconds and print the table so far; each row's
JSON line also gives both sides' wall time, which shows where a slow machine spends it.)

Prints a markdown table; --json FILE also writes the raw numbers. Where there is no cargo, set
ATTN_BENCH_EXE to a built `attention` bench binary (`cargo bench --bench attention --no-run`
prints its path; it takes criterion's arguments and a regex over `cpu/...` ids).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def prefill_shapes(dtypes, seqs=(512, 1024, 2048)):
    for dt in dtypes:
        for d in (64, 128):
            for causal in (False, True):
                for seq in seqs:
                    yield dict(kind="prefill", dtype=dt, d=d, causal=causal, seq=seq,
                               id=f"{dt}/d{d}/{'causal' if causal else 'full'}/seq{seq}")


def decode_shapes(caches):
    # Ours three times: heads-first cache (as torch gets it), seq-major ([1, cache, 8, 128]) and
    # paged (pages [n, 16, 8, 128] through a block table); torch always reads heads-first.
    for suffix in ("", "/seq-major", "/paged16"):
        for cache in caches:
            yield dict(kind="decode", dtype="bf16", d=128, cache=cache, id=f"decode/bf16/gqa32-8/d128/kv{cache}{suffix}")


def flops(s):
    if s["kind"] == "prefill":
        f = 4.0 * 16 * s["seq"] * s["seq"] * s["d"]
        return f / 2 if s["causal"] else f
    return 4.0 * 32 * s["cache"] * s["d"]


def kv_bytes(s):
    return 2 * s["cache"] * 8 * s["d"] * torch.tensor([], dtype=DTYPES[s["dtype"]]).element_size()


def bench_binary():
    # A machine without cargo (the GPU machine) names a prebuilt bench binary instead.
    if os.environ.get("ATTN_BENCH_EXE"):
        return os.environ["ATTN_BENCH_EXE"]
    out = subprocess.run(["cargo", "bench", "--bench", "attention", "--no-run", "--message-format=json"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "attention" \
                and "bench" in msg["target"]["kind"] and msg.get("executable"):
            return msg["executable"]
    sys.exit("could not find the bench executable")


WARM = [0.3]  # warm-up seconds per shape and side (0.2 with --quick)
UNIT = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def ours(exe, bench_id, threads, secs):
    env = dict(os.environ, ATTN_CPU_THREADS=str(threads), ATTN_BENCH_SKIP_GPU="1")
    dt = bench_id.split("/")[1] if bench_id.startswith("decode/") else bench_id.split("/")[0]
    env["ATTN_BENCH_CPU_DTYPES"] = dt if dt in DTYPES else "bf16"
    r = subprocess.run([exe, "--bench", "--noplot", "--measurement-time", str(secs), "--warm-up-time", str(WARM[0]),
                        "--sample-size", "10", f"^cpu/{re.escape(bench_id)}$"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", r.stdout)
    if not m:
        sys.exit(f"no timing for {bench_id}:\n{r.stdout}\n{r.stderr}")
    return float(m.group(1)) * UNIT[m.group(2)]


_TORCH_KV = {}


def torch_time(s, secs):
    dt = DTYPES[s["dtype"]]
    g = torch.Generator().manual_seed(0)
    if s["kind"] == "prefill":
        shape = (1, 16, s["seq"], s["d"])
        q, k, v = (torch.rand(shape, generator=g).mul(2).sub(1).to(dt) for _ in range(3))
        call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=s["causal"])
    else:
        q = torch.rand((1, 32, 1, s["d"]), generator=g).to(dt)
        # As in our bench: several cache copies, together beyond the last-level cache.
        copies = max(1, min(16, -(-(512 << 20) // kv_bytes(s))))
        key = (s["dtype"], s["cache"], s["d"])
        if key not in _TORCH_KV:  # made once per cache size: 512 MiB of random numbers is slow
            _TORCH_KV.clear()
            _TORCH_KV[key] = [(torch.rand((1, 8, s["cache"], s["d"]), generator=g).to(dt),
                               torch.rand((1, 8, s["cache"], s["d"]), generator=g).to(dt)) for _ in range(copies)]
        kvs = _TORCH_KV[key]
        it = [0]

        def call():
            k, v = kvs[it[0] % copies]
            it[0] += 1
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < WARM[0]:
            call()
        times = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < secs or len(times) < 10:
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", help="thread counts, comma-separated (default 1,2; --quick: 1,2,16)")
    ap.add_argument("--dtypes", default="bf16,f16,f32")
    ap.add_argument("--decode", help="decode cache lengths (default 4096,8192,16384,32768; --quick: 4096,16384,32768)")
    ap.add_argument("--secs", type=float, help="measuring time per shape and side (default 1.5; --quick: 0.4)")
    ap.add_argument("--filter", default="")
    ap.add_argument("--quick", action="store_true",
                    help="threads 1,2,16 (up to the core count), bf16 prefill at all shapes, f16/f32 at seq1024, decode 4k/16k/32k")
    ap.add_argument("--json")
    ap.add_argument("--budget", type=float,
                    help="seconds: stop starting new rows after this long and print the table of those done "
                         "(for a device call with a time limit)")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = [int(t) for t in (a.threads or ("1,2,16" if a.quick else "1,2")).split(",")]
    if a.quick and not a.threads:
        threads = [n for n in threads if n <= cores] or [1]
    caches = [int(c) for c in (a.decode or ("4096,16384,32768" if a.quick else "4096,8192,16384,32768")).split(",") if c]
    secs = a.secs or (0.4 if a.quick else 1.5)
    if a.quick:
        WARM[0] = 0.2
    exe = bench_binary()
    dtypes = a.dtypes.split(",")
    if a.quick:
        # Every shape in the first dtype (bf16), seq1024 alone in the others.
        shapes = list(prefill_shapes(dtypes[:1])) + list(prefill_shapes(dtypes[1:], seqs=(1024,)))
    else:
        shapes = list(prefill_shapes(dtypes))
    shapes += list(decode_shapes(caches))
    shapes = [s for s in shapes if a.filter in s["id"]]
    rows = []
    start = time.perf_counter()
    spent = lambda: a.budget is not None and time.perf_counter() - start > a.budget
    for n in threads:
        if spent():
            break
        torch.set_num_threads(n)
        bw = None
        if any(s["kind"] == "decode" for s in shapes):
            bw = (256 << 20) / ours(exe, "read_bandwidth/256MiB", n, secs)
        torch_done = {}  # torch decode reads the same heads-first cache for all three of ours
        for s in shapes:
            if spent():
                print(f"budget of {a.budget:.0f} s spent: {len(rows)} rows done", file=sys.stderr, flush=True)
                break
            # Each side's wall time per row (process start, inputs, warm-up and measuring) beside
            # its result, so a slow machine shows where the time goes.
            t0 = time.perf_counter()
            t_ours = ours(exe, s["id"], n, secs)
            ours_wall = time.perf_counter() - t0
            tkey = (s["kind"], s["dtype"], s["d"], s.get("causal"), s.get("seq"), s.get("cache"))
            t0 = time.perf_counter()
            if tkey not in torch_done:
                torch_done[tkey] = torch_time(s, secs)
            torch_wall = time.perf_counter() - t0
            t_torch = torch_done[tkey]
            row = dict(threads=n, id=s["id"], ours_s=t_ours, torch_s=t_torch, ratio=t_torch / t_ours,
                       ours_wall_s=round(ours_wall, 1), torch_wall_s=round(torch_wall, 1))
            if s["kind"] == "prefill":
                row.update(ours_gflops=flops(s) / t_ours / 1e9, torch_gflops=flops(s) / t_torch / 1e9)
            else:
                row.update(ours_gbs=kv_bytes(s) / t_ours / 1e9, torch_gbs=kv_bytes(s) / t_torch / 1e9,
                           read_bw_gbs=bw / 1e9)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {cores} cores, "
          f"bench {exe}, {time.perf_counter() - start:.0f} s")
    print("| threads | shape | ours | torch | ours/torch |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "ours_gflops" in r:
            print(f"| {r['threads']} | {r['id']} | {r['ours_gflops']:.1f} GFLOP/s | {r['torch_gflops']:.1f} GFLOP/s | {r['ratio']:.2f}× |")
        else:
            print(f"| {r['threads']} | {r['id']} | {r['ours_s']*1e6:.0f} µs, {r['ours_gbs']:.1f} GB/s "
                  f"({100*r['ours_gbs']/r['read_bw_gbs']:.0f}% of {r['read_bw_gbs']:.1f} GB/s read) | "
                  f"{r['torch_s']*1e6:.0f} µs, {r['torch_gbs']:.1f} GB/s "
                  f"({100*r['torch_gbs']/r['read_bw_gbs']:.0f}%) | {r['ratio']:.2f}× |")
    worst = [r for r in rows if r["ratio"] < 1.0]
    print(f"\n{len(rows) - len(worst)} of {len(rows)} rows at or above torch"
          + (f"; lowest {min(r['ratio'] for r in rows):.2f}× ({min(rows, key=lambda r: r['ratio'])['id']}, "
             f"{min(rows, key=lambda r: r['ratio'])['threads']} threads)" if rows else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
