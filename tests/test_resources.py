"""Bounds and resources: open files, worker processes, a full disk. Each is tried the way a user meets it: a low
``ulimit -n``, a killed parent, a disk that fills at any byte."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT
from helpers import make_folder


def run_python(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=timeout)


# ---- a full disk, at any byte of an HDF5 shard ----------------------------------------------------------------------

FULL_DISK = """
    import errno
    from vitok.storage import hdf5

    state = {"written": 0, "limit": None}

    class FullDisk(hdf5._GuardedFile):
        '''A disk with room for `limit` more bytes of shard data: a short write, then ENOSPC, as write(2) does.'''

        def write_some(self, view):
            limit = state["limit"]
            if limit is not None and state["written"] + len(view) > limit:
                room = max(0, limit - state["written"])
                if room == 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                view = view[:room]
            written = super().write_some(view)
            state["written"] += written
            return written

    hdf5._GuardedFile = FullDisk
"""


@pytest.mark.slow
def test_a_disk_full_at_any_byte_of_an_hdf5_shard_is_a_clean_error(tmp_path):
    """Regression: ENOSPC at some offsets crashed the interpreter ("Can't decrement id ref count", then SIGABRT,
    SIGSEGV or SIGBUS) instead of the clean message. Every offset of the first shard's writes, several times."""
    script = FULL_DISK + """
    import gc, os, shutil, sys
    from pathlib import Path
    from vitok.bench.store import synthetic_store
    from vitok.errors import DiskFullError

    def run(limit, out):
        state["written"], state["limit"] = 0, limit
        try:
            synthetic_store(out, 40, 16, 64, "hdf5", per_shard=20)
            outcome = "ok"
        except DiskFullError as exc:
            assert "no space left on the device" in str(exc), exc
            outcome = "full"
        gc.collect()  # a half-closed HDF5 file crashed here, or at exit
        left = [p.name for p in (out / "shards").glob(".*.tmp")]
        assert not left, (limit, left)
        shutil.rmtree(out)
        return outcome

    os.fsync = lambda fd: None  # durability is not under test here, and fsync is slow on shared disks
    base = Path(sys.argv[1])
    assert run(None, base / "whole") == "ok"
    total = state["written"]
    limits = sorted(set(range(0, 4096, 128)) | {total * i // 40 for i in range(40)} | {total - 1})
    outcomes = [run(limit, base / f"o{n}") for n, limit in enumerate(limits * 2)]
    assert set(outcomes) == {"full"}, outcomes
    print("offsets", len(limits), "bytes", total)
    """
    result = run_python(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offsets" in result.stdout


@pytest.mark.slow
def test_a_disk_full_during_extract_exits_1_and_a_rerun_resumes(tmp_path):
    """Through the CLI: exit 1, one line naming the cause, no temporary file left, then the same command resumes."""
    folder = make_folder(tmp_path / "imgs", count=6, with_odd=False)
    script = FULL_DISK + """
    import contextlib, io, sys
    from pathlib import Path
    import vitok
    from vitok.cli import app as cli

    folder, base = sys.argv[1], sys.argv[2]

    def extract(out, limit):
        state["written"], state["limit"] = 0, limit
        sys.argv = ["vitok", "extract", folder, "-o", out, "--model", "qwen3-vl-tiny", "--workers", "0", "--quiet",
                    "--shard-size", "2", "--features", "patch", "--store-dtype", "float32"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                return exc.code, err.getvalue()

    for limit in (0, 5000, 90000):
        out = f"{base}/out{limit}"
        code, err = extract(out, limit)
        assert code == 1 and "no space left on the device" in err and "internal error" not in err, (limit, err)
        assert not list(Path(out, "shards").glob(".*.tmp")), limit
        assert extract(out, None)[0] == 0
        assert len(vitok.open(out)) == 6 and vitok.verify(out).clean
    print("done")
    """
    result = run_python(script, folder, tmp_path)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-3000:]


# ---- open files: a store of many shards under a low ulimit -n -------------------------------------------------------


@pytest.mark.slow
def test_every_read_path_works_under_ulimit_n_64_on_a_store_of_many_shards(tmp_path):
    """Regression: one open reader per shard failed key reads, iter_shards and export at ~60 shards with ulimit -n
    64 ("Too many open files"); array() of an NPY store held a memory map (a descriptor) per shard."""
    pytest.importorskip("pyarrow")
    script = """
    import os, resource, sys
    from pathlib import Path
    from vitok.bench.store import synthetic_store

    base = Path(sys.argv[1])
    os.fsync = lambda fd: None  # durability is not under test here
    stores = {}
    for fmt, dtype in (("hdf5", "float16"), ("npy", "float32"), ("wds", "float16")):
        stores[fmt] = base / fmt
        synthetic_store(stores[fmt], 130, 1, 8, fmt, per_shard=1, store_dtype=dtype)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    import vitok
    from vitok.consumers.export import export_embedding_reader

    for fmt, out in stores.items():
        store = vitok.open(out)
        assert len([store[key] for key in store.keys()]) == 130, fmt
        assert sum(len(keys) for keys, _, _ in store.iter_shards()) == 130, fmt
        keys, array = store.array()
        assert array.shape == (130, 8) and len(keys) == 130, fmt
        store.close()
        assert export_embedding_reader(out, base / f"export-{fmt}") == 130, fmt
        assert vitok.verify(out).clean, fmt
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(40)]  # other code takes descriptors meanwhile
    store = vitok.open(stores["hdf5"])
    assert len([store[key] for key in store.keys()]) == 130
    print("read", len(held))
    """
    result = run_python(script, tmp_path)
    assert result.returncode == 0 and "read" in result.stdout, result.stderr[-3000:]


# ---- decode workers: as many as the machine holds, and never outliving the run ---------------------------------------


def test_workers_are_clamped_to_what_the_machine_holds_with_one_warning(caplog):
    from vitok.pipeline.workers import clamp_workers, workers_allowed

    limit, why = workers_allowed()
    assert 1 <= limit <= 2 * os.cpu_count() and "cores" in why
    with caplog.at_level("WARNING", logger="vitok"):
        assert clamp_workers(1) == 1 and not caplog.records
        assert clamp_workers(1000) == limit
    assert len(caplog.records) == 1 and "--workers 1000" in caplog.text and f"using {limit}" in caplog.text


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = _read(f"/proc/{entry}/stat")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _ignored_signals(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    return 0


def _alive(pid: int) -> bool:
    try:
        state = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_decode_workers_die_with_a_killed_parent_and_never_ignore_sigterm(tmp_path):
    """Regression: after SIGKILL of the main process its decode workers lived on, ignoring SIGTERM and SIGINT, and
    kept the output pipe open (``vitok ... | grep`` hung). Started the way ``nohup``/``&`` starts a run: with
    SIGINT and SIGTERM ignored."""
    import signal
    import time

    from helpers import wait_for

    folder = make_folder(tmp_path / "imgs", count=8, with_odd=False)
    script = (
        "import sys, time, vitok\n"
        "from vitok.inputs.readers.files import FilesReader\n"
        "def stuck(self, unit, start=0, stop=None):\n"
        "    time.sleep(600)  # a worker busy on a slow input\n"
        "    yield from ()\n"
        "FilesReader.samples = stuck\n"
        "vitok.extract([sys.argv[1]], sys.argv[2], model='qwen3-vl-tiny', workers=2, shard_size=2)\n"
    )

    def ignore_signals():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    proc = subprocess.Popen([sys.executable, "-c", script, str(folder), str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=ignore_signals)
    workers: list[int] = []
    try:
        assert wait_for(lambda: len(_children(proc.pid)) >= 2, timeout=120, process=proc), "no workers started"
        time.sleep(1.0)  # past the workers' initialiser
        workers = _children(proc.pid)
        for pid in workers:
            ignored = _ignored_signals(pid)
            assert not ignored & (1 << (signal.SIGTERM - 1)) and not ignored & (1 << (signal.SIGINT - 1)), pid
        proc.kill()
        proc.wait(timeout=30)
        assert wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=15), "orphaned workers live on"
        assert proc.stdout.read() == b""  # EOF: nothing holds the pipe open any more
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        for pid in workers:  # (orphans of the old code: their parent is no longer proc)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("code", ["EPERM", "EOPNOTSUPP", "EXDEV"])
def test_a_store_is_made_on_a_file_system_without_hard_links(tmp_path, monkeypatch, code):
    """exFAT, gcsfuse, s3fs and some SMB mounts refuse os.link: exclusive creation falls back to O_EXCL."""
    import errno

    import vitok
    from vitok.storage.files import create_exclusive

    def no_link(*_args, **_kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "link", no_link)
    first = tmp_path / "x" / "claim"
    assert create_exclusive(first, "first") and not create_exclusive(first, "second")
    assert first.read_text() == "first" and [p.name for p in first.parent.iterdir()] == ["claim"]
    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    summary = vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, shard_size=2)
    assert summary.ok == 3 and vitok.verify(tmp_path / "out").clean
