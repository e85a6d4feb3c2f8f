"""Shard claims: two processes writing into one store never do the same shard, and never destroy each other's work.

A process claims a shard before working on it by creating ``OUT/.claims/<shard>.claim`` exclusively (``O_EXCL``
semantics through a hard link, which NFS honours too; ``If-None-Match: *`` on an object store). The claim names its
run; the run proves it is alive by rewriting ``OUT/.claims/runs/<run>`` every 30 seconds (``touch``: a file's mtime,
an object's LastModified). A claim is stale, and taken over, when its run file is gone, or when its run file has not
been rewritten for ``stale_after`` seconds (the times compared are both the store's, the holder's last beat against
this run's own, so clock skew between hosts does not matter). Taking over is a swap that only one taker wins (the
claim renamed aside and checked; ``If-Match`` on the stale claim's ETag), and a run releases only the claim it
wrote (a claim taken over since is the taker's).

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

from ..processes import process_alive
from .layout import CLAIMS_DIR
from .roots import StoreRoot, store_root

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
FRESH_SECONDS = 3 * HEARTBEAT_SECONDS  # a heartbeat younger than this proves its run alive, whatever its pid says
STALE_AFTER = 600.0
RUNS_DIR = f"{CLAIMS_DIR}/runs"  # one heartbeat file per running process


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
    """This process's claims in one store, and its heartbeat, through the store's root (``roots.StoreRoot``)."""

    def __init__(self, out: Path | StoreRoot, identity: RunIdentity | None = None,
                 stale_after: float = STALE_AFTER, read_only: bool = False) -> None:
        self.root = store_root(out)
        self.identity = identity or RunIdentity.current()
        self.stale_after = stale_after
        self.read_only = read_only  # a reader judging claims (verify): the store's clock read, no heartbeat written
        self._clock: float | None = None
        self.held: dict[str, str] = {}  # shard -> the version of its claim this run wrote
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the run's heartbeat ----------------------------------------------------------------------------------

    @property
    def run_file(self) -> str:
        return f"{RUNS_DIR}/{self.identity.id}"

    def start(self) -> None:
        self.root.write(self.run_file, self.identity.to_json().encode())
        self._thread = threading.Thread(target=self._beat, name="vitok-heartbeat", daemon=True)
        self._thread.start()
        self.remove_dead_runs()

    def remove_dead_runs(self) -> int:
        """Delete the run files of runs that are over (killed: a finished run removes its own), judged as claims
        are (``is_stale``); their claims, if any, stay stale and are taken over as before. Returns how many."""
        removed = 0
        for entry in self.root.list(RUNS_DIR):
            if entry.name == self.identity.id or entry.name.startswith(".") or entry.folder:
                continue
            holder = read_claim_at(self.root, f"{RUNS_DIR}/{entry.name}")
            if holder is None:
                holder = {"run": entry.name}  # unreadable: judged by its age alone
            if holder.get("run") != entry.name:
                continue
            if self.is_stale(holder):
                with contextlib.suppress(OSError):
                    removed += self.root.delete(f"{RUNS_DIR}/{entry.name}")
        if removed:
            logger.info("removed the heartbeat files of %d run(s) that are over", removed)
        return removed

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a missed beat: the next one tries again
                self.root.touch(self.run_file, self.identity.to_json().encode())

    def stop(self) -> None:
        """Release every claim still held, then the run file (a claim without its run file is stale)."""
        self._stop.set()
        for shard in list(self.held):
            self.release(shard)
        with contextlib.suppress(Exception):
            self.root.delete(self.run_file)

    # ---- claims ---------------------------------------------------------------------------------------------

    def path(self, shard: str) -> str:
        return f"{CLAIMS_DIR}/{shard}.claim"

    def try_claim(self, shard: str) -> bool:
        """Claim ``shard`` for this run; False when a live run holds it."""
        name = self.path(shard)
        mine = self.identity.to_json().encode()
        for _ in range(3):
            version = self.root.create(name, mine)
            if version is not None:
                self.held[shard] = version
                return True
            try:
                data, stale_version = self.root.read_with_version(name)
                holder = json.loads(data)
            except (OSError, ValueError):
                continue  # released between our attempt and our read (or being written): try again
            if not self.is_stale(holder):
                return False
            version = self.root.swap(name, mine, stale_version)  # of many takers exactly one succeeds
            if version is not None:
                logger.info("shard %s: claim of run %s is stale, taking it over", shard, holder.get("run"))
                self.held[shard] = version
                return True
        return False

    def release(self, shard: str) -> None:
        version = self.held.pop(shard, None)
        if version is not None:
            with contextlib.suppress(Exception):  # only the claim this run wrote: never one taken over since
                self.root.delete(self.path(shard), version or None)

    def is_stale(self, holder: dict) -> bool:
        run_file = self.root.stat(f"{RUNS_DIR}/{holder.get('run')}")
        if run_file is None:
            return True
        touched = run_file.modified
        gone = self.identity.judges_gone(holder)
        if gone is not None:  # the pid means the same process here
            return gone
        age = self._now() - touched  # the store's times, not clocks
        if age > self.stale_after:
            return True
        if age <= FRESH_SECONDS or holder.get("host") != self.identity.host:
            return False  # a fresh heartbeat: alive, whatever a pid check in this namespace would say
        pid = int(holder.get("pid", -1))  # same host name, namespace unknown: a dead pid shortens a missed beat
        return not process_alive(pid)

    def _now(self) -> float:
        """The store's time now (rewriting this run's own heartbeat; a reader: read once, nothing written), or the
        clock where that fails."""
        try:
            if self.read_only:
                if self._clock is None:
                    self._clock = self.root.clock()
                return self._clock
            return self.root.touch(self.run_file, self.identity.to_json().encode())
        except Exception:
            return time.time()

    def remove_over(self, committed_shards) -> int:
        """Delete the claims of committed shards (``committed_shards()``, asked only when there are claims) whose run
        is over: a run killed between a commit and the release of its claim leaves the claim, and no later run claims
        a done shard again, so nothing else would ever remove it. Judged without this run's clock (no heartbeat is
        written): the run file is gone, or the pid is checkable here and gone; a claim taken over since it was read
        is kept (deleted at the version read). One listing of the claims, a read per claim of a committed shard.
        Returns how many were deleted."""
        claims = [e.name for e in self.root.list(CLAIMS_DIR) if not e.folder and e.name.endswith(".claim")]
        done = {f"{shard}.claim" for shard in committed_shards()} if claims else set()
        removed = 0
        for claim in claims:
            if claim not in done:
                continue
            name = f"{CLAIMS_DIR}/{claim}"
            try:
                data, version = self.root.read_with_version(name)
                holder = json.loads(data)
            except (OSError, ValueError):
                continue
            over = self.root.stat(f"{RUNS_DIR}/{holder.get('run')}") is None or self.identity.judges_gone(holder)
            if over and self.root.delete(name, version):
                removed += 1
        return removed

    def holders(self) -> dict[str, dict]:
        """shard -> claim of every claim file in the store (live or stale)."""
        result = {}
        for entry in self.root.list(CLAIMS_DIR):
            if entry.name.endswith(".claim") and not entry.folder:
                holder = read_claim_at(self.root, f"{CLAIMS_DIR}/{entry.name}")
                if holder is not None:
                    result[entry.name[: -len(".claim")]] = holder
        return result


def read_claim(path: Path) -> dict | None:
    """A claim or run record in a local file (an export's owner record), None when unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_claim_at(root: StoreRoot, name: str) -> dict | None:
    """A claim or heartbeat record in a store, None when unreadable."""
    try:
        return json.loads(root.read(name))
    except (OSError, ValueError):
        return None
