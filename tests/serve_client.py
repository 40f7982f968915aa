"""Start `transferkit serve` as a real process on a free loopback port, and talk to it with the stdlib."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


class ServerProcess:
    """`transferkit serve MODEL --port 0 ...`; the URL is read from the line it prints when listening."""

    def __init__(self, command: list[str], log_dir: Path, timeout: float = 120, env: dict | None = None):
        self.log = log_dir / f"serve-{uuid.uuid4().hex[:8]}.log"
        with open(self.log, "w") as out:  # a file, not a pipe: uvicorn's access log must never block
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = self._wait_for_url(timeout)

    @classmethod
    def transferkit(cls, model, *options: str, log_dir: Path, python: str = sys.executable) -> "ServerProcess":
        return cls([python, "-m", "transferkit", "serve", str(model), "--port", "0", *options], log_dir)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"at (http://\S+/)", self.log.read_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start within {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> bool:
        """SIGTERM, as a process manager stops it; True if uvicorn shut down cleanly (it re-raises the
        signal after its graceful shutdown, so the exit status is -SIGTERM)."""
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False
        return code in (0, -signal.SIGTERM) and "Finished server process" in self.log.read_text()


def request(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None,
            timeout: float = 60) -> tuple[int, dict]:
    """(status, parsed JSON body) for any status, 4xx included."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, dict]:
    """A multipart/form-data body with one file part per (name, bytes), and its Content-Type header."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_files(url: str, files: list[tuple[str, bytes]], query: str = "") -> tuple[int, dict]:
    body, headers = multipart(files)
    return request(url + "predict" + query, body, headers)
