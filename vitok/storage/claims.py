"""Shard claims: two processes writing into one store never do the same shard, and never destroy each other's work.

A process claims a shard before working on it by creating ``OUT/.claims/<shard>.claim`` exclusively (``O_EXCL``
semantics through a hard link, which NFS honours too). The claim names its run; the run proves it is alive by
touching ``OUT/.claims/runs/<run>`` every 30 seconds. A claim is stale, and taken over, when its run file is gone,
or when its run file has not been touched for ``stale_after`` seconds (the times compared are both file-system
times, so clock skew between hosts does not matter).

A process id says something only inside its PID namespace on one boot of one kernel: containers often share the
host's name while each has its own PID namespace, where every other container's process looks dead. So the PID
is trusted (a dead process, or a recycled pid, makes the claim stale at once) only when the claim records the same
PID namespace and boot id as this process's; otherwise a dead-looking process only shortens the wait once its
heartbeat has missed a few beats (``FRESH_SECONDS``), so a claim whose heartbeat is fresh is never taken over.
Claims are released when the shard is committed or abandoned; a killed process leaves them behind, stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .files import create_exclusive, remove
from .layout import CLAIMS_DIR

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
FRESH_SECONDS = 3 * HEARTBEAT_SECONDS  # a heartbeat younger than this proves its run alive, whatever its pid says
STALE_AFTER = 600.0


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.readline().strip() or None
    except OSError:
        return None


def pid_namespace() -> dict[str, str | None]:
    """Where this process's pid means something: its PID namespace (the inode of /proc/self/ns/pid) and the
    kernel's boot id; None each where /proc does not say."""
    try:
        namespace: str | None = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = None
    return {"pid_ns": namespace, "boot_id": _read_first_line("/proc/sys/kernel/random/boot_id")}


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of a process (detects a recycled pid); None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def process_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class RunIdentity:
    host: str
    pid: int
    proc_start: str | None
    token: str
    pid_ns: str | None = None  # PID namespace and boot id (``pid_namespace``): where ``pid`` can be checked
    boot_id: str | None = None

    @classmethod
    def current(cls) -> RunIdentity:
        return cls(socket.gethostname(), os.getpid(), _proc_start(os.getpid()), uuid.uuid4().hex[:8],
                   **pid_namespace())

    @property
    def id(self) -> str:
        return f"{self.host.replace('.', '_')}-{self.pid}-{self.token}"  # no dots: it is part of file names

    def to_json(self) -> str:
        return json.dumps({"run": self.id, "host": self.host, "pid": self.pid, "proc_start": self.proc_start,
                           "pid_ns": self.pid_ns, "boot_id": self.boot_id})

    def shares_pids_with(self, holder: dict) -> bool:
        """Whether ``holder``'s pid can be checked here: same host name, PID namespace and boot (all known)."""
        return (holder.get("host") == self.host and self.pid_ns is not None and self.boot_id is not None
                and holder.get("pid_ns") == self.pid_ns and holder.get("boot_id") == self.boot_id)

    def judges_gone(self, holder: dict) -> bool | None:
        """Whether ``holder``'s process is over, where its pid can be checked here (``shares_pids_with``): its pid
        is not running, or runs a process started at another time (a recycled pid). None where it cannot be told."""
        if not self.shares_pids_with(holder):
            return None
        pid = int(holder.get("pid", -1))
        if not process_alive(pid):
            return True
        start = _proc_start(pid)
        return holder.get("proc_start") is not None and start is not None and start != holder["proc_start"]


class Claims:
    """This process's claims in one store, and its heartbeat."""

    def __init__(self, out: Path, identity: RunIdentity | None = None, stale_after: float = STALE_AFTER) -> None:
        self.folder = Path(out) / CLAIMS_DIR
        self.identity = identity or RunIdentity.current()
        self.stale_after = stale_after
        self.held: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the run's heartbeat ----------------------------------------------------------------------------------

    @property
    def run_file(self) -> Path:
        return self.folder / "runs" / self.identity.id

    def start(self) -> None:
        self.run_file.parent.mkdir(parents=True, exist_ok=True)
        self.run_file.write_text(self.identity.to_json())
        self._thread = threading.Thread(target=self._beat, name="vitok-heartbeat", daemon=True)
        self._thread.start()
        self.remove_dead_runs()

    def remove_dead_runs(self) -> int:
        """Delete the run files of runs that are over (killed: a finished run removes its own), judged as claims
        are (``is_stale``); their claims, if any, stay stale and are taken over as before. Returns how many."""
        removed = 0
        for path in (self.folder / "runs").iterdir() if (self.folder / "runs").is_dir() else ():
            if path == self.run_file or path.name.startswith("."):
                continue
            holder = read_claim(path)
            if holder is None:
                holder = {"run": path.name}  # unreadable: judged by its age alone
            if holder.get("run") != path.name:
                continue
            if self.is_stale(holder):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        if removed:
            logger.info("removed the heartbeat files of %d run(s) that are over", removed)
        return removed

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.run_file)

    def stop(self) -> None:
        """Release every claim still held, then the run file (a claim without its run file is stale)."""
        self._stop.set()
        for shard in list(self.held):
            self.release(shard)
        with contextlib.suppress(OSError):
            self.run_file.unlink()

    # ---- claims ---------------------------------------------------------------------------------------------

    def path(self, shard: str) -> Path:
        return self.folder / f"{shard}.claim"

    def try_claim(self, shard: str) -> bool:
        """Claim ``shard`` for this run; False when a live run holds it."""
        path = self.path(shard)
        for _ in range(3):
            if create_exclusive(path, self.identity.to_json()):
                self.held.add(shard)
                return True
            holder = read_claim(path)
            if holder is None:
                continue  # released between our attempt and our read: try again
            if not self.is_stale(holder):
                return False
            if self._take_over(path, holder):
                logger.info("shard %s: claim of run %s is stale, taking it over", shard, holder.get("run"))
        return False

    def _take_over(self, path: Path, holder: dict) -> bool:
        """Move a stale claim aside; only one process succeeds, and a fresh claim moved by mistake goes back."""
        aside = path.with_name(f"{path.name}.stale-{self.identity.token}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        moved = read_claim(aside)
        if moved is not None and moved.get("run") != holder.get("run"):  # someone claimed it meanwhile: put back
            with contextlib.suppress(OSError):
                os.link(aside, path)
        remove(aside)
        return True

    def release(self, shard: str) -> None:
        if shard in self.held:
            self.held.discard(shard)
            with contextlib.suppress(OSError):
                self.path(shard).unlink()

    def is_stale(self, holder: dict) -> bool:
        run_file = self.folder / "runs" / str(holder.get("run"))
        try:
            touched = run_file.stat().st_mtime
        except OSError:
            return True
        gone = self.identity.judges_gone(holder)
        if gone is not None:  # the pid means the same process here
            return gone
        age = self._now() - touched  # file-system times, not clocks
        if age > self.stale_after:
            return True
        if age <= FRESH_SECONDS or holder.get("host") != self.identity.host:
            return False  # a fresh heartbeat: alive, whatever a pid check in this namespace would say
        pid = int(holder.get("pid", -1))  # same host name, namespace unknown: a dead pid shortens a missed beat
        return not process_alive(pid)

    def _now(self) -> float:
        """The file system's time now (touching this run's own file), or the clock where that fails."""
        try:
            os.utime(self.run_file)
            return self.run_file.stat().st_mtime
        except OSError:
            return time.time()

    def holders(self) -> dict[str, dict]:
        """shard -> claim of every claim file in the store (live or stale)."""
        result = {}
        if self.folder.is_dir():
            for path in self.folder.glob("*.claim"):
                holder = read_claim(path)
                if holder is not None:
                    result[path.name[: -len(".claim")]] = holder
        return result


def read_claim(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
