"""A real S3 endpoint on loopback for the tests: moto's server (``ThreadedMotoServer``, any free port), and a small
proxy in front of it that counts every request and can answer chosen ones with a fault instead (503 SlowDown, 409
ConditionalRequestConflict, a connection dropped before or after the request reached the server or in the middle of
the answer's body, 403 for a key id). Only 127.0.0.1 is talked to.
The fixtures (``moto_endpoint``: one server for the session; ``s3``: a fresh state, the bucket and a proxy per test,
its ``AWS_*`` variables set for the test) are shared with every test module through conftest.py.

moto's server is a real HTTP endpoint speaking S3, with conditional writes; what it does not prove is in
docs/guarantees.md (it checks a condition and then writes, without a lock, and never answers 409).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import struct
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BUCKET = "vitok-test"

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request '
             b'rate.</Message></Error>')
REFUSED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key '
           b'Id you provided does not exist in our records.</Message></Error>')
CONFLICT = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code><Message>A '
            b'conflicting conditional operation is currently in progress against this resource. Please try '
            b'again.</Message></Error>')


@dataclass
class Fault:
    """Answer the next ``times`` requests matching ``method`` and ``path`` (a regex on path and query) with
    ``action``: ``503`` (SlowDown), ``409`` (ConditionalRequestConflict, the request never forwarded), ``reset`` (the
    connection dropped, the request never forwarded), ``lose`` (the request forwarded and done, the answer dropped),
    ``cut`` / ``cut-reset`` (the answer's status and headers sent, with the whole body's Content-Length, then only
    its first ``after`` bytes before the connection is closed / reset with an RST), ``hang`` (held until the proxy
    stops). ``then``, when given, runs as the fault fires, before it is answered (another writer's request landing
    meanwhile)."""

    method: str
    path: str
    action: str
    times: int = 1
    after: int = 0
    then: Callable[[], None] | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.hits < self.times and method == self.method and re.search(self.path, path) is not None


@dataclass
class Seen:
    method: str
    path: str
    status: int
    sent: int  # request body bytes
    received: int  # response body bytes
    range: str = ""  # the request's Range header


@dataclass
class Proxy:
    target: tuple[str, int]
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    refused_key: str | None = None  # requests signed with this access key id get 403 InvalidAccessKeyId
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> str:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    fault = next((f for f in proxy.faults if f.matches(self.command, self.path)), None)
                    if fault is not None:
                        fault.hits += 1
                if fault is not None and fault.then is not None:
                    fault.then()
                if proxy.refused_key and f"Credential={proxy.refused_key}/" in self.headers.get("Authorization", ""):
                    proxy._note(self.command, self.path, 403, len(body), len(REFUSED))
                    return self._reply(403, REFUSED)
                if fault is not None and fault.action == "503":
                    proxy._note(self.command, self.path, 503, len(body), len(SLOW_DOWN))
                    return self._reply(503, SLOW_DOWN)
                if fault is not None and fault.action == "409":
                    proxy._note(self.command, self.path, 409, len(body), len(CONFLICT))
                    return self._reply(409, CONFLICT)
                if fault is not None and fault.action == "reset":
                    proxy._note(self.command, self.path, 0, len(body), 0)
                    return self._drop()
                if fault is not None and fault.action == "hang":
                    proxy._note(self.command, self.path, 0, len(body), 0)
                    proxy.stopping.wait()
                    return self._drop()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "host",
                                                                                      "connection", "expect")}
                headers["Host"] = f"{proxy.target[0]}:{proxy.target[1]}"
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.target, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST")
                                     else None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                cut = fault is not None and fault.action in ("cut", "cut-reset")
                proxy._note(self.command, self.path, response.status, len(body),
                            min(fault.after, len(data)) if cut else len(data), self.headers.get("Range", ""))
                if fault is not None and fault.action == "lose":
                    return self._drop()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                if response.getheader("Date"):
                    self.send_header("Date", response.getheader("Date"))
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))  # (HEAD: the object's size)
                self.end_headers()
                if cut:
                    self.wfile.write(data[: fault.after])
                    if fault.action == "cut-reset":  # closed with an RST, not a FIN: the client's read is reset
                        self.close_connection = True
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return self.connection.close()
                    return self._drop()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _note(self, method: str, path: str, status: int, sent: int, received: int, range: str = "") -> None:
        with self.lock:
            self.seen.append(Seen(method, path, status, sent, received, range))

    def inject(self, method: str, path: str, action: str, times: int = 1, after: int = 0,
               then: Callable[[], None] | None = None) -> Fault:
        fault = Fault(method, path, action, times, after, then)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.seen.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def moto_endpoint():
    server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'vitok[test]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    yield moto.get_host_and_port()
    moto.stop()


class S3:
    """The endpoint of one test: a fresh server state, the bucket, the proxy the code under test talks through,
    and a client straight to the server for setting up and looking."""

    def __init__(self, host: str, port: int) -> None:
        import boto3

        urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
        self.proxy = Proxy((host, port))
        self.endpoint = self.proxy.start()
        self.direct = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.direct.create_bucket(Bucket=BUCKET)
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.direct.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))

    def requests(self, method: str | None = None, path: str = "") -> list:
        return [s for s in self.proxy.seen if (method is None or s.method == method) and path in s.path]

    def download(self, prefix: str, folder: Path) -> Path:
        """Every object under ``prefix/`` as a file under ``folder`` (what a plain reader with boto3 gets)."""
        for key in self.keys(f"{prefix}/"):
            path = folder / key[len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.direct.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        return folder


@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path):
    endpoint = S3(*moto_endpoint)
    for key, value in endpoint.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the staging space of this test's runs
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    yield endpoint
    endpoint.proxy.stop()
