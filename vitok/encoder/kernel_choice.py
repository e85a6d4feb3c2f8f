"""Which CPU kernel runs each shape of the model, decided by timing the candidates on this machine.

The fastest fp32 GEMM differs between CPUs (oneDNN's AVX-512 code is well ahead of torch's default GEMM on some,
level with it on AVX2-only ones), so with ``VITOK_ONEDNN=auto`` (the default) the first call of each shape class
(a linear's weight shape and dtype; attention's heads and segment length class) runs both kernels on at most
``TIMED_ROWS`` of its real rows and keeps the faster (never per batch size: an image's tokens must not depend on
the images batched with it); the answer is remembered per machine (CPU model, ISA flags, torch version) in
``$VITOK_CACHE_DIR/kernels.json`` (default ``~/.cache/vitok``), so later runs pay nothing. Decisions are taken
under a file lock and re-read inside it, so processes started together on one machine (torchrun, --gpus, a SLURM
node) use the same kernels and give the same tokens bit for bit. ``VITOK_ONEDNN=on`` / ``off`` skip the timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..atomic import AtomicFile

logger = logging.getLogger(__name__)

TIMED_ROWS = 512
ROUNDS = 4  # timing rounds per choice (candidates alternate within a round)
PROCEDURE = 2  # in the machine identity: a change of the timing procedure re-decides choices taken by the old one
_lock = threading.Lock()
_choices: dict[str, str] | None = None
_identity: str | None = None


def cache_file() -> Path:
    from ..environment import cache_dir

    return cache_dir() / "kernels.json"


def machine_identity() -> str:
    from ..environment import cpu_flags, cpu_model

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "sse4")))
    text = f"{cpu_model()}|{' '.join(flags)}|torch={torch.__version__}|procedure={PROCEDURE}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _stored() -> dict:
    """The cache file's machines -> choices; {} when it is missing or damaged (it is rebuilt: losing it costs time)."""
    try:
        stored = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _read() -> dict[str, str]:
    choices = _stored().get(_identity)
    return {str(k): str(v) for k, v in choices.items()} if isinstance(choices, dict) else {}


def _load() -> dict[str, str]:
    global _choices, _identity
    if _choices is None:
        _identity = machine_identity()
        _choices = _read()
    return _choices


@contextlib.contextmanager
def _machine_lock():
    """An exclusive lock on the cache, shared by every process of this machine (none when it cannot be made)."""
    import fcntl

    handle = None
    with contextlib.suppress(OSError):
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        handle = open(cache_file().with_suffix(".lock"), "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def _save() -> None:
    path = cache_file()
    with contextlib.suppress(OSError, ValueError):  # a read-only home must not stop a run
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = _stored()
        stored[_identity] = _choices
        with AtomicFile(path.parent, path.name, path) as atomic:
            atomic.handle.write(json.dumps(stored, indent=1, sort_keys=True).encode())


def _seconds(run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def rows_class(rows: int) -> int:
    return 1 << max(0, (max(rows, 1) - 1).bit_length())


def fastest(candidates: dict[str, Callable[[], torch.Tensor]], rounds: int = ROUNDS) -> str:
    """The candidate with the lowest of its times over ``rounds`` rounds, the candidates taking turns within each
    round: a burst of load from another process then slows both alike. (Timing each candidate's runs back to back,
    two each, kept torch's GEMM for a bf16 4096x4096 linear that oneDNN runs 1.2x faster on a loaded 2-core EPYC.)"""
    times: dict[str, float] = {}
    for _ in range(rounds):
        for name, run in candidates.items():
            times[name] = min(times.get(name, float("inf")), _seconds(run)[0])
    return min(times, key=times.get)


def choose(key: str, candidates: dict[str, Callable[[], torch.Tensor]]) -> str:
    """The name of the fastest candidate for ``key`` (timed once per machine, then remembered)."""
    with _lock:
        choices = _load()
        if key in choices and choices[key] in candidates:
            return choices[key]
        with _machine_lock():
            choices.update(_read())  # another process may have decided meanwhile
            if key not in choices or choices[key] not in candidates:
                for run in candidates.values():  # warm up: first calls allocate and pack
                    run()
                choices[key] = fastest(candidates)
                logger.debug("kernel for %s: %s", key, choices[key])
                _save()
        return choices[key]


def known(key: str) -> bool:
    """Whether this machine has timed the choice for ``key`` (in this process or in the on-disk cache)."""
    with _lock:
        return key in _load()


def forget() -> None:
    """Drop what this process remembers (the tests use it)."""
    global _choices
    with _lock:
        _choices = None
