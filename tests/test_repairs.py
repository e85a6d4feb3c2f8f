"""Smaller things users meet: resuming with a bare command, info and verify agreeing, damaged sidecars, model
paths, mismatched consumers, leftovers of dead runs."""

from __future__ import annotations

import json

import pytest
from helpers import make_folder
from typer.testing import CliRunner

import vitok
from vitok.errors import SettingsMismatchError

LIB = dict(model="qwen3-vl-tiny", workers=0)
NON_DEFAULT = dict(pool="mean", store_dtype="float32", shard_size=2, features="patch,merged", token_order="raster")


def invoke(*args: str):
    from vitok import cli

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
    assert store.header.settings["pool"] == "mean" and store[before[0]].shape == (1, 64)
    # an option given on the command line is still compared: one difference, named
    result = invoke("extract", "-o", str(out), "--workers", "0", "-q", "--pool", "max")
    assert isinstance(result.exception, SettingsMismatchError)
    assert "pool: 'mean' -> 'max'" in str(result.exception) and str(result.exception).count("->") == 1


def test_a_resume_of_a_store_made_with_a_local_model_finds_it_from_another_folder(tmp_path, monkeypatch):
    from vitok.checkpoint import resolve_model, save_tower
    from vitok.model import VisionEncoder

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
