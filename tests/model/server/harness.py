"""The server under test, started as a user starts it: the llama3-triton console script on a free loopback port
(a helper module, not a test module: conftest.py's fixtures and test_server.py use it)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

API_KEY = "test-key"
CONTEXT = 256


def console_script() -> str:
    beside = Path(sys.executable).parent / "llama3-triton"  # the script of the interpreter running the tests
    found = str(beside) if beside.exists() else shutil.which("llama3-triton")
    assert found, "the llama3-triton console script is not installed (pip install -e .)"
    return found


class Server:
    """A ``serve`` process: its URL once it listens, its stderr as it goes."""

    def __init__(self, ckpt: Path, *args: str, home: Path):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_CACHE_HOME": str(home),
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [console_script(), "serve", "--ckpt", str(ckpt), "--port", "0", "--backend", "torch",
               "--device", "cpu", "--max-seq-len", str(CONTEXT), *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=home)  # fmt: skip
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port: int | None = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(180):
            self.proc.kill()
            raise AssertionError("the server did not start in 180 s:\n" + "".join(self.lines[-30:]))
        assert self.port is not None, "the server exited before it listened:\n" + "".join(self.lines[-30:])
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode

    def request(self, method: str, path: str, body=None, headers=None, key: str | None = API_KEY):
        """(status, headers, parsed JSON or text) of one plain HTTP request (no client library)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Authorization": f"Bearer {key}"} if key else {}
        h |= headers or {}
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        raw = r.read()
        conn.close()
        try:
            return r.status, dict(r.getheaders()), json.loads(raw)
        except ValueError:
            return r.status, dict(r.getheaders()), raw.decode("utf-8", "replace")

    def metrics(self) -> dict[str, float]:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_metric(self, name: str, want: float, timeout: float = 20.0) -> float:
        end = time.monotonic() + timeout
        while True:
            got = self.metrics().get(name)
            if got == want or time.monotonic() > end:
                return got
            time.sleep(0.05)
