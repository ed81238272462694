#!/usr/bin/env python3
"""Same-host migration and snapshot files, livemig beside QEMU, same run.

Part "local": an idle guest migrated to a new process on this host, per
memory size: livemig `--local` (memfds handed over), livemig `shm:` and
loopback TCP (pages copied), and QEMU's fastest same-host path, `migrate`
over a Unix socket (QEMU 7.2 has neither cpr-transfer nor mapped-ram).

Part "snapshot": the same idle guests saved to a file and restored:
livemig `vm-migrate file:F --mapped-ram` (guest paused for the save),
`vm-incoming file:F` (eager) and `--lazy`; QEMU `migrate exec:cat > F`
(its 7.2 way to write a file: a live migration into a pipe) and
`migrate-incoming exec:cat F` on a QEMU started with `-incoming defer`.

Guests: livemig's minivm with 1 vCPU running the built-in self-checking
test guest at 1 MiB/s over a 4 MiB working set (memory populated first,
memfd-backed in every livemig mode); QEMU 1 vCPU (`-machine pc -accel
kvm`) booting bench/guests/idle.bin, which halts and touches no memory.
Repetitions rotate the order of the modes. Prints Markdown tables of
medians (min..max) and the load average; writes every run as JSON with
--out.

    cargo build --release -p livemig-cli
    scripts/bench-qemu-local.py --sizes 1G,4G --reps 3
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from qmp_client import Qmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "livemig")
QEMU = "qemu-system-x86_64"
IDLE = os.path.join(ROOT, "bench", "guests", "idle.bin")
GUEST = ["--vcpus", "1", "--dirty-rate", "1M", "--working-set", "4M"]
# Extra flags for the copying livemig modes (shm:, tcp:): --no-verify
# leaves out the memory digest at stop time, which QEMU does not take.
COPY_EXTRA = []


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def size_bytes(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


# ---------------------------------------------------------------- QEMU side


class QemuVm:
    def __init__(self, tmp, name, size, incoming):
        self.qmp_path = os.path.join(tmp, f"{name}.qmp")
        disk = os.path.join(tmp, f"{name}.img")
        shutil.copy(IDLE, disk)
        args = [QEMU, "-machine", "pc", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
                "-m", f"{size_bytes(size) >> 20}M", "-smp", "1", "-nodefaults",
                "-display", "none", "-serial", f"file:{os.path.join(tmp, name + '.serial')}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-drive", f"file={disk},format=raw,if=ide,file.locking=off"]
        if incoming:
            args += ["-incoming", "defer", "-S"]
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.qmp = Qmp(self.qmp_path)

    def fast(self):
        # QEMU's default max-bandwidth is 128 MiB/s: lift it.
        self.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 64 << 30})

    def wait_migration(self, timeout=600):
        t0 = time.time()
        while True:
            q = self.qmp.cmd("query-migrate")
            st = q.get("status")
            if st in ("completed", "failed", "cancelled"):
                if st != "completed":
                    raise RuntimeError(f"QEMU migration {st}: {q}")
                return q
            if time.time() - t0 > timeout:
                raise RuntimeError(f"QEMU migration stuck: {q}")
            time.sleep(0.001)

    def stop(self):
        try:
            self.qmp.cmd("quit")
        except Exception:
            pass
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def qemu_unix(size, tmp):
    src = QemuVm(tmp, "src", size, False)
    dst = QemuVm(tmp, "dst", size, True)
    try:
        time.sleep(1.0)  # let the guest boot and settle into its halt
        uri = f"unix:{tmp}/qemu-mig.sock"
        src.fast()
        dst.qmp.cmd("migrate-incoming", {"uri": uri})
        src.qmp.cmd("migrate", {"uri": uri})
        q = src.wait_migration()
        dst.wait_migration()
        dst.qmp.cmd("cont")
        running = dst.qmp.cmd("query-status")["running"]
        return {
            "downtime_ms": float(q["downtime"]),
            "total_ms": q["total-time"],
            "socket_bytes": q["ram"]["transferred"],
            "ok": running,
        }
    finally:
        src.stop()
        dst.stop()


def qemu_snapshot(size, tmp):
    path = os.path.join(tmp, "qemu.snap")
    src = QemuVm(tmp, "src", size, False)
    try:
        time.sleep(1.0)
        src.fast()
        t0 = time.time()
        src.qmp.cmd("migrate", {"uri": f"exec:cat > {path}"})
        q = src.wait_migration()
        save_wall = (time.time() - t0) * 1000
    finally:
        src.stop()
    file_bytes = os.path.getsize(path)
    disk_bytes = os.stat(path).st_blocks * 512
    dst = QemuVm(tmp, "dst", size, True)
    try:
        t0 = time.time()
        dst.qmp.cmd("migrate-incoming", {"uri": f"exec:cat {path}"})
        dst.wait_migration()
        dst.qmp.cmd("cont")
        resume_ms = (time.time() - t0) * 1000
        running = dst.qmp.cmd("query-status")["running"]
    finally:
        dst.stop()
        os.unlink(path)
    return {
        "save_pause_ms": float(q["downtime"]),
        "save_ms": save_wall,
        "save_total_ms": q["total-time"],
        "file_bytes": file_bytes,
        "disk_bytes": disk_bytes,
        "restore_ms": resume_ms,
        "lazy_ms": None,
        "ok": running,
    }


# ------------------------------------------------------------- livemig side


def livemig_migrate(mode, size, tmp):
    uri = {"local": f"unix:{tmp}/local.sock", "shm": f"shm:{tmp}/shm.sock",
           "tcp": "tcp:127.0.0.1:0"}[mode]
    dest_cmd = [BIN, "vm-incoming", uri, "-m", size, "--vcpus", "1", "--seconds", "1",
                "--json", "--announce"]
    src_extra = ["--memfd"] + COPY_EXTRA
    if mode == "local":
        dest_cmd.append("--local")
        src_extra = ["--local"]
    dest = subprocess.Popen(dest_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = dest.stdout.readline().strip()
        if not line:
            raise RuntimeError("destination did not start: " + dest.stderr.read())
        src = subprocess.run([BIN, "vm-migrate", line, "-m", size, "--warmup", "0.5", "--json"]
                             + GUEST + src_extra, capture_output=True, text=True, timeout=600)
        out, err = dest.communicate(timeout=120)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    if src.returncode != 0 or dest.returncode != 0:
        raise RuntimeError(f"{mode}: {src.stderr[-1500:]} / {err[-1500:]}")
    s, d = last_json(src.stdout), last_json(out)
    if mode == "local":
        downtime = s["downtime-us"] / 1000.0
        sock = s["socket-bytes"]["out"] + s["socket-bytes"]["in"]
    else:
        downtime = float(s["downtime"])
        sock = s["ram"]["transferred"]
    return {
        "downtime_ms": downtime,
        "total_ms": s["total-time"],
        "socket_bytes": sock,
        "ok": s["guest"]["self-check"] == "passed" and d["guest"]["self-check"] == "passed",
    }


def livemig_snapshot(size, tmp, background=False):
    path = os.path.join(tmp, "lm.mr")
    uri = f"file:{path}"
    how = "--background-snapshot" if background else "--mapped-ram"
    src = subprocess.run([BIN, "vm-migrate", uri, "-m", size, how, "--warmup", "0.5",
                          "--json"] + GUEST, capture_output=True, text=True, timeout=600)
    if src.returncode != 0:
        raise RuntimeError(f"save: {src.stderr[-1500:]}")
    s = last_json(src.stdout)
    res = {"restore_ms": None, "restore_ms_ok": True}
    kinds = (("restore_ms", []), ("lazy_ms", ["--lazy"]))
    for kind, extra in kinds[1:] if background else kinds:
        d = subprocess.run([BIN, "vm-incoming", uri, "-m", size, "--vcpus", "1", "--seconds",
                            "0.3", "--json"] + extra, capture_output=True, text=True, timeout=600)
        if d.returncode != 0:
            raise RuntimeError(f"restore {extra}: {d.stderr[-1500:]}")
        j = last_json(d.stdout)
        res[kind] = float(j["time-to-resume"])
        res[kind + "_ok"] = j["guest"]["self-check"] == "passed"
    os.unlink(path)
    return {
        "save_pause_ms": float(s["downtime"]),
        "save_ms": float(s["save"]["millis"]),
        # A paused save happens inside the pause: the whole save is the
        # pause; a background one writes the file after it.
        "save_total_ms": float(s["downtime"]) + (s["save"]["millis"] if background else 0),
        "file_bytes": s["save"]["file-len"],
        "disk_bytes": s["save"]["disk-bytes"],
        "restore_ms": res["restore_ms"],
        "lazy_ms": res["lazy_ms"],
        "ok": s["guest"]["self-check"] == "passed" and res["restore_ms_ok"] and res["lazy_ms_ok"],
    }


# ------------------------------------------------------------------ report


def fmt_bytes(n):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n:.0f} B"


def med(rs, key, fmt="{:.2f}"):
    v = [r[key] for r in rs if r.get(key) is not None]
    if not v:
        return "-"
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}..{fmt.format(max(v))})"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1G,4G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parts", default="local,snapshot")
    ap.add_argument("--out", default=None)
    ap.add_argument("--modes", default="local,shm,tcp,qemu-unix",
                    help="modes of the local part")
    ap.add_argument("--no-prefault", action="store_true",
                    help="livemig sources: leave guest memory unpopulated until the guest "
                    "touches it, as QEMU's idle guest leaves it")
    ap.add_argument("--no-verify", action="store_true",
                    help="livemig shm:/tcp: without the memory digest at stop time")
    a = ap.parse_args()
    if a.no_verify:
        COPY_EXTRA.append("--no-verify")
    if a.no_prefault:
        GUEST.append("--no-prefault")
    parts = a.parts.split(",")
    runs = []
    loads = [loadavg()]
    local_modes = a.modes.split(",")
    snap_modes = ["livemig", "livemig-bg", "qemu"]
    with tempfile.TemporaryDirectory(prefix="livemig-qemu-", dir="/var/tmp") as tmp:
        for size in a.sizes.split(","):
            for rep in range(a.reps):
                if "local" in parts:
                    n = len(local_modes)
                    order = local_modes[rep % n:] + local_modes[:rep % n]
                    for mode in order:
                        r = (qemu_unix(size, tmp) if mode == "qemu-unix"
                             else livemig_migrate(mode, size, tmp))
                        r.update(part="local", mode=mode, size=size, rep=rep, load=loadavg())
                        runs.append(r)
                        print(f"{size} {mode} rep {rep}: downtime {r['downtime_ms']:.2f} ms, "
                              f"total {r['total_ms']} ms, {fmt_bytes(r['socket_bytes'])}, "
                              f"ok {r['ok']}, load {r['load']}", file=sys.stderr, flush=True)
                if "snapshot" in parts:
                    order = snap_modes[rep % 3:] + snap_modes[:rep % 3]
                    for mode in order:
                        if mode == "qemu":
                            r = qemu_snapshot(size, tmp)
                        else:
                            r = livemig_snapshot(size, tmp, mode == "livemig-bg")
                        r.update(part="snapshot", mode=mode, size=size, rep=rep, load=loadavg())
                        runs.append(r)
                        print(f"{size} snapshot {mode} rep {rep}: {r}", file=sys.stderr, flush=True)
    loads.append(loadavg())
    if a.out:
        with open(a.out, "w") as f:
            json.dump(runs, f, indent=1)
    print(f"load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}")
    if "local" in parts:
        print()
        print("| guest | mode | downtime ms, median (min..max) | total ms | through the socket | checks |")
        print("|---|---|---|---|---|---|")
        for size in a.sizes.split(","):
            for mode in local_modes:
                rs = [r for r in runs if r["part"] == "local" and r["size"] == size
                      and r["mode"] == mode]
                if rs:
                    print(f"| {size} | {mode} | {med(rs, 'downtime_ms')} | "
                          f"{med(rs, 'total_ms', '{:.0f}')} | "
                          f"{fmt_bytes(statistics.median(r['socket_bytes'] for r in rs))} | "
                          f"{sum(r['ok'] for r in rs)}/{len(rs)} |")
    if "snapshot" in parts:
        print()
        print("| guest | system | save: guest paused ms | save: whole ms | file (apparent / on disk) "
              "| restore: time to resume ms | lazy: time to resume ms | checks |")
        print("|---|---|---|---|---|---|---|---|")
        for size in a.sizes.split(","):
            for mode in snap_modes:
                rs = [r for r in runs if r["part"] == "snapshot" and r["size"] == size
                      and r["mode"] == mode]
                if rs:
                    fb = statistics.median(r["file_bytes"] for r in rs)
                    db = statistics.median(r["disk_bytes"] for r in rs)
                    print(f"| {size} | {mode} | {med(rs, 'save_pause_ms')} | "
                          f"{med(rs, 'save_total_ms', '{:.0f}')} | "
                          f"{fmt_bytes(fb)} / {fmt_bytes(db)} | {med(rs, 'restore_ms')} | "
                          f"{med(rs, 'lazy_ms')} | {sum(r['ok'] for r in rs)}/{len(rs)} |")


if __name__ == "__main__":
    main()
