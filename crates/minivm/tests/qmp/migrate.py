"""Drives two minivm processes through QEMU's own QMP client (qemu.qmp).

Usage: migrate.py SRC_SOCKET DST_SOCKET MIGRATION_URI

Negotiates with both, sets parameters and capabilities with QEMU's names,
starts migrate-incoming on the destination and migrate on the source,
waits for the source's MIGRATION event "completed", and checks the
destination's status. Prints one JSON line with what it saw; exits non-zero
on any mismatch.
"""

import asyncio
import json
import sys

from qemu.qmp import ExecuteError, QMPClient

FINAL = ("completed", "failed", "cancelled")


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


async def expect_error(qmp, cmd, args, cls):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as e:
        check(e.error_class == cls, f"{cmd} {args}: class {e.error_class}, want {cls}")
        return str(e)
    raise SystemExit(f"FAILED: {cmd} {args} was accepted")


async def wait_status(listener, timeout):
    """MIGRATION statuses from `listener` until a final one."""
    seen = []
    async def follow():
        async for ev in listener:
            if ev["event"] == "MIGRATION":
                seen.append(ev["data"]["status"])
                if seen[-1] in FINAL:
                    return
            else:
                seen.append(ev["event"])
    await asyncio.wait_for(follow(), timeout)
    return seen


async def main(src_sock, dst_sock, uri):
    src, dst = QMPClient("source"), QMPClient("destination")
    await src.connect(src_sock)
    await dst.connect(dst_sock)
    check(src.greeting is not None, "greeting")

    version = await src.execute("query-version")
    check(version["package"].startswith("livemig"), f"query-version {version}")
    names = [c["name"] for c in await src.execute("query-commands")]
    for c in ("migrate", "migrate-incoming", "query-migrate", "stop", "cont"):
        check(c in names, f"query-commands lacks {c}")
    check(await src.execute("query-migrate") == {}, "query-migrate before any is {}")
    st = await src.execute("query-status")
    check(st == {"running": True, "status": "running"}, f"source status {st}")
    st = await dst.execute("query-status")
    check(st["status"] == "inmigrate", f"destination status {st}")

    # Unknown arguments and commands: QEMU's error classes.
    await expect_error(src, "migrate-set-parameters", {"no-such-parameter": 1}, "GenericError")
    await expect_error(src, "query-migrate", {"extra": True}, "GenericError")
    await expect_error(src, "no-such-command", None, "CommandNotFound")

    caps = [
        {"capability": "events", "state": True},
        {"capability": "xbzrle", "state": True},
        {"capability": "return-path", "state": True},
        {"capability": "multifd", "state": True},
    ]
    await src.execute("migrate-set-capabilities", {"capabilities": caps})
    await dst.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "events", "state": True}]},
    )
    await src.execute(
        "migrate-set-parameters",
        {
            "downtime-limit": 500,
            "max-bandwidth": 0,
            "xbzrle-cache-size": 16 << 20,
            "multifd-channels": 2,
        },
    )
    params = await src.execute("query-migrate-parameters")
    check(params["downtime-limit"] == 500, f"parameters {params}")
    check(params["multifd-channels"] == 2, f"parameters {params}")
    got = await src.execute("query-migrate-capabilities")
    on = {c["capability"] for c in got if c["state"]}
    check({"events", "xbzrle", "multifd", "return-path"} <= on, f"capabilities {got}")

    with dst.listener(("MIGRATION", "RESUME")) as dst_events:
        await dst.execute("migrate-incoming", {"uri": uri})
        with src.listener(("MIGRATION", "MIGRATION_PASS", "STOP")) as src_events:
            await src.execute("migrate", {"uri": uri})
            src_seen = await wait_status(src_events, 120)
        dst_seen = await wait_status(dst_events, 60)
        # The destination's guest starts after its status is final.
        resumed = await asyncio.wait_for(dst_events.get(), 30)
    check(src_seen[-1] == "completed", f"source events {src_seen}")
    check("MIGRATION_PASS" in src_seen and "STOP" in src_seen, f"source events {src_seen}")
    check(dst_seen[-1] == "completed", f"destination events {dst_seen}")
    check(resumed["event"] == "RESUME", f"destination event {resumed}")

    # The source minivm exits right after completing; ask the destination.
    st = await dst.execute("query-status")
    check(st == {"running": True, "status": "running"}, f"destination status {st}")
    q = await dst.execute("query-migrate")
    check(q.get("status") == "completed", f"destination query-migrate {q}")
    await dst.disconnect()
    try:
        await src.disconnect()
    except Exception:  # the source may already have gone
        pass
    print(json.dumps({"source": src_seen, "destination": dst_seen, "version": version}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
