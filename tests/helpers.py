"""Builders for generated image folders and subprocess runs of the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ODD, ROOT
from PIL import Image

TINY = ["--model", "qwen3-vl-tiny", "--workers", "0", "--quiet"]


def make_folder(folder: Path, count: int = 10, with_odd: bool = True, seed: int = 0) -> Path:
    """Random photos of a few sizes (some repeated, so batches share grids), nested, plus the odd files."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (96, 64), (64, 128), (80, 80)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        ext = ".png" if i % 3 else ".JPG"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"img{i:02d}{ext}",
                                                                              format="PNG" if ext == ".png" else "JPEG")
    if with_odd:
        shutil.copytree(ODD, folder / "odd")
    (folder / "notes.txt").write_text("not an image, ignored by the walk")
    return folder


def vitok(*args: str, input: str | bytes | None = None, env: dict | None = None, check: bool = False, cwd=None,
          real: bool = False):
    """Run the CLI and return (returncode, stdout, stderr): in this process by default (the fast lane: no interpreter
    and torch start per call), or as a real ``python -m vitok`` process with ``real=True``."""
    if real:
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        result = subprocess.run([sys.executable, "-m", "vitok", *args], capture_output=True, text=True, input=input,
                                env=full_env, timeout=300, cwd=cwd)
    else:
        result = in_process(*args, input=input, env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"vitok {' '.join(args)} -> {result.returncode}\n{result.stderr}")
    return result


def in_process(*args: str, input: str | bytes | None = None, env: dict | None = None, cwd=None):
    """``vitok ARGS`` through the console entry point in this process, with its own argv, stdin, environment and
    working directory; the 'vitok' logger is restored afterwards (the CLI reconfigures it)."""
    import contextlib
    import io
    import logging

    from vitok.cli.app import main

    data = input.encode() if isinstance(input, str) else (input or b"")
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    stdout, stderr = io.StringIO(), io.StringIO()
    logger = logging.getLogger("vitok")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    old_env, old_cwd, old_argv, old_stdin = dict(os.environ), os.getcwd(), sys.argv, sys.stdin
    code = 0
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        sys.argv, sys.stdin = ["vitok", *args], stdin
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(old_env)
        os.chdir(old_cwd)
        sys.argv, sys.stdin = old_argv, old_stdin
        logger.handlers[:], logger.level, logger.propagate = saved
    return subprocess.CompletedProcess(["vitok", *args], code, stdout.getvalue(), stderr.getvalue())


def popen_vitok(*args: str, env: dict | None = None, capture: bool = False) -> subprocess.Popen:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    pipe = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "vitok", *args], stdout=pipe, stderr=pipe, env=full_env,
                            text=capture or None)


def wait_for(predicate, timeout: float = 120.0, process=None) -> bool:
    """Poll until predicate() holds (or the process ends, or the time is up)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            return predicate()
        time.sleep(0.05)
    return False


def png_folder(folder: Path, count: int) -> Path:
    """A new folder of ``count`` random PNGs named 0.png, 1.png, ... (``png(i)``)."""
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i}.png").write_bytes(png(i))
    return folder


def png(seed: int, size=(48, 40)) -> bytes:
    """The bytes of a random PNG (the same for the same seed)."""
    import io

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(path: Path, size=(64, 64), seed: int = 0) -> Path:
    """A small random image file (format from the suffix)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def all_tokens(out: Path, feature: str | None = None) -> dict[str, np.ndarray]:
    import vitok

    store = vitok.open(out)
    return {key: store.get(key, feature) for key in store.keys()}


VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}


def video_clip(path: Path, frames: int = 12, size: tuple[int, int] = (96, 64), fps: int = 24, codec: str | None = None,
               pix_fmt: str = "yuv420p", rotation: int | None = None, container: str | None = None,
               seed: int = 0) -> Path:
    """A short clip encoded with PyAV (milliseconds): moving gradients and noise, ``size`` = (width, height). The
    codec follows the suffix unless given; ``rotation`` writes a display matrix; ``container`` names the format when
    the suffix does not (a clip without one)."""
    import av

    width, height = size
    codec = codec or VIDEO_CODECS.get(path.suffix.lower(), "libx264")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            pixels = np.stack([(x * 2 + 5 * i) % 256, (y * 3 + 2 * i) % 256, ((x + y) * 4 + 9 * i) % 256], -1)
            pixels = (pixels + rng.integers(0, 24, pixels.shape)).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def serve_folder(folder: Path):
    """A real HTTP server on a free loopback port serving ``folder`` in a thread: http.server's file handler plus
    single byte ranges (``Range: bytes=a-b``, as object stores and web servers answer them: fsspec reads a seekable
    remote file in ranges). A context manager giving (base URL, the requests it received)."""
    import contextlib
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet; what was asked is kept in ``requests``
            requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".strip())

        def send_head(self):
            wanted = self.headers.get("Range")
            path = Path(self.translate_path(self.path))
            if not wanted or not path.is_file():
                return super().send_head()
            size = path.stat().st_size
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start, stop = int(first or 0), min(int(last) if last else size - 1, size - 1)
            handle = open(path, "rb")
            handle.seek(start)
            self.send_response(206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{stop}/{size}")
            self.send_header("Content-Length", str(stop - start + 1))
            self.end_headers()
            return _Limited(handle, stop - start + 1)

    @contextlib.contextmanager
    def running():
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}", requests
        finally:
            server.shutdown()
            server.server_close()

    return running()


class _Limited:
    """A file's next ``left`` bytes, as http.server's ``copyfile`` reads them."""

    def __init__(self, handle, left: int) -> None:
        self.handle, self.left = handle, left

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.handle.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


KILLED_AT_CALL = """
import importlib, os, signal, sys, time
from pathlib import Path
target, call, shards, wanted, sent = sys.argv[1:6]
module, _, name = target.partition(":")
owner = importlib.import_module(module)
*path, attribute = name.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, attribute), []
def hooked(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(call):
        deadline = time.time() + 120
        while len(list(Path(shards).glob("*.json"))) < int(wanted) and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), getattr(signal, sent))
    return real(*args, **kwargs)
setattr(owner, attribute, hooked)
from vitok.cli.app import main
sys.argv = ["vitok", *sys.argv[6:]]
main()
"""


def vitok_killed_at(target: str, call: int, *args: str, shards: Path | None = None, published: int = 0,
                    sent: str = "SIGKILL", env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``vitok ARGS`` in a real process that sends itself ``sent`` as the ``call``-th call of ``target``
    ("module:Class.method" or "module:function") begins, once ``shards`` holds ``published`` finished shards.

    A kill sent from outside races the run: on a fast machine a small job ends between the test seeing its first
    shard and the signal, and the kill lands nowhere. Here the point is fixed by the work itself."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", KILLED_AT_CALL, target, str(call), str(shards or "."), str(published),
                           sent, *args], env=full_env, capture_output=True, text=True, timeout=300)
