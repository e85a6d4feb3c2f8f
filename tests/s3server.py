"""A real S3 endpoint on loopback for the tests: moto's server (``ThreadedMotoServer``, any free port), and a small
proxy in front of it that counts every request and can answer chosen ones with a fault instead (503 SlowDown, 409
ConditionalRequestConflict, a connection dropped before or after the request reached the server or in the middle of
the answer's body, 403 for a key id). Only 127.0.0.1 is talked to.

moto's server is a real HTTP endpoint speaking S3, with conditional writes; what it does not prove is in
docs/guarantees.md (it checks a condition and then writes, without a lock, and never answers 409).
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
