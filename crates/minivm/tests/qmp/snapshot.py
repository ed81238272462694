"""Snapshot files through QEMU's own QMP client (qemu.qmp), QEMU's names.

Usage: snapshot.py SRC_SOCKET DST_SOCKET FILE

On the running source: capability background-snapshot, `migrate` to
file:FILE; the MIGRATION events end in "completed", STOP and RESUME go
out around the pause and the guest runs on. Mapped-ram settings that a
file cannot honour are refused (xbzrle). On the waiting destination:
parameter x-livemig-lazy, `migrate-incoming` from file:FILE; the guest
resumes (RESUME) while memory is still served from the file, and
query-migrate reaches "completed". Prints one JSON line with what it saw;
exits non-zero on any mismatch.
"""

import asyncio
import json
import sys

from qemu.qmp import ExecuteError, QMPClient

FINAL = ("completed", "failed", "cancelled")


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


async def until_final(qmp, timeout):
    async def poll():
        while True:
            q = await qmp.execute("query-migrate")
            if q.get("status") in FINAL:
                return q
            await asyncio.sleep(0.01)
    return await asyncio.wait_for(poll(), timeout)


async def main(src_sock, dst_sock, path):
    src, dst = QMPClient("source"), QMPClient("destination")
    await src.connect(src_sock)
    await dst.connect(dst_sock)
    uri = {"uri": f"file:{path}"}

    caps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
    check("mapped-ram" in caps and "background-snapshot" in caps, f"capabilities {caps}")

    # A file holds each page once: xbzrle with mapped-ram is refused.
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "mapped-ram", "state": True},
        {"capability": "xbzrle", "state": True}]})
    try:
        await src.execute("migrate", uri)
        raise SystemExit("FAILED: mapped-ram with xbzrle was accepted")
    except ExecuteError as e:
        check("xbzrle" in str(e) and "mapped-ram" in str(e), f"refusal: {e}")
    await src.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "mapped-ram", "state": False},
        {"capability": "xbzrle", "state": False},
        {"capability": "background-snapshot", "state": True},
        {"capability": "events", "state": True}]})

    with src.listener(("MIGRATION", "STOP", "RESUME")) as events:
        await src.execute("migrate", uri)
        seen = []

        async def follow():
            async for ev in events:
                if ev["event"] == "MIGRATION":
                    seen.append(ev["data"]["status"])
                    if seen[-1] in FINAL:
                        return
                else:
                    seen.append(ev["event"])
        await asyncio.wait_for(follow(), 120)
    check(seen[-1] == "completed", f"source events {seen}")
    check("STOP" in seen and "RESUME" in seen and seen.index("STOP") < seen.index("RESUME"),
          f"source events {seen}")
    st = await src.execute("query-status")
    check(st == {"running": True, "status": "running"}, f"source after the snapshot {st}")
    q = await src.execute("query-migrate")
    check(q["status"] == "completed" and q["ram"]["total"] > 0, f"source query-migrate {q}")

    await dst.execute("migrate-set-parameters", {"x-livemig-lazy": True})
    params = await dst.execute("query-migrate-parameters")
    check(params["x-livemig-lazy"] is True, f"parameters {params}")
    with dst.listener(("RESUME",)) as resumed:
        await dst.execute("migrate-incoming", uri)
        ev = await asyncio.wait_for(resumed.get(), 60)
    check(ev["event"] == "RESUME", f"destination event {ev}")
    q = await until_final(dst, 120)
    check(q["status"] == "completed", f"destination query-migrate {q}")
    st = await dst.execute("query-status")
    check(st == {"running": True, "status": "running"}, f"destination status {st}")
    await src.disconnect()
    await dst.disconnect()
    print(json.dumps({"source": seen, "destination": q}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
