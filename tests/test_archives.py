"""Webdataset tars and parquet files in img2dataset's layouts: keys, records, damage, resume, parts, remote files,
and the same tokens as the same images read as loose files."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import vitok as run_vitok
from helpers import vitok_killed_at
from PIL import Image

import vitok
from vitok.storage.keys import key_text

IMG2DATASET = Path(__file__).parent / "data" / "img2dataset"  # real img2dataset output, see its README.md
LIB = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", features=["merged", "deepstack"])


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (96, 64), (64, 80)]
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 3][1], sizes[i % 3][0], 3), dtype=np.uint8))
            for i in range(count)]


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]], shuffle_members: bool = False) -> None:
    """A tar as img2dataset writes it: per sample KEY.jpg (or png), KEY.txt, KEY.json, in sample order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Three tars (JPEG and PNG members, captions, json, a sample without image, a duplicate key), a gap in the
    numbering (00002 missing), a truncated tar, and the same images as loose files."""
    root = tmp_path_factory.mktemp("wds")
    (root / "tars").mkdir()
    (root / "loose").mkdir()
    images = sample_images(12)
    index = 0
    for shard in (0, 1, 3):
        samples = []
        for i in range(4):
            key = f"{shard:05d}{i:04d}"
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            data = encode(images[index], fmt)
            (root / "loose" / f"{shard:05d}").mkdir(exist_ok=True)
            (root / "loose" / f"{shard:05d}" / f"{key}.{ext}").write_bytes(data)
            meta = {"key": key, "status": "success", "url": f"http://x/{key}"}
            samples.append((key, {ext: data, "txt": f"caption {key}".encode(), "json": json.dumps(meta).encode()}))
            index += 1
        if shard == 1:
            samples.append(("000010099", {"json": b'{"status": "failed_to_download"}'}))  # no image member
            samples.append(("000010001", {"txt": b"again"}))  # a key seen before in this tar
        write_tar(root / "tars" / f"{shard:05d}.tar", samples)
    full = (root / "tars" / "00003.tar").read_bytes()
    (root / "tars" / "00004.tar").write_bytes(full[: int(len(full) * 0.6)])  # a killed img2dataset run
    return root


@pytest.mark.slow
def test_tars_give_keys_records_and_the_tokens_of_the_loose_files(collection, tmp_path):
    """Same images, same tokens bit for bit; one image per batch, so that a GEMM whose results depend on the batch's
    row count (cuBLAS, some CPU kernels) cannot make the comparison depend on how the inputs were grouped."""
    out = tmp_path / "out"
    summary = vitok.extract([str(collection / "tars" / "{00000..00004}.tar")], out, token_budget=1, **LIB)
    assert summary.shards_written == 5 and summary.failed == 0  # the missing 00002 is a failed unit, not a record
    store = vitok.open(out)
    assert "00000/000000000" in store and "00003/000030003" in store
    info = store.info("00001/000010001")
    assert info["source"].endswith("00001.tar") and info["member"] == "000010001.png"
    assert info["meta"]["caption"] == "caption 000010001" and info["meta"]["json"]["status"] == "success"
    assert "no image in this sample" in store.skipped["00001/000010099"]
    assert "duplicate key" in store.skipped["00001/000010001#2"]
    units = {s.shard: s.unit for s in store.shards.values()}
    assert "cannot open" in units["00002"].error and units["00002"].failed
    assert "truncated" in units["00004"].error
    truncated = [k for k in store.keys() if k.startswith("00004/")]
    assert 1 <= len(truncated) < 4  # every sample before the cut, none after
    loose = tmp_path / "loose"
    vitok.extract([str(collection / "loose")], loose, token_budget=1, **LIB)
    reference = vitok.open(loose)
    for key in reference.keys():
        stem, name = key.split("/")
        for feature in ("merged", "deepstack"):
            np.testing.assert_array_equal(store.get(f"{stem}/{name.split('.')[0]}", feature),
                                          reference.get(key, feature))
    report = vitok.verify(out)  # intact, but unfinished while 00002 cannot be opened (retried by the next run)
    assert not report.problems and [u for u in report.unfinished if "00002" in u] and not report.clean
    info_text = run_vitok("info", str(out)).stdout
    assert "00002: cannot open" in info_text and "00004:" in info_text


@pytest.mark.slow
def test_the_real_img2dataset_output_reads_in_both_layouts(tmp_path):
    tars = vitok.extract([str(IMG2DATASET / "webdataset")], tmp_path / "wds", token_budget=1, **LIB)
    parquet = vitok.extract([str(IMG2DATASET / "parquet")], tmp_path / "pq", token_budget=1, **LIB)
    assert tars.ok == parquet.ok == 14 and parquet.skipped == 1
    wds, pq = vitok.open(tmp_path / "wds"), vitok.open(tmp_path / "pq")
    assert wds.keys() == pq.keys()
    assert "failed_to_download" in pq.skipped["00000/000005"]
    for key in wds.keys():
        np.testing.assert_array_equal(wds[key], pq[key])


def _parquet(path, images, struct: bool, keys=None, row_group_size=3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [encode(image, "PNG") if image is not None else None for image in images]
    column = ([{"bytes": d, "path": None} if d is not None else None for d in data] if struct else data)
    table = {"image" if struct else "jpg": column, "caption": [f"c{i}" for i in range(len(images))]}
    if keys is not None:
        table["key"] = keys
    pq.write_table(pa.table(table), path, row_group_size=row_group_size)
    return data


@pytest.mark.slow
@pytest.mark.parametrize("struct", [True, False], ids=["hf-image-struct", "img2dataset-binary"])
def test_parquet_row_groups_are_units_and_keys_follow_the_key_column(tmp_path, struct):
    images = sample_images(7)
    images[4] = None
    keys = None if struct else [f"k{i}" for i in range(7)]
    _parquet(tmp_path / "data.parquet", images, struct, keys)
    summary = vitok.extract([str(tmp_path / "data.parquet")], tmp_path / "out", **LIB)
    assert summary.shards_written == 3 and summary.ok == 6 and summary.skipped == 1
    store = vitok.open(tmp_path / "out")
    names = ["0", "1", "2", "3", "5", "6"] if struct else ["k0", "k1", "k2", "k3", "k5", "k6"]
    assert store.keys() == [f"data/{n}" for n in names]
    assert sorted(store.shards) == ["data~rg00000", "data~rg00001", "data~rg00002"]
    assert store.info(f"data/{names[1]}")["meta"]["caption"] == "c1"


@pytest.mark.slow
def test_kill_in_the_middle_of_a_tar_then_rerun_gives_every_sample_once(tmp_path):
    images = sample_images(24, seed=3)
    for shard in range(6):
        write_tar(tmp_path / f"{shard:05d}.tar", [(f"{shard}{i:03d}", {"png": encode(images[4 * shard + i], "PNG")})
                                                  for i in range(4)])
    out = tmp_path / "out"
    args = ["extract", str(tmp_path / "{00000..00005}.tar"), "-o", str(out), "--size", "small", "--workers", "1",
            "--quiet"]
    killed = vitok_killed_at("vitok.storage.shards:commit", 2, *args)  # as the second tar's shard is committed
    assert killed.returncode == -9, killed.stderr
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert 1 <= len(finished) < 6
    assert run_vitok(*args).returncode == 0
    assert all((out / "shards" / n).stat().st_mtime_ns == t for n, t in finished.items())
    store = vitok.open(out)
    assert len(store) == 24 and len(set(store.keys())) == 24 and vitok.verify(out).clean


@pytest.mark.slow
def test_parts_over_tars_equal_one_process(collection, tmp_path):
    source = str(collection / "tars" / "{00000..00003}.tar")
    vitok.extract([source], tmp_path / "one", **LIB)
    for part in range(2):
        vitok.extract([source], tmp_path / "two", part=part, num_parts=2, **LIB)
    one, two = vitok.open(tmp_path / "one"), vitok.open(tmp_path / "two")
    assert one.keys() == two.keys() and one.skipped == two.skipped
    for key in one.keys():
        np.testing.assert_array_equal(one[key], two[key])
    parts = {s.part for s in two.shards.values()}
    assert parts == {"0/2", "1/2"}


def test_a_missing_tar_that_appears_later_is_retried(collection, tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(collection / "tars" / name, folder / name)
    source = str(folder / "{00000..00002}.tar")
    first = vitok.extract([source], tmp_path / "out", **LIB)
    assert first.shards_written == 3
    shutil.copy(collection / "tars" / "00003.tar", folder / "00002.tar")
    second = vitok.extract([source], tmp_path / "out", **LIB)
    assert second.shards_written == 1 and second.ok == 4
    store = vitok.open(tmp_path / "out")
    assert sum(k.startswith("00002/") for k in store.keys()) == 4 and vitok.verify(tmp_path / "out").clean
    shards = tmp_path / "out" / "shards"  # the retry replaced the first attempt whole: one shard named for the tar
    assert sorted(p.name for p in shards.glob("00002*")) == ["00002~r1.h5", "00002~r1.json"]
    assert (shards / ".superseded" / "00002.json").exists()
    assert vitok.extract([source], tmp_path / "out", **LIB).shards_written == 0  # and it counts as done


@pytest.mark.slow
def test_remote_tars_and_parquet_through_fsspec(collection, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for name in ("00000.tar", "00001.tar"):
        memory.pipe(f"/remote/{name}", (collection / "tars" / name).read_bytes())
    summary = vitok.extract(["memory://remote/{00000..00001}.tar"], tmp_path / "mem", **LIB)
    local = vitok.extract([f"file://{collection}/tars/{{00000..00001}}.tar"], tmp_path / "file", **LIB)
    assert summary.ok == local.ok == 8
    folder = vitok.extract(["memory://remote/"], tmp_path / "folder", input_format="wds", **LIB)
    assert folder.ok == 8
    assert vitok.open(tmp_path / "mem").keys() == vitok.open(tmp_path / "file").keys()


def test_a_missing_fsspec_is_named(monkeypatch):
    import builtins

    from vitok.errors import UsageError
    from vitok.inputs.readers.remote import open_binary

    real_import = builtins.__import__

    def without_fsspec(name, *args, **kwargs):
        if name == "fsspec":
            raise ImportError("no fsspec")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_fsspec)
    with pytest.raises(UsageError, match=r"vitok\[remote\]"):
        open_binary("s3://bucket/00000.tar")


def test_plan_of_ten_thousand_listed_paths(tmp_path):
    paths = [f"/data/images/{i // 1000:03d}/{i:07d}.jpg" for i in range(10_000)]
    (tmp_path / "list.txt").write_text("\n".join(reversed(paths)) + "\n")
    result = run_vitok("plan", "--files-from", str(tmp_path / "list.txt"), "-o", str(tmp_path / "out"),
                       "--shard-size", "1000")
    assert result.returncode == 0 and "10000 inputs in 10 shards" in result.stdout
    from vitok.storage.plan import load_plan

    plan = load_plan(tmp_path / "out")
    unit = plan.units[7].files()
    assert unit[0] == (paths[7000], paths[7000]) and len(unit) == 1000


def test_env_part_reads_only_its_units(tmp_path):
    """A process of part k of N seeks to its own units' lines; it never loads the whole plan."""
    from vitok.storage.plan import UnitRef

    folder = tmp_path / "imgs"
    for i in range(9):
        from helpers import photo

        photo(folder / f"{i}.png", seed=i)
    run_vitok("plan", str(folder), "-o", str(tmp_path / "out"), "--shard-size", "3", check=True)
    reads = []
    original = UnitRef.files

    def counting(self):
        reads.append(self.name)
        return original(self)

    UnitRef.files = counting
    try:
        vitok.extract([], tmp_path / "out", part=1, num_parts=3, shard_size=3, **LIB)
    finally:
        UnitRef.files = original
    assert set(reads) == {"shard-000001"}
    assert os.path.exists(tmp_path / "out" / "shards" / "shard-000001.json")


def test_update_plans_added_and_rewritten_tars_and_the_rewritten_tars_tokens_win(tmp_path):
    images = sample_images(6, seed=3)
    folder = tmp_path / "tars"
    folder.mkdir()
    for shard in range(2):
        write_tar(folder / f"{shard:05d}.tar", [(f"k{i}", {"png": encode(images[2 * shard + i], "PNG")})
                                                for i in range(2)])
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, **LIB)
    before = vitok.open(out)
    old_tokens = before["00001/k0"]
    before.close()
    write_tar(folder / "00001.tar", [(f"k{i}", {"png": encode(images[4 + i], "PNG")}) for i in range(2)])
    os.utime(folder / "00001.tar", ns=(1, 1))  # its size may not change: the mtime says it was rewritten
    write_tar(folder / "00002.tar", [("k0", {"png": encode(images[0], "PNG")})])
    with pytest.raises(vitok.errors.InputsChangedError):
        vitok.extract([str(folder)], out, **LIB)
    summary = vitok.extract([str(folder)], out, update=True, **LIB)
    assert summary.ok == 3 and summary.shards_written == 2  # the rewritten tar and the new one, nothing else
    store = vitok.open(out)
    assert store.keys() == ["00000/k0", "00000/k1", "00001/k0", "00001/k1", "00002/k0"]
    assert not np.array_equal(store["00001/k0"], old_tokens)
    np.testing.assert_array_equal(store["00002/k0"], store["00000/k0"])  # the same image
    assert vitok.verify(out).clean


def test_tar_members_keep_their_real_names_and_links_are_recorded_not_lost(tmp_path):
    images = sample_images(3)
    folder = tmp_path / "tars"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        def add(name: str, data: bytes | None = None, link: str | None = None, kind=tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = kind, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        add("UPPER.JPG", encode(images[0], "JPEG"))
        add("UPPER.txt", b"a caption")
        add("soft.jpg", link="UPPER.JPG", kind=tarfile.SYMTYPE)
        add("hard.jpg", link="UPPER.JPG", kind=tarfile.LNKTYPE)
        add("hard.txt", b"its caption")
        add("both.png", encode(images[1], "PNG"))
        add("both.webp", link="both.png", kind=tarfile.SYMTYPE)
    out = tmp_path / "out"
    summary = vitok.extract([str(folder)], out, **LIB)
    assert (summary.ok, summary.skipped, summary.failed) == (2, 2, 0)
    with vitok.open(out) as store:
        assert store.keys() == ["00000/UPPER", "00000/both"]
        assert store.info("00000/UPPER")["member"] == "UPPER.JPG"
        assert store.info("00000/both")["meta"] == {"other_images": ["both.webp"]}
        assert "symbolic link to UPPER.JPG" in store.skipped["00000/soft"]
        assert "hard link to UPPER.JPG" in store.skipped["00000/hard"]


def test_a_hugging_face_image_cell_with_only_a_path_is_recorded_with_that_path(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    images = sample_images(2)
    outside = tmp_path / "outside.png"
    images[1].save(outside)
    folder = tmp_path / "pq"
    folder.mkdir()
    column = [{"bytes": encode(images[0], "PNG"), "path": "a.png"}, {"bytes": None, "path": str(outside)}]
    pq.write_table(pa.table({"image": column, "key": ["a", "b"]}), folder / "x.parquet")
    out = tmp_path / "out"
    summary = vitok.extract([str(folder)], out, **LIB)
    assert (summary.ok, summary.skipped, summary.failed) == (1, 1, 0)
    with vitok.open(out) as store:
        assert store.keys() == ["x/a"]
        assert f"only its path {str(outside)!r}" in store.skipped["x/b"]


# ---- keys a store cannot hold ------------------------------------------------------------------------------------


def _nul_key_inputs(root: Path, source: str) -> tuple[list[str], list[str]]:
    """Inputs of one kind whose keys hold NUL beside good ones: (sources, the vitok keys that hold NUL)."""
    data = [encode(image, "PNG") for image in sample_images(5)]
    if source == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = ["ok", "x\x00a", "x\x00b", "tail\x00", "tail"]  # NUL inside, two that differ after it, one at the end
        pq.write_table(pa.table({"key": keys, "png": pa.array(data, pa.binary())}), root / "ev.parquet")
        return [str(root / "ev.parquet")], [f"ev/{k}" for k in keys if "\x00" in k]
    if source == "tar":
        with tarfile.open(root / "ev.tar", "w", format=tarfile.PAX_FORMAT) as tar:  # PAX names may hold NUL
            for key, png in zip(["ok", "x\x00a", "x\x00b", "tail\x00", "tail"], data):
                info = tarfile.TarInfo(f"{key}.png")
                info.size, info.pax_headers = len(png), {"path": f"{key}.png"}  # (a ustar name would end at NUL)
                tar.addfile(info, io.BytesIO(png))
        with tarfile.open(root / "ev.tar") as tar:
            names = [m.name for m in tar.getmembers()]
        if not any("\x00" in n for n in names):
            pytest.skip("this tarfile does not keep NUL in PAX member names")
        return [str(root / "ev.tar")], [f"ev/{n.rsplit('.', 1)[0]}" for n in names if "\x00" in n]
    (root / "imgs").mkdir()
    for i, png in enumerate(data[:2]):
        (root / "imgs" / f"{i}.png").write_bytes(png)
    listed = [str(root / "imgs" / "0.png"), str(root / "imgs" / "1.png"), str(root / "imgs" / "b\x00d.png")]
    (root / "list.txt").write_text("\n".join(listed) + "\n")
    return ["--files-from", str(root / "list.txt")], [listed[2]]


@pytest.mark.parametrize("fmt", ["hdf5", "npy", "wds"])
@pytest.mark.parametrize("source", ["parquet", "tar", "files"])
def test_a_key_holding_nul_costs_only_its_sample_in_every_format(tmp_path, fmt, source):
    sources, bad = _nul_key_inputs(tmp_path, source)
    args = ["extract", *sources, "-o", str(tmp_path / "out"), "--model", "qwen3-vl-tiny", "--workers", "0",
            "--quiet", "--format", fmt]
    result = run_vitok(*args)
    assert result.returncode == 0, result.stderr
    with vitok.open(tmp_path / "out") as store:
        skipped = {k: r for k, r in store.skipped.items() if "\x00" in k}
        assert sorted(skipped) == sorted(bad)
        assert all("NUL" in reason and key_text(key) in reason for key, reason in skipped.items())
        assert not any("\x00" in k for k in store.keys()) and len(store) == 2
        for key in store.keys():
            assert store[key].shape[0] == store.info(key)["tokens"]["merged"]
        count = len(store)
    assert run_vitok("verify", str(tmp_path / "out")).returncode == 0
    again = run_vitok(*args)  # a rerun does not die on the same keys: there is nothing left to do
    assert again.returncode == 0, again.stderr
    if fmt == "wds":
        with tarfile.open(next((tmp_path / "out" / "shards").glob("*.tar"))) as tar:
            members = [m.name for m in tar.getmembers() if m.name != "__vitok__"]
        assert len(members) == len(set(members)) == 2 * count  # <key>.merged.npy + <key>.json, no clash
