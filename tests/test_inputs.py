"""Inputs that are not what they seem: non-regular files, folders that cannot be listed, archives among loose images,
parquet keys that repeat or are missing, member names of --format wds, and refusals that must come before any
write."""

from __future__ import annotations

import errno
import io
import logging
import os
import signal
import tarfile
from contextlib import contextmanager

import numpy as np
import pytest
from helpers import png, png_folder

import vitok
from vitok.errors import SettingsMismatchError, UsageError
from vitok.storage.plan import load_plan

verify_store = vitok.verify
LIB = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", pool="mean")


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expired(*_):
        raise AssertionError(f"still running after {seconds} s: something blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifos_named_like_images_or_archives_are_skipped_with_a_reason_never_opened(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(0))
    os.mkfifo(folder / "pipe.jpg")
    out = tmp_path / "out"
    with deadline(120):
        summary = vitok.extract([str(folder)], out, **LIB)
    assert summary.ok == 1 and summary.skipped == 1
    assert "FIFO" in vitok.open(out).skipped["pipe.jpg"]
    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("k.png")
        data = png(1)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    os.mkfifo(tars / "00001.tar")
    with deadline(120):
        vitok.extract([str(tars)], tmp_path / "out2", **LIB)
    store = vitok.open(tmp_path / "out2")
    assert store.keys() == ["00000/k"]
    assert "FIFO" in store.shards["00001"].unit.error


def test_a_fifo_named_like_a_parquet_file_is_recorded_not_opened_nor_retried(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["a"], "jpg": [png(0)]}), folder / "a.parquet")
    os.mkfifo(folder / "b.parquet")
    out = tmp_path / "out"
    with deadline(120):
        vitok.extract([str(folder)], out, **LIB)
        with vitok.open(out) as store:
            assert store.keys() == ["a/a"]
            unit = store.shards["b"].unit
            assert "FIFO" in unit.error and not unit.failed
        assert vitok.extract([str(folder)], out, **LIB).shards_written == 0


def test_a_folder_that_cannot_be_listed_is_recorded_and_listed_again_by_the_next_run(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "images"
    (folder / "locked").mkdir(parents=True)
    (folder / "a.png").write_bytes(png(0))
    (folder / "locked" / "b.png").write_bytes(png(1))
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        vitok.extract([str(folder)], out, **LIB)
    assert "could not list" in caplog.text and "locked" in caplog.text
    assert any("locked" in e and "Permission denied" in e for e in verify_store(out).input_errors)
    monkeypatch.setattr(os, "scandir", scandir)
    summary = vitok.extract([str(folder)], out, **LIB)  # no --update needed: a retry of what could not be listed
    assert summary.ok == 1
    assert vitok.open(out).keys() == ["a.png", "locked/b.png"]
    assert not verify_store(out).input_errors


def test_a_path_too_long_to_list_is_recorded_not_lost(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(0))
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(25):  # 25 x 200 characters: past PATH_MAX (4096)
            os.mkdir("d" * 200, dir_fd=fd)
            inner = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    errors = load_plan(out).latest.listing_errors
    assert errors and "too long" in errors[0][1]


def test_archives_beside_loose_images_are_named_with_the_flag_to_use(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(0))
    with tarfile.open(folder / "00000.tar", "w"):
        pass
    with caplog.at_level(logging.WARNING):
        vitok.extract([str(folder)], tmp_path / "out", **LIB)
    assert "00000.tar" in caplog.text and "--input-format wds" in caplog.text


def test_parquet_column_flags_on_inputs_without_columns_are_named_as_ignored(tmp_path, caplog):
    folder = tmp_path / "loose"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(0))
    with caplog.at_level(logging.WARNING):
        vitok.extract([str(folder)], tmp_path / "out", image_column="jpg", key_column="id", **LIB)
    assert "--image-column jpg applies to parquet inputs only" in caplog.text
    assert "--key-column id applies to parquet inputs only" in caplog.text
    assert len(vitok.open(tmp_path / "out")) == 1


def test_parquet_duplicate_and_null_keys_are_recorded_never_written_twice(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    table = pa.table({"key": ["a", "b", "a", None, "3"], "jpg": [png(i) for i in range(5)]})
    pq.write_table(table, folder / "x.parquet", row_group_size=2)  # the duplicate is in another row group (unit)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    store = vitok.open(out)
    assert store.keys() == ["x/3", "x/a", "x/b"]  # the null key is not row 3's "3"
    assert "duplicate key 'a'" in store.skipped["x/a#2"] and "no key" in store.skipped["x/#row3"]
    report = verify_store(out)
    assert report.clean and report.images_ok == 3 and report.images_skipped == 2


def test_wds_member_names_are_one_per_key(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(("x.y.png", "x_y.png", "x%2Ey.png")):
        (folder / name).write_bytes(png(i))
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, format="wds", **LIB)
    with tarfile.open(next((out / "shards").glob("*.tar"))) as tar:
        names = [m.name for m in tar.getmembers()]
    assert len(names) == len(set(names)) == 3 * 2 + 1  # features + json per image, and the index
    with vitok.open(out) as store:
        assert not np.array_equal(store["x.y.png"], store["x_y.png"])
    assert verify_store(out).clean


def test_every_refusal_comes_before_the_first_write(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["a"], "a": [png(0)], "b": [png(1)]}), folder / "x.parquet")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="x.parquet.*--image-column"):
        vitok.extract([str(folder)], out, **LIB)
    with pytest.raises(UsageError, match="--image-column 'nope'"):
        vitok.extract([str(folder)], out, image_column="nope", **LIB)
    with pytest.raises(UsageError, match="--key-column 'nope'"):
        vitok.extract([str(folder)], out, image_column="a", key_column="nope", **LIB)
    assert not out.exists()
    vitok.extract([str(folder)], out, image_column="a", **LIB)  # the corrected command runs
    assert vitok.open(out).keys() == ["x/a"]

    for parent in ("one", "two"):  # two sources whose keys clash: one/imgs/k.png and two/imgs/k.png -> imgs/k.png
        (tmp_path / parent / "imgs").mkdir(parents=True)
        (tmp_path / parent / "imgs" / "k.png").write_bytes(png(len(parent)))
    (tmp_path / "one" / "imgs" / "j.png").write_bytes(png(5))
    clash = tmp_path / "clash"
    with pytest.raises(UsageError, match="same key"):
        vitok.extract([str(tmp_path / "one" / "imgs"), str(tmp_path / "two" / "imgs")], clash, **LIB)
    assert not clash.exists()


def test_a_refused_mixed_settings_run_leaves_vitok_json_as_it_was(tmp_path):
    folder = png_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, shard_size=1, **LIB)
    (out / "vitok.json").unlink()
    os.remove(sorted((out / "shards").glob("*.json"))[-1])
    with pytest.raises(SettingsMismatchError, match="other settings"):
        vitok.extract([str(folder)], out, shard_size=1, **{**LIB, "pool": "max"})
    assert not (out / "vitok.json").exists()


# ---- lists of paths (stdin, --files-from) are literal ---------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 7, 1 << 24])
def test_list_lines_are_split_alike_whatever_the_block_size(block_size):
    from vitok.inputs.sources import read_lines

    text = b"\xef\xbb\xbfa.jpg\r\nb c.jpg\r\n\r\n# note\r\nd\r\r\ncaf\xe9.jpg\ne.jpg\r"
    expected = ["a.jpg", "b c.jpg", "d\r", os.fsdecode(b"caf\xe9.jpg"), "e.jpg"]
    assert read_lines(io.BytesIO(text), block_size=block_size) == expected
    assert read_lines(io.BytesIO(b"a\r\nb\r\nc\r\n"), block_size=block_size) == ["a", "b", "c"]
    assert read_lines(io.BytesIO(b"\xef\xbb"), block_size=block_size) == [os.fsdecode(b"\xef\xbb")]  # not a BOM


def test_list_lines_name_files_literally_crlf_bom_braces_and_non_utf8(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [b"shot{1,2}.jpg", b"plain.png", b"caf\xe9.png", b"{00..01}.png"]
    for i, name in enumerate(names):
        with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
            handle.write(png(i))
    (folder / "shot1.jpg").write_bytes(png(9))  # what the pattern would expand to: must not be read
    listed = b"\xef\xbb\xbf" + b"".join(os.path.join(os.fsencode(folder), n) + b"\r\n" for n in names)
    (tmp_path / "list.txt").write_bytes(listed)
    out = tmp_path / "out"
    summary = vitok.extract([], out, files_from=str(tmp_path / "list.txt"), **LIB)
    assert (summary.ok, summary.skipped, summary.failed) == (4, 0, 0)
    keys = {os.fsencode(k) for k in vitok.open(out).keys()}
    assert keys == {os.path.join(os.fsencode(folder), n) for n in names}
    stdin_out = tmp_path / "stdin_out"
    summary = vitok.extract(["-"], stdin_out, stdin=io.BytesIO(listed), **LIB)
    assert (summary.ok, summary.skipped, summary.failed) == (4, 0, 0)


# ---- a store inside its own input folder ------------------------------------------------------------------------


def test_a_store_inside_its_input_folder_is_never_listed_as_input(tmp_path, caplog):
    images = png_folder(tmp_path / "images", 2)
    out = images / "out"
    first = vitok.extract([str(images)], out, format="wds", **LIB)
    assert first.ok == 2
    with caplog.at_level(logging.INFO, logger="vitok"):
        again = vitok.extract([str(images)], out, format="wds", **LIB)  # no "archives beside the images" warning
    assert again.ok == 0 and vitok.open(out).keys() == ["0.png", "1.png"]
    assert not [r for r in caplog.records if "beside" in r.getMessage()]
    assert [r for r in caplog.records if "left out 1 folder(s) holding a vitok store" in r.getMessage()]

    tars = tmp_path / "tars"  # a folder of tars with the store's own tars inside: no clash of two 00000 archives
    tars.mkdir()
    with tarfile.open(tars / "00000.tar", "w") as tar:
        for i in range(2):
            info = tarfile.TarInfo(f"k{i}.png")
            data = png(i)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    vitok.extract([str(tars)], tars / "out", format="wds", **LIB)
    assert vitok.extract([str(tars)], tars / "out", format="wds", **LIB).ok == 0
    other = vitok.extract([str(tars)], tmp_path / "elsewhere", format="wds", **LIB)  # another store: left out too
    assert other.ok == 2 and vitok.open(tmp_path / "elsewhere").keys() == ["00000/k0", "00000/k1"]


def test_a_vitok_json_of_the_users_own_is_not_a_store(tmp_path):
    from vitok.inputs.sources import list_inputs

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(0))
    (tmp_path / "imgs" / "vitok.json").write_text("{}")  # a config file, no shards/ nor plan/
    assert [k for k, _ in list_inputs([str(tmp_path / "imgs")]).items()] == ["a.png"]
