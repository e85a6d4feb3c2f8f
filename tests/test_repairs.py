"""Smaller things users meet: resuming with a bare command, info and verify agreeing, damaged sidecars, model
paths, mismatched consumers, leftovers of dead runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import make_folder
from typer.testing import CliRunner

import vitok
from vitok.errors import SettingsMismatchError

LIB = dict(model="qwen3-vl-tiny", workers=0)
NON_DEFAULT = dict(pool="mean", store_dtype="float32", shard_size=2, features="patch,merged", token_order="raster")


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI points the vitok logger at CliRunner's stream; put it back for the next test."""
    import logging

    logger = logging.getLogger("vitok")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def invoke(*args: str):
    from vitok.cli import app as cli

    return CliRunner().invoke(cli.app, list(args))


def drop_shard(out, name: str = "shard-000001") -> None:
    for path in (out / "shards").glob(f"{name}.*"):
        path.unlink()


# ---- a bare resume takes the store's settings -----------------------------------------------------------------------


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-options", "older-store"])
def test_a_bare_resume_takes_the_stored_settings_and_compares_only_given_ones(tmp_path, recorded):
    """Regression: ``vitok extract -o out/`` (the README's resume) on a store made with non-default settings was
    refused with a diff of every setting."""
    folder = make_folder(tmp_path / "imgs", count=6, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB, **NON_DEFAULT)
    before = vitok.open(out).keys()
    drop_shard(out)  # an interrupted run: one shard to redo
    if not recorded:  # a store written before headers recorded their options: taken from its settings
        header = json.loads((out / "vitok.json").read_text())
        header.pop("options")
        (out / "vitok.json").write_text(json.dumps(header))
    result = invoke("extract", "-o", str(out), "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    store = vitok.open(out)
    assert store.keys() == before and vitok.verify(out).clean
    assert store.header.settings.pool == "mean" and store[before[0]].shape == (1, 64)
    # an option given on the command line is still compared: one difference, named
    result = invoke("extract", "-o", str(out), "--workers", "0", "-q", "--pool", "max")
    assert isinstance(result.exception, SettingsMismatchError)
    assert "pool: 'mean' -> 'max'" in str(result.exception) and str(result.exception).count("->") == 1


def test_a_resume_of_a_store_made_with_a_local_model_finds_it_from_another_folder(tmp_path, monkeypatch):
    from vitok.encoder.checkpoint import resolve_model, save_tower
    from vitok.encoder.model import VisionEncoder

    source = resolve_model("qwen3-vl-tiny")
    save_tower(VisionEncoder(source.encoder), tmp_path / "tower.safetensors", source.encoder)
    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    monkeypatch.chdir(tmp_path)
    vitok.extract([str(folder)], "out", model="tower.safetensors", workers=0, shard_size=2, pool="mean")
    drop_shard(tmp_path / "out")
    monkeypatch.chdir(folder)
    result = invoke("extract", "-o", str(tmp_path / "out"), "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    assert len(vitok.open(tmp_path / "out")) == 4


# ---- info and verify agree, and both speak JSON ----------------------------------------------------------------------


def test_info_and_verify_agree_on_counts_through_retries_and_damage(tmp_path):
    """Regression: info said "3 done of 2 planned" after retries and counted the images of a damaged shard ok."""
    from helpers import photo

    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    late = tmp_path / "late" / "x.png"
    listed = sorted(str(p) for p in folder.rglob("*.*") if p.suffix.lower() in (".png", ".jpg")) + [str(late)]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "out"
    vitok.extract([], out, files_from=str(tmp_path / "list.txt"), shard_size=2, **LIB)  # x.png cannot be read
    photo(late)
    vitok.extract([], out, files_from=str(tmp_path / "list.txt"), shard_size=2, **LIB)  # ...now it is: a retry shard
    assert len(list((out / "shards").glob("*.json"))) == 4  # 3 planned shards and a retry
    info = json.loads(invoke("info", str(out), "--json").output)
    verify = json.loads(invoke("verify", str(out), "--json").output)
    assert info["shards_done"] == info["planned_shards"] == 3 and info["images_ok"] == 5 and info["clean"]
    assert {k: info[k] for k in verify} == verify
    text = invoke("info", str(out)).output
    assert "3 done of 3 planned" in text and "5 ok, 0 skipped, 0 failed" in text

    data = out / "shards" / "shard-000000.h5"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a damaged shard: its 2 images are not ok
    result = invoke("verify", str(out), "--json")
    verify = json.loads(result.output)
    assert result.exit_code == 1 and not verify["clean"]
    assert verify["images_ok"] == 3 and verify["images_damaged"] == 2 and verify["shards_damaged"] == ["shard-000000"]
    info = json.loads(invoke("info", str(out), "--json").output)
    assert {k: info[k] for k in verify} == verify


def test_one_damaged_sidecar_leaves_the_rest_of_the_store_readable_and_says_how_to_repair(tmp_path, caplog):
    """Regression: one unreadable sidecar made open, info and verify fail on the whole store."""
    folder = make_folder(tmp_path / "imgs", count=6, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, shard_size=2, **LIB)
    keys = vitok.open(out).keys()
    (out / "shards" / "shard-000001.json").write_text('{"shard": "shard-000001", "records": [')  # cut short
    with caplog.at_level("WARNING", logger="vitok"):
        store = vitok.open(out)
    assert len(store) == 4 and "shard-000001" in store.damaged and "vitok extract" in caplog.text
    assert all(store[key].shape[-1] == 96 for key in store.keys())
    report = vitok.verify(out)
    assert not report.clean and report.shards_damaged == ["shard-000001"]
    assert any("shard-000001" in p and "re-extract" in p for p in report.problems)
    assert "shard-000001" in invoke("info", str(out)).output
    vitok.extract([str(folder)], out, shard_size=2, **LIB)  # the repair: the shard is redone
    assert vitok.open(out).keys() == keys and vitok.verify(out).clean


# ---- models: damaged checkpoints and mistyped paths ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tower_file(tmp_path_factory):
    from vitok.encoder.checkpoint import resolve_model, save_tower
    from vitok.encoder.model import VisionEncoder

    source = resolve_model("qwen3-vl-tiny")
    path = tmp_path_factory.mktemp("tower") / "tower.safetensors"
    save_tower(VisionEncoder(source.encoder), path, source.encoder)
    return path


@pytest.mark.parametrize("keep", [50, 0.5, 0.95], ids=["header-cut", "half", "tail-cut"])
def test_a_truncated_safetensors_is_one_error_naming_the_file(tmp_path, tower_file, keep):
    from vitok.encoder.checkpoint import read_tower_state_dict, resolve_model
    from vitok.errors import CheckpointError

    data = tower_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError) as caught:
        read_tower_state_dict(resolve_model(cut))
    message = str(caught.value)
    assert str(cut) in message and "truncated or damaged" in message and "\n" not in message


@pytest.mark.parametrize("spec", ["./models/qwen3", "~/no-such-models/qwen3", "/no/such/model", "a/b/c", "local/x"])
def test_a_mistyped_local_model_path_is_not_tried_as_a_hub_repo(tmp_path, monkeypatch, spec):
    from vitok.encoder.checkpoint import resolve_model
    from vitok.errors import UsageError

    (tmp_path / "local").mkdir()  # "local/x": its first part exists here, so it is a path, not owner/name
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("vitok.encoder.checkpoint._resolve_hub", lambda repo: pytest.fail(f"tried the hub for {repo}"))
    with pytest.raises(UsageError, match="no such folder or file"):
        resolve_model(spec)


def test_a_repo_id_is_still_a_repo_id(tmp_path, monkeypatch):
    from vitok.encoder import checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "_resolve_hub", lambda repo: repo)
    assert checkpoint.resolve_model("Qwen/Qwen3-VL-2B-Instruct") == "Qwen/Qwen3-VL-2B-Instruct"


# ---- the training collator refuses a store made by another tower -----------------------------------------------------


def test_the_collator_refuses_a_store_with_other_deepstack_levels_or_width(tmp_path):
    from types import SimpleNamespace

    from vitok.integrations.transformers import CachedImagesCollator

    folder = make_folder(tmp_path / "imgs", count=2, with_odd=False)
    vitok.extract([str(folder)], tmp_path / "out", features="merged,deepstack", **LIB)
    store = vitok.open(tmp_path / "out")  # qwen3-vl-tiny: merged 96 wide, DeepStack from block 0

    def config(width=96, levels=(0,)):
        vision = SimpleNamespace(out_hidden_size=width, deepstack_visual_indexes=list(levels), spatial_merge_size=2)
        return SimpleNamespace(image_token_id=7, vision_config=vision)

    CachedImagesCollator(store, config())
    with pytest.raises(ValueError, match=r"1 DeepStack level\(s\).*adds 3"):
        CachedImagesCollator(store, config(levels=(0, 1, 2)))
    with pytest.raises(ValueError, match="96 wide.*takes 128"):
        CachedImagesCollator(store, config(width=128))


# ---- heartbeats of dead runs -----------------------------------------------------------------------------------------


def test_heartbeat_files_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    from vitok.storage.claims import Claims, RunIdentity, pid_namespace

    runs = tmp_path / ".claims" / "runs"
    runs.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # (in this PID namespace: a pid is trusted only there, else a fresh heartbeat keeps the run alive)
    dead_run = RunIdentity(socket.gethostname(), int(dead.stdout), None, "deadbeef", **pid_namespace())
    (runs / dead_run.id).write_text(dead_run.to_json())
    live_run = RunIdentity("other-host", 1, None, "cafecafe")  # another host, beating recently
    (runs / live_run.id).write_text(live_run.to_json())
    claims = Claims(tmp_path)
    claims.start()
    try:
        assert sorted(p.name for p in runs.iterdir()) == sorted([claims.identity.id, live_run.id])
    finally:
        claims.stop()
    assert [p.name for p in runs.iterdir()] == [live_run.id]


def test_checksum_damage_gets_a_hint_that_repairs_it(tmp_path):
    """Regression: verify advised a plain rerun for damage only checksums find, and the rerun (which checks sizes,
    keys and rows) found nothing to do. The hint now says to delete the shard first; following it repairs the store."""
    folder = make_folder(tmp_path / "imgs", count=2, with_odd=False)
    out = tmp_path / "out"
    options = dict(LIB, format="npy", store_dtype="float32")
    vitok.extract([str(folder)], out, **options)
    with vitok.open(out) as store:
        before = {key: store[key] for key in store.keys()}
    data = next((out / "shards").glob("*/merged.npy"))
    damaged = bytearray(data.read_bytes())
    damaged[-1] ^= 0x40
    data.write_bytes(bytes(damaged))
    problem = next(p for p in vitok.verify(out).problems if "checksum" in p)
    assert "delete shards/" in problem
    shard = data.parent.name
    for path in (out / "shards").glob(f"{shard}*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    vitok.extract([str(folder)], out, **options)
    assert vitok.verify(out).clean
    with vitok.open(out) as store:
        for key, tokens in before.items():
            np.testing.assert_array_equal(store[key], tokens)


def test_info_and_verify_count_the_images_removed_from_the_sources(tmp_path):
    """Regression: images_removed stayed 0 after --update recorded a removed file (its record no longer counts,
    so the count taken from the counted records could never see it)."""
    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    (folder / "b" / "img00.JPG").unlink()
    vitok.extract([str(folder)], out, update=True, **LIB)
    report = vitok.verify(out)
    assert report.images_removed == 1 and report.images_ok == 2 and report.clean


def test_a_killed_plan_write_leaves_a_temporary_file_that_is_shown_then_removed(tmp_path):
    import os
    import time

    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    out = tmp_path / "out"
    (out / "plan").mkdir(parents=True)
    killed, writing = out / "plan" / ".0000.k1ll3d.tmp", out / "plan" / ".0000.l1v3ly.tmp"
    killed.write_bytes(b'"a"\n' * 1000)  # what a 'vitok plan' killed while writing its content leaves
    writing.write_bytes(b'"b"\n')  # another process writing its plan now
    old = time.time() - 3600
    os.utime(killed, (old, old))
    assert invoke("plan", str(folder), "-o", str(out), "--shard-size", "2").exit_code == 0
    assert not killed.exists() and writing.exists()
    os.utime(writing, (old, old))  # now its writer was killed too
    vitok.extract([], out, **LIB, shard_size=2)
    report = vitok.verify(out)
    assert any(".0000.l1v3ly.tmp" in line and "interrupted plan write" in line for line in report.leftovers)
    assert ".0000.l1v3ly.tmp" in invoke("info", str(out)).output


def test_claims_a_killed_run_left_on_committed_shards_are_removed_by_the_next_run(tmp_path):
    """A run killed between committing a shard and releasing its claim leaves the claim (and its run file); no later
    run claims a done shard, so before the fix the claim stayed forever, a leftover in every ``verify``. The next run,
    even one with nothing to do, removes it; a claim of a live run is kept."""
    import socket
    import subprocess
    import sys

    from vitok.storage.claims import Claims, RunIdentity, pid_namespace

    folder = make_folder(tmp_path / "imgs", count=4, with_odd=False)
    out = tmp_path / "out"
    options = dict(LIB, shard_size=2)
    vitok.extract([str(folder)], out, **options)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Claims(out, RunIdentity(socket.gethostname(), int(gone.stdout), None, "deadbeef", **pid_namespace()))
    live = Claims(out, RunIdentity("other-host", 1, None, "cafecafe"))  # another host, beating recently
    for claims, shard in ((dead, "shard-000000"), (live, "shard-000001")):
        claims.root.write(claims.run_file, claims.identity.to_json().encode())
        assert claims.try_claim(shard)  # and never released: as a kill leaves it
    assert sorted(vitok.verify(out).leftovers + vitok.verify(out).in_progress) == [
        "shard-000000 (claimed by " + dead.identity.id + ")", "shard-000001 (claimed by " + live.identity.id + ")"]
    runs = out / ".claims" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted([dead.identity.id, live.identity.id])  # verify judged
    # the other host's heartbeat by the store's clock without writing one of its own (before: its own run file, left)
    summary = vitok.extract([str(folder)], out, **options)
    assert summary.shards_written == 0  # (nothing to do: the run that only tidies)
    report = vitok.verify(out)
    assert not report.leftovers and report.in_progress == [f"shard-000001 (claimed by {live.identity.id})"]
