"""The command line as a new user meets it: usage errors are usage errors (exit 2) on any typer the ranges admit,
the help teaches, and the error paths never say "internal error"."""

from __future__ import annotations

import pytest
from helpers import make_folder
from helpers import vitok as run_vitok


@pytest.mark.parametrize("args, says", [
    (["extract", "--bogus", "x"], "No such option"),
    (["extract", "imgs", "--shard-size", "abc"], "--shard-size"),
    (["extract", "imgs", "--pool", "avg"], "--pool"),
    (["extract", "imgs", "--image-size", "0"], "--image-size"),
    (["extract", "imgs", "--features", ","], "names nothing"),
    (["plan"], "give at least one source"),
    (["extract", "--model", "qwen3-vl-tiny"], "give at least one source"),
    (["extract", "nowhere", "--model", "qwen3-vl-tiny"], "does not exist"),
    (["extract", "x", "--model", "no-such-model"], "valid presets"),
    (["frobnicate"], "No such command"),
])
def test_usage_errors_exit_2_with_a_message(tmp_path, args, says):
    result = run_vitok(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert says in result.stderr and "internal error" not in result.stderr


def test_plan_from_a_list_needs_no_positional_source(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=3, with_odd=False)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    (tmp_path / "list.txt").write_text("\n".join(map(str, images)) + "\n")
    result = run_vitok("plan", "--files-from", "list.txt", "-o", "out", "--shard-size", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 shards of 2" in result.stdout


def test_help_is_grouped_in_panels_and_shows_choices():
    result = run_vitok("extract", "--help", env={"COLUMNS": "160"})
    assert result.returncode == 0
    for panel in ("Model", "Inputs", "Outputs", "Preprocessing", "Speed", "Cluster"):
        assert f"─ {panel} " in result.stdout
    assert "none|mean|max|cls" in result.stdout and "float16|float32|bfloat16" in result.stdout
    assert run_vitok("--version").stdout.startswith("vitok ")


def test_bench_help_lists_the_benchmarks_own_options():
    """``vitok bench --help`` reaches the benchmark's parser: its sections and sizes, not an empty option list."""
    result = run_vitok("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "--sections" in result.stdout and "--s3-url" in result.stdout and "--video-clips" in result.stdout


@pytest.mark.parametrize("command, record, only", [
    ("plan", "vitok.run.options:ExtractOptions", "PLAN_OPTIONS"),
    ("export", "vitok.consumers.export:ExportOptions", None),
])
def test_plan_and_export_flags_come_from_the_options_records(command, record, only):
    """One declaration per option: every field of the record (plan: the input fields) is a flag with its choices."""
    import dataclasses
    import importlib

    from vitok.cli import run
    from vitok.run.options import flag_of

    module, name = record.split(":")
    fields = dataclasses.fields(getattr(importlib.import_module(module), name))
    wanted = getattr(run, only) if only else [f.name for f in fields]
    text = run_vitok(command, "--help", env={"COLUMNS": "200"}).stdout
    for field in fields:
        if field.name in wanted:
            assert flag_of(field) in text, (command, field.name)
            for choice in field.metadata["cli"]["choices"] or ():
                assert choice in text, (command, field.name, choice)


# ---- flags that would do nothing are refused, or do what they say -------------------------------------------------


def test_bench_refuses_an_unknown_section_naming_the_sections():
    from vitok import bench

    result = run_vitok("bench", "--sections", "machine,nope")  # refused before anything runs
    assert result.returncode == 2, result.stderr
    assert "'nope'" in result.stderr and all(name in result.stderr for name in bench.SECTIONS)
    assert set(bench.DEFAULT_SECTIONS.split(",")) <= set(bench.SECTIONS)
    assert all(f"\n  {name} " in bench.__doc__ or f"; {name}:" in bench.__doc__ for name in bench.SECTIONS)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    import vitok

    root = tmp_path_factory.mktemp("cli")
    folder = make_folder(root / "imgs", count=2, with_odd=False)
    vitok.extract([str(folder)], root / "out", model="qwen3-vl-tiny", workers=0, features=["merged", "deepstack"])
    return root / "out"


@pytest.mark.parametrize("flags, says", [
    (["--embeds", "--sources"], "--sources"),
    (["--embeds", "--quick"], "--quick"),
    (["--detect-changes", "hash"], "--detect-changes applies with --sources"),
])
def test_verify_refuses_flags_that_would_do_nothing(small_store, flags, says):
    result = run_vitok("verify", str(small_store), *flags)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and result.stderr.startswith("vitok: error:")


def test_verify_embeds_prints_json_when_asked(small_store):
    import json

    result = run_vitok("verify", str(small_store), "--embeds", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checked"] == 2 and report["clean"] and report["layout"] == "store" and report["problems"] == []


def test_extract_of_a_planned_store_takes_the_plans_shard_size_and_reader_options(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import png

    import vitok

    folder = make_folder(tmp_path / "imgs", count=5, with_odd=False)
    assert run_vitok("plan", str(folder), "-o", str(tmp_path / "p"), "--shard-size", "3").returncode == 0
    refused = run_vitok("extract", "-o", str(tmp_path / "p"), "--model", "qwen3-vl-tiny", "--shard-size", "4")
    assert refused.returncode == 2 and "planned in shards of 3" in refused.stderr
    result = run_vitok("extract", "-o", str(tmp_path / "p"), "--model", "qwen3-vl-tiny", "--workers", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(vitok.open(tmp_path / "p")) == 5 and vitok.open(tmp_path / "p").meta["settings"]["shard_size"] == 3
    table = pa.table({"id": ["a", "b"], "key": ["x", "y"], "png": pa.array([png(0), png(1)], pa.binary())})
    pq.write_table(table, tmp_path / "t.parquet")
    assert run_vitok("plan", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "q"), "--key-column",
                     "id").returncode == 0
    result = run_vitok("extract", "-o", str(tmp_path / "q"), "--model", "qwen3-vl-tiny", "--workers", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(vitok.open(tmp_path / "q").keys()) == ["t/a", "t/b"]
