"""An S3-compatible server for tests and benchmarks: moto's server mode, started as users start one.

`python -m moto.server -H 127.0.0.1 -p PORT` runs in a subprocess and speaks the S3 REST protocol,
so s3fs (aiobotocore underneath) talks to it exactly as to AWS or MinIO. The client side is set up
only through the environment, as a user would: dummy `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`,
and the endpoint through fsspec's own config variable `FSSPEC_S3` (read by fsspec at import in child
processes; `activate` re-reads it in this one). The CLI runs unmodified with `s3://bucket/...` URLs.

The server writes one line per request to its stderr (werkzeug's access log): `requests()` parses
that file, so tests and benchmarks count what a unit costs without touching the client.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY_ID = "testing-key-id"
SECRET_ACCESS_KEY = "testing-secret-Zq81vX"  # a dummy, but the secret-grep tests look for it
_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')
_COLOUR = re.compile(r"\x1b\[[\d;]*m")  # werkzeug colours some lines (206 Partial Content: ranged GETs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # /bucket/key?query, as the server logged it
    status: int


class S3Server:
    """One moto server on 127.0.0.1; `start()` returns once it answers, `stop()` once its port is closed."""

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> "S3Server":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ, **self.env()))
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server did not answer within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def env(self) -> dict[str, str]:
        """What a user exports to point the CLI at this server: credentials and fsspec's s3 config."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
                "AWS_DEFAULT_REGION": "us-east-1",
                "FSSPEC_S3": json.dumps({"client_kwargs": {"endpoint_url": self.endpoint}})}

    def activate(self, monkeypatch=None) -> None:
        """Export `env()` into this process and give fsspec the config it reads from `FSSPEC_S3` at
        import in a fresh process; with pytest's `monkeypatch`, both are undone after the test."""
        import fsspec.config

        for key, value in self.env().items():
            monkeypatch.setenv(key, value) if monkeypatch else os.environ.__setitem__(key, value)
        conf = json.loads(self.env()["FSSPEC_S3"])
        monkeypatch.setitem(fsspec.config.conf, "s3", conf) if monkeypatch else fsspec.config.conf.__setitem__("s3", conf)
        fsspec.get_filesystem_class("s3").clear_instance_cache()

    def requests(self) -> list[Request]:
        """Every request the server has logged so far, in order."""
        self._log.flush()
        text = _COLOUR.sub("", self.log_path.read_text(errors="replace"))
        return [Request(m[1], m[2], int(m[3])) for m in _REQUEST.finditer(text)]

    def make_bucket(self, name: str) -> str:
        import fsspec

        fsspec.filesystem("s3").mkdir(name)
        return f"s3://{name}"
