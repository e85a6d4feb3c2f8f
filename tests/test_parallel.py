"""Many processes, one store: parts from flags, torchrun and SLURM; kills, reruns with other part counts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from helpers import TINY, all_tokens, make_folder, popen_vitok, vitok_killed_at
from helpers import vitok as run_vitok

import vitok
from vitok.errors import UsageError
from vitok.run.parallel import detect_part

ARGS = [*TINY, "--shard-size", "3", "--store-dtype", "float32", "--features", "patch,merged"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("p") / "imgs", count=14, with_odd=True)


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    run_vitok("extract", str(folder), "-o", str(out), *ARGS, check=True)
    return {f: all_tokens(out, f) for f in ("patch", "merged")}


def assert_same_store(out, single):
    for feature, expected in single.items():
        got = all_tokens(out, feature)
        assert got.keys() == expected.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key])
    assert run_vitok("verify", str(out)).returncode == 0


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1, "single")),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (1, 4, "torchrun")),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4",
          "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4, "slurm")),
        ({"SLURM_ARRAY_TASK_ID": "20", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "30",
          "SLURM_ARRAY_TASK_STEP": "10", "SLURM_ARRAY_TASK_COUNT": "3"}, (1, 3, "slurm")),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}, (2, 4, "slurm")),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1",
          "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, (3, 4, "slurm")),
    ],
)
def test_part_from_environment(env, expected):
    part = detect_part(env=env)
    assert (part.index, part.count, part.launcher) == expected


def test_explicit_flags_win_and_sparse_arrays_need_num_parts():
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    assert detect_part(0, 3, env=env).index == 0
    sparse = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "7",
              "SLURM_ARRAY_TASK_COUNT": "2"}
    with pytest.raises(UsageError, match="sparse"):
        detect_part(env=sparse)
    assert detect_part(None, 8, env=sparse).index == 7
    with pytest.raises(UsageError):
        detect_part(5, 3, env={})


@pytest.mark.slow
def test_two_parts_one_after_the_other_equal_single_process(folder, single, tmp_path):
    out = tmp_path / "out"
    for part in ("0", "1"):
        run_vitok("extract", str(folder), "-o", str(out), *ARGS, "--part", part, "--num-parts", "2", check=True)
    assert_same_store(out, single)


def test_slurm_array_tasks_simulated(folder, single, tmp_path):
    out = tmp_path / "out"
    for task in ("1", "2"):
        env = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "2",
               "SLURM_ARRAY_TASK_COUNT": "2"}
        run_vitok("extract", str(folder), "-o", str(out), *ARGS, env=env, check=True)
    assert_same_store(out, single)


def free_port() -> int:
    """A port nobody listens on now (a fixed one failed under load when another run held it)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")  # noqa: E501
def test_torchrun_two_processes_on_cpu(folder, single, tmp_path):
    out = tmp_path / "out"
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = str(free_port())
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "vitok", "extract",
                             str(folder), "-o", str(out), *ARGS, "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_store(out, single)
    parts = {json.loads(p.read_text())["part"] for p in (out / "shards").glob("*.json")}
    assert parts == {"0/2", "1/2"}


@pytest.mark.slow
def test_killed_part_is_finished_by_a_rerun_and_other_part_counts_redo_nothing(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=16, with_odd=False)
    out = tmp_path / "out"
    args = ["extract", str(folder), "-o", str(out), "--size", "small", "--workers", "0", "--shard-size", "2",
            "--quiet", "--store-dtype", "float32"]
    run_vitok(*args, "--part", "0", "--num-parts", "2", check=True)
    killed = vitok_killed_at("vitok.storage.shards:commit", 2, *args, "--part", "1", "--num-parts", "2")
    assert killed.returncode == -9, killed.stderr  # as part 1's second shard is committed
    assert run_vitok("verify", str(out)).returncode == 1
    run_vitok(*args, "--part", "1", "--num-parts", "2", check=True)
    assert run_vitok("verify", str(out)).returncode == 0
    result = run_vitok(*args, "--part", "2", "--num-parts", "3", "--json", check=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["shards_written"] == 0 and summary["ok"] == 0
    assert len(vitok.open(out)) == 16


def test_verify_catches_deleted_and_truncated_shards(folder, tmp_path):
    out = tmp_path / "out"
    run_vitok("extract", str(folder), "-o", str(out), *ARGS, check=True)
    shards = sorted((out / "shards").glob("*.h5"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    result = run_vitok("verify", str(out))
    assert result.returncode == 1 and "bytes" in result.stderr
    shards[1].unlink()
    result = run_vitok("verify", str(out))
    assert result.returncode == 1 and "missing" in result.stderr
    # a rerun redoes exactly the damaged shards
    summary = json.loads(run_vitok("extract", str(folder), "-o", str(out), *ARGS, "--json", check=True)
                         .stdout.strip().splitlines()[-1])
    assert summary["shards_written"] == 2
    assert run_vitok("verify", str(out)).returncode == 0


def test_plan_command_is_reused_by_extract(folder, tmp_path):
    out = tmp_path / "out"
    result = run_vitok("plan", str(folder), "-o", str(out), "--shard-size", "3", check=True)
    assert "shards of 3" in result.stdout
    run_vitok("extract", str(folder), "-o", str(out), *ARGS, check=True)
    other = make_folder(tmp_path / "other", count=2, with_odd=False)
    result = run_vitok("extract", str(other), "-o", str(out), *ARGS)
    assert result.returncode == 2 and "changed since" in result.stderr


@pytest.mark.slow
def test_parts_started_at_the_same_moment_into_a_new_folder(folder, single, tmp_path):
    """Regression: a second process saw the first one's temporary header file and refused the folder."""
    out = tmp_path / "out"
    procs = [popen_vitok("extract", str(folder), "-o", str(out), *ARGS, "--part", str(i), "--num-parts", "3")
             for i in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert_same_store(out, single)
