"""A minimal synchronous QMP client over a unix socket, shared by the
scripts in this directory (minivm's control socket and QEMU's speak the
same protocol)."""

import json
import socket
import time


class Qmp:
    """A minimal synchronous QMP client."""

    def __init__(self, path, timeout=30):
        t0 = time.time()
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() - t0 > timeout:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("rwb")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"{name}: control socket closed")
            r = json.loads(line)
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            return r.get("return")

    def close(self):
        self.f.close()
        self.s.close()
