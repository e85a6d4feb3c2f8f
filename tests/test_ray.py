"""--engine ray on a local Ray instance (2 CPUs, shared by the module): the store equals a single process's, a killed
driver resumes, an undecodable image is recorded, and a worker that dies is retried without duplicate rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT
from helpers import TINY, make_folder, png_folder, vitok_killed_at
from helpers import vitok as cli

import vitok

ray = pytest.importorskip("ray")

IMG2DATASET = Path(__file__).parent / "data" / "img2dataset"
LIB = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", features=["merged", "deepstack"], shard_size=4)
ARM = "VITOK_TEST_CRASH_ARM"  # a file: while it exists, the next decode task to reach its second batch dies


def test_engine_flags_that_contradict_are_refused_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from vitok.cli import app as cli
    from vitok.errors import UsageError

    with pytest.raises(UsageError, match="--address .* needs --engine ray"):
        vitok.extract([str(tmp_path)], tmp_path / "out", address="auto", **LIB)
    with pytest.raises(UsageError, match="--decode gpu is not available with --engine ray"):
        vitok.extract([str(tmp_path)], tmp_path / "out", engine="ray", decode="gpu", **LIB)
    with pytest.raises(UsageError, match="--reuse is not available with --engine ray"):
        vitok.extract([str(tmp_path)], tmp_path / "out", engine="ray", reuse=[str(tmp_path)], **LIB)
    result = CliRunner().invoke(cli.app, ["extract", str(tmp_path), "-o", str(tmp_path / "out"), "--engine", "ray",
                                          "--gpus", "0,1"])
    assert isinstance(result.exception, UsageError) and "--gpus" in str(result.exception)
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def crash_once_hook() -> None:
    """Runs in every Ray worker of the test cluster: a decode task dies (the whole worker process, as an OOM kill
    would) after handing over its first step, once per arming."""
    import vitok.run.ray_engine as engine

    original = engine.unit_steps

    def unit_steps(*args, **kwargs):
        for n, step in enumerate(original(*args, **kwargs)):
            arm = os.environ.get(ARM)
            if n == 1 and arm:
                try:
                    os.unlink(arm)
                except FileNotFoundError:
                    pass
                else:
                    os._exit(1)
            yield step

    engine.unit_steps = unit_steps


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    arm = tmp_path_factory.mktemp("arm") / "crash"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", ARM: str(arm)},
                          "worker_process_setup_hook": "test_ray.crash_once_hook"})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield {"address": ray.get_runtime_context().gcs_address, "arm": arm}
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ray") / "imgs", count=10, with_odd=True)


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    vitok.extract([str(folder)], out, **LIB)
    return contents(out)


def contents(out: Path) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """Every committed shard: its sidecar (less the data's checksum: HDF5 files name their temporary file) and the
    bytes of every array in its data."""
    shards = {}
    for path in sorted((out / "shards").glob("*.json")):
        sidecar = json.loads(path.read_text())
        sidecar.pop("files")
        sidecar["records"] = sorted(sidecar["records"], key=lambda r: r["key"])  # skipped ones may come earlier
        with h5py.File(out / "shards" / sidecar["data"]) as handle:
            names: list[str] = []
            handle.visit(names.append)
            arrays = {name: as_bytes(handle[name][()]) for name in names if isinstance(handle[name], h5py.Dataset)}
        shards[path.stem] = (sidecar, arrays)
    return shards


def as_bytes(array: np.ndarray) -> bytes:
    return repr(array.tolist()).encode() if array.dtype.kind == "O" else array.tobytes()


def assert_same(out: Path, expected) -> None:
    got = contents(out)
    assert sorted(got) == sorted(expected)
    for shard, (sidecar, arrays) in expected.items():
        assert got[shard][0] == sidecar, shard
        assert got[shard][1].keys() == arrays.keys()
        for name in arrays:
            assert got[shard][1][name] == arrays[name], f"{shard}/{name}"
    assert vitok.verify(out).clean


@pytest.mark.slow  # a Ray run costs several seconds on 2 cores
def test_loose_files_equal_one_process_and_undecodable_images_are_recorded(cluster, folder, single, tmp_path):
    summary = vitok.extract([str(folder)], tmp_path / "out", engine="ray", **LIB)
    assert summary.ok == sum(r["status"] == "ok" for s, _ in single.values() for r in s["records"])
    assert summary.skipped >= 5 and summary.failed == 0
    assert any("cannot" in reason or "truncated" in reason for reason in summary.skipped_reasons.values())
    assert_same(tmp_path / "out", single)
    store = vitok.open(tmp_path / "out")
    assert len(store.keys()) == summary.ok == len(set(store.keys()))


@pytest.mark.slow  # a Ray run costs several seconds on 2 cores
def test_a_ray_run_reports_the_figures_of_its_tasks_and_actors_and_a_bare_resume_takes_the_stored_settings(
        cluster, tmp_path, monkeypatch):
    import time

    import vitok.run.ray_engine as engine
    from vitok.run.run_stats import latest_stats

    folder, out = png_folder(tmp_path / "imgs", 4), tmp_path / "out"
    joining = engine.connect

    def slow_to_join(*args):  # Ray's start-up, long enough to tell apart from planning
        time.sleep(2.0)
        return joining(*args)

    monkeypatch.setattr(engine, "connect", slow_to_join)
    summary = vitok.extract([str(folder)], out, engine="ray", **(LIB | {"shard_size": 2}))
    phases, stages = summary.phases, summary.stages
    assert phases["ray_init"] >= 2.0 and phases["plan"] < 2.0, phases
    assert stages["images"] >= 1 and stages["workers"] >= 1 and stages["encoders"] >= 1, stages
    assert stages["decode_img_s"] > 0 and 0 < stages["decode_busy"] <= 1 and stages["decode_capacity_img_s"] > 0
    assert 0 < stages["encoder_busy"] <= 1 and stages["encoder_img_s"] > 0, stages
    assert stages["writer_mb_s"] > 0 and 0 < stages["writer_busy"] <= 1, stages
    assert summary.bottleneck and latest_stats(out)["stages"] == stages and latest_stats(out)["engine"] == "ray"
    # a bare resume through the Ray engine takes the store's settings (model, shard size, features, dtype)
    again = vitok.extract([], out, engine="ray")
    assert again.shards_already_done == 2 and again.ok == 0


@pytest.mark.slow  # a Ray run costs several seconds on 2 cores
def test_a_ray_run_into_a_bucket_equals_one_process_and_its_resume_sends_no_shard(cluster, folder, single, s3,
                                                                                  tmp_path, monkeypatch):
    """``--engine ray -o s3://``: only the driver talks to the bucket (plan, claims, commits), so workers that cannot
    reach it (the endpoint is this test's proxy, on a port they were never told) still make the store a local run
    makes, bit for bit; the driver has the endpoint from ``--storage-option`` alone."""
    from s3server import BUCKET

    @ray.remote
    def configuration() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}

    assert s3.endpoint not in ray.get(configuration.remote()).values()
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the driver has it only from the flag
    remote = f"s3://{BUCKET}/feats"
    args = ["extract", str(folder), "-o", remote, *TINY, "--store-dtype", "float32", "--features", "merged,deepstack",
            "--shard-size", "4", "--engine", "ray", "--address", cluster["address"], "--storage-option",
            f"endpoint_url={s3.endpoint}", "--json"]
    first = cli(*args, check=True)
    assert json.loads(first.stdout)["shards_written"] == len(single)
    assert_same(s3.download("feats", tmp_path / "copy"), single)
    s3.proxy.clear()
    again = json.loads(cli(*args, check=True).stdout)
    assert again["shards_written"] == 0 and again["shards_already_done"] == len(single)
    assert not [s for s in s3.proxy.seen if s.method in ("PUT", "POST", "DELETE")], "the resume wrote to the bucket"


def test_a_job_refused_after_ray_started_leaves_no_instance_running(cluster, folder, s3, monkeypatch):
    """``vitok.extract(engine="ray")`` joins (or starts) Ray before the job is prepared; a job refused then (a bucket
    that does not exist, other settings) used to leave the instance it had started running in the caller's
    process. Here joining is said to have started Ray (the module's cluster stands in for it) and the shutdown is
    counted, not done."""
    import vitok.run.ray_engine as engine
    from vitok.errors import StoreAccessError

    shutdowns = []
    monkeypatch.setattr(engine, "connect", lambda address, timeout: True)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    with pytest.raises(StoreAccessError, match="does not exist"):
        vitok.extract([str(folder)], "s3://no-such-bucket/feats", engine="ray", **LIB)
    assert shutdowns == [True]


@pytest.mark.slow  # a Ray run costs several seconds on 2 cores
def test_img2dataset_tars_equal_one_process(cluster, tmp_path):
    source = [str(IMG2DATASET / "webdataset")]
    vitok.extract(source, tmp_path / "single", **LIB)
    summary = vitok.extract(source, tmp_path / "ray", engine="ray", **LIB)
    assert summary.ok == 14
    assert_same(tmp_path / "ray", contents(tmp_path / "single"))


@pytest.mark.slow  # a Ray run costs several seconds on 2 cores
def test_videos_through_ray_equal_one_process(cluster, tmp_path):
    from helpers import video_clip

    from vitok.inputs.video_decode import unavailable

    if unavailable("torchcodec") or unavailable("pyav"):
        pytest.skip(f"videos need torchcodec and PyAV here: {unavailable('torchcodec') or unavailable('pyav')}")
    folder = tmp_path / "videos"
    folder.mkdir()
    for name, frames, size in (("a.mp4", 12, (96, 64)), ("b.webm", 9, (64, 80))):
        video_clip(folder / name, frames=frames, size=size)
    (folder / "broken.mp4").write_bytes(b"not a video")
    # per temporal step, and a token budget under a video's patches: its steps are encoded in pieces; the single
    # process also cuts each video in time (decoded a piece at a time), which Ray's tasks do not
    common = dict(LIB, features=["merged"], pool="mean", pool_steps=True, token_budget=64, shard_size=2,
                  video_chunk_patches=1)
    vitok.extract([str(folder)], tmp_path / "single", **common)
    summary = vitok.extract([str(folder)], tmp_path / "ray", engine="ray", **common)
    assert summary.ok == 2 and summary.skipped == 1
    assert_same(tmp_path / "ray", contents(tmp_path / "single"))
    store = vitok.open(tmp_path / "ray")
    assert store.header.settings.pool_by == "step" and store["a.mp4"].shape[0] == store.info("a.mp4")["grid_thw"][0]


@pytest.mark.slow  # a Ray run costs several seconds on 2 cores
def test_a_killed_driver_resumes_to_the_same_store(cluster, folder, single, tmp_path):
    out = tmp_path / "out"
    driver = vitok_killed_at("vitok.storage.shards:commit", 2, "extract", str(folder), "-o", str(out), *TINY,
                             "--store-dtype", "float32", "--features", "merged,deepstack", "--shard-size", "4",
                             "--engine", "ray", "--address", cluster["address"])
    assert driver.returncode == -9, driver.stderr[-2000:]  # as the driver commits the second shard
    committed = len(list((out / "shards").glob("*.json")))
    assert 0 < committed < len(single)
    summary = vitok.extract([str(folder)], out, engine="ray", **LIB)
    assert summary.shards_already_done >= committed and summary.shards_written == len(single) - committed
    assert_same(out, single)


@pytest.mark.slow  # a process of its own: a few seconds
def test_a_driver_without_the_clusters_token_is_told_what_to_set(cluster, folder, tmp_path):
    """Ray 2.60 starts a local instance with token authentication on; a driver that sends no token is refused."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        pytest.skip("the test cluster runs without token authentication")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled",
                                                                                  "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "vitok", "extract", str(folder), "-o", str(tmp_path / "out"),
                             *TINY, "--engine", "ray", "--address", cluster["address"]], capture_output=True,
                            text=True, env=env, timeout=90)
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "internal error" not in result.stderr, result.stderr
    assert line.startswith(f"vitok: error: the Ray cluster at {cluster['address']} refused this driver's token")
    assert "RAY_AUTH_MODE=token" in line and not (tmp_path / "out").exists()


@pytest.mark.slow  # a Ray run costs several seconds on 2 cores
def test_a_dead_worker_is_retried_by_ray_without_duplicate_rows(cluster, folder, single, tmp_path):
    cluster["arm"].touch()
    vitok.extract([str(folder)], tmp_path / "out", engine="ray", **LIB)
    assert not cluster["arm"].exists(), "no decode task died: the test did not test anything"
    assert_same(tmp_path / "out", single)
    keys = vitok.open(tmp_path / "out").keys()
    assert len(keys) == len(set(keys))
    np.testing.assert_equal(len(keys), sum(r["status"] == "ok" for s, _ in single.values() for r in s["records"]))


@pytest.mark.slow  # a Ray run costs several seconds on 2 cores
def test_token_encoder_and_write_store_in_a_ray_pipeline(cluster, tmp_path):
    from vitok.integrations.ray import TokenEncoder, write_store

    photos = sorted(p for p in (ROOT / "examples" / "images").iterdir() if p.suffix.lower() in (".jpg", ".png"))[:3]
    rows = [{"key": p.stem, "image": p.read_bytes()} for p in photos] + [{"key": "broken", "image": b"not an image"}]
    options = dict(model="qwen3-vl-tiny", store_dtype="float32", features=("merged", "deepstack"), token_budget=1,
                   dtype="float32")
    ds = ray.data.from_items(rows).map_batches(TokenEncoder, fn_constructor_kwargs=options, batch_size=2,
                                               compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    assert write_store(ds, tmp_path / "out", shard_size=3, **options) == 2
    for p in photos:  # the same tokens as vitok extract of the files (one image per batch in both)
        (tmp_path / "files" / p.name).parent.mkdir(exist_ok=True)
        (tmp_path / "files" / p.name).write_bytes(p.read_bytes())
    vitok.extract([str(tmp_path / "files")], tmp_path / "reference", workers=0, **options)
    store, reference = vitok.open(tmp_path / "out"), vitok.open(tmp_path / "reference")
    assert sorted(store.keys()) == sorted(p.stem for p in photos)
    assert "not an image" in store.skipped["broken"]
    for p in photos:
        for feature in ("merged", "deepstack"):
            np.testing.assert_array_equal(store.get(p.stem, feature), reference.get(p.name, feature))
    assert vitok.verify(tmp_path / "out").clean


@pytest.mark.slow
def test_a_unit_is_cut_into_the_local_loops_batches_and_steps_are_kept_once_in_order(tmp_path):
    """The stages without Ray: a decode task's steps hold the batches ``plan_batches`` makes of the unit's decodable
    images; steps arriving shuffled and twice (a retried task) come out once each, in order."""
    import pickle
    import random

    from vitok.inputs.preprocess import Preprocessor
    from vitok.inputs.readers import ReaderOptions
    from vitok.pipeline.batcher import plan_batches
    from vitok.pipeline.loader import in_unit_order
    from vitok.run.job import preprocess_for
    from vitok.run.options import make_options
    from vitok.run.ray_engine import decode_unit, process_name, unit_steps
    from vitok.storage.plan import load_plan

    folder = make_folder(tmp_path / "imgs", count=7, with_odd=False)
    (folder / "a" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    units = load_plan(out).units
    options = make_options(**LIB)
    preprocess = Preprocessor(preprocess_for(vitok.encoder.checkpoint.resolve_model(options.model), options))
    steps = []
    for unit in units:
        unit_steps_list = list(unit_steps(unit, "files", ReaderOptions(), preprocess, 700))
        assert [s.seq for s in unit_steps_list] == list(range(len(unit_steps_list))) and unit_steps_list[-1].end
        batches = [[item.record.key for item in s.items] for s in unit_steps_list if s.items]
        decodable = [s.items for s in unit_steps_list if s.items]
        sizes = [item.image.grid_thw[1] * item.image.grid_thw[2] for items in decodable for item in items]
        keys = [key for batch in batches for key in batch]
        assert [len(r) for r in plan_batches(sizes, 700)] == [len(b) for b in batches]
        assert len(keys) + sum(len(s.records) for s in unit_steps_list) == unit.count
        # the decode figures travel with the steps: every input once, the task's busy time, its process
        assert sum(s.decoded for s in unit_steps_list) == unit.count
        assert sum(s.decode_seconds for s in unit_steps_list) > 0
        assert {s.decoder for s in unit_steps_list} == {process_name()}
        steps += unit_steps_list
    rows = [row for unit in units for row in decode_unit({"unit": pickle.dumps(unit)}, "files", ReaderOptions(),
                                                         preprocess, 700)]
    assert len(rows) == len(steps)
    arriving = rows + rows[: len(rows) // 2]
    random.Random(0).shuffle(arriving)
    replayed = [(s.unit, s.seq) for s in in_unit_order(pickle.loads(r["step"]) for r in arriving)]
    assert sorted(replayed) == sorted((s.unit, s.seq) for s in steps) and len(set(replayed)) == len(replayed)
    for unit in units:
        assert [q for u, q in replayed if u == unit.index] == sorted(q for u, q in replayed if u == unit.index)


def test_a_unit_sent_to_a_decode_task_needs_no_plan_on_its_node(tmp_path):
    """The driver sends each unit with its inputs in it (``UnitRef.inlined``): a node holding neither OUT nor its
    plan (a store in a bucket) reads the same inputs."""
    import pickle
    import shutil

    from vitok.storage.plan import write_generation
    from vitok.storage.plan.model import load_plan

    folder = make_folder(tmp_path / "imgs", count=5, with_odd=False)
    out = tmp_path / "out"
    from vitok.inputs.sources import list_inputs

    write_generation(out, list_inputs([str(folder)]), 2, 0, 0, [str(folder)], "initial")
    units = load_plan(out).units
    planned = [unit.files() for unit in units]
    sent = [pickle.dumps(unit.inlined()) for unit in units]
    shutil.rmtree(out)
    assert [pickle.loads(data).files() for data in sent] == planned and all(planned)


def test_the_driver_ships_the_whole_vitok_package_to_the_workers(monkeypatch):
    """``py_modules`` names the vitok package itself (not the folder of the engine's module), so a worker without
    vitok installed imports the driver's."""
    import vitok.run.ray_engine as engine

    shipped = {}
    monkeypatch.setattr(engine, "join", lambda address, timeout, runtime_env: shipped.update(runtime_env) or True)
    assert engine.connect("127.0.0.1:6379", 5)
    (package,) = shipped["py_modules"]
    assert Path(package) == Path(vitok.__file__).resolve().parent
