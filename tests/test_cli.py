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
