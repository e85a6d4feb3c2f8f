"""The store's view of its sources stays current: inputs changed in place are found (loose files, tars, parquet),
refused by a plain rerun, re-extracted by --update, reported by verify --sources; after an update the key set is
exactly what the sources hold through every reader; unit names cannot collide with any input's name."""

from __future__ import annotations

import io
import json
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
from vitok.storage.shards import iter_retired

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
    assert (summary.ok, summary.images_encoded, summary.carried) == (3, 1, 2)  # its shard replaced whole; the
    # unchanged two carried into the new one
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
    assert (summary.images_encoded, summary.carried) == (1, 2)  # 3.png; 1.png and 2.png, whose shard held the
    # removed 0.png, are carried
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


# ---- plain readers (h5py, numpy, webdataset: no vitok) see exactly the store after any --update --------------------


def plain_rows(out, fmt: str) -> list[tuple[str, np.ndarray]]:
    """(key, merged tokens) of every row a reader without vitok finds where OUT/README.txt says to look: h5py over
    shards/*.h5, numpy over shards/*/, webdataset over shards/*.tar."""
    import glob

    shards = os.path.join(out, "shards")
    rows: list[tuple[str, np.ndarray]] = []
    if fmt == "hdf5":
        import h5py

        for path in sorted(glob.glob(os.path.join(shards, "*.h5"))):
            with h5py.File(path) as f:
                keys = [k.decode("utf-8", "surrogateescape") for k in f["keys"][()]]
                offsets = f["merged_offsets"][()]
                rows += [(key, f["merged"][offsets[i]:offsets[i + 1]]) for i, key in enumerate(keys)]
    elif fmt == "npy":
        for folder in sorted(glob.glob(os.path.join(shards, "*", ""))):
            keys = np.load(os.path.join(folder, "keys.npy"))
            offsets = np.load(os.path.join(folder, "merged_offsets.npy"))
            data = np.load(os.path.join(folder, "merged.npy"))
            rows += [(str(key), data[offsets[i]:offsets[i + 1]]) for i, key in enumerate(keys)]
    else:
        import webdataset as wds

        for sample in wds.WebDataset(sorted(glob.glob(os.path.join(shards, "*.tar"))), shardshuffle=False):
            rows.append((json.loads(sample["json"])["key"], np.load(io.BytesIO(sample["merged.npy"]))))
    return rows


def assert_plain_readers_see_the_store(out, fmt: str) -> None:
    """Every current key once, with the store's tokens; nothing superseded, nothing removed."""
    rows = plain_rows(out, fmt)
    with vitok.open(out) as store:
        assert sorted(key for key, _ in rows) == store.keys()
        for key, tokens in rows:
            np.testing.assert_array_equal(np.asarray(tokens, np.float32), store[key])


WDS_OPEN = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # webdataset leaves tars open


@pytest.mark.parametrize("fmt", ["hdf5", pytest.param("npy", marks=pytest.mark.slow),
                                 pytest.param("wds", marks=[pytest.mark.slow, WDS_OPEN])])
def test_plain_readers_see_exactly_the_stores_keys_after_files_change_move_and_go(tmp_path, fmt):
    """Regression: the README's h5py recipe over every shard found 15 rows and 11 keys in a 10-key store (old rows
    of a changed file, a renamed file under its old name) after two updates."""
    folder = png_folder(tmp_path / "images", 10)
    out = tmp_path / "out"
    options = {**LIB, "shard_size": 4, "format": fmt}
    vitok.extract([str(folder)], out, **options)
    (folder / "1.png").write_bytes(png(20))  # changed in place
    bump_mtime(folder / "1.png")
    vitok.extract([str(folder)], out, update=True, **options)
    assert_plain_readers_see_the_store(out, fmt)
    os.rename(folder / "2.png", folder / "12.png")
    os.remove(folder / "5.png")
    vitok.extract([str(folder)], out, update=True, **options)
    assert_plain_readers_see_the_store(out, fmt)
    assert_views(out, sorted(f"{i}.png" for i in (0, 1, 3, 4, 6, 7, 8, 9, 12)))


def joined_shard(out, tar) -> list:
    """The store shards that join with input ``tar`` by name, as OUT/README.txt says: ``shards/<stem>.tar``, or
    ``shards/<stem>~<suffix>.tar`` once vitok extracted the tar again (one of them, never both)."""
    stem = os.path.basename(tar)[: -len(".tar")]
    return [p for p in sorted((out / "shards").glob("*.tar")) if p.stem == stem or p.stem.startswith(stem + "~")]


@WDS_OPEN
def test_a_rewritten_tar_joins_by_name_with_its_new_tokens_and_a_removed_one_with_nothing(tmp_path):
    """Regression: after --update of a tar rewritten with other pictures, the README's join by shard name paired
    the new images with the old tokens (the old shards/00001.tar stayed beside 00001~g1.tar)."""
    import webdataset as wds

    folder = tmp_path / "tars"
    folder.mkdir()
    write_tar(folder / "00000.tar", {"a": png(0), "b": png(1)})
    write_tar(folder / "00001.tar", {"c": png(2), "d": png(3), "e": png(4)})
    write_tar(folder / "00002.tar", {"f": png(5)})
    out = tmp_path / "out"
    options = {**LIB, "pool": "none", "format": "wds"}
    vitok.extract([str(folder)], out, **options)
    write_tar(folder / "00001.tar", {"c": png(12), "d": png(13), "e": png(14)})  # same keys, other pictures
    bump_mtime(folder / "00001.tar")
    os.remove(folder / "00002.tar")
    vitok.extract([str(folder)], out, update=True, **options)
    assert_plain_readers_see_the_store(out, "wds")
    assert joined_shard(out, "00002.tar") == []
    with vitok.open(out) as store:
        for tar in sorted(folder.glob("*.tar")):
            [shard] = joined_shard(out, tar)
            sources = list(wds.WebDataset(str(tar), shardshuffle=False))
            joined = list(wds.WebDataset(str(shard), shardshuffle=False))
            assert len(sources) == len(joined)
            for source, tokens in zip(sources, joined):
                assert source["__key__"] == tokens["__key__"]
                np.testing.assert_array_equal(np.load(io.BytesIO(tokens["merged.npy"])).astype(np.float32),
                                              store[f"{tar.stem}/{source['__key__']}"])
    assert verify_store(out).clean


# ---- counts and provenance after an update -------------------------------------------------------------------------


def test_info_after_updates_counts_only_the_shards_the_plan_holds_now(tmp_path):
    """Regression: info said "2 done of 3 planned" on a finished store after a tar was rewritten (the superseded
    unit counted as planned), and loose-file stores counted a superseded shard as done."""
    from helpers import vitok as run_vitok

    folder = tmp_path / "tars"
    folder.mkdir()
    write_tar(folder / "00000.tar", {"a": png(0), "b": png(1)})
    write_tar(folder / "00001.tar", {"c": png(2)})
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    write_tar(folder / "00001.tar", {"c": png(3), "d": png(4)})
    bump_mtime(folder / "00001.tar")
    vitok.extract([str(folder)], out, update=True, **LIB)
    info = json.loads(run_vitok("info", str(out), "--json").stdout)
    assert (info["shards_done"], info["planned_shards"], info["planned_images"]) == (2, 2, 4) and info["finished"]
    assert "2 done of 2 planned; 0 not done" in run_vitok("info", str(out)).stdout


def test_info_after_a_loose_file_update_counts_the_replacing_shards_not_the_replaced(tmp_path):
    from helpers import vitok as run_vitok

    images = png_folder(tmp_path / "images", 6)
    loose = tmp_path / "loose"
    vitok.extract([str(images)], loose, shard_size=2, **LIB)
    (images / "3.png").write_bytes(png(9))
    bump_mtime(images / "3.png")
    os.remove(images / "4.png")
    vitok.extract([str(images)], loose, shard_size=2, update=True, **LIB)
    info = json.loads(run_vitok("info", str(loose), "--json").stdout)
    assert info["shards_done"] == info["planned_shards"] and info["finished"] and info["clean"]
    assert info["images_ok"] == 5 and info["planned_images"] == 5 and info["images_removed"] == 1


def copied_record(out, copied_from: str) -> dict:
    """The record ``copied_from`` names (``<shard>/<key>``), read from that shard's sidecar as OUT/README.txt says:
    ``shards/<shard>.json``, or ``shards/.superseded/<shard>.json`` once --update superseded the shard."""
    shard, _, key = copied_from.partition("/")
    for folder in (out / "shards", out / "shards" / ".superseded"):
        if (folder / f"{shard}.json").exists():
            records = json.loads((folder / f"{shard}.json").read_text())["records"]
            return next(r for r in records if r["key"] == key)
    raise AssertionError(f"no shard {shard!r} holds the record {copied_from!r}")


def test_copied_from_names_a_record_of_those_pixels_after_the_donors_key_changes(tmp_path):
    """Regression: copied_from named the key A.png, which an update then filled with other pixels: following it
    read other tokens."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "A.png").write_bytes(png(0))
    (folder / "B.png").write_bytes(png(1))
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, shard_size=2, **LIB)
    (folder / "C.png").write_bytes(png(0))  # A's pixels: copied, not encoded
    assert vitok.extract([str(folder)], out, shard_size=2, update=True, **LIB).duplicates == 1
    (folder / "A.png").write_bytes(png(2))
    bump_mtime(folder / "A.png")
    vitok.extract([str(folder)], out, shard_size=2, update=True, **LIB)
    with vitok.open(out) as store:
        copy = store.info("C.png")
        assert copy["copied_from"] is not None
        assert copied_record(out, copy["copied_from"])["content_id"] == copy["content_id"]
        assert store.info("A.png")["content_id"] != copy["content_id"]


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["_move:1", "_move:2", "_move:4", "commit:1"])
def test_an_update_killed_while_it_moves_superseded_shards_resumes_and_plain_readers_never_see_a_key_twice(
        tmp_path, kill):
    """kill -9 at each move of the superseded-shard step (data, then sidecar, of two shards) and right after it,
    before the first replacing shard is published: no key is ever twice where plain readers look, and a plain
    resume gives the store a fresh extract gives, plain readers included."""
    from helpers import TINY, vitok_killed_at

    folder = png_folder(tmp_path / "images", 10)
    out = tmp_path / "out"
    args = ["--shard-size", "4", "--pool", "mean", "--store-dtype", "float32", *TINY]
    vitok.extract([str(folder)], out, **LIB, shard_size=4)
    (folder / "1.png").write_bytes(png(20))
    bump_mtime(folder / "1.png")
    os.remove(folder / "5.png")  # two shards superseded: shard-000000 and shard-000001
    target, at = kill.split(":")
    killed = vitok_killed_at(f"vitok.storage.shards:{target}", int(at), "extract", str(folder), "-o", str(out),
                             "--update", *args)
    assert killed.returncode == -9
    keys = [key for key, _ in plain_rows(out, "hdf5")]
    assert len(keys) == len(set(keys))
    assert not verify_store(out).clean  # unfinished (and, before the step is done, shards left in view)
    vitok.extract([], out, **LIB, shard_size=4)  # a plain resume
    assert_plain_readers_see_the_store(out, "hdf5")
    expected = sorted(f"{i}.png" for i in (0, 1, 2, 3, 4, 6, 7, 8, 9))
    assert_views(out, expected)
    fresh = tmp_path / "fresh"
    vitok.extract([str(folder)], fresh, **LIB, shard_size=4)
    with vitok.open(out) as store, vitok.open(fresh) as other:
        for key in expected:
            np.testing.assert_array_equal(store[key], other[key])
    assert not any(kept for _, kept in iter_retired(out))  # the plan is done: superseded data dropped


def test_a_superseded_shard_moved_halfway_is_finished_by_the_next_run(tmp_path, monkeypatch):
    """The step stopped between a shard's data and its sidecar (what kill -9 leaves, in process): plain readers see
    neither its rows nor a duplicate; vitok's readers and verify do not count its records; a plain resume moves the
    sidecar and ends where a fresh extract does."""
    from vitok.storage import shards

    class Stop(BaseException):
        pass

    folder = png_folder(tmp_path / "images", 6)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB, shard_size=3)
    (folder / "4.png").write_bytes(png(20))
    bump_mtime(folder / "4.png")
    real = shards._move
    calls = []

    def stop_at_the_sidecar(root, source, target):
        calls.append(source.rsplit("/", 1)[-1])
        if len(calls) == 2:
            raise Stop
        real(root, source, target)

    monkeypatch.setattr(shards, "_move", stop_at_the_sidecar)
    with pytest.raises(Stop):
        vitok.extract([str(folder)], out, **LIB, shard_size=3, update=True)
    monkeypatch.setattr(shards, "_move", real)
    assert calls == ["shard-000001.h5", "shard-000001.json"]
    assert sorted(key for key, _ in plain_rows(out, "hdf5")) == ["0.png", "1.png", "2.png"]
    with vitok.open(out) as store:
        assert store.keys() == ["0.png", "1.png", "2.png"]
    report = verify_store(out)
    assert report.incomplete and not report.problems
    vitok.extract([], out, **LIB, shard_size=3)
    assert_plain_readers_see_the_store(out, "hdf5")
    assert_views(out, [f"{i}.png" for i in range(6)])
    assert not (out / "shards" / "shard-000001.json").exists()


def test_unchanged_files_of_a_replaced_shard_are_carried_not_read_again(tmp_path, monkeypatch):
    from vitok.inputs.readers.files import FilesReader

    folder = png_folder(tmp_path / "images", 6)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB, shard_size=3)
    with vitok.open(out) as store:
        before = {key: store[key] for key in store.keys()}
    (folder / "4.png").write_bytes(png(20))
    bump_mtime(folder / "4.png")
    read = []
    samples = FilesReader.samples

    def reading(self, unit, start=0, stop=None):
        read.extend(key for key, _ in unit.files()[start:stop])
        return samples(self, unit, start, stop)

    monkeypatch.setattr(FilesReader, "samples", reading)
    summary = vitok.extract([str(folder)], out, **LIB, shard_size=3, update=True)
    assert read == ["4.png"] and (summary.carried, summary.images_encoded, summary.duplicates) == (2, 1, 0)
    with vitok.open(out) as store:
        assert store.info("3.png")["shard"] == store.info("4.png")["shard"] != "shard-000001"
        for key in ("0.png", "1.png", "2.png", "3.png", "5.png"):  # bit for bit
            np.testing.assert_array_equal(store[key], before[key])
        assert not np.array_equal(store["4.png"], before["4.png"])
    assert_plain_readers_see_the_store(out, "hdf5")
    assert verify_store(out).clean


def test_a_shard_an_older_vitok_updated_in_part_is_flagged_then_replaced_whole_by_the_next_update(tmp_path):
    """A store updated before shards were replaced whole: its first shard still holds the old rows of a changed
    file beside current ones. verify says so (plain readers see that key twice), and the next update replaces the
    shard whole."""
    from vitok.inputs.sources import list_inputs
    from vitok.storage.plan import write_generation

    folder = png_folder(tmp_path / "images", 6)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB, shard_size=3)
    (folder / "1.png").write_bytes(png(20))
    bump_mtime(folder / "1.png")
    plan = load_plan(out)  # the update as it was planned before: the changed file alone, nothing superseded
    write_generation(out, list_inputs([str(folder)]), 3, 1, len(plan.units), [str(folder)], "update",
                     items=[("1.png", 0)], removed=[])
    vitok.extract([], out, **LIB, shard_size=3)
    keys = [key for key, _ in plain_rows(out, "hdf5")]
    assert keys.count("1.png") == 2
    report = verify_store(out)
    assert not report.clean and any("shard-000000" in line for line in report.in_view)
    (folder / "4.png").write_bytes(png(21))
    bump_mtime(folder / "4.png")
    summary = vitok.extract([str(folder)], out, **LIB, shard_size=3, update=True)
    assert (summary.images_encoded, summary.carried) == (1, 4)  # 4.png; 0, 2 (of the half-current shard), 3, 5
    assert_plain_readers_see_the_store(out, "hdf5")
    assert_views(out, [f"{i}.png" for i in range(6)])
