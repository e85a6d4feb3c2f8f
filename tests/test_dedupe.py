"""Content identity (inputs.identity) and each distinct image encoded once (pipeline.dedupe): within a unit, from
committed shards of the same store (parts, resume), and from other stores (--reuse)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitok
from vitok.errors import SettingsMismatchError
from vitok.inputs.identity import content_id
from vitok.storage.format import numpy_dtype
from vitok.storage.records import vision_revision

TINY = {"model": "qwen3-vl-tiny", "workers": 0}
COUNTS = ("ok", "images_encoded", "batches_encoded", "duplicates", "reused")


def collection(folder: Path, unique: int, copies: dict[int, int], seed: int = 0) -> Path:
    """``img00.png`` ... : image i is a fresh random picture, or for i in ``copies`` the same pixels as image
    ``copies[i]`` saved in another format (so the files' bytes differ while the pixels are equal)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = [rng.integers(0, 256, (40 + 4 * (i % 3), 48, 3), dtype=np.uint8) for i in range(unique)]
    fresh = iter(pictures)
    made: dict[int, np.ndarray] = {}
    for i in range(unique + len(copies)):
        made[i] = made[copies[i]] if i in copies else next(fresh)
        suffix = ".bmp" if i in copies else ".png"  # lossless either way: equal pixels, other bytes
        Image.fromarray(made[i]).save(folder / f"img{i:02d}{suffix}")
    return folder


def raw_tokens(out: Path) -> dict[str, np.ndarray]:
    """Every key's rows in the stored dtype (bit patterns), read through the shard readers."""
    found = {}
    with vitok.open(out) as store:
        for feature in store.features:
            for keys, data, offsets in store.iter_shards(feature, dtype=None):
                for i, key in enumerate(keys):
                    found[(key, feature)] = np.array(data[..., offsets[i]:offsets[i + 1], :])
    return found


def counts(summary) -> dict[str, int]:
    return {k: getattr(summary, k) for k in COUNTS}


# ---- item 4: the identity contract ------------------------------------------------------------------------------


def test_record_hashes_follow_the_documented_contract(tmp_path):
    src = collection(tmp_path / "imgs", 3, {3: 0})
    out = tmp_path / "out"
    vitok.extract([str(src)], out, **TINY)
    store = vitok.open(out)
    from vitok.encoder.checkpoint import resolve_model
    from vitok.inputs.preprocess import Preprocessor, patchify, resize_uint8, target_size

    preprocess = Preprocessor(resolve_model("qwen3-vl-tiny").preprocess)
    for key in store.keys():
        record = store.info(key)
        data = (src / key).read_bytes()
        assert record["source_sha256"] == hashlib.sha256(data).hexdigest()
        # recomputed from the contract's words: resized uint8 image -> patches in merge-block order -> sha256
        image = Image.open(src / key).convert("RGB")
        config = preprocess.config
        h, w = target_size(config, image.height, image.width)
        patches = patchify(resize_uint8(image, h, w, config), config.patch_size, config.merge_size).numpy()
        t, gh, gw = record["grid"]
        text = f"vitok-pixels/1 grid={t},{gh},{gw} patch=3,{config.patch_size},{config.patch_size}\n"
        assert record["content_id"] == hashlib.sha256(text.encode() + patches.tobytes()).hexdigest()
        assert record["content_id"] == content_id(preprocess.load(data).patches, record["grid"])
    # equal pixels under other bytes: one content id, two file hashes
    assert store.info("img03.bmp")["content_id"] == store.info("img00.png")["content_id"]
    assert store.info("img03.bmp")["source_sha256"] != store.info("img00.png")["source_sha256"]
    identity = json.loads((out / "vitok.json").read_text())["identity"]
    model = store.header.settings.to_json()["model"]
    canonical = json.dumps(model["config"], sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()
    assert identity["vision_revision"] == hashlib.sha256(canonical + b"\n" + model["weights"].encode()).hexdigest()
    assert identity["vision_revision"] == vision_revision(model["config"], model["weights"])
    assert identity["decoder"]["pillow"] and identity["decoder"]["decode"] == "exact"
    assert store.header.identity == identity  # RunHeader round trip


def test_content_id_refuses_what_is_not_patches():
    with pytest.raises(ValueError, match="uint8 patches"):
        content_id(np.zeros((4, 3, 2, 2), dtype=np.float32), (1, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        content_id(np.zeros((5, 3, 2, 2), dtype=np.uint8), (1, 2, 2))
    a = np.zeros((4, 3, 2, 2), dtype=np.uint8)
    assert content_id(a, (1, 2, 2)) != content_id(a, (1, 4, 1))  # the grid is part of the identity


# ---- item 5: each distinct image encoded once -------------------------------------------------------------------


SLOW = pytest.mark.slow


@pytest.mark.parametrize(("fmt", "budget"), [  # one batch per unit (copies wait for it) / one per image (copies after)
    ("hdf5", None), pytest.param("npy", None, marks=SLOW), pytest.param("wds", None, marks=SLOW),
    pytest.param("hdf5", 1, marks=SLOW), pytest.param("npy", 1, marks=SLOW), pytest.param("wds", 1, marks=SLOW)])
def test_thirty_percent_duplicates_encode_seventy_percent(tmp_path, fmt, budget):
    # 20 images, 6 of them (30 %) the pixels of another in their unit (shards of 10)
    copies = {7: 0, 8: 1, 9: 2, 17: 10, 18: 11, 19: 13}
    src = collection(tmp_path / "imgs", 14, copies)
    names = sorted(p.name for p in src.iterdir())
    out = tmp_path / "out"
    summary = vitok.extract([str(src)], out, format=fmt, shard_size=10, token_budget=budget, **TINY)
    assert summary.ok == 20 and summary.images_encoded == 14 and summary.duplicates == 6 and summary.reused == 0
    if budget == 1:
        assert summary.batches_encoded == 14
    tokens = raw_tokens(out)
    store = vitok.open(out)
    report = vitok.verify(out)
    assert report.clean, report.problems
    copied = {k: store.info(k)["copied_from"] for k in store.keys() if store.info(k).get("copied_from")}
    assert len(copied) == 6
    for key, origin in copied.items():  # <shard>/<key>: this shard's record of the first copy
        shard, _, first = origin.partition("/")
        assert shard == store.info(key)["shard"]
        assert names.index(key) // 10 == names.index(first) // 10  # within its unit
        assert np.array_equal(tokens[(key, "merged")], tokens[(first, "merged")])
        assert store.info(key)["content_id"] == store.info(first)["content_id"]


@pytest.mark.slow
def test_an_image_tokens_do_not_depend_on_its_batch_mates(tmp_path):
    """Dedupe changes which images share a batch; the tokens of the others must not change with it."""
    src = collection(tmp_path / "imgs", 7, {7: 0, 8: 3, 9: 5})
    vitok.extract([str(src)], tmp_path / "deduped", **TINY)
    vitok.extract([str(src)], tmp_path / "singles", token_budget=1, **TINY)
    a, b = raw_tokens(tmp_path / "deduped"), raw_tokens(tmp_path / "singles")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_reuse_runs_no_encoder_batch_and_copies_bit_for_bit(tmp_path):
    src = collection(tmp_path / "imgs", 7, {7: 0, 8: 1, 9: 2})
    first = tmp_path / "first"
    vitok.extract([str(src)], first, shard_size=4, store_dtype="bfloat16", **TINY)
    second = tmp_path / "second"  # another format and shard size: tokens do not depend on them
    summary = vitok.extract([str(src)], second, reuse=[str(first)], format="npy", shard_size=3,
                            store_dtype="bfloat16", **TINY)
    assert counts(summary) == {"ok": 10, "images_encoded": 0, "batches_encoded": 0, "duplicates": 0, "reused": 10}
    a, b = raw_tokens(first), raw_tokens(second)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == numpy_dtype("bfloat16")
        np.testing.assert_array_equal(a[key], b[key])
    origin = vitok.open(first).info("img04.png")["shard"]
    assert vitok.open(second).info("img04.png")["copied_from"] == f"{first}::{origin}/img04.png"


def test_reuse_refuses_a_store_of_other_token_settings(tmp_path):
    src = collection(tmp_path / "imgs", 2, {})
    vitok.extract([str(src)], tmp_path / "pooled", pool="mean", **TINY)
    with pytest.raises(SettingsMismatchError, match="pool"):
        vitok.extract([str(src)], tmp_path / "b", reuse=[str(tmp_path / "pooled")], **TINY)
    assert not (tmp_path / "b" / "vitok.json").exists()  # refused before anything was written
    settings = vitok.open(tmp_path / "pooled").header.settings
    assert settings.replace(format="npy", shard_size=7).token_json() == settings.token_json()


@pytest.mark.slow
def test_parts_and_resume_copy_from_committed_shards(tmp_path):
    # unit 1 (img05..img09) repeats unit 0's pixels; unit 0 is committed by part 0 before part 1 runs
    src = collection(tmp_path / "imgs", 5, {5: 0, 6: 1, 7: 2, 8: 3, 9: 4})
    out = tmp_path / "out"
    s0 = vitok.extract([str(src)], out, shard_size=5, part=0, num_parts=2, **TINY)
    assert counts(s0) == {"ok": 5, "images_encoded": 5, "batches_encoded": 1, "duplicates": 0, "reused": 0}
    s1 = vitok.extract([str(src)], out, shard_size=5, part=1, num_parts=2, **TINY)
    assert counts(s1) == {"ok": 5, "images_encoded": 0, "batches_encoded": 0, "duplicates": 5, "reused": 0}
    store = vitok.open(out)
    assert store.info("img05.bmp")["copied_from"] == f"{store.info('img00.png')['shard']}/img00.png"
    assert store.info("img05.bmp")["shard"] != store.info("img00.png")["shard"]
    tokens = raw_tokens(out)
    for i in range(5):
        np.testing.assert_array_equal(tokens[(f"img{i + 5:02d}.bmp", "merged")], tokens[(f"img{i:02d}.png", "merged")])
    # a rerun (resume of a finished store) changes nothing; a fresh single-part run encodes the duplicates of units
    # not committed yet (units never wait for each other) and gives the same tokens
    again = vitok.extract([str(src)], out, shard_size=5, **TINY)
    assert again.ok == 0 and again.already_done == 10
    whole = tmp_path / "whole"
    vitok.extract([str(src)], whole, shard_size=5, **TINY)
    other = raw_tokens(whole)
    for key in tokens:
        np.testing.assert_array_equal(tokens[key], other[key])


def test_cli_reuse_is_repeatable_and_json_counts_duplicates(tmp_path):
    from typer.testing import CliRunner

    from vitok.cli import app as cli

    src = collection(tmp_path / "imgs", 4, {4: 0})
    a, b = tmp_path / "a", tmp_path / "b"
    vitok.extract([str(src / "img00.png"), str(src / "img01.png")], a, **TINY)
    vitok.extract([str(src / "img02.png")], b, **TINY)
    result = CliRunner().invoke(cli.app, ["extract", str(src), "-o", str(tmp_path / "c"), "--model", "qwen3-vl-tiny",
                                          "--workers", "0", "--reuse", str(a), "--reuse", str(b), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert {k: summary[k] for k in COUNTS} == {"ok": 5, "images_encoded": 1, "batches_encoded": 1, "duplicates": 0,
                                               "reused": 4}
    from vitok.run.options import ExtractOptions

    assert ExtractOptions(reuse=(str(a), str(b))).to_argv() == ["--reuse", str(a), "--reuse", str(b)]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["reuse", "same store"])
def test_rows_are_never_copied_from_a_shard_that_fails_its_checksums(tmp_path, where, caplog):
    """Regression: a donor shard with overwritten bytes gave its damaged rows to copies, in shards that then verified
    clean. Now a donor's checksums are checked first, and its images are encoded instead."""
    src = collection(tmp_path / "imgs", 2, {})
    common = dict(TINY, format="npy", store_dtype="float32")
    first = tmp_path / "first"
    vitok.extract([str(src)], first, **common)
    expected = raw_tokens(first)
    for data in (first / "shards").glob("*/merged.npy"):
        _flip_last_byte(data)
    assert not vitok.verify(first).clean
    copy = tmp_path / "more" / "img00_again.bmp"
    copy.parent.mkdir()
    Image.open(src / "img00.png").save(copy)
    if where == "reuse":
        out = tmp_path / "second"
        summary = vitok.extract([str(copy.parent)], out, reuse=[str(first)], **common)
        key = "img00_again.bmp"
    else:
        out = first
        Image.open(src / "img00.png").save(src / "img00_again.bmp")
        summary = vitok.extract([str(src)], out, update=True, **common)
        key = "img00_again.bmp"
    assert summary.reused == summary.duplicates == 0 and summary.images_encoded == 1
    assert "does not match its checksums" in caplog.text
    with vitok.open(out) as store:
        assert store.info(key).get("copied_from") is None
        np.testing.assert_array_equal(store.get(key, "merged"), expected[("img00.png", "merged")])


def test_within_unit_duplicates_follow_their_first_copy_to_the_committer():
    """The deduplicator alone decides and orders within-unit copies: a duplicate seen before its first copy's batch
    reaches the committer goes right after that batch; one whose first copy was skipped is skipped with it."""
    from types import SimpleNamespace

    from vitok.pipeline.committer import Commit, CopyRows, WriteBatch, WriteRecord
    from vitok.pipeline.dedupe import Deduplicator, Donors
    from vitok.pipeline.types import EncodedBatch, RunCounts, UnitEnd
    from vitok.storage.records import ImageRecord, UnitInfo

    sent = []
    counts = RunCounts()
    dedupe = Deduplicator(Donors(["merged"]), SimpleNamespace(send=sent.append), counts, names={0: "shard-000000"})

    def item(key, content):
        return SimpleNamespace(record=ImageRecord(key, "ok", key, content_id=content))

    first, copy, lone, bad, bad_copy = (item("a", "c1"), item("b", "c1"), item("c", "c2"), item("d", "c3"),
                                        item("e", "c3"))
    assert [dedupe.skips(0, i) for i in (first, copy, lone, bad, bad_copy)] == [False, True, False, False, True]
    assert sent == [] and (counts.duplicates, counts.reused) == (2, 0)
    bad.record.status, bad.record.reason = "skipped", "out of memory"
    batch = EncodedBatch(0, [first.record, lone.record], {}, {}, skipped=[bad.record])
    dedupe.deliver([batch, UnitEnd(0, UnitInfo())])
    assert [type(m) for m in sent] == [WriteBatch, CopyRows, WriteRecord, Commit]
    assert sent[1].record.copied_from == "shard-000000/a" and sent[1].first == "a" and sent[2].record is bad_copy.record
    assert bad_copy.record.status == "skipped" and "same pixels as shard-000000/d: out of memory" in \
        bad_copy.record.reason


def test_reuse_refuses_an_unfinished_store_naming_what_is_unfinished(tmp_path):
    src = collection(tmp_path / "src", 6, {})
    vitok.extract([str(src)], tmp_path / "half", shard_size=2, part=0, num_parts=2, **TINY)  # 2 of 3 shards done
    from vitok.errors import UsageError

    with pytest.raises(UsageError, match=r"--reuse .*half is not a finished store: 1 of 3 planned shard\(s\) not done"):
        vitok.extract([str(src)], tmp_path / "b", reuse=[str(tmp_path / "half")], **TINY)
    assert not (tmp_path / "b").exists()  # refused before anything is written
    vitok.extract([str(src)], tmp_path / "half", shard_size=2, part=1, num_parts=2, **TINY)
    assert vitok.extract([str(src)], tmp_path / "b", reuse=[str(tmp_path / "half")], **TINY).reused == 6
