"""Stores in S3 (``vitok/storage/s3.py``), against a real S3 endpoint on loopback: moto's server, started here on a
free port, with a counting, fault-injecting proxy in front of it (``s3server.py``). What moto cannot prove is in
docs/guarantees.md."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import numpy as np
import pytest
from helpers import TINY, make_folder, popen_vitok, wait_for
from helpers import vitok as cli
from s3server import BUCKET

import vitok


def _root(path: str = "feats", **options):
    from vitok.storage.roots import store_root

    return store_root(f"s3://{BUCKET}/{path}", storage_options=options)


# ---- the root: the store's operations on S3 ----------------------------------------------------------------------


def test_exclusive_create_swap_and_a_lost_answer_of_our_own_write(s3):
    root, other = _root(), _root()
    assert root.create("a.claim", b"mine") is not None and other.create("a.claim", b"theirs") is None
    data, version = other.read_with_version("a.claim")
    assert data == b"mine"
    taken = other.swap("a.claim", b"theirs", version)  # compare-and-swap on the ETag read
    assert taken is not None and root.swap("a.claim", b"again", version) is None  # a stale ETag loses
    assert not root.delete("a.claim", version) and root.read("a.claim") == b"theirs"  # never deletes theirs
    assert other.delete("a.claim", taken) and not root.exists("a.claim")
    s3.proxy.inject("PUT", r"/b\.claim", "lose")  # the server writes it, the answer is lost; botocore retries
    assert root.create("b.claim", b"mine") is not None  # 412 on the retry, recognised as this very write
    assert other.create("b.claim", b"theirs") is None and root.read("b.claim") == b"mine"
    assert [s.status for s in s3.requests("PUT", "/b.claim")][:2] == [200, 412]


def test_an_upload_is_whole_or_absent_and_a_killed_one_is_a_leftover(s3, tmp_path):
    import threading

    root = _root(multipart_threshold="1MiB", multipart_chunksize="5MiB")
    staged = tmp_path / "data.bin"
    staged.write_bytes(os.urandom(6 << 20) + b"end")
    s3.proxy.inject("POST", r"uploadId=", "hang")  # the completion never answers: as if the process were killed
    def upload() -> None:
        with contextlib.suppress(Exception):  # (it fails once the proxy stops)
            root.put("shards/shard-000000.h5", staged)

    threading.Thread(target=upload, daemon=True).start()
    assert wait_for(lambda: s3.requests("POST", "uploadId="), timeout=30)
    assert len(s3.requests("PUT", "partNumber=")) == 2  # 5 MiB, then the rest
    assert "feats/shards/shard-000000.h5" not in s3.keys()  # the parts are sent, nothing is visible
    leftovers = root.leftovers("shards")
    assert [lo.becomes for lo in leftovers] == ["shard-000000.h5"]
    from vitok.storage.shards import remove_temps, temp_files

    assert temp_files(root) == ["shard-000000.h5 (an upload never completed)"]
    remove_temps(root, "shard-000000")
    assert not root.leftovers("shards") and not s3.direct.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_a_multipart_upload_declares_its_parts_checksums_as_boto3s_transfer_does(s3, tmp_path, monkeypatch):
    # The service checks each part on arrival and keeps their composite checksum; undeclared, it computes a
    # whole-object checksum at completion (moto in Python: a third of the commit's time on 96 MB shards).
    staged = tmp_path / "data.bin"
    payload = os.urandom(11 << 20)
    for calculation, declared in (("when_supported", "CRC32"), ("when_required", None)):
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", calculation)
        root = _root(multipart_threshold="1MiB", multipart_chunksize="5MiB")
        staged.write_bytes(payload)
        assert root.put(f"shards/{calculation}.h5", staged, exclusive=True)
        head = s3.direct.head_object(Bucket=BUCKET, Key=f"feats/shards/{calculation}.h5", ChecksumMode="ENABLED")
        assert head["ContentLength"] == len(payload) and root.read(f"shards/{calculation}.h5") == payload
        if declared:
            assert "ChecksumCRC32" in head
        else:
            assert "ChecksumCRC32" not in head

# ---- whole runs -------------------------------------------------------------------------------------------------


def _records(store) -> dict:
    drop = {"shard"}
    return {key: {k: v for k, v in store.info(key).items() if k not in drop} for key in store.keys()}


def test_a_remote_store_equals_a_local_store_and_reads_verifies_and_exports(s3, tmp_path):
    imgs = make_folder(tmp_path / "imgs", 6, with_odd=False)
    local, remote = tmp_path / "local", f"s3://{BUCKET}/feats"
    args = [str(imgs), *TINY, "--shard-size", "2", "--features", "merged,deepstack"]
    cli("extract", *args, "-o", str(local), check=True)
    cli("extract", *args, "-o", remote, check=True, cwd=tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(":")]  # nothing local under the URL's name
    assert "feats/vitok.json" in s3.keys() and len(s3.keys("feats/shards/")) == 6  # 3 shards, 3 sidecars
    mine, theirs = vitok.open(local), vitok.open(remote)
    assert theirs.keys() == mine.keys() and len(theirs) == 6
    for key in mine.keys():
        for feature in ("merged", "deepstack"):
            np.testing.assert_array_equal(theirs.get(key, feature), mine.get(key, feature))
    assert _records(theirs) == _records(mine)
    for (k1, t1, o1), (k2, t2, o2) in zip(theirs.iter_shards(), mine.iter_shards()):
        assert k1 == k2 and np.array_equal(t1, t2) and np.array_equal(o1, o2)
    result = cli("verify", remote, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["images_ok"] == 6, result.stderr
    assert cli("extract", *args, "-o", remote, "--json", check=True).stdout.count('"shards_written": 0')  # resumed
    for store, dest in ((str(local), tmp_path / "exported-local"), (remote, tmp_path / "exported-remote")):
        cli("export", store, str(dest), "--pool", "mean", check=True)
    for i in range(3):
        name = f"img_emb/img_emb_{i}.npy"
        assert np.array_equal(np.load(tmp_path / "exported-remote" / name), np.load(tmp_path / "exported-local" / name))


def test_one_key_is_read_by_a_byte_range_of_its_rows(s3, tmp_path):
    from vitok.bench.store import synthetic_store

    synthetic_store(_root(), 60, 64, 256, per_shard=60)  # one shard of 60 images x 64 rows x 256 float16: ~2 MB
    shard = next(k for k in s3.keys() if k.endswith(".h5"))
    size = s3.direct.head_object(Bucket=BUCKET, Key=shard)["ContentLength"]
    vitok.open(f"s3://{BUCKET}/feats").close()  # the first open builds the key index (cached on this machine)
    s3.proxy.clear()
    with vitok.open(f"s3://{BUCKET}/feats") as store:
        tokens = store.get("img00000042")
    assert tokens.shape == (64, 256)
    reads = s3.requests("GET", "/feats/shards/shard-000000.h5")
    row_bytes = 64 * 256 * 2
    assert len(reads) == 1 and reads[0].received == row_bytes, reads  # one ranged GET of the key's rows
    assert sum(s.received for s in s3.proxy.seen) < size / 10  # with the header and two listings
    assert not [s for s in s3.requests("GET", "/shards/") if ".json" in s.path]  # no sidecar read: the index is
    # the cache, checked against the store's listing


def test_faults_mid_upload_are_retried_and_an_endpoint_that_keeps_failing_stops_with_one_line(s3, tmp_path):
    imgs = make_folder(tmp_path / "imgs", 4, with_odd=False)
    remote = f"s3://{BUCKET}/feats"
    args = ["extract", str(imgs), "-o", remote, *TINY, "--shard-size", "2"]
    s3.proxy.inject("PUT", r"/shards/shard-000000\.h5", "503", times=2)
    s3.proxy.inject("PUT", r"/shards/shard-000001\.h5", "reset")
    s3.proxy.inject("PUT", r"/shards/shard-000000\.json", "lose")  # the commit lands, its answer is lost
    s3.proxy.inject("PUT", r"/\.claims/shard-000001\.claim", "reset")
    cli(*args, check=True)
    assert [f.hits for f in s3.proxy.faults] == [2, 1, 1, 1]
    assert cli("verify", remote).returncode == 0 and len(vitok.open(remote)) == 4
    s3.proxy.clear()
    other = f"s3://{BUCKET}/other"
    s3.proxy.inject("PUT", r"/other/shards/shard-000001\.h5", "503", times=100)  # throttled past every retry
    result = cli(*args[:3], other, *args[4:], "--storage-option", "max_attempts=2")
    assert result.returncode == 75, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vitok: error: ") and "SlowDown" in last and "rerun" in last
    assert "other/shards/shard-000001.json" not in s3.keys() and "other/shards/shard-000001.h5" not in s3.keys()
    assert len(vitok.open(other)) == 2  # the shard committed before stays, nothing partial is listed
    s3.proxy.clear()
    cli(*args[:3], other, *args[4:], check=True)
    assert cli("verify", other).returncode == 0 and len(vitok.open(other)) == 4


def test_missing_or_refused_credentials_and_a_missing_bucket_get_one_line_and_exit_2(s3, tmp_path, monkeypatch):
    imgs = make_folder(tmp_path / "imgs", 1, with_odd=False)

    def refused(*args, env=None):
        result = cli(*args, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and lines[-1].startswith("vitok: error: "), result.stderr
        return lines[-1]

    assert "does not exist" in refused("extract", str(imgs), "-o", "s3://no-such-bucket/feats", *TINY)
    assert "does not exist" in refused("info", "s3://no-such-bucket/feats")
    s3.proxy.refused_key = "badkey"
    assert "refused" in refused("info", f"s3://{BUCKET}/feats", env={"AWS_ACCESS_KEY_ID": "badkey"})
    s3.proxy.refused_key = None
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert "no credentials" in refused("extract", str(imgs), "-o", f"s3://{BUCKET}/feats", *TINY)
    assert refused("info", f"s3://{BUCKET}/feats", "--storage-option", "nonsense")  # not KEY=VALUE
    assert not s3.keys()


def test_verify_names_a_damaged_remote_shard_and_the_next_run_redoes_it(s3, tmp_path):
    imgs = make_folder(tmp_path / "imgs", 4, with_odd=False)
    remote = f"s3://{BUCKET}/feats"
    args = ["extract", str(imgs), "-o", remote, *TINY, "--shard-size", "2"]
    cli(*args, check=True)
    key = "feats/shards/shard-000001.h5"
    body = bytearray(s3.direct.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-100] ^= 0xFF  # silent corruption: same size
    s3.direct.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    result = cli("verify", remote)
    assert result.returncode == 1 and "shard-000001" in result.stderr and "checksum" in result.stderr
    s3.direct.put_object(Bucket=BUCKET, Key=key, Body=bytes(body[:-10]))  # truncated: a resume sees it
    assert cli(*args, "--json", check=True).stdout.count('"shards_written": 1')
    assert cli("verify", remote).returncode == 0 and len(vitok.open(remote)) == 4
    s3.direct.delete_object(Bucket=BUCKET, Key="feats/shards/shard-000000.json")  # data left without its sidecar,
    s3.proxy.clear()  # as by a run killed between the two
    assert cli(*args, "--json", check=True).stdout.count('"shards_written": 1')
    puts = [s.status for s in s3.requests("PUT", "/feats/shards/shard-000000.h5")]
    assert puts == [412, 200]  # never over data that may be vouched for: found, removed, then put
    assert cli("verify", remote).returncode == 0 and len(vitok.open(remote)) == 4


def test_verify_while_another_host_writes_judges_its_claim_by_the_servers_clock_and_writes_nothing(s3):
    """``vitok verify s3://…`` from a machine other than the writers' (a laptop, while a cluster runs): the claim of
    a live run on another host is judged by its heartbeat's age on the server's clock; before, verify wrote a
    heartbeat of its own to read that clock, and left it in the bucket."""
    from vitok.bench.store import synthetic_store
    from vitok.storage.claims import Claims, RunIdentity

    synthetic_store(_root(), 4, 8, 16, per_shard=2)
    live = Claims(_root(), RunIdentity("other-host", 1, None, "cafecafe"))
    live.root.write(live.run_file, live.identity.to_json().encode())
    assert live.try_claim("shard-000001")
    before = s3.keys()
    s3.proxy.clear()
    report = vitok.verify(f"s3://{BUCKET}/feats")
    assert report.in_progress == [f"shard-000001 (claimed by {live.identity.id})"] and not report.leftovers
    assert not [s for s in s3.proxy.seen if s.method in ("PUT", "POST", "DELETE")] and s3.keys() == before


def test_an_update_of_a_remote_store_moves_the_shards_it_replaces_aside(s3, tmp_path):
    from PIL import Image

    imgs = make_folder(tmp_path / "imgs", 4, with_odd=False)
    remote = f"s3://{BUCKET}/feats"
    args = ["extract", str(imgs), "-o", remote, *TINY, "--shard-size", "2"]
    cli(*args, check=True)
    changed = sorted(imgs.rglob("*.png"))[0]
    Image.new("RGB", (72, 40), (200, 10, 10)).save(changed)  # one input rewritten in place
    os.utime(changed, (1, 1))
    assert cli(*args).returncode == 2  # refused without --update, naming the change
    cli(*args, "--update", check=True)
    moved = s3.keys("feats/shards/.superseded/")
    assert moved and all(k.endswith((".h5", ".json")) for k in moved)  # data and sidecar, copied then deleted
    assert not set(k.replace(".superseded/", "") for k in moved) & set(s3.keys("feats/shards/"))
    store = vitok.open(remote)
    assert len(store) == 4 and store.info(changed.relative_to(imgs).as_posix())["size"] == [72, 40]
    assert cli("verify", remote).returncode == 0


# ---- processes -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # two whole processes
def test_kill_9_mid_upload_then_resume(s3, tmp_path):
    imgs = make_folder(tmp_path / "imgs", 6, with_odd=False)
    remote = f"s3://{BUCKET}/feats"
    args = ["extract", str(imgs), "-o", remote, *TINY, "--shard-size", "2", "--storage-option",
            "multipart_threshold=1"]
    s3.proxy.inject("POST", r"/shards/shard-000001\.h5\?uploadId=", "hang")  # completing its upload never answers
    process = popen_vitok(*args, env=s3.env)
    assert wait_for(lambda: s3.requests("POST", "/shards/shard-000001.h5?uploadId="), timeout=120, process=process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert "feats/shards/shard-000001.h5" not in s3.keys() and "feats/shards/shard-000001.json" not in s3.keys()
    assert s3.direct.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    assert len(vitok.open(remote)) == 2  # shard-000000 only: nothing of the killed upload is listed
    report = cli("verify", remote, "--json")
    assert report.returncode == 1 and any("never completed" in line for line in json.loads(report.stdout)["leftovers"])
    s3.proxy.clear()
    done = popen_vitok(*args, "--json", env=s3.env, capture=True)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    assert json.loads(out)["shards_written"] == 2  # the killed shard and the one never started; the first stays
    assert cli("verify", remote).returncode == 0 and len(vitok.open(remote)) == 6
    assert not s3.direct.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


@pytest.mark.slow  # two whole processes
def test_two_processes_racing_for_the_same_units_commit_each_once(s3, tmp_path):
    imgs = make_folder(tmp_path / "imgs", 8, with_odd=False)
    remote = f"s3://{BUCKET}/feats"
    args = ["extract", str(imgs), "-o", remote, *TINY, "--shard-size", "2", "--json"]
    processes = [popen_vitok(*args, env=s3.env, capture=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [o[1][-1500:] for o in outputs]
    summaries = [json.loads(o[0]) for o in outputs]
    assert sum(s["shards_written"] for s in summaries) == 4  # every unit committed once, none lost
    sidecar_puts = [s for s in s3.requests("PUT", ".json") if "/feats/shards/" in s.path and s.status == 200]
    assert len(sidecar_puts) == 4
    assert cli("verify", remote).returncode == 0 and len(vitok.open(remote)) == 8


@pytest.mark.slow  # three processes at once
def test_a_slurm_array_with_gpus_children_writes_one_bucket_at_once_each_unit_once(s3, tmp_path, monkeypatch):
    """Two SLURM array tasks into one bucket at the same moment: task 0 runs ``--gpus 0,1`` (its part split between
    two children, parts 0/4 and 2/4), task 1 runs alone (part 1/2). The endpoint comes from ``--storage-option``
    alone, which ``--gpus`` passes on to its children. ``--gpus`` needs CUDA: each child is started with ``--device
    cuda:G``, which a machine without GPUs refuses (exit 2), so here the children are started as ``--gpus`` builds
    them with only that flag replaced by ``--device cpu``."""
    import subprocess

    from conftest import ROOT

    imgs = make_folder(tmp_path / "imgs", 8, with_odd=False)
    local, remote = tmp_path / "local", f"s3://{BUCKET}/feats"
    args = [str(imgs), *TINY, "--shard-size", "2", "--features", "merged,deepstack"]
    cli("extract", *args, "-o", str(local), check=True)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    flags = [*args, "-o", remote, "--storage-option", f"endpoint_url={s3.endpoint}", "--json"]
    array = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    alone = popen_vitok("extract", *flags, env=array | {"SLURM_ARRAY_TASK_ID": "1"}, capture=True)
    started, real = [], subprocess.Popen

    def on_cpu(cmd, **kwargs):
        started.append(cmd)
        return real([("cpu" if arg.startswith("cuda:") else arg) for arg in cmd], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", on_cpu)
    split = cli("extract", *flags, "--gpus", "0,1", env=array | {"SLURM_ARRAY_TASK_ID": "0", "PYTHONPATH": str(ROOT)})
    monkeypatch.setattr(subprocess, "Popen", real)
    out, err = alone.communicate(timeout=300)
    assert split.returncode == 0 and alone.returncode == 0, (split.stderr[-1500:], err[-1500:])
    assert [cmd[cmd.index("--device") + 1] for cmd in started] == ["cuda:0", "cuda:1"]
    assert all(f"endpoint_url={s3.endpoint}" in cmd for cmd in started)
    summaries = [json.loads(split.stdout.strip().splitlines()[-1]), json.loads(out.strip().splitlines()[-1])]
    assert [s["part"] for s in summaries] == ["0/4,2/4", "1/2"]
    assert sum(s["shards_written"] for s in summaries) == 4
    commits = sorted(s.path for s in s3.requests("PUT", "/feats/shards/") if s.path.endswith(".json")
                     and s.status == 200)
    assert commits == [f"/{BUCKET}/feats/shards/shard-{i:06d}.json" for i in range(4)]  # each unit once
    parts = [json.loads(s3.direct.get_object(Bucket=BUCKET, Key=f"feats/shards/shard-{i:06d}.json")["Body"].read())
             ["part"] for i in range(4)]
    assert parts == ["0/4", "1/2", "2/4", "1/2"]
    assert len([s for s in s3.requests("PUT", "/feats/vitok.json") if s.status == 200]) == 1
    mine, theirs = vitok.open(local), vitok.open(remote, storage_options={"endpoint_url": s3.endpoint})
    assert theirs.keys() == mine.keys() and len(mine) == 8
    for key in mine.keys():
        for feature in ("merged", "deepstack"):
            np.testing.assert_array_equal(theirs.get(key, feature), mine.get(key, feature))
    assert _records(theirs) == _records(mine)
    assert cli("verify", remote, "--storage-option", f"endpoint_url={s3.endpoint}").returncode == 0


@pytest.mark.slow
def test_torchrun_processes_write_one_bucket_each_unit_once(s3, tmp_path):
    """``torchrun --nproc-per-node 2`` into one bucket: each rank takes its part from the launcher's environment and
    commits through the same conditional writes; the bucket equals a one-process local store."""
    import shutil
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed")
    imgs = make_folder(tmp_path / "imgs", 8, with_odd=False)
    local, remote = tmp_path / "local", f"s3://{BUCKET}/feats"
    args = [str(imgs), *TINY, "--shard-size", "2", "--device", "cpu"]
    cli("extract", *args, "-o", str(local), check=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "vitok", "extract",
                             *args, "-o", remote], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    commits = sorted(s.path for s in s3.requests("PUT", "/feats/shards/") if s.path.endswith(".json")
                     and s.status == 200)
    assert commits == [f"/{BUCKET}/feats/shards/shard-{i:06d}.json" for i in range(4)]  # each unit once
    parts = {json.loads(s3.direct.get_object(Bucket=BUCKET, Key=f"feats/shards/shard-{i:06d}.json")["Body"].read())
             ["part"] for i in range(4)}
    assert parts == {"0/2", "1/2"}
    mine, theirs = vitok.open(local), vitok.open(remote)
    assert theirs.keys() == mine.keys() and len(mine) == 8
    for key in mine.keys():
        np.testing.assert_array_equal(theirs.get(key), mine.get(key))
    assert _records(theirs) == _records(mine)
    assert cli("verify", remote).returncode == 0


# ---- reads whose answer is cut midway -----------------------------------------------------------------------------


def _tokens(url: str) -> dict:
    with vitok.open(url) as store:
        return {key: store.get(key) for key in store.keys()}


def test_reads_cut_mid_body_are_resumed_and_give_the_same_tokens(s3):
    from vitok.bench.store import synthetic_store

    synthetic_store(_root(), 8, 16, 256, per_shard=4)  # two shards of 4 images x 16 rows x 256 float16
    remote = f"s3://{BUCKET}/feats"
    expected = _tokens(remote)
    s3.proxy.clear()
    row_bytes = 16 * 256 * 2
    s3.proxy.inject("GET", r"/shards/shard-000000\.h5", "cut", times=2, after=row_bytes // 3)
    s3.proxy.inject("GET", r"/shards/shard-000001\.h5", "cut-reset", times=2, after=row_bytes // 2)
    got = _tokens(remote)
    assert [f.hits for f in s3.proxy.faults] == [2, 2]
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in expected)
    resumed = [s.range for s in s3.requests("GET", "/shards/shard-000000.h5")][:3]
    first = int(resumed[0].split("=")[1].split("-")[0])  # the key's rows; then from the first byte still needed
    assert resumed[1].startswith(f"bytes={first + row_bytes // 3}-") and resumed[1].split("-")[1] == \
        resumed[0].split("-")[1], resumed
    s3.proxy.clear()  # whole objects (a checksum's GET, the sidecars): cut after a few bytes, twice each
    s3.proxy.inject("GET", r"/shards/shard-000000\.h5", "cut", times=2, after=4096)
    s3.proxy.inject("GET", r"/shards/shard-000001\.json", "cut-reset", times=2, after=100)
    result = cli("verify", remote, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["images_ok"] == 8, result.stderr
    assert [f.hits for f in s3.proxy.faults] == [2, 2]
    assert _tokens(remote).keys() == expected.keys()


def test_a_read_cut_every_time_stops_with_one_line_and_exit_75(s3):
    from vitok.bench.store import synthetic_store

    synthetic_store(_root(), 4, 16, 256, per_shard=4)
    remote = f"s3://{BUCKET}/feats"
    s3.proxy.inject("GET", r"/shards/shard-000000\.h5", "cut", times=1000, after=10)
    result = cli("verify", remote, "--storage-option", "max_attempts=3")
    assert result.returncode == 75, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vitok: error: ") and "dropped while reading" in last and "rerun" in last, last
    assert len(s3.requests("GET", "/shards/shard-000000.h5")) == 3  # bounded: max_attempts in all
    quick = cli("verify", remote, "--quick", "--storage-option", "max_attempts=2")  # no checksum: opened by ranges
    assert quick.returncode == 75 and "dropped while reading" in quick.stderr, quick.stderr  # unreachable, not damaged


# ---- 409 ConditionalRequestConflict: a concurrent conditional write of the same key ------------------------------


def test_a_conditional_write_answered_409_looks_then_loses_or_sends_again(s3, tmp_path):
    from vitok.errors import StoreUnavailableError

    root = _root(multipart_threshold="1MiB", multipart_chunksize="5MiB")

    def theirs(key: str):  # another writer's object lands while ours is answered 409
        return lambda: s3.direct.put_object(Bucket=BUCKET, Key=f"feats/{key}", Body=b"theirs")

    s3.proxy.inject("PUT", r"/a\.json", "409")
    assert root.create("a.json", b"mine") is not None and root.read("a.json") == b"mine"  # nobody's: sent again
    assert [s.status for s in s3.requests("PUT", "/a.json")] == [409, 200]
    s3.proxy.inject("PUT", r"/b\.json", "409", then=theirs("b.json"))
    assert root.create("b.json", b"mine") is None and root.read("b.json") == b"theirs"  # lost, as to a 412
    assert [s.status for s in s3.requests("PUT", "/b.json")] == [409]  # settled by a look, not sent again
    version = root.stat("a.json").version
    s3.proxy.inject("PUT", r"/a\.json", "409", then=theirs("a.json"))  # a swap: the object changed meanwhile
    assert root.swap("a.json", b"again", version) is None and root.read("a.json") == b"theirs"

    staged = tmp_path / "data.bin"
    body = os.urandom(6 << 20)
    for name, then, outcome in (("c.h5", None, True), ("d.h5", theirs("d.h5"), False)):
        staged.write_bytes(body)
        s3.proxy.inject("POST", rf"/{name}\?uploadId=", "409", then=then)  # the completion
        assert root.put(name, staged, exclusive=True) is outcome
        assert root.read(name) == (body if outcome else b"theirs")
        begun = [s for s in s3.requests("POST", f"/{name}?uploads")]
        assert len(begun) == (2 if outcome else 1)  # begun again only when nobody else's object is there
        assert not s3.direct.list_multipart_uploads(Bucket=BUCKET).get("Uploads")  # none left open
    s3.proxy.inject("PUT", r"/e\.json", "409", times=100)
    with pytest.raises(StoreUnavailableError, match="409 ConditionalRequestConflict.*rerun"):
        root.create("e.json", b"mine")
    assert len(s3.requests("PUT", "/e.json")) == 5 and not root.exists("e.json")  # bounded


# ---- whole shards: one GET each -----------------------------------------------------------------------------------


def test_a_whole_shard_is_one_get_and_a_key_one_ranged_get(s3, tmp_path):
    from vitok.bench.store import synthetic_store

    synthetic_store(_root(), 24, 64, 1024, per_shard=12)  # two shards of 12 images x 64 rows x 1024 float16: 1.5 MB
    remote = f"s3://{BUCKET}/feats"
    vitok.open(remote).close()  # (the key index, built once and cached on this machine)

    def gets() -> list[int]:
        return [len(s3.requests("GET", f"/feats/shards/shard-00000{i}.h5")) for i in range(2)]

    s3.proxy.clear()
    with vitok.open(remote) as store:
        shards = list(store.iter_shards(dtype=None))
        assert gets() == [1, 1]  # each shard's object fetched once, not a GET per 1 MB chunk or 256 KiB block
        key = store.keys()[17]
        tokens = store.stored_rows(key)
        assert gets() == [1, 2]  # one key: one ranged GET of its rows
    assert s3.requests("GET", "/shard-000001.h5")[-1].received == 64 * 1024 * 2
    keys, data, offsets = shards[1]
    i = keys.index(key)
    assert np.array_equal(data[offsets[i]:offsets[i + 1]], tokens)
    s3.proxy.clear()
    result = cli("verify", remote, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["images_ok"] == 24, result.stderr
    assert gets() == [1, 1]  # checksummed and opened from one copy
    s3.proxy.clear()
    cli("export", remote, str(tmp_path / "exported"), "--pool", "mean", check=True)
    assert gets() == [2, 2]  # the export's check (as verify), then the shard's tokens
    assert not [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()]  # the copies are gone


# ---- exports into a bucket ------------------------------------------------------------------------------------

MARKER, PENDING = ".vitok-export.json", ".vitok-export-pending.json"
LAYOUTS = {"embedding-reader": ["--pool", "mean"], "vllm-ec": [], "sglang": []}


@pytest.fixture(scope="module")
def every_token_store(tmp_path_factory):
    """Four images, every token, merged + DeepStack, two shards (what every layout can export)."""
    root = tmp_path_factory.mktemp("export-store")
    vitok.extract([str(make_folder(root / "imgs", 4, with_odd=False))], root / "out", model="qwen3-vl-tiny",
                  workers=0, shard_size=2, features=["merged", "deepstack"])
    return root / "out"


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _objects(s3, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) + 1:]: s3.direct.get_object(Bucket=BUCKET, Key=k)["Body"].read()
            for k in s3.keys(prefix + "/")}


def _without_marker(files: dict[str, bytes]) -> tuple[dict[str, bytes], dict]:
    marker = json.loads(files.pop(MARKER))
    marker.pop("created")
    return files, marker


def _upload_store(s3, folder, prefix: str) -> str:
    """A copy of a local store in the bucket, object for object (a store is its files)."""
    for name, data in _files(folder).items():
        if not name.startswith(".index/"):
            s3.direct.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{BUCKET}/{prefix}"


@pytest.mark.slow  # three exports each way (~6 s on 2 cores)
def test_every_layout_exported_into_a_bucket_equals_the_same_export_into_a_folder(s3, every_token_store, tmp_path):
    for layout, args in LAYOUTS.items():
        local = tmp_path / layout
        cli("export", str(every_token_store), str(local), "--layout", layout, *args, check=True)
        remote = f"s3://{BUCKET}/exports/{layout}"
        cli("export", str(every_token_store), remote, "--layout", layout, *args, check=True)
        mine, mine_marker = _without_marker(_files(local))
        theirs, their_marker = _without_marker(_objects(s3, f"exports/{layout}"))
        assert theirs == mine and mine, sorted(theirs)  # same names, same bytes; no pending record left
        assert their_marker == mine_marker
        if layout != "embedding-reader":  # read back from the bucket as a server would load it
            report = cli("verify", remote, "--embeds", "--json", check=True)
            assert json.loads(report.stdout) == {"checked": 4, "layout": layout, "problems": [], "clean": True}
    staged = [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()]
    assert not staged  # the local staging space is emptied as files go up
    from vitok.consumers.serving import read_sglang
    from vitok.consumers.vllm_client import VllmCache

    assert len(list(read_sglang(f"s3://{BUCKET}/exports/sglang"))) == 4
    cache = VllmCache.from_export(f"s3://{BUCKET}/exports/vllm-ec")
    assert cache.entries == VllmCache.from_export(tmp_path / "vllm-ec").entries


@pytest.mark.slow  # five exports, two of a store in the bucket, and botocore's backoff (~9 s on 2 cores)
def test_a_fault_mid_export_leaves_no_marker_and_the_rerun_finishes_it(s3, every_token_store, tmp_path):
    store = _upload_store(s3, every_token_store, "feats")  # a remote store, exported into the same bucket
    local = tmp_path / "ec"
    cli("export", str(every_token_store), str(local), "--layout", "vllm-ec", check=True)
    dest = f"s3://{BUCKET}/ec"
    args = ["export", store, dest, "--layout", "vllm-ec"]
    s3.proxy.inject("PUT", r"/fresh/uuids\.jsonl", "503", times=100)
    failed = cli("export", str(every_token_store), f"s3://{BUCKET}/fresh", "--layout", "vllm-ec", "--storage-option",
                 "max_attempts=2")
    assert failed.returncode == 75 and not s3.keys("fresh/")  # into an empty prefix: what it had put is deleted
    s3.proxy.clear()
    cli("export", str(every_token_store), dest, "--layout", "vllm-ec", "--key", "content", check=True)  # an earlier
    # export of this store (the same store, local: its identity is its header's), its entries named otherwise
    earlier = set(_objects(s3, "ec"))
    s3.proxy.inject("PUT", r"/ec/.*encoder_cache\.safetensors", "reset")  # dropped once: retried, unseen
    s3.proxy.inject("PUT", r"/ec/uuids\.jsonl", "503", times=100)  # the last file: throttled past every retry
    result = cli(*args, "--storage-option", "max_attempts=2")
    assert result.returncode == 75, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vitok: error: ") and "SlowDown" in last and "rerun" in last
    left = {k.removeprefix("ec/") for k in s3.keys("ec/")}
    assert MARKER not in left and PENDING in left  # unfinished, and marked so
    assert left - {PENDING} == (earlier - {MARKER}) | (set(_files(local)) - {MARKER, "uuids.jsonl"})
    assert json.loads(s3.direct.get_object(Bucket=BUCKET, Key="ec/" + PENDING)["Body"].read())["run"] is None
    refused = cli("verify", dest, "--embeds")
    assert refused.returncode == 2 and "neither a vitok export" in refused.stderr  # no reader takes it as done
    entry = next(name for name in sorted(_files(local)) if name.endswith(".safetensors"))
    damaged = bytearray(s3.direct.get_object(Bucket=BUCKET, Key=f"ec/{entry}")["Body"].read())
    damaged[-1] ^= 0xFF  # same size, other bytes: must not be taken for the file
    s3.direct.put_object(Bucket=BUCKET, Key=f"ec/{entry}", Body=bytes(damaged))
    s3.proxy.clear()
    cli(*args, check=True)  # the ownerless record is taken over at once
    theirs, their_marker = _without_marker(_objects(s3, "ec"))
    mine, mine_marker = _without_marker(_files(local))
    assert theirs == mine  # the earlier export's entries deleted, the damaged one put again
    assert {k: v for k, v in their_marker.items() if k != "store"} == {k: v for k, v in mine_marker.items()
                                                                         if k != "store"}
    puts = [s.path.split("?")[0].split("/ec/", 1)[1] for s in s3.requests("PUT", "/ec/") if s.status == 200
            and "/.vitok-probe/" not in s.path]  # (the bucket's check that conditional writes are honoured)
    assert puts[-1] == MARKER  # the marker last, after every file
    assert set(puts[:-1]) == {PENDING, entry, "uuids.jsonl"}  # what was up and equal is not sent again
    assert s3.requests("DELETE", "/ec/" + PENDING)[-1].status == 204  # then the record goes


@pytest.mark.slow  # five exports (~4.5 s on 2 cores)
def test_an_unrelated_prefix_or_one_being_written_is_refused_and_a_killed_export_is_taken_over(
        s3, every_token_store, tmp_path, monkeypatch):
    import subprocess
    import sys

    from vitok.storage.claims import RunIdentity

    store = str(every_token_store)
    endpoint = s3.env["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # DEST's endpoint from --storage-option, as for stores
    given = ["--layout", "vllm-ec", "--storage-option", f"endpoint_url={endpoint}"]
    s3.direct.put_object(Bucket=BUCKET, Key="mine/notes.txt", Body=b"keep me")
    for dest, message in ((f"s3://{BUCKET}/mine", "not a vitok export"),
                          ("s3://no-such-bucket/ec", "does not exist")):
        result = cli("export", store, dest, *given)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert s3.keys() == ["mine/notes.txt"]
    result = cli("export", store, str(tmp_path / "local"), *given)  # neither the store nor DEST is in a bucket
    assert result.returncode == 2 and "neither the store nor DEST" in result.stderr

    me = json.loads(RunIdentity.current().to_json())
    pending = {"vitok_export_pending": 1, "store_id": None, "store": store, "started": "x", "run": me}
    from vitok.consumers.export_target import store_identity

    pending["store_id"] = store_identity(vitok.open(store).header)
    s3.direct.put_object(Bucket=BUCKET, Key="busy/" + PENDING, Body=json.dumps(pending).encode())
    result = cli("export", store, f"s3://{BUCKET}/busy", *given)  # a live export (this process) writes it
    assert result.returncode == 1 and "being written by another export" in result.stderr, result.stderr
    assert s3.keys("busy/") == ["busy/" + PENDING]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pending["run"] = {**me, "pid": int(dead.stdout)}  # killed outright: its process is gone on this host
    s3.direct.put_object(Bucket=BUCKET, Key="busy/" + PENDING, Body=json.dumps(pending).encode())
    s3.direct.put_object(Bucket=BUCKET, Key="busy/gone-0000/encoder_cache.safetensors", Body=b"it had uploaded")
    cli("export", store, f"s3://{BUCKET}/busy", *given, check=True)
    names = [k.removeprefix("busy/") for k in s3.keys("busy/")]
    assert names == sorted([MARKER, "uuids.jsonl", *(f"{line['uuid']}/encoder_cache.safetensors" for line in map(
        json.loads, s3.direct.get_object(Bucket=BUCKET, Key="busy/uuids.jsonl")["Body"].read().splitlines()))])
    assert "gone-0000/encoder_cache.safetensors" not in names  # what the killed one left, deleted

    other = f"s3://{BUCKET}/other-store"
    _upload_store(s3, every_token_store, "feats")
    result = cli("export", other.replace("other-store", "feats"), f"s3://{BUCKET}/feats/inside", *given)
    assert result.returncode == 2 and "inside the store" in result.stderr


def test_an_export_beats_its_record_and_stops_without_a_marker_once_another_took_it_over(s3, tmp_path, monkeypatch):
    from vitok.consumers import export_target
    from vitok.errors import StoreError
    from vitok.storage.roots import LocalRoot

    monkeypatch.setattr(export_target, "HEARTBEAT", 0.2)
    store = LocalRoot(tmp_path / "store")  # (only its location matters here: DEST must not overlap it)
    target = export_target.open_target(f"s3://{BUCKET}/ec", "blake2b:1", store)
    folder = target.begin()
    (folder / "a.bin").write_bytes(b"first")
    target.done(folder / "a.bin")
    beats = lambda status: [s for s in s3.requests("PUT", "/ec/" + PENDING) if s.status == status]  # noqa: E731
    assert wait_for(lambda: len(beats(200)) >= 3, timeout=30)  # created, then rewritten while nothing is uploaded
    # another export takes DEST over (as one on another host does once this one's heartbeat looks stale)
    s3.direct.put_object(Bucket=BUCKET, Key="ec/" + PENDING, Body=b'{"store_id": "blake2b:1", "run": null}')
    assert wait_for(lambda: beats(412) and target._lost is not None, timeout=30)  # the next beat finds it not its own
    (folder / "b.bin").write_bytes(b"second")
    with pytest.raises(StoreError, match="another export took it over"):
        target.done(folder / "b.bin")
    target.abort()
    assert s3.keys("ec/") == ["ec/" + PENDING, "ec/a.bin"]  # never marked finished by this one, b.bin never sent
    assert json.loads(s3.direct.get_object(Bucket=BUCKET, Key="ec/" + PENDING)["Body"].read()) == {
        "store_id": "blake2b:1", "run": None}  # the taker's record is left alone


@pytest.mark.parametrize("option", ["max_attempts=-1", "max_attempts=0", "endpoint_url=ftp://host", "verify=maybe",
                                    "verify=/no/such/ca.pem", "use_ssl=perhaps", "multipart_threshold=-5",
                                    "multipart_chunksize=-1MiB"])
def test_a_storage_option_the_client_cannot_take_is_one_line(tmp_path, option):
    """Values botocore refuses only later (an internal error, exit 1) or reads as something else (any string as
    verify=True, a CA bundle's path dropped) are refused up front, naming the value."""
    result = cli("info", f"s3://{BUCKET}/feats", "--storage-option", option)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("vitok: error: "), result.stderr
    assert option.split("=", 1)[1] in lines[0]


def test_verify_takes_a_ca_bundle_file_and_an_endpoint_from_the_environment_is_checked(tmp_path, monkeypatch):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    assert _root(verify=str(bundle)).options["verify"] == str(bundle)  # botocore's verify: a bundle's path
    assert _root(verify="false").options["verify"] is False
    from vitok.errors import StoreAccessError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://host")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(StoreAccessError, match="ftp://host"):
        _root().exists("vitok.json")


def test_a_store_url_that_is_not_utf8_is_one_line(tmp_path):
    url = f"s3://{BUCKET}/caf" + b"\xe9".decode("utf-8", "surrogateescape")
    result = cli("info", url)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"vitok: error: the store s3://{BUCKET}/caf\\xe9: an S3 bucket or key must be UTF-8 text; rename the prefix")
