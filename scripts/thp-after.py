#!/usr/bin/env python3
"""The guest's speed on a migration's destination, over time, and how much
of its memory is on transparent huge pages (AnonHugePages in
/proc/PID/smaps_rollup), for several destination builds or flags in the
same run (interleaved, run by run).

Each run starts a source minivm (always the same binary, `--source`),
lets its guest warm up, measures the guest's speed there, migrates it over
loopback TCP to a destination minivm started with one of the `--dest`
configurations, and samples the destination every `--period` seconds for
`--seconds` seconds: the guest's progress and AnonHugePages.

Guests:
- `inc`: the harness's incrementer boot sector (bench/guests/incrementer.bin,
  32-bit ring 0: the host emulates it) over [1 MiB, --mem): speed in
  passes per second, from the ',' marks it prints every 16 MiB.
- `stride`: scripts/thp-stride.S (assembled into a flat image at run
  time with binutils), long mode ring 3, natively run: increments one byte
  of every 4 KiB page of [2 MiB, --mem) and prints '.' per pass; one
  byte per page makes it bound by address translation (the TLB), the
  guest that huge pages help most. Speed in passes per second.
- `ring3`: minivm's built-in ring-3 test guest (runs natively) at
  `--dirty-rate 0` (as fast as it can): speed in MiB/s of pages written,
  from minivm's once-a-second status line.

    cargo build --release -p minivm
    scripts/thp-after.py --guest inc --mem 1G --seconds 60 --reps 3 \\
        --dest branch=target/release/minivm \\
        --dest huge=/tmp/base10/release/minivm \\
        --dest 4k=target/release/minivm:--no-huge-pages

Prints a table per configuration (speed in windows of --window seconds
after the resume, medians over runs) and writes every sample as JSON
(--json PATH).
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from qmp_client import Qmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = 16 << 20
FIRST = 0x10_0000


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def sector(end, n=1, seed=1):
    with open(os.path.join(ROOT, "bench", "guests", "incrementer.bin"), "rb") as f:
        s = bytearray(f.read())
    assert len(s) == 512 and s[510:] == b"\x55\xaa"
    s[0x1F0:0x1FC] = end.to_bytes(4, "little") + seed.to_bytes(4, "little") + n.to_bytes(4, "little")
    return bytes(s)


def stride_image(tmp, end):
    """Assembles scripts/thp-stride.S with its end address set to `end`."""
    src = os.path.join(ROOT, "scripts", "thp-stride.S")
    with open(src) as f:
        text = f.read().replace(".quad 0x20000000", f".quad {end:#x}")
    s, o, b = f"{tmp}/stride.S", f"{tmp}/stride.o", f"{tmp}/stride.bin"
    with open(s, "w") as f:
        f.write(text)
    subprocess.run(["as", "--64", "-o", o, s], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x1000", "-e", "0x1000",
                    "--oformat", "binary", "-o", b, o], check=True)
    return b


def inc_position(serial, rng):
    """The incrementer's position in passes from its serial output."""
    try:
        with open(serial, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    passes = data.count(b".")
    last_dot = data.rfind(b".")
    chunks = data[last_dot + 1:].count(b",") if last_dot >= 0 else data.count(b",")
    return passes + min(chunks * MARK, rng) / rng


def anon_huge_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def thread_cpu(pid, name_prefix):
    """CPU seconds of the threads of `pid` whose name starts with the prefix."""
    total = 0.0
    tck = os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    st = f.read()
            except FileNotFoundError:
                continue
            name = st[st.index("(") + 1:st.rindex(")")]
            if name.startswith(name_prefix):
                fields = st[st.rindex(")") + 2:].split()
                total += (int(fields[11]) + int(fields[12])) / tck
    except FileNotFoundError:
        return None
    return total


class Progress:
    """The guest's progress, read from a serial file (inc) or minivm's
    status lines on stderr (ring3)."""

    def __init__(self, guest, serial, log, rng):
        self.guest, self.serial, self.log, self.rng = guest, serial, log, rng

    def now(self):
        if self.guest in ("inc", "stride"):
            return inc_position(self.serial, self.rng)
        # ring3: the last "pages_written=N" in the log, in MiB.
        try:
            with open(self.log) as f:
                m = re.findall(r"pages_written=(\d+)", f.read())
        except FileNotFoundError:
            return None
        return int(m[-1]) * 4096 / (1 << 20) if m else None


def wait(pred, timeout, what):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def speed_over(prog, secs, pid):
    """Progress per second and per vCPU CPU second over `secs` seconds."""
    p0, c0, t0 = prog.now(), thread_cpu(pid, "vcpu"), time.time()
    time.sleep(secs)
    p1, c1, t1 = prog.now(), thread_cpu(pid, "vcpu"), time.time()
    return (p1 - p0) / (t1 - t0), ((p1 - p0) / (c1 - c0) if c1 > c0 else None)


def one(args, label, dest_bin, dest_flags, tmp):
    mem = args.mem
    mem_bytes = int(mem[:-1]) << {"M": 20, "G": 30}[mem[-1]]
    rng = mem_bytes - FIRST
    d_sock, s_sock = f"{tmp}/d.sock", f"{tmp}/s.sock"
    d_ser, s_ser = f"{tmp}/d.serial", f"{tmp}/s.serial"
    d_log, s_log = f"{tmp}/d.log", f"{tmp}/s.log"
    for p in (d_sock, s_sock, d_ser, s_ser):
        if os.path.exists(p):
            os.unlink(p)
    procs = []
    try:
        dcmd = [dest_bin, "run", "--incoming", "--no-progress-check", "--mem", mem,
                "--vcpus", "1", "--seconds", str(args.seconds + 5), "--control", d_sock,
                "--serial", d_ser] + dest_flags
        scmd = [args.source, "run", "--mem", mem, "--vcpus", "1", "--control", s_sock,
                "--serial", s_ser]
        if args.guest == "inc":
            sec = f"{tmp}/sector.bin"
            with open(sec, "wb") as f:
                f.write(sector(mem_bytes))
            scmd += ["--boot-sector", sec]
        elif args.guest == "stride":
            scmd += ["--flat", stride_image(tmp, mem_bytes), "--mode", "long-ring3"]
        else:
            scmd += ["--dirty-rate", "0"]
        dst = subprocess.Popen(dcmd, stdout=subprocess.DEVNULL, stderr=open(d_log, "w"))
        procs.append(dst)
        src = subprocess.Popen(scmd, stdout=subprocess.DEVNULL, stderr=open(s_log, "w"))
        procs.append(src)
        sprog = Progress(args.guest, s_ser, s_log, rng)
        dprog = Progress(args.guest, d_ser, d_log, rng)
        if args.guest in ("inc", "stride"):
            # Whole passes first: every page touched.
            wait(lambda: (sprog.now() or 0) >= 2.0, 300, "the source guest's first passes")
        else:
            wait(lambda: sprog.now() is not None, 60, "the source guest's status")
            time.sleep(2)
        before, before_cpu = speed_over(sprog, args.before, src.pid)
        dq, sq = Qmp(d_sock), Qmp(s_sock)
        uri = f"tcp:127.0.0.1:{free_port()}"
        dq.cmd("migrate-incoming", {"uri": uri})
        t_mig = time.time()
        sq.cmd("migrate", {"uri": uri})
        q = {}
        while True:
            try:
                q = sq.cmd("query-migrate")
            except (RuntimeError, OSError):
                break  # the source exits once completed
            if q.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        if q.get("status") not in (None, "completed"):
            raise RuntimeError(f"migration {q.get('status')}: {q.get('error-desc')}")
        sq.close()
        # The destination runs the guest once it answers "running".
        wait(lambda: dq.cmd("query-status").get("status") == "running", 60,
             "the destination to run the guest")
        t_res = time.time()
        dq.close()
        samples = []
        p_prev, t_prev = dprog.now(), t_res
        while time.time() - t_res < args.seconds:
            time.sleep(args.period)
            t = time.time()
            p = dprog.now()
            samples.append({
                "t": round(t - t_res, 3),
                "pos": p,
                "anon_huge_kb": anon_huge_kb(dst.pid),
                "rss_kb": rss_kb(dst.pid),
                "collapse_cpu_s": thread_cpu(dst.pid, "thp-collapse"),
                "vcpu_cpu_s": thread_cpu(dst.pid, "vcpu"),
            })
            p_prev, t_prev = p, t
        time.sleep(0.2)
        with open(d_log) as f:
            collapse = [ln.strip() for ln in f if ln.startswith("huge pages:")]
        return {"label": label, "collapse": collapse[-1] if collapse else None,
                "before": before, "before_cpu": before_cpu, "migrate_s": t_res - t_mig,
                "total_ms": q.get("total-time"), "downtime_ms": q.get("downtime"),
                "samples": samples}
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def windows(run, width, seconds, per="t"):
    """Speed per window of `width` seconds after the resume, per wall
    second (`per` "t") or per vCPU CPU second ("vcpu_cpu_s"); None where
    the samples do not cover it. The first window starts at the first
    sample."""
    s = [x for x in run["samples"] if x["pos"] is not None and x[per] is not None]
    out = []
    for i in range(int(seconds // width)):
        lo, hi = i * width, (i + 1) * width
        a = [x for x in s if x["t"] <= lo + 1e-9] or s[:1]
        b = [x for x in s if x["t"] <= hi + 1e-9]
        if not a or not b or b[-1][per] <= a[-1][per]:
            out.append(None)
            continue
        out.append((b[-1]["pos"] - a[-1]["pos"]) / (b[-1][per] - a[-1][per]))
    return out


def huge_at(run, t):
    xs = [x for x in run["samples"] if x["t"] <= t + 1e-9 and x["anon_huge_kb"] is not None]
    return xs[-1]["anon_huge_kb"] // 1024 if xs else None


def main():
    # SIGTERM ends the runs the way Ctrl-C does: the minivm processes are
    # stopped on the way out.
    import signal
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", choices=["inc", "stride", "ring3"], default="inc")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--seconds", type=int, default=60, help="sampling time after the resume")
    ap.add_argument("--before", type=float, default=4.0, help="seconds the source speed is measured")
    ap.add_argument("--period", type=float, default=0.5)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--source", default=os.path.join(ROOT, "target", "release", "minivm"))
    ap.add_argument("--dest", action="append", required=True,
                    help="LABEL=BINARY[:FLAG,FLAG...] (repeatable)")
    ap.add_argument("--json", help="write all runs here")
    args = ap.parse_args()
    dests = []
    for d in args.dest:
        label, rest = d.split("=", 1)
        binary, _, flags = rest.partition(":")
        dests.append((label, binary, [f for f in flags.split(",") if f]))
    runs = []
    with tempfile.TemporaryDirectory(prefix="thp-after-") as tmp:
        for rep in range(args.reps):
            order = dests[rep % len(dests):] + dests[:rep % len(dests)]
            for label, binary, flags in order:
                load = os.getloadavg()[0]
                try:
                    r = one(args, label, binary, flags, tmp)
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    print(f"{label} run {rep + 1}: FAILED: {e}", file=sys.stderr)
                    continue
                r["load"] = load
                r["rep"] = rep + 1
                runs.append(r)
                w = windows(r, args.window, args.seconds)
                wc = windows(r, args.window, args.seconds, "vcpu_cpu_s")
                bc = r["before_cpu"] or 0
                print(f"{label} run {rep + 1} (load {load:.1f}): before {r['before']:.3f}/s "
                      f"{bc:.3f}/cpu-s, migration {r['total_ms']} ms, after: "
                      + " ".join("-" if x is None else f"{x:.3f}" for x in w) + " /s; "
                      + " ".join("-" if x is None else f"{x:.3f}" for x in wc) + " /cpu-s"
                      + f"; AnonHugePages MiB at end {huge_at(r, args.seconds)}"
                      + (f"; {r['collapse']}" if r["collapse"] else ""),
                      file=sys.stderr, flush=True)
    unit = "MiB/s" if args.guest == "ring3" else "passes/s"
    nwin = int(args.seconds // args.window)
    print(f"\nguest {args.guest}, mem {args.mem}, {args.reps} run(s) per destination; "
          f"speed in {unit}, medians (and min-max) per {args.window:g} s window after the resume; "
          f"ratio = after / the source's speed just before, same run")
    hdr = "| destination | before | " + " | ".join(
        f"{i * args.window:g}-{(i + 1) * args.window:g} s" for i in range(nwin)) + " | AnonHugePages MiB at " + \
        ", ".join(f"{t:g}" for t in [args.window, args.seconds / 2, args.seconds]) + " s |"
    print(hdr)
    print("|" + "---|" * (nwin + 3))
    for label, _, _ in dests:
        rs = [r for r in runs if r["label"] == label]
        if not rs:
            print(f"| {label} | no run |")
            continue
        for per, key, what in (("t", "before", "per s"), ("vcpu_cpu_s", "before_cpu", "per vCPU CPU s")):
            bs = [r[key] for r in rs if r[key]]
            before = statistics.median(bs) if bs else 0
            cells = []
            for i in range(nwin):
                ratios = []
                for r in rs:
                    w = windows(r, args.window, args.seconds, per)
                    if i < len(w) and w[i] is not None and r[key]:
                        ratios.append(w[i] / r[key])
                if ratios:
                    cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
                else:
                    cells.append("-")
            huge = []
            for t in [args.window, args.seconds / 2, args.seconds]:
                hs = [h for h in (huge_at(r, t) for r in rs) if h is not None]
                huge.append(str(int(statistics.median(hs))) if hs else "-")
            print(f"| {label}, {what} | {before:.3f} | " + " | ".join(cells) + " | " + ", ".join(huge) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
