"""Exports: DEST never mixes two stores, damage and unfinished stores are refused, NaN/Inf never leave silently, every
key is exportable, errors are one line; the serving layouts (vLLM's encoder-cache connector, SGLang records) load the
way their consumers load them and equal Store.image_embeds; the validator refuses what a server would choke on."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_folder, photo

import vitok
from vitok.consumers.export import export, export_embedding_reader
from vitok.errors import StoreError, UsageError

pq = pytest.importorskip("pyarrow.parquet")
MARKER = ".vitok-export.json"


def _invoke(main, args):
    import contextlib
    import io
    import sys

    out, err = io.StringIO(), io.StringIO()
    code = 0
    old = sys.argv
    sys.argv = ["vitok", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def warnings_seen(caplog):
    """The vitok logger's warnings (the CLI's setup stops it propagating to the root logger)."""
    logger = logging.getLogger("vitok")
    logger.addHandler(caplog.handler)
    old = logger.level
    logger.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Five images, every token, merged + DeepStack, three shards."""
    root = tmp_path_factory.mktemp("export")
    folder = make_folder(root / "imgs", count=5, with_odd=False)
    vitok.extract([str(folder)], root / "out", model="qwen3-vl-tiny", workers=0, shard_size=2,
                  features=["merged", "deepstack"])
    return root / "out"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- DEST: new, empty or an earlier export of the same store; replaced whole --------------------------------------


@pytest.mark.slow
def test_an_earlier_export_is_replaced_whole_and_other_folders_are_refused(store, tmp_path):
    dest = tmp_path / "index"
    assert export_embedding_reader(store, dest, pool="mean") == 5
    assert len(list((dest / "img_emb").glob("*.npy"))) == 3
    stale = dest / "img_emb" / "img_emb_7.npy"  # what a bigger earlier export of this store would leave behind
    np.save(stale, np.zeros((4, 96), np.float16))
    assert export_embedding_reader(store, dest, pool="max") == 5
    assert not stale.exists() and len(list((dest / "img_emb").glob("*.npy"))) == 3
    assert json.loads((dest / MARKER).read_text())["options"]["pool"] == "max"
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no temporary folder left beside it

    other = tmp_path / "other-store"
    vitok.extract([str(make_folder(tmp_path / "imgs2", count=2, with_odd=False))], other, model="qwen3-vl-tiny",
                  workers=0, pool="mean")
    before = tree(dest)
    with pytest.raises(UsageError, match="export of another store"):
        export_embedding_reader(other, dest)
    assert tree(dest) == before

    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    from vitok.cli.app import main

    code, _, err = _invoke(main, ["export", str(store), str(unrelated), "--pool", "mean"])
    assert code == 2 and "not a vitok export" in err and len(err.strip().splitlines()) == 1
    assert tree(unrelated) == {"notes.txt": b"keep me"}

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_embedding_reader(store, empty, pool="mean") == 5


def test_a_failed_export_leaves_the_earlier_one_intact(store, tmp_path, monkeypatch):
    dest = tmp_path / "ec"
    export(store, dest, "vllm-ec")
    before = tree(dest)

    def broken(self, key, dtype=None):
        raise OSError("disk went away")

    monkeypatch.setattr(vitok.storage.store.Store, "image_embeds", broken)
    with pytest.raises(OSError):
        export(store, dest, "vllm-ec")
    assert tree(dest) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ec"]


def test_usage_errors_create_nothing(store, tmp_path):
    from vitok.cli.app import main

    dest = tmp_path / "a" / "b" / "index"
    for args, message in ((["--feature", "nosuch", "--pool", "mean"], "nosuch"),
                          ([], "--pool"), (["--layout", "vllm-ec", "--pool", "mean"], "--pool")):
        code, _, err = _invoke(main, ["export", str(store), str(dest), *args])
        assert code == 2 and message in err and err.startswith("vitok: error:"), (args, err)
        assert list(tmp_path.iterdir()) == []


def test_an_unwritable_dest_is_a_one_line_runtime_error(store, tmp_path):
    from vitok.cli.app import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _invoke(main, ["export", str(store), str(blocker / "index"), "--pool", "mean"])
    assert code == 1 and err.startswith("vitok: error: cannot write beside DEST") and len(err.splitlines()) == 1
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        code, _, err = _invoke(main, ["export", str(store), str(locked / "index"), "--pool", "mean"])
        assert code == 1 and "cannot write" in err


# ---- the store: empty shards, damage, unfinished ------------------------------------------------------------------


def test_shards_without_usable_images_export_cleanly(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a1.png", "a2.png"):
        (folder / name).write_bytes(b"not an image")
    for name in ("b1.png", "b2.png", "b3.png"):
        photo(folder / name, seed=len(name))
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, shard_size=2,
                  features=["merged", "deepstack"])
    assert export_embedding_reader(tmp_path / "out", tmp_path / "index", pool="mean") == 3
    assert len(list((tmp_path / "index" / "img_emb").glob("*.npy"))) == 2  # the empty shard gets no file
    assert export(tmp_path / "out", tmp_path / "ec", "vllm-ec").images == 3


def test_a_shard_with_overwritten_bytes_is_refused_by_name(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, shard_size=2, format="npy",
                  pool="mean")
    data = tmp_path / "out" / "shards" / "shard-000001" / "merged.npy"
    raw = bytearray(data.read_bytes())
    raw[-64:] = b"\xff" * 64  # float16 NaNs, same size: only the checksum can tell
    data.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="shard-000001.*checksum"):
        export_embedding_reader(tmp_path / "out", tmp_path / "index")
    assert not (tmp_path / "index").exists()
    import shutil

    shutil.rmtree(data.parent)  # a store with a missing shard
    from vitok.cli.app import main

    code, _, err = _invoke(main, ["export", str(tmp_path / "out"), str(tmp_path / "index")])
    assert code == 1 and "shard-000001" in err and len(err.splitlines()) == 1 and "internal" not in err


def test_an_incomplete_store_is_refused_unless_allow_partial(tmp_path, warnings_seen):
    folder = make_folder(tmp_path / "imgs", count=6, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, shard_size=2, pool="mean")
    (tmp_path / "out" / "shards" / "shard-000002.json").unlink()  # as if its run had not finished it
    with pytest.raises(StoreError, match=r"incomplete: 1 of 3 planned shard\(s\) not done \(shard-000002\).*"
                                         "--allow-partial"):
        export_embedding_reader(tmp_path / "out", tmp_path / "index")
    assert not (tmp_path / "index").exists()
    result = export(tmp_path / "out", tmp_path / "index", allow_partial=True)
    assert result.images == 4 and "shard-000002" in result.missing[0] and "partial" in warnings_seen.text
    assert "shard-000002" in json.loads((tmp_path / "index" / MARKER).read_text())["missing"][0]



def test_inputs_that_failed_make_a_store_incomplete(tmp_path):
    from vitok.cli.app import main

    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    assert _invoke(main, ["plan", str(folder), "-o", str(tmp_path / "out"), "--shard-size", "2"])[0] == 0
    (folder / "a" / "img01.png").unlink()  # listed, then gone: recorded as failed, a rerun retries it
    vitok.extract([], tmp_path / "out", model="qwen3-vl-tiny", workers=0, pool="mean", shard_size=2)
    with pytest.raises(StoreError, match=r"1 input\(s\) that could not be read \('a/img01.png'\)"):
        export(tmp_path / "out", tmp_path / "index")
    _verify_agrees(main, tmp_path / "out", r"1 input\(s\) that could not be read \('a/img01.png'\)")
    assert export(tmp_path / "out", tmp_path / "index", allow_partial=True).images == 3


def _verify_agrees(main, out, reason: str) -> None:
    """verify calls the store unfinished for the reason export gives: exit 1, and so says its --json."""
    import re

    code, _, err = _invoke(main, ["verify", str(out)])
    assert code == 1 and re.search("incomplete: " + reason, err), err
    code, printed, _ = _invoke(main, ["verify", str(out), "--json"])
    report = json.loads(printed)
    assert code == 1 and not report["clean"] and not report["finished"]
    assert re.match(reason, report["unfinished"][0]) and not report["problems"]
    assert not vitok.verify(out).clean


def test_archives_that_could_not_be_read_make_a_store_incomplete(tmp_path):
    """Regression: a store whose tars were all missing exported as empty, exit 0, with nothing said missing."""
    from test_archives import encode, sample_images, write_tar

    write_tar(tmp_path / "00000.tar", [("x0", {"png": encode(sample_images(1)[0], "PNG")})])
    out = tmp_path / "out"
    vitok.extract([str(tmp_path / "{00000..00001}.tar")], out, model="qwen3-vl-tiny", workers=0, pool="mean")
    with pytest.raises(StoreError, match=r"1 archive\(s\) or folder\(s\) that could not be read \(00001"):
        export(out, tmp_path / "index")
    from vitok.cli.app import main

    _verify_agrees(main, out, r"1 archive\(s\) or folder\(s\) that could not be read \(00001")
    assert export(out, tmp_path / "index", allow_partial=True).images == 1


def test_images_that_failed_to_decode_leave_a_store_finished(tmp_path):
    """A file that is not an image is a final outcome (skipped): verify and export both call the store finished."""
    from vitok.cli.app import main

    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    (folder / "broken.png").write_bytes(b"not a png")
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, pool="mean")
    code, printed, _ = _invoke(main, ["verify", str(tmp_path / "out"), "--json"])
    report = json.loads(printed)
    assert code == 0 and report["clean"] and report["finished"] and report["images_skipped"] == 1
    assert export(tmp_path / "out", tmp_path / "index").images == 3


def test_an_interrupted_export_is_cleaned_up_by_the_next(store, tmp_path):
    import time

    left = tmp_path / ".index.vitok-export-999999999-x1.tmp"  # a dead process's temporary folder
    (left / "img_emb").mkdir(parents=True)
    busy = tmp_path / ".index.vitok-export-999999998-x2.tmp"  # an export in another PID namespace: its pid looks
    (busy / "img_emb").mkdir(parents=True)  # dead here, but it wrote a moment ago
    old = time.time() - 3600
    for path in (left / "img_emb", left):
        os.utime(path, (old, old))
    export_embedding_reader(store, tmp_path / "index", pool="mean")
    assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "index"]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".vitok-export-" in p.name)


def test_a_killed_exports_folder_goes_at_once_once_its_process_is_known_dead(store, tmp_path):
    import subprocess
    import sys

    from vitok.consumers.export_target import OWNER
    from vitok.storage.claims import RunIdentity, _proc_start

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = json.loads(RunIdentity.current().to_json())  # this host, PID namespace and boot: pids can be checked
        cases = {"dead": (dead.pid, None), "recycled": (alive.pid, "1"), "alive": (alive.pid, _proc_start(alive.pid))}
        for name, (pid, start) in cases.items():  # what a killed export leaves: its folder, its process's record
            folder = tmp_path / f".index.vitok-export-{pid}-{name}.tmp"
            (folder / "img_emb").mkdir(parents=True)
            (folder / OWNER).write_text(json.dumps({**here, "pid": pid, "proc_start": start}))
        export_embedding_reader(store, tmp_path / "index", pool="mean")  # each folder was written a moment ago
        assert _temps(tmp_path) == [f".index.vitok-export-{alive.pid}-alive.tmp"]
        assert OWNER not in os.listdir(tmp_path / "index")  # the record never reaches the export
    finally:
        alive.kill()
        alive.wait()


def _fill(mount: Path, leave: int) -> None:
    """Fill a file system until only ``leave`` bytes are free."""
    stat = os.statvfs(mount)
    (mount / "fill").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


@pytest.mark.parametrize("layout, pool", [("embedding-reader", "mean"), ("vllm-ec", None), ("sglang", None)])
def test_a_full_disk_during_an_export_is_the_clear_out_of_space_error(store, small_tmpfs, layout, pool):
    from helpers import vitok as run_vitok

    _fill(small_tmpfs, 8 << 10)  # room to begin, not to finish
    result = run_vitok("export", str(store), str(small_tmpfs / "dest"), "--layout", layout,
                       *(["--pool", pool] if pool else []))
    assert result.returncode == 1, result.stderr
    error = result.stderr.splitlines()[-1]  # (after the sglang layout's warning about Qwen3-VL)
    assert error.startswith("vitok: error: no space left on the device holding ") and \
        "free space and rerun the same command" in error and "internal error" not in result.stderr
    assert sorted(os.listdir(small_tmpfs)) == ["fill"]  # no temporary folder, no DEST


SLOW_EXPORT = """
import sys, time
from pathlib import Path
import vitok.consumers.serving as serving

def slow(self, store, folder, done=None):  # writes a file, then takes its time, as a big export does
    (Path(folder) / "partial").write_text("x")
    time.sleep(120)

serving.VllmEcLayout.write = slow
from vitok.cli.app import main
sys.argv = ["vitok", "export", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130), ("SIGKILL", -9)])
def test_a_signalled_export_leaves_nothing_beside_dest(store, tmp_path, sig, code):
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    from helpers import wait_for

    dest = tmp_path / "ec"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(store), str(dest), "--layout", "vllm-ec"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert wait_for(lambda: any((tmp_path / t / "partial").exists() for t in _temps(tmp_path)), process=proc)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert not dest.exists()
    if sig == "SIGKILL":  # the process could clean nothing: the next export removes its folder at once
        assert len(_temps(tmp_path)) == 1
        export(store, dest, "vllm-ec")
        assert (dest / "uuids.jsonl").exists()
    else:
        assert err.splitlines()[-1] == f"vitok: interrupted by {sig}; rerun the same command to resume", err
    assert not _temps(tmp_path)


# ---- NaN / Inf ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_weights_are_counted_per_image_reported_and_never_exported(tmp_path):
    from test_checkpoint import checkpoint_folder

    def poison(state):
        state["merger.linear_fc2.bias"][0] = float("nan")
        return state

    (tmp_path / "ckpt").mkdir()
    model = checkpoint_folder(tmp_path / "ckpt", poison)
    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", model=model, workers=0, features=["merged", "deepstack"])
    store = vitok.open(tmp_path / "out")
    for key in store.keys():
        tokens = store.info(key)["tokens"]["merged"]
        assert store.info(key)["nonfinite"] == tokens  # one NaN column: one per merged token
    assert set(store.nonfinite()) == set(store.keys())
    from vitok.cli.app import main

    code, out, _ = _invoke(main, ["info", str(tmp_path / "out")])
    assert "3 images hold NaN/Inf" in out
    code, _, err = _invoke(main, ["verify", str(tmp_path / "out")])
    assert err.count("NaN/Inf value(s) in its tokens") == 3 and code == 1  # every image: what export refuses
    code, _, err = _invoke(main, ["export", str(tmp_path / "out"), str(tmp_path / "ec"), "--layout", "vllm-ec"])
    assert code == 1 and "every image" in err and not (tmp_path / "ec").exists()


@pytest.mark.slow
def test_a_store_whose_every_image_is_nan_fails_extract_verify_and_export_alike(tmp_path):
    """Regression: every image NaN extracted as all ok with exit 0 (no count in --json) and passed verify, while
    export refused the store."""
    from helpers import vitok as run_vitok
    from test_checkpoint import checkpoint_folder

    def poison(state):
        state["merger.linear_fc2.weight"][0, 0] = float("nan")
        return state

    (tmp_path / "ckpt").mkdir()
    model = checkpoint_folder(tmp_path / "ckpt", poison)
    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    out = str(tmp_path / "out")
    result = run_vitok("extract", str(folder), "-o", out, "--model", model, "--workers", "0", "--json", "-q",
                       "--features", "merged,deepstack")
    summary = json.loads(result.stdout)
    assert result.returncode == 1 and summary["ok"] == 3 and summary["nonfinite"] == 3
    assert "NaN/Inf" in result.stderr
    verify = run_vitok("verify", out, "--json")
    report = json.loads(verify.stdout)
    assert verify.returncode == 1 and report["images_nonfinite"] == 3 and not report["clean"]
    info = json.loads(run_vitok("info", out, "--json").stdout)
    assert info["images_nonfinite"] == 3
    exported = run_vitok("export", out, str(tmp_path / "ec"), "--layout", "vllm-ec")
    assert exported.returncode == 1 and "every image" in exported.stderr and not (tmp_path / "ec").exists()
    healthy = make_folder(tmp_path / "more", count=2, with_odd=False, seed=1)  # a usable image: exit 0
    assert run_vitok("extract", str(healthy), "-o", str(tmp_path / "fine"), "--model", "qwen3-vl-tiny",
                     "--workers", "0", "-q").returncode == 0


def test_images_with_nan_are_left_out_with_a_count(store, tmp_path, warnings_seen):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(store, copy)
    sidecar = copy / "shards" / "shard-000001.json"
    data = json.loads(sidecar.read_text())
    data["records"][0]["nonfinite"] = 7  # as the device stage records it
    bad = data["records"][0]["key"]
    sidecar.write_text(json.dumps(data))
    for layout, pool in (("embedding-reader", "mean"), ("vllm-ec", None), ("sglang", None)):
        result = export(copy, tmp_path / layout, layout, pool=pool)
        assert result.images == 4 and list(result.left_out) == [bad] and "left out 1 image" in warnings_seen.text
        marker = json.loads((tmp_path / layout / MARKER).read_text())
        assert marker["left_out"] == {bad: "7 NaN/Inf value(s) in its tokens (counted at extraction)"}
    exported = [json.loads(line)["key"] for line in (tmp_path / "vllm-ec" / "uuids.jsonl").read_text().splitlines()]
    assert bad not in exported and len(exported) == 4


def test_verify_fails_on_what_export_refuses_a_store_whose_every_image_holds_nan(store, tmp_path):
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(store, copy)
    sidecars = sorted((copy / "shards").glob("*.json"))
    for path in sidecars:  # as the device stage records NaN/Inf
        data = json.loads(path.read_text())
        for record in data["records"]:
            record["nonfinite"] = 3
        path.write_text(json.dumps(data))
    report = vitok.verify(copy)
    assert report.images_nonfinite == report.images_ok == 5 and report.all_nonfinite and not report.clean
    with pytest.raises(StoreError, match="every image"):
        export(copy, tmp_path / "ec", "vllm-ec")
    assert not (tmp_path / "ec").exists()
    data = json.loads(sidecars[0].read_text())
    data["records"][0].pop("nonfinite")  # one image left usable: counted and left out, not refused
    sidecars[0].write_text(json.dumps(data))
    report = vitok.verify(copy)
    assert report.images_nonfinite == 4 and not report.all_nonfinite and report.clean
    assert export(copy, tmp_path / "ec", "vllm-ec").images == 1


# ---- keys that are not UTF-8 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    photo(root / "imgs" / "plain.png", seed=1)
    photo(root / "imgs" / "x.png", seed=2)
    try:
        os.rename(os.fsencode(root / "imgs" / "x.png"), os.fsencode(root / "imgs") + b"/caf\xe9.png")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    vitok.extract([str(root / "imgs")], root / "out", model="qwen3-vl-tiny", workers=0,
                  features=["merged", "deepstack", "patch"])
    return root


def test_keys_that_are_not_utf8_export_in_every_layout(odd_keys):
    key = "caf\udce9.png"
    out = odd_keys / "out"
    assert key in vitok.open(out).keys()
    assert export_embedding_reader(out, odd_keys / "index", pool="mean", feature="merged") == 2
    table = pq.read_table(odd_keys / "index" / "metadata" / "metadata_0.parquet").to_pylist()
    assert {row["key_bytes"] for row in table} == {b"caf\xe9.png", b"plain.png"}
    assert "caf\\xe9.png" in {row["key"] for row in table}
    assert export(out, odd_keys / "ec", "vllm-ec").images == 2
    text = (odd_keys / "ec" / "uuids.jsonl").read_text()
    assert "\\ud" not in text  # no lone surrogate escapes: strict JSON readers (serde, Go) refuse them
    lines = [json.loads(line) for line in text.splitlines()]
    assert {line["key"] for line in lines} == {"caf\\xe9.png", "plain.png"}
    assert {bytes.fromhex(line.get("key_bytes_hex", "")) for line in lines} == {b"caf\xe9.png", b""}
    assert all((odd_keys / "ec" / line["uuid"]).is_dir() for line in lines)
    from vitok.consumers.serving import verify_embeds

    assert verify_embeds(odd_keys / "ec").clean
    assert export(out, odd_keys / "sg", "sglang").images == 2


def test_every_text_form_of_a_key_maps_back_to_exactly_one_key(tmp_path):
    from vitok.consumers.serving import entry_name
    from vitok.storage.keys import key_from_text, key_text

    folder = tmp_path / "imgs"
    # a name that is not UTF-8, a name spelled like its escape, a backslash, a control character
    names = [b"caf\xe9.png", b"caf\\xe9.png", b"a\\b.png", b"tab\t.png", b"plain.png"]
    for seed, name in enumerate(names):
        photo(folder / f"{seed}.png", seed=seed)
        try:
            os.rename(os.fsencode(folder / f"{seed}.png"), os.fsencode(folder) + b"/" + name)
        except OSError:
            pytest.skip("this file system refuses names that are not UTF-8")
    vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, features=["merged", "deepstack"])
    keys = set(vitok.open(tmp_path / "out").keys())
    assert {os.fsencode(k) for k in keys} == set(names)
    export(tmp_path / "out", tmp_path / "er", "embedding-reader", pool="mean")
    export(tmp_path / "out", tmp_path / "ec", "vllm-ec")
    export(tmp_path / "out", tmp_path / "sg", "sglang")
    lines = [json.loads(line) for line in (tmp_path / "ec" / "uuids.jsonl").read_text().splitlines()]
    uuid = {row["key"]: row["uuid"] for row in lines}  # the lookup the docs show
    forms = {
        "vllm-ec uuids.jsonl": [row["key"] for row in lines],
        "sglang key column": [row["key"] for p in sorted((tmp_path / "sg").glob("*.parquet"))
                              for row in pq.read_table(p).to_pylist()],
        "embedding-reader key column": [row["key"] for p in sorted((tmp_path / "er" / "metadata").glob("*.parquet"))
                                        for row in pq.read_table(p).to_pylist()],
    }
    for where, texts in forms.items():
        assert len(set(texts)) == len(keys), where  # no two keys share a text form
        assert {key_from_text(t) for t in texts} == keys, where  # and each text names its own key
        assert all(t.isprintable() for t in texts), where
    assert all(uuid[key_text(k)] == entry_name(k) for k in keys)  # each key finds its own entry
    for text in ["caf\\xe9", "\\", "\\\\x41", "x\x00y", "caf\udce9", "\ud800", "\x7f", "a\nb", "", "é"]:
        assert key_from_text(key_text(text)) == text and key_text(text).isprintable()
    with pytest.raises(ValueError):
        key_from_text("a\\qb")  # not a text form: a lone backslash


def test_pictures_of_keys_that_are_not_utf8(odd_keys):
    pytest.importorskip("matplotlib")
    from vitok.consumers.viz import token_picture

    with vitok.open(odd_keys / "out") as store:
        assert token_picture(store, "caf\udce9.png", odd_keys / "p.png").exists()


# ---- serving layouts -----------------------------------------------------------------------------------------------


def test_vllm_ec_loads_as_the_connector_loads_it_and_equals_image_embeds(store, tmp_path):
    from safetensors.torch import load_file

    dest = tmp_path / "ec"
    result = export(store, dest, "vllm-ec")
    opened = vitok.open(store)
    lines = [json.loads(line) for line in (dest / "uuids.jsonl").read_text().splitlines()]
    assert result.images == len(lines) == len(opened) == 5
    assert len({line["uuid"] for line in lines}) == 5
    for line in lines:
        filename = os.path.join(str(dest), line["uuid"], "encoder_cache.safetensors")  # the connector's path
        assert os.path.exists(filename)  # its hit test
        tensors = load_file(filename, device="cpu")
        assert list(tensors) == ["ec_cache"]
        ec_cache = tensors["ec_cache"]
        expected, grid = opened.image_embeds(line["key"], dtype=torch.bfloat16)
        assert ec_cache.dtype == torch.bfloat16 and ec_cache.is_contiguous() and ec_cache.layout == torch.strided
        assert torch.equal(ec_cache, expected) and line["image_grid_thw"] == grid.tolist()
        t, h, w = grid[0].tolist()
        assert ec_cache.shape == (t * h * w // 4, 96 * 2)  # out_hidden_size x (1 + one DeepStack level)
        merged = torch.from_numpy(opened.get(line["key"], "merged")).to(torch.bfloat16)
        assert torch.equal(ec_cache[:, :96], merged)  # the merger first, then the level


def test_vllm_ec_through_vllm_itself(store, tmp_path):
    pytest.importorskip("vllm")
    from vllm.distributed.ec_transfer.ec_connector import example_connector  # noqa: F401

    dest = tmp_path / "ec"
    export(store, dest, "vllm-ec")
    connector = object.__new__(example_connector.ECExampleConnector)  # no engine: only its storage path is set
    connector._storage_path = str(dest)
    for line in map(json.loads, (dest / "uuids.jsonl").read_text().splitlines()):
        assert connector.has_cache_item(line["uuid"])


def test_entry_names_are_safe_and_distinct():
    from vitok.consumers.serving import entry_name

    keys = ["a/b.jpg", "a_b.jpg", "A/B.jpg", "../x", ".hidden", "caf\udce9.png", "x" * 500, "日本.png", ""]
    names = [entry_name(k) for k in keys]
    assert len({n.lower() for n in names}) == len(keys)
    for name in names:
        assert name and "/" not in name and not name.startswith(".") and len(name.encode()) <= 100
        assert name.isascii()


def test_sglang_records_decode_back_to_image_embeds_without_vitok(store, tmp_path, warnings_seen):
    import importlib.util

    from conftest import ROOT

    dest = tmp_path / "sg"
    assert export(store, dest, "sglang").images == 5
    assert "cannot serve this export" in warnings_seen.text  # a Qwen3-VL store: SGLang runs the tower on it
    spec = importlib.util.spec_from_file_location("sglang_example", ROOT / "examples" / "sglang_precomputed.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    items = example.items(dest)
    opened = vitok.open(store)
    assert sorted(items) == opened.keys()
    for key, item in items.items():
        expected, grid = opened.image_embeds(key, dtype=torch.bfloat16)
        assert item["format"] == "precomputed_embedding"
        assert torch.equal(item["feature"], expected) and torch.equal(item["image_grid_thw"], grid)
    keys = opened.keys()[:2]  # one request, two images: one item, features concatenated, grids stacked
    rows = example.rows_by_key(dest)
    item = example.request_item([rows[k] for k in keys])
    embeds = [opened.image_embeds(k, dtype=torch.bfloat16) for k in keys]
    assert torch.equal(item["feature"], torch.cat([e for e, _ in embeds]))
    assert torch.equal(item["image_grid_thw"], torch.cat([g for _, g in embeds]))
    pad = 151655
    ids = example.expand_prompt([1, pad, 2, pad, 3], item["image_grid_thw"], pad)
    counts = [int(g.prod()) // 4 for g in item["image_grid_thw"]]
    assert ids == [1, *[pad] * counts[0], 2, *[pad] * counts[1], 3] and ids.count(pad) == item["feature"].shape[0]
    with pytest.raises(ValueError, match="placeholder"):
        example.expand_prompt([1, pad, 2], item["image_grid_thw"], pad)


@pytest.fixture(scope="module")
def video_store(tmp_path_factory):
    """A store of two clips (Qwen3-VL tiny, merged + DeepStack, 6 frames sampled: 3 temporal steps each)."""
    from helpers import video_clip

    from vitok.inputs.video_decode import unavailable

    for decoder in ("pyav", "torchcodec"):  # PyAV encodes the clips, torchcodec decodes them
        if unavailable(decoder):
            pytest.skip(f"{decoder} unusable here: {unavailable(decoder)}")
    root = tmp_path_factory.mktemp("video-serving")
    (root / "vids").mkdir()
    video_clip(root / "vids" / "a.mp4", frames=20, size=(64, 64), fps=24)
    video_clip(root / "vids" / "b.mp4", frames=9, size=(96, 64), fps=10, seed=1)
    vitok.extract([str(root / "vids")], root / "out", model="qwen3-vl-tiny", workers=0,
                  features=("merged", "deepstack"), num_frames=6)
    return root / "out"


@pytest.mark.slow  # about 11 s on 2 cores: decoding and encoding two clips, two exports
def test_video_stores_export_video_items_to_vllm_ec_and_sglang(video_store, tmp_path):
    from safetensors.torch import load_file

    from vitok.consumers.serving import read_sglang, unpack_bf16, verify_embeds
    from vitok.consumers.vllm_client import VllmCache

    opened = vitok.open(video_store)
    expected = {key: opened.video_embeds(key, dtype=torch.bfloat16) for key in opened.keys()}
    assert export(video_store, tmp_path / "ec", "vllm-ec").images == 2
    lines = [json.loads(line) for line in (tmp_path / "ec" / "uuids.jsonl").read_text().splitlines()]
    for line in lines:
        embeds, grid, metadata = expected[line["key"]]
        assert line["modality"] == "video" and "image_grid_thw" not in line
        assert line["video_grid_thw"] == grid.tolist() and line["video_metadata"] == metadata
        ec_cache = load_file(str(tmp_path / "ec" / line["uuid"] / "encoder_cache.safetensors"))["ec_cache"]
        assert torch.equal(ec_cache, embeds) and ec_cache.shape[1] == 96 * 2  # merger + one DeepStack level
        assert line["tokens"] == ec_cache.shape[0] == int(grid.prod()) // 4
    assert export(video_store, tmp_path / "sg", "sglang").images == 2
    rows = list(read_sglang(tmp_path / "sg"))
    assert [row["key"] for row in rows] == opened.keys()
    for row in rows:
        embeds, grid, metadata = expected[row["key"]]
        assert torch.equal(unpack_bf16(row["feature"], row["shape"]), embeds) and "image_grid_thw" not in row
        assert row["video_grid_thw"] == grid.tolist() and row["frames_indices"] == metadata["frames_indices"]
        assert row["fps"] == metadata["fps"] and row["total_num_frames"] == metadata["total_num_frames"]
        assert row["second_per_grid_ts"] is None  # Qwen2.5-VL's alone
    for where in (tmp_path / "ec", tmp_path / "sg", video_store):
        report = verify_embeds(where)
        assert report.clean and report.checked == 2, report.problems
    cache = VllmCache.from_export(tmp_path / "ec")  # the client reads a video export; its image requests refuse it
    assert cache["a.mp4"].modality == "video" and cache["a.mp4"] == VllmCache.from_store(video_store)["a.mp4"]
    with pytest.raises(ValueError, match="is a video"):
        cache.request("<|image_pad|>", ["a.mp4"])

    lines[0]["video_metadata"]["frames_indices"] = lines[0]["video_metadata"]["frames_indices"][:2]
    lines[1].pop("video_grid_thw")
    (tmp_path / "ec" / "uuids.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    problems = verify_embeds(tmp_path / "ec").problems
    assert len(problems) == 2 and "2 frame(s), 1 temporal step(s); the grid has 3" in problems[0]
    assert "the grid of its modality" in problems[1]


def test_contract_of_families_without_deepstack():
    from vitok.consumers.serving import EmbedsContract
    from vitok.storage.records import ModelSettings, RunHeader, Settings

    def header(family, indexes):
        config = {"family": family, "out_hidden_size": 3584, "spatial_merge_size": 2,
                  "deepstack_visual_indexes": indexes}
        return RunHeader(Settings(ModelSettings("m", config=config)), "0", "")

    assert EmbedsContract.of_store(header("qwen2_5_vl", [])).width == 3584
    assert EmbedsContract.of_store(header("qwen3_5", [])).width == 3584
    assert EmbedsContract.of_store(header("qwen3_vl", [5, 11, 17])).width == 3584 * 4


# ---- the validator -------------------------------------------------------------------------------------------------


def test_validator_refuses_crafted_bad_exports_naming_the_key(store, tmp_path):
    from safetensors.torch import save_file

    from vitok.cli.app import main
    from vitok.consumers.serving import verify_embeds

    dest = tmp_path / "ec"
    export(store, dest, "vllm-ec")
    assert verify_embeds(dest).clean
    lines = [json.loads(line) for line in (dest / "uuids.jsonl").read_text().splitlines()]
    first, second, third = lines[0], lines[1], lines[2]
    path = dest / first["uuid"] / "encoder_cache.safetensors"
    good = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path))["ec_cache"]
    save_file({"ec_cache": good[:-1].contiguous()}, str(path))  # one token short of the grid
    save_file({"ec_cache": good.float()}, str(dest / second["uuid"] / "encoder_cache.safetensors"))
    nan = good.clone()
    nan[0, 0] = float("nan")
    save_file({"ec_cache": nan}, str(dest / third["uuid"] / "encoder_cache.safetensors"))
    report = verify_embeds(dest)
    assert len(report.problems) == 3
    assert first["key"] in report.problems[0] and "shape" in report.problems[0]
    assert second["key"] in report.problems[1] and "dtype float32" in report.problems[1]
    assert third["key"] in report.problems[2] and "NaN" in report.problems[2]
    code, _, err = _invoke(main, ["verify", str(dest), "--embeds"])
    assert code == 1 and first["key"] in err

    sg = tmp_path / "sg"
    export(store, sg, "sglang")
    table = pq.read_table(sg / "embeds-00000.parquet").to_pylist()
    table[1]["shape"] = [table[1]["shape"][0] * 2, table[1]["shape"][1] // 2]  # same bytes, wrong width
    import pyarrow as pa

    from vitok.consumers.serving import SglangLayout

    pq.write_table(pa.Table.from_pylist(table, schema=SglangLayout.schema()), sg / "embeds-00000.parquet")
    report = verify_embeds(sg)
    assert len(report.problems) == 1 and table[1]["key"] in report.problems[0]


def test_export_refuses_an_embedding_off_the_contract(store, tmp_path, monkeypatch):
    original = vitok.storage.store.Store.image_embeds
    victim = vitok.open(store).keys()[2]

    def off_by_one(self, key, dtype=None):
        embeds, grid = original(self, key, dtype)
        return (embeds[:-1] if key == victim else embeds), grid

    monkeypatch.setattr(vitok.storage.store.Store, "image_embeds", off_by_one)
    with pytest.raises(StoreError, match=f"{victim!r} cannot be served: shape"):
        export(store, tmp_path / "ec", "vllm-ec")
    assert not (tmp_path / "ec").exists() and list(tmp_path.iterdir()) == []


def test_entry_names_that_collide_are_refused(store, tmp_path, monkeypatch):
    import vitok.consumers.serving

    monkeypatch.setattr(vitok.consumers.serving, "entry_name", lambda key: "same")
    with pytest.raises(StoreError, match="collides"):
        export(store, tmp_path / "ec", "vllm-ec")
    assert list(tmp_path.iterdir()) == []


def test_key_content_shares_one_entry_per_content_id(store, tmp_path, monkeypatch):
    """The hook for content ids (records' ``content_id``, added by content hashing): equal content, one entry."""
    original = vitok.storage.store.Store.info

    def with_content(self, key):
        return {**original(self, key), "content_id": "sha256-" + ("dup" if key.startswith("a/") else key[-8:-4])}

    monkeypatch.setattr(vitok.storage.store.Store, "info", with_content)
    assert export(store, tmp_path / "ec", "vllm-ec", key="content").images == 5
    lines = [json.loads(line) for line in (tmp_path / "ec" / "uuids.jsonl").read_text().splitlines()]
    shared = {line["uuid"] for line in lines if line["key"].startswith("a/")}
    assert shared == {"sha256-dup"} and len(lines) == 5
    assert sorted(p.name for p in (tmp_path / "ec").iterdir() if p.is_dir()) == sorted({x["uuid"] for x in lines})


def test_options_that_do_not_apply_to_a_serving_layout_are_refused(store, tmp_path):
    with pytest.raises(UsageError, match="--dtype applies to embedding-reader"):
        export(store, tmp_path / "ec", "vllm-ec", dtype="float32")
    assert not (tmp_path / "ec").exists()


def test_an_export_holds_the_store_as_checked_not_as_first_opened(tmp_path, monkeypatch):
    """A run that commits a shard between the export's opening the store and its check (a store still being
    written) made the export hold only the shards of the first opening, marked finished: 2 of 4 images."""
    from vitok.bench.store import synthetic_store
    from vitok.consumers import export as module

    store = tmp_path / "store"
    store.mkdir()
    synthetic_store(store, 4, 1, 8, per_shard=2)
    aside = tmp_path / "aside"
    aside.mkdir()
    for path in (store / "shards").glob("shard-000001.*"):
        path.rename(aside / path.name)
    check = module.check_store

    def committed_meanwhile(opened, allow_partial):  # the other run's commit: data, then its sidecar
        for name in ("shard-000001.h5", "shard-000001.json"):
            (aside / name).rename(store / "shards" / name)
        return check(opened, allow_partial)

    monkeypatch.setattr(module, "check_store", committed_meanwhile)
    result = export(store, tmp_path / "dest", pool="mean")
    assert result.images == len(vitok.open(store).keys()) == 4
    marker = json.loads((tmp_path / "dest" / MARKER).read_text())
    assert marker["images"] == 4
