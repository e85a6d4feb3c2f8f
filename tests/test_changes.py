"""The store's view of its sources stays current: inputs changed in place are found (loose files, tars, parquet),
refused by a plain rerun, re-extracted by --update, reported by verify --sources; after an update the key set is
exactly what the sources hold through every reader; unit names cannot collide with any input's name."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from helpers import photo, png, png_folder
from typer.testing import CliRunner

import vitok
from vitok.cli.app import app
from vitok.errors import InputsChangedError
from vitok.storage.plan import load_plan, unit_name

verify_store = vitok.verify
LIB = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", pool="mean")


def write_tar(path, samples: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data in samples.items():
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def bump_mtime(path) -> None:
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def every_view(out) -> dict[str, object]:
    """The key set as each reader sees it: keys(), iter_shards, array(), verify's counts, export rows."""
    store = vitok.open(out)
    try:
        shards = sorted(k for keys, _, _ in store.iter_shards() for k in keys)
        array_keys, array = store.array()
        report = verify_store(out)
        return {"keys": store.keys(), "iter_shards": shards, "array": sorted(array_keys), "rows": len(array),
                "verify_ok": report.images_ok, "clean": report.clean}
    finally:
        store.close()


def assert_views(out, expected: list[str]) -> None:
    views = every_view(out)
    assert views == {"keys": expected, "iter_shards": expected, "array": expected, "rows": len(expected),
                     "verify_ok": len(expected), "clean": True}


def three_pngs(folder):
    return png_folder(folder, 3)


@pytest.mark.slow
def test_a_loose_file_replaced_in_place_is_refused_then_updated_and_reported_stale(tmp_path):
    folder = three_pngs(tmp_path / "images")
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    old = vitok.open(out)["1.png"]
    (folder / "1.png").write_bytes(png(7, size=(64, 64)))  # same name, other bytes
    result = CliRunner().invoke(app, ["verify", str(out), "--sources"])
    assert result.exit_code == 1 and "stale: 1.png" in result.output
    with pytest.raises(InputsChangedError, match="1 changed.*1.png"):
        vitok.extract([str(folder)], out, **LIB)
    summary = vitok.extract([str(folder)], out, update=True, **LIB)
    assert summary.ok == 1
    store = vitok.open(out)
    assert not np.array_equal(store["1.png"], old)
    np.testing.assert_array_equal(store["1.png"], store.get("1.png"))
    assert_views(out, ["0.png", "1.png", "2.png"])
    assert verify_store(out, sources="mtime").clean
    again = vitok.extract([str(folder)], out, update=True, **LIB)  # changed once: extracted once
    assert again.ok == 0 and len(load_plan(out).generations) == 2


def test_a_content_hash_sees_a_rewrite_that_keeps_size_and_mtime_and_ignores_a_touch(tmp_path):
    folder = png_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, detect_changes="hash", **LIB)
    bump_mtime(folder / "0.png")  # touched, same bytes: not a change for the hash
    vitok.extract([str(folder)], out, detect_changes="hash", **LIB)
    with pytest.raises(InputsChangedError):
        vitok.extract([str(folder)], out, **LIB)  # ...but it is for size + mtime
    stat = os.stat(folder / "1.png")
    data = bytearray((folder / "1.png").read_bytes())
    data[-20] ^= 0xFF  # same size
    (folder / "1.png").write_bytes(bytes(data))
    os.utime(folder / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    with pytest.raises(InputsChangedError, match="1.png"):
        vitok.extract([str(folder)], out, detect_changes="hash", **LIB)


def test_a_rewritten_tar_alone_is_found_and_its_dropped_samples_disappear_everywhere(tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    write_tar(folder / "00000.tar", {"a": png(0), "b": png(1)})
    write_tar(folder / "00001.tar", {"c": png(2), "d": png(3), "e": png(4)})
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    write_tar(folder / "00001.tar", {"c": png(5)})  # rewritten with fewer samples; no other archive changed
    bump_mtime(folder / "00001.tar")
    with pytest.raises(InputsChangedError, match="00001.tar"):
        vitok.extract([str(folder)], out, **LIB)
    summary = vitok.extract([str(folder)], out, update=True, **LIB)
    assert summary.ok == 1 and summary.shards_written == 1
    assert_views(out, ["00000/a", "00000/b", "00001/c"])
    again = vitok.extract([str(folder)], out, update=True, **LIB)  # changed once: never re-extracted again
    assert again.shards_written == 0 and len(load_plan(out).generations) == 2
    os.remove(folder / "00001.tar")  # a removed archive: its keys go, not only its path
    vitok.extract([str(folder)], out, update=True, **LIB)
    store = vitok.open(out)
    assert store.removed == {"00001/c", "00001/d", "00001/e"}
    assert_views(out, ["00000/a", "00000/b"])


@pytest.mark.slow
def test_a_parquet_file_rewritten_in_place_is_found(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": [png(0), png(1)]}), folder / "x.parquet")
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    pq.write_table(pa.table({"key": ["a"], "jpg": [png(2)]}), folder / "x.parquet")
    bump_mtime(folder / "x.parquet")
    with pytest.raises(InputsChangedError, match="x.parquet"):
        vitok.extract([str(folder)], out, **LIB)
    vitok.extract([str(folder)], out, update=True, **LIB)
    assert_views(out, ["x/a"])


def test_a_loose_file_removed_and_added_again_comes_back(tmp_path):
    folder = three_pngs(tmp_path / "images")
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    data = (folder / "2.png").read_bytes()
    os.remove(folder / "2.png")
    vitok.extract([str(folder)], out, update=True, **LIB)
    assert_views(out, ["0.png", "1.png"])
    (folder / "2.png").write_bytes(data)
    summary = vitok.extract([str(folder)], out, update=True, **LIB)
    assert summary.ok == 1
    assert_views(out, ["0.png", "1.png", "2.png"])
    assert not vitok.open(out).removed
    vitok.extract([str(folder)], out, **LIB)  # and the plain rerun agrees that nothing changed


def test_unit_names_escape_what_vitok_appends():
    names = {unit_name(s) for s in ("x", "x~g1", "x%7Eg1", ".x", "%2Ex", "x~r1", "a.retry1")}
    assert len(names) == 7 and not any("~" in n or n.startswith(".") for n in names)


@pytest.mark.slow
def test_archives_named_like_generations_and_retries_keep_their_own_shards(tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    for stem, seed in (("x", 0), ("x.g1", 1), ("x~g1", 2), ("a", 3), ("a.retry1", 4), ("a~r1", 5)):
        write_tar(folder / f"{stem}.tar", {"k": png(seed)})
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    assert vitok.extract([str(folder)], out, **LIB).shards_written == 0  # every one counts as done
    write_tar(folder / "x.tar", {"k": png(9), "k2": png(10)})
    bump_mtime(folder / "x.tar")
    summary = vitok.extract([str(folder)], out, update=True, **LIB)
    assert summary.ok == 2  # re-planned under a name no stem can take: not mistaken for x.g1's shard
    store = vitok.open(out)
    assert store.keys() == sorted([*(f"{s}/k" for s in ("x", "x.g1", "x~g1", "a", "a.retry1", "a~r1")), "x/k2"])
    tokens = {key: store[key] for key in store.keys()}
    assert not any(np.array_equal(tokens["x/k"], tokens[f"{s}/k"]) for s in ("x.g1", "x~g1"))
    assert verify_store(out).clean


def test_an_archive_changed_or_removed_before_it_was_read_is_never_read(tmp_path):
    from vitok.inputs.sources import list_inputs
    from vitok.storage.plan import write_generation

    folder = tmp_path / "tars"
    folder.mkdir()
    for shard in range(3):
        write_tar(folder / f"{shard:05d}.tar", {"k": png(shard)})
    out = tmp_path / "out"
    write_generation(out, list_inputs([str(folder)]), 1000, 0, 0, [str(folder)], "initial")  # planned, not run
    write_tar(folder / "00001.tar", {"k": png(7), "k2": png(8)})
    bump_mtime(folder / "00001.tar")
    os.remove(folder / "00002.tar")
    with pytest.raises(InputsChangedError, match="1 removed"):
        vitok.extract([str(folder)], out, **LIB)
    summary = vitok.extract([str(folder)], out, update=True, **LIB)
    assert summary.shards_written == 2 and summary.ok == 3  # 00000 and 00001 as it is now; not 00002, not old 00001
    report = verify_store(out)
    assert report.clean and not report.incomplete
    assert_views(out, ["00000/k", "00001/k", "00001/k2"])


def test_retry_names_of_new_and_old_plans():
    from vitok.storage.plan.retries import base_and_attempt

    assert base_and_attempt("x~r2") == ("x", 2)
    assert base_and_attempt("a.retry1") == ("a.retry1", 0)  # an archive named a.retry1.tar
    assert base_and_attempt("a.retry1", legacy=True) == ("a", 1)  # a plan written before the escaping


def test_a_store_written_with_the_old_names_keeps_reading_and_resuming(tmp_path):
    import json
    import shutil

    folder = tmp_path / "tars"
    folder.mkdir()
    write_tar(folder / "00000.tar", {"k": png(0)})
    source = str(folder / "{00000..00001}.tar")
    out = tmp_path / "out"
    vitok.extract([source], out, **LIB)  # 00001.tar is missing: a failed unit
    write_tar(folder / "00001.tar", {"k": png(1), "j": png(2)})
    vitok.extract([source], out, **LIB)  # retried into 00001~r1
    shards = out / "shards"  # make it a store of the first naming: 00001.retry1, no "names", no attempt in sidecars
    sidecar = json.loads((shards / "00001~r1.json").read_text())
    shutil.move(shards / sidecar["data"], shards / "00001.retry1.h5")
    sidecar["files"] = {"00001.retry1.h5": sidecar["files"][sidecar["data"]]}
    sidecar |= {"shard": "00001.retry1", "data": "00001.retry1.h5"}
    for name in ("unit", "attempt"):
        sidecar["unit"].pop(name)
    (shards / "00001.retry1.json").write_text(json.dumps(sidecar))
    (shards / "00001~r1.json").unlink()
    header = json.loads((out / "plan" / "0000.json").read_text())
    header.pop("names")
    (out / "plan" / "0000.json").write_text(json.dumps(header))
    assert load_plan(out).legacy_names
    with vitok.open(out) as store:
        assert store.keys() == ["00000/k", "00001/j", "00001/k"]
    assert verify_store(out).clean
    assert vitok.extract([source], out, **LIB).shards_written == 0  # the old retry counts as done


def test_archives_planned_with_a_content_hash_are_compared_by_content(tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    write_tar(folder / "00000.tar", {"k": png(0)})
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, detect_changes="hash", **LIB)
    assert "sha256" in load_plan(out).units[0].archive().data
    tar = folder / "00000.tar"
    bump_mtime(tar)
    vitok.extract([str(folder)], out, detect_changes="hash", **LIB)  # touched only: the same content
    stat = os.stat(tar)
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # inside the member's bytes: same size
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(InputsChangedError, match="sha256"):
        vitok.extract([str(folder)], out, detect_changes="hash", **LIB)


def test_verify_sources_reports_an_input_deleted_since_it_was_extracted(tmp_path):
    """Regression: a loose file deleted after extraction left verify --sources clean, its tokens reported current."""
    folder = tmp_path / "imgs"
    for i in range(2):
        photo(folder / f"{i}.png", seed=i)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    (folder / "1.png").unlink()
    report = verify_store(out, sources="mtime")
    assert not report.clean and any("1.png" in line and "no longer exists" in line for line in report.stale)


def test_a_bare_update_lists_the_plans_recorded_sources_again(tmp_path, monkeypatch):
    folder = three_pngs(tmp_path / "images")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    vitok.extract(["images"], out, **LIB)  # a relative source: the plan holds it absolute
    (folder / "3.png").write_bytes(png(3))
    (folder / "0.png").unlink()
    monkeypatch.chdir(folder)  # another working directory
    summary = vitok.extract([], out, update=True, **LIB)
    assert summary.ok == 1
    assert_views(out, ["1.png", "2.png", "3.png"])

    listed = tmp_path / "list.txt"  # a store planned from a --files-from list: the list is read again
    listed.write_text(f"{folder / '1.png'}\n")
    from_list = tmp_path / "from_list"
    vitok.extract([], from_list, files_from=str(listed), **LIB)
    listed.write_text(f"{folder / '1.png'}\n{folder / '2.png'}\n")
    assert vitok.extract([], from_list, update=True, **LIB).ok == 1
    assert vitok.open(from_list).keys() == sorted([str(folder / "1.png"), str(folder / "2.png")])

    piped = tmp_path / "piped"  # a list read on stdin cannot be read again: said, not a silent "nothing to do"
    vitok.extract(["-"], piped, stdin=io.BytesIO(f"{folder / '1.png'}\n".encode()), **LIB)
    with pytest.raises(vitok.errors.UsageError, match="stdin"):
        vitok.extract([], piped, update=True, **LIB)


def test_a_bare_update_reads_relative_list_lines_against_the_directory_they_were_planned_in(tmp_path, monkeypatch):
    three_pngs(tmp_path / "images")
    listed = tmp_path / "list.txt"
    listed.write_text("images/0.png\nimages/1.png\n")
    monkeypatch.chdir(tmp_path)
    vitok.extract([], "out", files_from="list.txt", **LIB)
    listed.write_text("images/0.png\nimages/1.png\nimages/2.png\n")
    elsewhere = tmp_path / "elsewhere" / "images"  # a same-named file under the new directory must not be read
    elsewhere.mkdir(parents=True)
    (elsewhere / "2.png").write_bytes(png(9))
    monkeypatch.chdir(tmp_path / "elsewhere")
    summary = vitok.extract([], tmp_path / "out", update=True, **LIB)
    assert summary.ok == 1 and summary.failed == 0
    store = vitok.open(tmp_path / "out")
    assert store.keys() == ["images/0.png", "images/1.png", "images/2.png"]
    assert store.info("images/2.png")["source"] == str(tmp_path / "images" / "2.png")
