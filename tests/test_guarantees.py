"""A store that never lies: each class of the ways users break things, tried as they do it (docs/guarantees.md
says what each one promises)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from helpers import TINY, make_folder, photo, popen_vitok, vitok_killed_at
from helpers import vitok as run_vitok

import vitok
from vitok.errors import InputsChangedError, SettingsMismatchError, StoreError, UsageError

LIB = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32")


def shard_times(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*") if not p.name.startswith(".")}


def leftovers(out) -> list[str]:
    return [p.name for p in (out / "shards").iterdir() if p.name.endswith(".tmp")] if (out / "shards").exists() else []


# ---- 1. resume anywhere; unreadable inputs are retried --------------------------------------------------------------


def test_resume_from_another_directory_reads_every_image(tmp_path):
    make_folder(tmp_path / "a" / "imgs", count=6, with_odd=False)
    out = tmp_path / "out"
    run_vitok("plan", "imgs", "-o", str(out), "--shard-size", "2", cwd=tmp_path / "a", check=True)
    (tmp_path / "b").mkdir()
    result = run_vitok("extract", "-o", str(out), *TINY, "--shard-size", "2", "--json", cwd=tmp_path / "b")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] == 6 and summary["skipped"] == summary["failed"] == 0
    again = run_vitok("extract", str(tmp_path / "a" / "imgs"), "-o", str(out), *TINY, "--shard-size", "2",
                      "--json", cwd=tmp_path)  # another spelling of the same source: the same plan
    assert again.returncode == 0 and json.loads(again.stdout)["already_done"] == 6


def test_an_input_that_cannot_be_read_is_failed_then_retried(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    late = tmp_path / "late" / "x.png"
    listed = sorted(str(p) for p in folder.rglob("*.*") if p.suffix.lower() in (".png", ".jpg")) + [str(late)]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "out"
    first = vitok.extract([], out, files_from=str(tmp_path / "list.txt"), **LIB)
    assert first.ok == 4 and first.failed == 1 and "cannot read" in first.skipped_reasons[str(late)]
    store = vitok.open(out)
    assert str(late) in store.failed and str(late) not in store.skipped
    before = shard_times(out)
    assert vitok.extract([], out, files_from=str(tmp_path / "list.txt"), **LIB).shards_written == 0  # still absent
    photo(late)
    second = vitok.extract([], out, files_from=str(tmp_path / "list.txt"), **LIB)
    assert second.ok == 1 and second.shards_written == 1
    assert all(shard_times(out)[name] == t for name, t in before.items())  # finished shards untouched
    store = vitok.open(out)
    assert str(late) in store and not store.failed and len(store) == 5
    assert vitok.verify(out).clean


# ---- 2. a grown collection ---------------------------------------------------------------------------------------


def test_added_and_removed_inputs_are_refused_then_planned_with_update(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=6, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, shard_size=2, **LIB)
    before = shard_times(out)
    photo(folder / "new1.png", seed=1)
    photo(folder / "new2.png", seed=2)
    removed = sorted(folder.rglob("img0*.png"))[0]
    removed.unlink()
    with pytest.raises(InputsChangedError, match="2 added, 1 removed"):
        vitok.extract([str(folder)], out, shard_size=2, **LIB)
    summary = vitok.extract([str(folder)], out, shard_size=2, update=True, **LIB)
    assert (summary.images_encoded, summary.carried, summary.ok, summary.shards_written) == (2, 1, 3, 2)  # the
    # removed file's shard is replaced whole: its other image is carried beside the new ones
    after = {**shard_times(out), **{f"{p.name}": p.stat().st_mtime_ns for p in (out / "shards" / ".superseded").glob(
        "*.json")}}
    assert all(after[name] == t for name, t in before.items() if name.endswith(".json"))  # moved, never rewritten
    assert sum(name not in shard_times(out) for name in before) == 2  # that shard's sidecar and data
    store = vitok.open(out)
    key = removed.relative_to(folder).as_posix()
    assert key in store.removed and key not in store.keys() and {"new1.png", "new2.png"} <= set(store.keys())
    assert len(store) == 7 and vitok.verify(out).clean
    assert vitok.extract([str(folder)], out, shard_size=2, **LIB).shards_written == 0  # the update is the plan now


# ---- 3. a full disk ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hdf5", "npy"])
def test_a_full_disk_is_a_clear_error_and_a_rerun_resumes(tmp_path, small_tmpfs, fmt):
    folder = make_folder(tmp_path / "imgs", count=8, with_odd=False)
    out = small_tmpfs / "out"
    args = ["extract", str(folder), "-o", str(out), *TINY, "--features", "patch", "--format", fmt,
            "--shard-size", "2", "--store-dtype", "float32"]
    result = run_vitok(*args)
    assert result.returncode == 1, result.stderr
    assert "no space left on" in result.stderr and "MB more" in result.stderr and "internal error" not in result.stderr
    assert not leftovers(out)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    assert run_vitok(*args).returncode == 0
    assert run_vitok("verify", str(out)).returncode == 0


# ---- 4. names that are not UTF-8 --------------------------------------------------------------------------------


@pytest.mark.slow
def test_names_that_are_not_utf8_are_extracted_and_recorded(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = os.fsencode(str(folder)) + b"/caf\xe9.png"
    photo(folder / "plain.png")
    with open(raw, "wb") as handle:
        handle.write((folder / "plain.png").read_bytes())
    key = os.fsdecode(b"caf\xe9.png")
    for how, args, stdin in [("folder", [str(folder)], None), ("stdin", ["-"], raw + b"\n"),
                             ("list", ["--files-from", str(tmp_path / "list")], None)]:
        (tmp_path / "list").write_bytes(raw + b"\n")
        out = tmp_path / f"out-{how}"
        result = subprocess.run([sys.executable, "-m", "vitok", "extract", *args, "-o", str(out), *TINY],
                                input=stdin, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert result.returncode == 0, result.stderr
        keys = vitok.open(out).keys()
        assert (key if how == "folder" else os.fsdecode(raw)) in keys
    info = subprocess.run([sys.executable, "-m", "vitok", "info", str(tmp_path / "out-folder")], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert info.returncode == 0


# ---- 5b. a committed shard is bound to the plan unit it was made from -------------------------------------------


def _same_names_other_pixels(tmp_path):
    """Two folders whose files have the same names (keys) and other pixels, and a store of the first."""
    first = make_folder(tmp_path / "a" / "imgs", count=4, with_odd=False, seed=0)
    second = make_folder(tmp_path / "b" / "imgs", count=4, with_odd=False, seed=1)
    reference = tmp_path / "reference"
    vitok.extract([str(second)], reference, shard_size=2, **LIB)
    out = tmp_path / "out"
    vitok.extract([str(first)], out, shard_size=2, **LIB)
    return first, second, reference, out


def _assert_holds_tokens_of(out, reference):
    store, expected = vitok.open(out), vitok.open(reference)
    assert sorted(store.keys()) == sorted(expected.keys())
    for key in expected.keys():
        np.testing.assert_array_equal(store[key], expected[key])
    assert vitok.verify(out).clean


def test_a_rewritten_plan_never_takes_another_plans_shards_as_done(tmp_path):
    _, second, reference, out = _same_names_other_pixels(tmp_path)
    shutil.rmtree(out / "plan")  # a hand-made "reset": the shards of the first folder stay under the same names
    run_vitok("plan", str(second), "-o", str(out), "--shard-size", "2", check=True)
    report = vitok.verify(out)
    assert not report.clean and "made from other inputs" in report.problems[0]
    for name in ("vitok.json", "README.txt"):
        (out / name).unlink()
    summary = vitok.extract([str(second)], out, shard_size=2, **LIB)
    assert summary.already_done == 0 and summary.shards_written == 2
    _assert_holds_tokens_of(out, reference)
    again = vitok.extract([str(second)], out, shard_size=2, **LIB)  # and what was redone is done
    assert again.already_done == 4 and again.shards_written == 0


def test_a_sidecar_without_the_plan_digest_is_compared_on_its_records(tmp_path):
    """Stores written before sidecars recorded the digest: their records' keys and files are compared."""
    _, second, reference, out = _same_names_other_pixels(tmp_path)
    for sidecar in (out / "shards").glob("*.json"):
        data = json.loads(sidecar.read_text())
        assert data["unit"].pop("inputs").startswith("blake2b:")
        sidecar.write_text(json.dumps(data))
    resumed = vitok.extract([], out, shard_size=2, **LIB)  # the same plan: still done
    assert resumed.already_done == 4 and resumed.shards_written == 0
    (out / "vitok.json").unlink()
    shutil.rmtree(out / "plan")
    summary = vitok.extract([str(second)], out, shard_size=2, **LIB)
    assert summary.already_done == 0 and summary.shards_written == 2
    _assert_holds_tokens_of(out, reference)


def test_overwrite_that_cannot_remove_a_shard_stops_naming_it(tmp_path, monkeypatch):
    """A shard --overwrite cannot delete (chattr +i, permissions) must not pass for one of the new run's."""
    _, second, reference, out = _same_names_other_pixels(tmp_path)
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).rsplit("/", 1)[-1].startswith("shard-000000"):
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(StoreError, match="could not remove .*shard-000000.*Operation not permitted.*rerun"):
        vitok.extract([str(second)], out, shard_size=2, overwrite=True, **LIB)
    assert (out / "vitok.json").exists() and (out / "plan").is_dir()  # shards go first, the header and plan last
    monkeypatch.setattr(os, "unlink", real_unlink)
    vitok.extract([str(second)], out, shard_size=2, overwrite=True, **LIB)
    _assert_holds_tokens_of(out, reference)


# ---- 5. validation before side effects ---------------------------------------------------------------------------


def test_nothing_is_written_and_no_model_loaded_before_the_run_can_start(tmp_path, monkeypatch):
    from vitok.encoder import inference

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(inference, "load_encoder", no_loading)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="does not exist"):
        vitok.extract([str(tmp_path / "missing")], out, **LIB)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        vitok.extract([str(tmp_path / "empty")], out, **LIB)
    with pytest.raises(UsageError, match="--workers"):
        vitok.extract([str(tmp_path / "empty")], out, **{**LIB, "workers": -2})
    assert not out.exists()


def test_overwrite_with_a_mistyped_source_keeps_the_store(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    with pytest.raises(UsageError, match="does not exist"):
        vitok.extract([str(tmp_path / "imsg")], out, overwrite=True, **LIB)
    assert len(vitok.open(out)) == 3 and vitok.verify(out).clean


# ---- 6. neighbours -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_identical_runs_into_one_store_write_every_shard_once(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=12, with_odd=False)
    out = tmp_path / "out"
    args = ["extract", str(folder), "-o", str(out), *TINY, "--format", "npy", "--shard-size", "2", "--json"]
    procs = [popen_vitok(*args, capture=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outputs]
    summaries = [json.loads(o[0]) for o in outputs]
    assert sum(s["shards_written"] for s in summaries) == 6  # no shard written twice, none lost
    assert run_vitok("verify", str(out)).returncode == 0 and len(vitok.open(out)) == 12


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    from vitok.storage.claims import Claims, RunIdentity

    first, second = Claims(tmp_path), Claims(tmp_path)
    first.start()
    second.start()
    assert first.try_claim("shard-000001") and not second.try_claim("shard-000001")
    dead = Claims(tmp_path, RunIdentity(first.identity.host, 2**22 + 12345, None, "dead"))
    dead.start()
    dead._stop.set()
    assert dead.try_claim("shard-000002")
    os.rename(tmp_path / dead.run_file, tmp_path / ".claims" / "runs" / "gone")  # its process died without cleaning up
    assert second.try_claim("shard-000002")  # stale: taken over
    first.stop()
    assert second.try_claim("shard-000001")  # released
    second.stop()
    assert not list(tmp_path.joinpath(".claims").glob("*.claim"))


@pytest.mark.parametrize("namespace", ["other-namespace", "unknown-namespace"])
def test_a_fresh_heartbeat_keeps_a_claim_whatever_its_pid_looks_like_here(tmp_path, monkeypatch, namespace):
    """Containers sharing the host's name, each in its own PID namespace: every other container's pid looks dead.
    Only a claim of this PID namespace and boot is judged by its pid; others by their heartbeat."""
    import time

    from vitok.storage import claims as claims_module
    from vitok.storage.claims import Claims, RunIdentity, pid_namespace

    monkeypatch.setattr(claims_module, "process_alive", lambda pid: pid == os.getpid())  # every other pid "dead"
    mine = Claims(tmp_path)
    mine.start()
    here = pid_namespace()
    other = {"other-namespace": {"pid_ns": "1234567", "boot_id": here["boot_id"]},
             "unknown-namespace": {}}[namespace]  # (an older vitok's claim records neither)
    live = Claims(tmp_path, RunIdentity(mine.identity.host, 7, None, "live", **other))
    live.start()
    live._stop.set()
    assert live.try_claim("shard-000001")
    assert not mine.try_claim("shard-000001")  # its heartbeat is fresh: never taken over
    missed = time.time() - 3 * claims_module.HEARTBEAT_SECONDS - 30  # three beats missed, and its pid is dead here
    os.utime(tmp_path / live.run_file, (missed, missed))
    assert mine.try_claim("shard-000001")
    same = Claims(tmp_path, RunIdentity(mine.identity.host, 8, None, "same", **here))  # this namespace: pid trusted
    same.start()
    same._stop.set()
    assert same.try_claim("shard-000002") and mine.try_claim("shard-000002")
    mine.stop()


# ---- 7/8. settings fingerprints and checksums ------------------------------------------------------------------------


def test_a_deleted_header_does_not_let_other_settings_mix_into_the_store(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, shard_size=2, **LIB)
    (out / "vitok.json").unlink()
    os.remove(sorted((out / "shards").glob("*.json"))[-1])  # one shard left to do
    with pytest.raises(SettingsMismatchError, match="other settings"):
        vitok.extract([str(folder)], out, shard_size=2, pool="mean", **LIB)


def test_verify_compares_checksums_and_records_know_their_source(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    store = vitok.open(out)
    record = store.info(store.keys()[0])
    assert record["source_bytes"] > 0 and record["source_mtime_ns"] > 0 and record["decoder"]
    shard = next((out / "shards").glob("*.h5"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    result = run_vitok("verify", str(out))
    assert result.returncode == 1 and "checksum" in result.stderr
    assert run_vitok("verify", str(out), "--quick").returncode == 0


# ---- 9. signals and leftovers ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_cleanly_and_a_rerun_resumes(tmp_path, sig, code):
    folder = make_folder(tmp_path / "imgs", count=24, with_odd=False)
    out = tmp_path / "out"
    args = ["extract", str(folder), "-o", str(out), "--size", "small", "--workers", "1", "--shard-size", "2"]
    stopped = vitok_killed_at("vitok.storage.shards:commit", 2, *args, sent=sig.name)  # as the second shard commits
    stderr = stopped.stderr
    assert stopped.returncode == code, stderr[-1000:]
    assert "rerun the same command to resume" in stderr
    assert not leftovers(out) and not list((out / ".claims").glob("*.claim"))
    done = shard_times(out)
    assert run_vitok(*args).returncode == 0
    assert all(shard_times(out)[n] == t for n, t in done.items())
    assert run_vitok("verify", str(out)).returncode == 0 and len(vitok.open(out)) == 24


def test_leftovers_of_killed_runs_are_reported_then_cleaned(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, shard_size=2, **LIB)
    os.remove(out / "shards" / "shard-000001.json")
    os.remove(out / "shards" / "shard-000001.h5")
    (out / "shards" / ".shard-000001.h5.host-1-dead.tmp").write_bytes(b"partial")
    assert any("interrupted run" in line for line in vitok.verify(out).leftovers)
    vitok.extract([str(folder)], out, shard_size=2, **LIB)
    assert not leftovers(out) and vitok.verify(out).clean


# ---- 10. output hygiene ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_progress_goes_to_stderr_even_on_a_terminal(tmp_path):
    import pty

    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vitok", "extract", str(folder), "-o", str(tmp_path / "out"),
                             "--model", "qwen3-vl-tiny", "--workers", "0", "--json"], stdout=subprocess.PIPE,
                            stderr=slave, env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100"))
    os.close(slave)
    stdout, _ = proc.communicate(timeout=120)
    os.close(master)
    assert proc.returncode == 0
    assert json.loads(stdout)["ok"] == 3  # stdout is exactly one JSON line


def test_gpus_summaries_merge_into_the_single_process_shape_and_signals_fail():
    from vitok.run.gpus import exit_code_of, merge_summaries
    from vitok.run.summary import ExtractSummary

    def summary(part, ok):
        return ExtractSummary("o", part, 4, ok, 1, 0, 0, 2, 0, 0, 1, 2.0, 1.0, 10, 100, 0.1, 0.2, 0.0).to_dict()

    merged = merge_summaries([summary("0/2", 3), summary("1/2", 4)])
    assert merged.keys() == summary("0/2", 1).keys()
    assert merged["ok"] == 7 and merged["part"] == "0/2,1/2" and merged["images_per_second"] == 4.5
    assert exit_code_of([0, -9]) == 137 and exit_code_of([0, 0]) == 0 and exit_code_of([2, 0]) == 2


@pytest.mark.parametrize("given, env", [
    ({}, {}),
    ({"part": 1, "num_parts": 4}, {}),
    ({}, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"}),
    ({}, {"RANK": "1", "WORLD_SIZE": "2"}),
])
def test_gpus_split_this_process_part_between_its_gpus(monkeypatch, tmp_path, given, env):
    """--gpus on part p of N: its children do parts p + N*j of N*G, never the whole plan again (a SLURM array of
    nodes each running --gpus all would otherwise have every node claim everything)."""
    import subprocess

    from vitok.run import gpus
    from vitok.run.options import ExtractOptions
    from vitok.run.parallel import Part, detect_part

    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                 "SLURM_ARRAY_TASK_MAX", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    commands = []

    class Child:
        returncode = 1  # (no summaries to merge)

        def __init__(self, cmd, **_):
            commands.append(cmd)

        def communicate(self):
            return "", None

    monkeypatch.setattr(subprocess, "Popen", Child)
    options = ExtractOptions(model="qwen3-vl-tiny", **given)
    gpus.run_per_gpu("0,1", tmp_path / "out", ["imgs"], options)
    parent = detect_part(options.part, options.num_parts)
    parts = [(int(cmd[cmd.index("--part") + 1]), int(cmd[cmd.index("--num-parts") + 1])) for cmd in commands]
    assert parts == [(parent.index, parent.count * 2), (parent.index + parent.count, parent.count * 2)]
    shards = range(48)
    for index, count in parts:  # the children own exactly the parent's shards, each once
        assert all(Part(parent.index, parent.count, None, "").owns(i) for i in shards if Part(index, count, None,
                                                                                                  "").owns(i))
    owned = [i for index, count in parts for i in shards if Part(index, count, None, "").owns(i)]
    assert sorted(owned) == [i for i in shards if parent.count == 1 or i % parent.count == parent.index]


def _first_time(marker) -> bool:
    """True once per marker file, whichever process asks first."""
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def _dies_in(monkeypatch, when):
    """Decoding kills the process doing it (SIGKILL, as the out-of-memory killer or a decoder crash would) whenever
    ``when(data)`` says so; workers are forked from this process, so they decode through the patch."""
    from vitok.inputs.preprocess import Preprocessor

    load = Preprocessor.load

    def dying(self, data, *args, **kwargs):
        if when(bytes(data)):
            os.kill(os.getpid(), signal.SIGKILL)
        return load(self, data, *args, **kwargs)

    monkeypatch.setattr(Preprocessor, "load", dying)


@pytest.mark.slow
def test_a_decode_worker_killed_once_costs_nothing(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs", count=24, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "clean", **LIB)
    marker = tmp_path / "killed-once"
    _dies_in(monkeypatch, lambda _data: _first_time(marker))
    summary = vitok.extract([str(folder)], tmp_path / "out", **{**LIB, "workers": 2})
    assert marker.exists() and summary.ok == 24 and summary.failed == summary.skipped == 0
    clean, out = vitok.open(tmp_path / "clean"), vitok.open(tmp_path / "out")
    assert sorted(out.keys()) == sorted(clean.keys())
    for key in clean.keys():
        np.testing.assert_array_equal(out[key], clean[key])


def test_a_worker_death_is_not_raised_from_a_signal_handler_in_whatever_the_run_is_doing(tmp_path):
    """torch's SIGCHLD handler raises a worker's death in the main thread wherever it is (the encoder, the writer),
    past the loader's recovery: a real run died with 'DataLoader worker (pid N) is killed by signal'."""
    from vitok.inputs.preprocess import Preprocessor
    from vitok.inputs.preprocess_config import PreprocessConfig
    from vitok.inputs.readers import ReaderOptions
    from vitok.inputs.sources import list_inputs
    from vitok.pipeline.workers import load_units
    from vitok.storage.plan import load_plan, write_generation

    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    write_generation(tmp_path / "store", list_inputs([str(folder)]), 4, 0, 0, [], "test")
    before = signal.getsignal(signal.SIGCHLD)
    chunks = load_units(load_plan(tmp_path / "store").units, "files", ReaderOptions(),
                        Preprocessor(PreprocessConfig()), workers=2)
    try:
        assert signal.getsignal(signal.SIGCHLD) is before
        assert sum(len(chunk.items) for chunk in chunks) == 4
    finally:
        chunks.close()


def _photos(folder, count, poisoned=()):
    """``count`` small PNGs f000.png...; the ``poisoned`` ones end with a marker that kills whoever decodes them."""
    import io

    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + i % 5 * 8, 48), (i, 2 * i % 256, 7)).save(buffer, format="PNG")
        (folder / f"f{i:03d}.png").write_bytes(buffer.getvalue() + (b"POISON" if i in poisoned else b""))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("input_format, poisoned", [("files", (20,)), ("files", (0, 41)), ("wds", (3, 29))])
def test_an_image_that_crashes_its_decoder_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, input_format,
                                                                             poisoned):
    """Wherever the image is: a worker may have decoded chunks ahead of the one awaited, so the task it died in is
    not always its first undelivered one (the first fix isolated only that, and every rerun died the same way)."""
    import tarfile

    folder = _photos(tmp_path / "imgs", 48, poisoned)
    if input_format == "wds":
        tars = tmp_path / "tars"
        tars.mkdir()
        for number, start in enumerate(range(0, 48, 16)):
            with tarfile.open(tars / f"{number:05d}.tar", "w") as tar:
                for i in range(start, start + 16):
                    tar.add(folder / f"f{i:03d}.png", arcname=f"f{i:03d}.png")
        folder = tars
    _dies_in(monkeypatch, lambda data: data.endswith(b"POISON"))
    summary = vitok.extract([str(folder)], tmp_path / "out", **{**LIB, "workers": 2, "shard_size": 16})
    store = vitok.open(tmp_path / "out")
    names = sorted(k.split("/")[-1].removesuffix(".png") for k in store.skipped)  # (tar keys have no extension)
    assert names == [f"f{i:03d}" for i in poisoned], store.skipped
    assert all("SIGKILL" in reason for reason in store.skipped.values())
    assert summary.ok == len(store.keys()) == 48 - len(poisoned)
    assert not vitok.verify(tmp_path / "out").problems


@pytest.mark.slow
def test_a_stalled_decode_worker_is_taken_as_dead_and_the_run_goes_on(tmp_path, monkeypatch):
    from vitok.pipeline import workers

    monkeypatch.setattr(workers, "STALL_SECONDS", 2.0)
    folder = _photos(tmp_path / "imgs", 24)
    marker = tmp_path / "stopped-once"

    def stop_once(_data):
        if _first_time(marker):  # (across the forked workers: the marker file is the memory)
            os.kill(os.getpid(), signal.SIGSTOP)  # as a decoder stuck in a loop or storage that never answers
        return False

    _dies_in(monkeypatch, stop_once)
    summary = vitok.extract([str(folder)], tmp_path / "out", **{**LIB, "workers": 2})
    assert marker.exists() and summary.ok == 24 and summary.skipped == summary.failed == 0


@pytest.mark.slow
def test_workers_that_die_whatever_is_isolated_end_the_run_with_one_clear_error(tmp_path, monkeypatch):
    from vitok.errors import WorkersDiedError
    from vitok.inputs.readers.files import FilesReader

    folder = _photos(tmp_path / "imgs", 8)
    monkeypatch.setattr(FilesReader, "samples", lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(WorkersDiedError, match="died 3 times in a row"):
        vitok.extract([str(folder)], tmp_path / "out", **{**LIB, "workers": 2})


# ---- 11. bounded open files --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_store_of_many_shards_keeps_few_files_open(tmp_path, monkeypatch):
    from vitok.storage import store as store_module

    folder = make_folder(tmp_path / "imgs", count=12, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", shard_size=1, **LIB)
    monkeypatch.setattr(store_module, "MAX_OPEN", 3)
    store = vitok.open(tmp_path / "out")
    open_before = len(os.listdir("/proc/self/fd"))
    for key in store.keys():
        store[key]
    assert len(store._readers) == 3 and len(os.listdir("/proc/self/fd")) <= open_before + 3
    store.close()


# ---- 12. parts from the environment -------------------------------------------------------------------------------


def test_a_part_from_slurm_says_so_and_names_what_is_pending(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=6, with_odd=False)
    out = tmp_path / "out"
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    result = run_vitok("extract", str(folder), "-o", str(out), *TINY[:-1], "--shard-size", "2", env=env)
    assert result.returncode == 0
    assert "from the slurm environment" in result.stderr and "other parts are not done" in result.stderr
    info = run_vitok("info", str(out))
    assert "2 done of 3 planned" in info.stdout and "1 not done" in info.stdout


# ---- 13. smaller ones ----------------------------------------------------------------------------------------------


def test_small_refusals_are_clear(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=2, with_odd=False)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="--image-size 100000"):
        vitok.extract([str(folder)], out, image_size=100000, **LIB)
    vitok.extract([str(folder)], out, **LIB)
    store = vitok.open(out)
    with pytest.raises(KeyError, match="not in this store"):
        store.info("nope.png")
    (tmp_path / "file").write_text("x")
    # a path that is not a store, given on the command line, is a usage error (exit 2, as a missing source is)
    for command, target, says in [("info", "file", "not a vitok store"), ("verify", "file", "not a vitok store"),
                                  ("info", "nowhere", "does not exist"), ("verify", "nowhere", "does not exist"),
                                  ("verify", "imgs", "not a vitok store"),
                                  ("export", "nowhere", "does not exist")]:
        extra = [str(tmp_path / "dest"), "--pool", "mean"] if command == "export" else []
        result = run_vitok(command, str(tmp_path / target), *extra)
        assert result.returncode == 2 and "internal error" not in result.stderr and says in result.stderr, result
    with pytest.raises(StoreError, match="not a vitok store"):
        vitok.open(tmp_path)
    with pytest.raises(UsageError, match="is a file, not a folder"):  # before the model loads
        vitok.extract([str(folder)], tmp_path / "file" / "sub", **LIB)
    header = out / "vitok.json"
    header.write_text(header.read_text()[:-20])  # damaged: every command says how to repair it
    for args in (["info", str(out)], ["extract", str(folder), "-o", str(out), *TINY]):
        result = run_vitok(*args)
        assert result.returncode == 1 and "damaged" in result.stderr and "--overwrite" in result.stderr, result
    vitok.extract([str(folder)], out, overwrite=True, **LIB)  # the repair it names works
    assert vitok.verify(out).clean


@pytest.fixture
def read_only_copy(tmp_path):
    """A read-only bind mount of a finished store."""
    folder = make_folder(tmp_path / "imgs", count=2, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", **LIB)
    mount = tmp_path / "ro"
    mount.mkdir()
    ok = subprocess.run(["mount", "--bind", str(tmp_path / "out"), str(mount)], capture_output=True).returncode == 0
    ok = ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(mount)], capture_output=True)
        pytest.skip("cannot make a read-only bind mount here (needs root)")
    try:
        yield folder, mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_finished_store_on_a_read_only_mount_resumes_as_a_no_op(read_only_copy, tmp_path):
    folder, mount = read_only_copy
    summary = vitok.extract([str(folder)], mount, **LIB)
    assert summary.shards_written == 0 and summary.already_done == 2
    with pytest.raises(StoreError, match="read-only"):
        vitok.extract([str(folder)], mount / "new", **LIB)


def test_all_inputs_skipped_is_loud_and_exits_1(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"not a jpeg")
    result = run_vitok("extract", str(folder), "-o", str(tmp_path / "out"), *TINY[:-1])
    assert result.returncode == 1 and "ALL 3 input(s)" in result.stderr


def test_a_run_with_nothing_usable_is_decided_as_one_whose_every_input_was_skipped():
    from vitok.run.summary import ExtractSummary

    def summary(ok, skipped=0, failed=0, nonfinite=0):
        return ExtractSummary("o", "0/1", None, ok, skipped, failed, 0, 1, 0, 0, 0, 1.0, 1.0, 0, 0, 0, 0, 0,
                              nonfinite=nonfinite)

    assert summary(0, skipped=3).nothing_usable and summary(0, failed=1).nothing_usable
    assert summary(3, nonfinite=3).nothing_usable and summary(2, skipped=1, nonfinite=2).nothing_usable
    assert not summary(3, nonfinite=2).nothing_usable and not summary(1, skipped=5).nothing_usable
    assert not summary(0).nothing_usable  # nothing attempted (all done already): not a failure


# ---- 14. a self-describing store, readable by colleagues ----------------------------------------------------------


def test_store_describes_itself_and_is_readable_by_the_group(tmp_path):
    import h5py

    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        vitok.extract([str(folder)], out, **LIB)
    finally:
        os.umask(old)
    readme = (out / "README.txt").read_text()
    assert "offsets" in readme and "grids" in readme and "qwen3-vl-tiny" in readme
    with h5py.File(next((out / "shards").glob("*.h5"))) as handle:
        grids = handle["grids"][()]
        keys = [k.decode() for k in handle["keys"][()]]
    store = vitok.open(out)
    assert grids.tolist() == [store.info(k)["grid"] for k in keys]
    files = [p for p in out.rglob("*") if p.is_file() and ".claims" not in p.parts]
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert np.isfinite(store[keys[0]]).all()


# ---- memory does not grow with the shard size (rows stream to disk as batches finish) -----------------------------

RSS_SCRIPT = """
import resource, sys
import vitok
vitok.extract([sys.argv[1]], sys.argv[2], model=sys.argv[3], workers=0, features=["patch"], store_dtype="float32",
              shard_size=int(sys.argv[4]), min_pixels=2048 * 256, max_pixels=2048 * 256)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_shard_size(tmp_path):
    from vitok.encoder.checkpoint import save_tower
    from vitok.encoder.config import EncoderConfig
    from vitok.encoder.model import VisionEncoder, init_random_weights

    config = EncoderConfig(name="wide", hidden_size=512, depth=1, num_heads=8, intermediate_size=1024,
                           out_hidden_size=256, num_position_embeddings=2304)
    model = VisionEncoder(config)
    init_random_weights(model)
    save_tower(model, tmp_path / "wide.safetensors", config)
    for i in range(30):
        photo(tmp_path / "imgs" / f"{i:03d}.png", size=(40, 30), seed=i)  # each resized to 2048 patches (4 MB)
    peaks = {}
    for size in (3, 30):
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "imgs"), str(tmp_path / f"o{size}"),
                                 str(tmp_path / "wide.safetensors"), str(size)], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[size] = int(result.stdout.split()[-1])
    data = sum(p.stat().st_size for p in (tmp_path / "o30" / "shards").glob("*.h5")) // 2**20
    assert data >= 110  # one shard of 30 images holds ~120 MB of tokens...
    assert peaks[30] - peaks[3] < 40, peaks  # ...but the process never holds it


@pytest.mark.slow
def test_a_crash_in_a_decode_worker_ends_the_run_instead_of_hanging(tmp_path):
    """Regression: an exception escaping a DataLoader worker left the process waiting for its workers forever."""
    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    script = (
        "import sys, vitok\n"
        "from vitok.inputs.readers.files import FilesReader\n"
        "def broken(self, unit, start=0, stop=None):\n"
        "    raise RuntimeError('reader bug')\n"
        "FilesReader.samples = broken\n"
        "vitok.extract([sys.argv[1]], sys.argv[2], model='qwen3-vl-tiny', workers=1)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "out")], capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode != 0 and "reader bug" in result.stderr
    assert not leftovers(tmp_path / "out") and not list((tmp_path / "out" / ".claims").glob("*.claim"))
