#!/usr/bin/env python3
"""Zero-copy local migration (`--local`) against `shm:` and TCP, same guest
configuration, same run: each repetition migrates a freshly started minivm
guest (memfd-backed memory, built-in self-checking test guest) from a
`livemig vm-migrate` process to a new `livemig vm-incoming` process, once
per mode, in rotating order. Prints medians (and min..max) and writes all
runs as JSON.

    cargo build --release -p livemig-cli
    scripts/bench-local.py --sizes 4G --modes local,shm,tcp --reps 5
    scripts/bench-local.py --sizes 1G,4G,16G --modes local --reps 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "livemig")


def one(mode, size, rate, warmup, tmp):
    """One migration: returns a dict of figures (or raises)."""
    if mode == "local":
        uri = f"unix:{tmp}/local.sock"
    elif mode == "shm":
        uri = f"shm:{tmp}/shm.sock"
    elif mode == "tcp":
        uri = "tcp:127.0.0.1:0"
    else:
        raise ValueError(mode)
    dest_cmd = [BIN, "vm-incoming", uri, "-m", size, "--seconds", "1", "--json", "--announce"]
    src_extra = ["--memfd"]
    if mode == "local":
        dest_cmd.append("--local")
        src_extra = ["--local"]
    dest = subprocess.Popen(dest_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = dest.stdout.readline().strip()
        if not line:
            raise RuntimeError("destination did not start: " + dest.stderr.read())
        src_cmd = [BIN, "vm-migrate", line, "-m", size, "--dirty-rate", rate,
                   "--warmup", str(warmup), "--json"] + src_extra
        src = subprocess.run(src_cmd, capture_output=True, text=True, timeout=600)
        out, err = dest.communicate(timeout=120)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    if src.returncode != 0:
        raise RuntimeError(f"{mode} source failed: {src.stderr[-2000:]}")
    if dest.returncode != 0:
        raise RuntimeError(f"{mode} destination failed: {err[-2000:]}")
    s = json.loads(src.stdout.strip().splitlines()[-1])
    d = json.loads(out.strip().splitlines()[-1])
    if mode == "local":
        downtime = s["downtime-us"] / 1000.0
        source_downtime = s["source-downtime-us"] / 1000.0
        socket = s["socket-bytes"]["out"] + s["socket-bytes"]["in"]
    else:
        downtime = float(s["downtime"])
        source_downtime = float(s.get("source-downtime", s["downtime"]))
        socket = s["ram"]["transferred"]
    return {
        "mode": mode,
        "size": size,
        "downtime_ms": downtime,
        "source_downtime_ms": source_downtime,
        "total_ms": s["total-time"],
        "socket_bytes": socket,
        "src_self_check": s["guest"]["self-check"],
        "dst_self_check": d["guest"]["self-check"],
        "dst_pages_advanced": d["guest"]["pages-written"] - d["guest"]["pages-written-before"],
    }


def fmt_bytes(n):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4G")
    ap.add_argument("--modes", default="local,shm,tcp")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rate", default="64M", help="guest dirty rate (all vCPUs)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="write all runs as JSON here")
    a = ap.parse_args()
    modes = a.modes.split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="livemig-local-") as tmp:
        for size in a.sizes.split(","):
            for rep in range(a.reps):
                order = modes[rep % len(modes):] + modes[:rep % len(modes)]
                for mode in order:
                    r = one(mode, size, a.rate, a.warmup, tmp)
                    r["rep"] = rep
                    runs.append(r)
                    print(f"{size} {mode} rep {rep}: downtime {r['downtime_ms']:.2f} ms, "
                          f"total {r['total_ms']} ms, socket {fmt_bytes(r['socket_bytes'])}, "
                          f"self-check {r['src_self_check']}/{r['dst_self_check']}",
                          file=sys.stderr, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(runs, f, indent=1)
    print(f"| guest | mode | downtime ms, median (min..max) | source's view ms | total ms | through the socket | self-check src/dst |")
    print("|---|---|---|---|---|---|---|")
    for size in a.sizes.split(","):
        for mode in modes:
            rs = [r for r in runs if r["size"] == size and r["mode"] == mode]
            if not rs:
                continue
            dt = [r["downtime_ms"] for r in rs]
            sd = [r["source_downtime_ms"] for r in rs]
            tt = [r["total_ms"] for r in rs]
            sb = [r["socket_bytes"] for r in rs]
            ok = sum(r["src_self_check"] == "passed" and r["dst_self_check"] == "passed"
                     and r["dst_pages_advanced"] > 0 for r in rs)
            print(f"| {size} | {mode} | {statistics.median(dt):.2f} ({min(dt):.2f}..{max(dt):.2f}) "
                  f"| {statistics.median(sd):.2f} | {statistics.median(tt):.0f} "
                  f"| {fmt_bytes(statistics.median(sb))} | {ok}/{len(rs)} passed |")


if __name__ == "__main__":
    main()
