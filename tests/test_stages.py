"""Each stage on its own: batcher, sources, plan, records, shard sink and commit protocol, options, settings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vitok import settings
from vitok.errors import UsageError
from vitok.inputs.sources import FileListing, list_inputs
from vitok.pipeline.batcher import Batcher, plan_batches
from vitok.run.options import ExtractOptions, make_options
from vitok.storage import get_format
from vitok.storage.format import FeatureLayout
from vitok.storage.plan import listing_digest, load_plan, write_generation
from vitok.storage.records import ImageRecord, ModelSettings, RunHeader, Settings, Sidecar
from vitok.storage.shards import check_shard, iter_sidecars, temp_files

# ---- batcher -------------------------------------------------------------------------------------------------------


def test_batches_respect_the_budget_and_keep_order():
    sizes = [3, 3, 3, 10, 1, 1, 5]
    batches = plan_batches(sizes, budget=6)
    assert [list(b) for b in batches] == [[0, 1], [2], [3], [4, 5], [6]]
    assert [i for b in batches for i in b] == list(range(len(sizes)))  # every item once, in order
    assert plan_batches([], 4) == [] and plan_batches([100], 4) == [range(0, 1)]  # too large alone: its own batch


def test_incremental_batcher_equals_the_pure_function_per_unit_whatever_the_interleaving():
    rng = np.random.default_rng(0)
    sizes = {unit: rng.integers(1, 9, size=20).tolist() for unit in "abc"}
    batcher: Batcher = Batcher(budget=12)
    got = {unit: [] for unit in sizes}
    order = [(unit, i) for i in range(20) for unit in "abc"]  # units interleaved, as archive workers do
    for unit, i in order:
        for batch in batcher.add(unit, i, sizes[unit][i]):
            got[unit].append(batch)
    for unit in sizes:
        got[unit] += batcher.flush(unit)
        assert got[unit] == [list(r) for r in plan_batches(sizes[unit], 12)]
    with pytest.raises(ValueError):
        Batcher(0)


# ---- sources -------------------------------------------------------------------------------------------------------


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_listing_keys_are_relative_and_paths_absolute(tmp_path):
    for name in ("b/2.jpg", "a/1.PNG", "c.txt", "d/3.webp"):
        _touch(tmp_path / "imgs" / name)
    listing = list_inputs(["imgs"], cwd=str(tmp_path))
    assert isinstance(listing, FileListing) and listing.ignored == 1
    items = list(listing.items())
    assert [key for key, _ in items] == ["a/1.PNG", "b/2.jpg", "d/3.webp"]
    root = listing.roots[items[0][1]]
    assert root.path("a/1.PNG") == str(tmp_path / "imgs" / "a" / "1.PNG")


def test_equivalent_spellings_of_a_source_give_the_same_listing(tmp_path):
    _touch(tmp_path / "imgs" / "x.jpg")
    spellings = ["imgs", "imgs/", "./imgs", str(tmp_path / "imgs")]
    digests = {listing_digest(list_inputs([s], cwd=str(tmp_path))) for s in spellings}
    assert len(digests) == 1


def test_non_utf8_names_are_kept_from_folders_lists_and_stdin(tmp_path):
    import io

    raw = os.fsencode(str(tmp_path / "imgs")) + b"/caf\xe9.jpg"
    os.makedirs(tmp_path / "imgs")
    with open(raw, "wb") as handle:
        handle.write(b"x")
    keys = [k for k, _ in list_inputs([str(tmp_path / "imgs")]).items()]
    assert keys == [os.fsdecode(b"caf\xe9.jpg")]
    listed = list_inputs(["-"], stdin=io.BytesIO(raw + b"\n"))
    assert [k for k, _ in listed.items()] == [os.fsdecode(raw)]
    (tmp_path / "list.txt").write_bytes(raw + b"\n# a comment\n\n")
    assert [k for k, _ in list_inputs([], files_from=str(tmp_path / "list.txt")).items()] == [os.fsdecode(raw)]


def test_listing_refusals(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        list_inputs(["nope"], cwd=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        list_inputs(["empty"], cwd=str(tmp_path))
    _touch(tmp_path / "x" / "one" / "a.jpg")
    _touch(tmp_path / "y" / "one" / "a.jpg")
    with pytest.raises(UsageError, match="same key"):
        list(list_inputs([str(tmp_path / "x" / "one"), str(tmp_path / "y" / "one"), str(tmp_path / "x")]).items())
    _touch(tmp_path / "t" / "00000.tar")
    with pytest.raises(UsageError, match="one kind of input"):
        list_inputs([str(tmp_path / "t" / "00000.tar"), str(tmp_path / "x" / "one" / "a.jpg")])


def test_brace_patterns_expand_like_webdataset_and_gaps_are_kept_for_the_reader(tmp_path):
    for i in (0, 1, 3):
        _touch(tmp_path / f"{i:05d}.tar")
    listing = list_inputs([str(tmp_path / "{00000..00003}.tar")])
    assert [os.path.basename(p) for p in listing.paths] == [f"{i:05d}.tar" for i in range(4)]
    assert listing.missing_ok == {str(tmp_path / "00002.tar")}


# ---- plan ----------------------------------------------------------------------------------------------------------


def test_plan_units_and_seeking_to_one_unit(tmp_path):
    for i in range(23):
        _touch(tmp_path / "imgs" / f"{i:03d}.jpg")
    listing = list_inputs([str(tmp_path / "imgs")])
    write_generation(tmp_path / "out", listing, 5, 0, 0, ["imgs"], "initial", listing_digest(listing))
    plan = load_plan(tmp_path / "out")
    assert [u.name for u in plan.units] == [f"shard-{i:06d}" for i in range(5)]
    assert [u.count for u in plan.units] == [5, 5, 5, 5, 3] and plan.num_images == 23
    fourth = plan.units[3].files()
    assert [key for key, _ in fourth] == [f"{i:03d}.jpg" for i in range(15, 20)]
    assert fourth[0][1] == str(tmp_path / "imgs" / "015.jpg")
    assert plan.latest.listing_digest == listing_digest(listing)


def test_a_second_planner_with_other_inputs_is_refused(tmp_path):
    from vitok.errors import InputsChangedError

    _touch(tmp_path / "a" / "1.jpg")
    _touch(tmp_path / "b" / "2.jpg")
    first, second = list_inputs([str(tmp_path / "a")]), list_inputs([str(tmp_path / "b")])
    write_generation(tmp_path / "out", first, 5, 0, 0, [], "initial", listing_digest(first))
    write_generation(tmp_path / "out", first, 5, 0, 0, [], "initial", listing_digest(first))  # same: accepted
    with pytest.raises(InputsChangedError):
        write_generation(tmp_path / "out", second, 5, 0, 0, [], "initial", listing_digest(second))


# ---- records -------------------------------------------------------------------------------------------------------


def test_records_round_trip_through_json_with_non_utf8_keys():
    key = os.fsdecode(b"caf\xe9.jpg")
    record = ImageRecord(key, "ok", "/x/" + key, row=0, tokens={"merged": 4}, grid=[1, 4, 4], size=[64, 64])
    sidecar = Sidecar("shard-000000", "hdf5", "shard-000000.h5", {}, {"merged": 4}, [record], fingerprint="f")
    text = json.dumps(sidecar.to_json(), ensure_ascii=True)
    back = Sidecar.from_json(json.loads(text))
    assert back.records[0] == record and back.fingerprint == "f" and back.count("ok") == 1
    header = RunHeader(Settings(ModelSettings("m"), features=("merged",)), "0.1", "now")
    assert RunHeader.from_json(header.to_json()).fingerprint == header.fingerprint


# ---- shard sink and commit protocol ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hdf5", "npy"])
def test_sink_streams_batches_commits_and_checks(tmp_path, fmt):
    from vitok.pipeline.sink import ShardSink
    from vitok.pipeline.types import EncodedBatch

    layouts = {"merged": FeatureLayout(8), "deepstack": FeatureLayout(8, levels=2)}
    sink = ShardSink(tmp_path, get_format(fmt), "shard-000007", layouts, "float32", None, "run1")
    rng = np.random.default_rng(0)
    expected = {}
    for batch_index in range(3):
        rows = [2, 3]
        records = [ImageRecord(f"k{batch_index}{i}", "ok", "src", grid=[1, 2, 2 * r]) for i, r in enumerate(rows)]
        merged = rng.standard_normal((5, 8)).astype(np.float32)
        deep = rng.standard_normal((2, 5, 8)).astype(np.float32)
        sink.add_batch(EncodedBatch(7, records, {"merged": merged, "deepstack": deep},
                                    {"merged": rows, "deepstack": rows}))
        expected[records[0].key], expected[records[1].key] = merged[:2], merged[2:]
    sink.add_record(ImageRecord("zz", "skipped", "src", reason="broken"))
    assert temp_files(tmp_path) and not list(iter_sidecars(tmp_path))  # streamed, not committed yet
    sidecar = sink.commit(fingerprint="f")
    assert not temp_files(tmp_path)
    assert check_shard(tmp_path, sidecar, checksums=True) == []
    reader = get_format(fmt).open(tmp_path / "shards" / sidecar.data)
    keys = reader.keys()
    offsets = reader.offsets("merged")
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(reader.array("merged")[offsets[i]:offsets[i + 1]], expected[key])
    assert reader.array("deepstack").shape == (2, 15, 8)
    assert reader.grids().tolist()[1] == [1, 2, 6]
    reader.close()


def test_a_crash_before_commit_leaves_nothing_listed(tmp_path):
    from vitok.pipeline.sink import ShardSink
    from vitok.pipeline.types import EncodedBatch

    sink = ShardSink(tmp_path, get_format("hdf5"), "shard-000000", {"merged": FeatureLayout(4)}, "float16", None,
                     "run1")
    sink.add_batch(EncodedBatch(0, [ImageRecord("a", "ok", "s", grid=[1, 2, 2])],
                                {"merged": np.ones((1, 4), np.float16)}, {"merged": [1]}))
    # the process dies here: temporary data only, no sidecar
    assert not list(iter_sidecars(tmp_path)) and len(temp_files(tmp_path)) == 1
    sink.abort()
    assert not temp_files(tmp_path)


def test_commit_of_a_shard_someone_else_committed_keeps_theirs(tmp_path):
    fmt = get_format("npy")
    sidecars = []
    for run in ("first", "second"):
        from vitok.pipeline.sink import ShardSink

        sink = ShardSink(tmp_path, fmt, "shard-000000", {"merged": FeatureLayout(4)}, "float32", None, run)
        sidecars.append(sink.commit(fingerprint=run))
    assert sidecars[0] is not None and sidecars[1] is None
    assert [s.fingerprint for s in iter_sidecars(tmp_path)] == ["first"] and not temp_files(tmp_path)


def test_a_damaged_sidecar_data_pair_is_found(tmp_path):
    import h5py

    from vitok.pipeline.sink import ShardSink
    from vitok.pipeline.types import EncodedBatch

    sink = ShardSink(tmp_path, get_format("hdf5"), "s", {"merged": FeatureLayout(4)}, "float32", None, "r")
    sink.add_batch(EncodedBatch(0, [ImageRecord("a", "ok", "s", grid=[1, 2, 2])],
                                {"merged": np.ones((3, 4), np.float32)}, {"merged": [3]}))
    sidecar = sink.commit()
    path = tmp_path / "shards" / sidecar.data
    with h5py.File(path) as handle:
        offset = handle["merged"].id.get_chunk_info(0).byte_offset  # where the tokens are, not the metadata
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert check_shard(tmp_path, sidecar) == []  # sizes and tables still agree
    assert "checksum" in check_shard(tmp_path, sidecar, checksums=True)[0]


# ---- options and settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    (dict(image_size=0), "--image-size must be at least 1"), (dict(token_budget=0), "--token-budget"),
    (dict(max_image_pixels=0), "--max-image-pixels"), (dict(num_parts=0), "--num-parts"),
    (dict(features=","), "names nothing"), (dict(pool="avg"), "--pool 'avg' is not one of"),
    (dict(workers=-1), "--workers"), (dict(compression="gzip", format="npy"), "hdf5 only"),
    (dict(part=3, num_parts=2), "--part 3"), (dict(bogus=1), "unknown extract option"),
])
def test_options_are_checked_before_anything_runs(values, message):
    with pytest.raises(UsageError, match=message):
        make_options(**values)


def test_options_to_flags_and_back(monkeypatch):
    """--gpus builds its children's flags from the options: the CLI must parse them back to the same options."""
    from typer.testing import CliRunner

    from vitok.cli import app as cli
    from vitok.run import options as options_module

    options = make_options(model="qwen3-vl-tiny", features="patch,merged", pool="mean", fast_decode=True,
                           shard_size=7, part=1, num_parts=3, store_dtype="bfloat16")
    argv = options.to_argv()
    assert argv[:2] == ["--model", "qwen3-vl-tiny"] and "--fast-decode" in argv
    seen = {}

    def capture(**values):
        seen.update(values)
        raise UsageError("stop here")

    monkeypatch.setattr(options_module, "make_options", capture)
    CliRunner().invoke(cli.app, ["extract", "x", *argv])
    assert make_options(**seen) == options and isinstance(options, ExtractOptions)


def test_a_copy_of_options_keeps_which_were_given():
    """A resume takes the options not given from the store; a copy made on the way (an engine fixing the device,
    a bare --update adding its list) must not turn every option into a given one."""
    options = make_options(model="qwen3-vl-tiny", shard_size=4)
    copy = options.replace(device="cpu")
    assert copy.given == frozenset({"model", "shard_size"})
    resumed = copy.from_store({"model": "other", "shard_size": 4, "pool": "mean", "features": ["merged"]})
    assert (resumed.model, resumed.pool, resumed.features, resumed.device) == ("qwen3-vl-tiny", "mean", ("merged",),
                                                                                "cpu")
    assert resumed.given == copy.given and resumed == copy.replace(pool="mean", features=("merged",))


def test_settings_switches_read_set_and_override(monkeypatch):
    monkeypatch.setenv("VITOK_TRITON", "0")
    settings._values.pop("triton", None)
    assert settings.get("triton") == "off" and not settings.enabled("triton")
    with settings.override(triton="on", simplejpeg="off"):
        assert settings.enabled("triton") and not settings.enabled("simplejpeg")
        assert os.environ["VITOK_SIMPLEJPEG"] == "off"  # worker processes inherit it
    assert settings.get("triton") == "off" and settings.enabled("simplejpeg")
    with pytest.raises(UsageError, match="one of"):
        settings.set("onednn", "sometimes")
    with pytest.raises(UsageError, match="unknown vitok setting"):
        settings.get("turbo")
