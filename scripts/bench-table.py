#!/usr/bin/env python3
"""Joins criterion bench logs with the anchors' JSON into one markdown table (TFLOP/s).

Usage: scripts/bench-table.py anchors.json 'label=bench.log[:group-prefix]' ...
Each bench log contributes one column: the median throughput of every id
`<backend>/<device>/<dtype>/d<D>/<full|causal>/seq<S>` whose group starts with the prefix.
"""
import json, re, sys

UNITS = {"elem/s": 1e0, "Kelem/s": 1e3, "Melem/s": 1e6, "Gelem/s": 1e9, "Telem/s": 1e12}


def parse(path, prefix):
    out, current = {}, None
    for line in open(path, errors="replace"):
        m = re.match(r"^(\S+/\S+/(\w+)/d(\d+)/(full|causal)/seq(\d+))", line)
        if m:
            current = m if m.group(1).startswith(prefix) else None
        t = re.search(r"thrpt:\s+\[\s*\S+ \S+\s+(\S+) (\S+)\s+\S+ \S+\s*\]", line)
        if t and current:
            key = (current.group(2), int(current.group(3)), current.group(4) == "causal", int(current.group(5)))
            out[key] = float(t.group(1)) * UNITS[t.group(2)] / 1e12
            current = None
    return out


anchors = json.load(open(sys.argv[1]))
cols = []
for arg in sys.argv[2:]:
    label, spec = arg.split("=", 1)
    path, _, prefix = spec.partition(":")
    cols.append((label, parse(path, prefix)))
torch = {}
for r in anchors["prefill"]:
    dt = {"float16": "f16", "bfloat16": "bf16"}[r["dtype"]]
    torch[(dt, r["d"], r["causal"], r["seq"])] = r
first = cols[0][0]
hdr = ["dtype", "d", "causal", "seq"] + [c[0] for c in cols] + ["torch flash", "torch cudnn", "torch efficient"]
hdr += [f"{first} / torch flash", f"{first} / torch efficient"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
keys = sorted(set().union(*[c[1].keys() for c in cols]), key=lambda k: (k[0] != "bf16", k[1], k[2], k[3]))
f = lambda x: "-" if x is None else f"{x:.0f}"
for k in keys:
    t = torch.get(k, {})
    vals = [c[1].get(k) for c in cols]
    ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}"
    row = [k[0], str(k[1]), "yes" if k[2] else "no", str(k[3])] + [f(v) for v in vals]
    row += [f(t.get("flash")), f(t.get("cudnn")), f(t.get("efficient"))]
    row += [ratio(vals[0], t.get("flash")), ratio(vals[0], t.get("efficient"))]
    print("| " + " | ".join(row) + " |")
