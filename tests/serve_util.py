"""A real `clipkit retrieve serve` process for the serve tests: started on a free loopback port
(--port 0, read back from its first line), asked over HTTP, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 600  # importing torch + faiss + loading the model on 2 shared, busy cores


class Server:
    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "clipkit", "retrieve", "serve", "--port", "0", *args]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self._started = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._started.wait(START_TIMEOUT_S) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-40:]))
        match = re.search(r"http://\S+:(\d+)/", "".join(self.lines))
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("serving "):
                self._started.set()
        self._started.set()  # ended before serving: the constructor reports it

    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, then the exit code (killed after `timeout` seconds)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def call(self, path: str, body=None, raw: bytes | None = None) -> tuple[int, object]:
        """(status, decoded JSON) of GET `path`, or of POST when a body is given."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        return status, json.loads(text)

    def knn(self, **fields) -> list[dict]:
        status, answer = self.call("/knn-service", {"indice_name": "demo", **fields})
        assert status == 200, answer
        return answer
