#!/usr/bin/env python3
"""CI: the `rust-version` in Cargo.toml is true. Every package a user builds (normal and build
dependencies, for the features given, all targets) must declare a rust-version at most ours;
needs only the installed toolchain (`cargo metadata`), not the old one.

usage: ci/msrv.py [cargo metadata feature flags...]   e.g. ci/msrv.py --features candle
"""
import json, subprocess, sys

def ver(s):
    return tuple(int(x) for x in (s.split(".") + ["0", "0"])[:3])

meta = json.loads(subprocess.check_output(
    ["cargo", "metadata", "--format-version", "1", "--locked", *sys.argv[1:]]))
pkgs = {p["id"]: p for p in meta["packages"]}
root = meta["resolve"]["root"]
ours = pkgs[root]["rust_version"]
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
seen, todo = set(), [root]
while todo:
    pid = todo.pop()
    if pid in seen:
        continue
    seen.add(pid)
    for dep in nodes[pid]["deps"]:
        kinds = {k["kind"] for k in dep["dep_kinds"]}
        if kinds & {None, "build"}:
            todo.append(dep["pkg"])
worst = sorted(((ver(pkgs[p]["rust_version"] or "0"), pkgs[p]["name"], pkgs[p]["version"], pkgs[p]["rust_version"])
                for p in seen if p != root), reverse=True)
above = [w for w in worst if w[0] > ver(ours)]
print(f"rust-version {ours}; highest among {len(worst)} dependencies: " +
      ", ".join(f"{n} {v} ({r})" for _, n, v, r in worst[:3]))
if above:
    print("dependencies above rust-version " + ours + ": " +
          ", ".join(f"{n} {v} needs {r}" for _, n, v, r in above))
    sys.exit(1)
