"""The device stage and the committer driven by a fake encoder: depth, order, unit ends, out-of-memory splits."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from vitok.inputs.preprocess import PreparedImage
from vitok.pipeline.device import DevicePipeline
from vitok.pipeline.types import Batch, EncodedBatch, Item, UnitEnd
from vitok.storage.records import ImageRecord, UnitInfo


class FakeEncoder:
    """Each image's 'patch' rows hold its patch values summed; the first ``oom_after`` calls succeed, then every
    multi-image call runs out of memory."""

    def __init__(self, oom_from: int | None = None) -> None:
        self.device = torch.device("cpu")
        self.preprocess = types.SimpleNamespace()
        self.calls: list[int] = []
        self.oom_from = oom_from

    def encode(self, images, features, token_order, chunk_rows=None):
        self.calls.append(len(images))
        if self.oom_from is not None and len(self.calls) > self.oom_from and len(images) > 1:
            raise torch.OutOfMemoryError("simulated")
        packed = torch.cat([im.patches.float().flatten(1).sum(1, keepdim=True).repeat(1, 4) for im in images])
        return types.SimpleNamespace(features={"patch": packed}, rows={"patch": [im.num_patches for im in images]})


def item(key: str, patches: int, value: int) -> Item:
    image = PreparedImage(torch.full((patches, 1, 1, 1), value, dtype=torch.uint8), (1, 1, patches), (1, 1))
    record = ImageRecord(key, "ok", key)
    record.grid = list(image.grid_thw)
    return Item(record, image)


def rows_by_key(events) -> dict[str, np.ndarray]:
    out = {}
    for event in events:
        if isinstance(event, EncodedBatch):
            offsets = np.cumsum([0, *event.rows["patch"]])
            for i, record in enumerate(event.records):
                out[record.key] = event.arrays["patch"][offsets[i] : offsets[i + 1]]
    return out


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_unit_end_comes_out_behind_the_units_last_batch(depth):
    pipeline = DevicePipeline(FakeEncoder(), ("patch",), "none", "float32", depth=depth)
    events = []
    for unit in range(3):
        for b in range(2):
            events += pipeline.submit(Batch(unit, [item(f"{unit}/{b}", 2, unit * 10 + b)]))
        events += pipeline.end(unit, UnitInfo(unit=str(unit)))
    events += pipeline.drain()
    # every unit's end follows all of its batches, and nothing is emitted twice or lost
    seen: dict[int, int] = {}
    for event in events:
        if isinstance(event, UnitEnd):
            assert seen.get(event.unit) == 2, (event, seen)
            seen[event.unit] = -1
        else:
            assert seen.get(event.unit, 0) >= 0
            seen[event.unit] = seen.get(event.unit, 0) + 1
    assert seen == {0: -1, 1: -1, 2: -1}
    assert sum(isinstance(e, EncodedBatch) for e in events) == 6


@pytest.mark.parametrize("depth", [1, 2])
def test_batches_stay_queued_up_to_the_depth(depth):
    pipeline = DevicePipeline(FakeEncoder(), ("patch",), "none", "float32", depth=depth)
    out = [pipeline.submit(Batch(0, [item(str(i), 1, i)])) for i in range(4)]
    assert [len(o) for o in out] == [0] * depth + [1] * (4 - depth)
    assert len(pipeline.drain()) == depth


def test_out_of_memory_splits_the_batch_into_images_and_keeps_the_input_order():
    encoder = FakeEncoder(oom_from=1)
    pipeline = DevicePipeline(encoder, ("patch",), "none", "float32", depth=2)
    events = pipeline.submit(Batch(0, [item("a", 2, 1), item("b", 3, 2)]))  # fits
    events += pipeline.submit(Batch(0, [item("c", 3, 3), item("d", 2, 4), item("e", 3, 5)]))  # runs out of memory
    events += pipeline.end(0, UnitInfo()) + pipeline.drain()
    batches = [e for e in events if isinstance(e, EncodedBatch)]
    assert len(batches) == 2 and isinstance(events[-1], UnitEnd)  # the split batch comes back as one
    split = batches[1]
    assert [split.records[i].key for i in split.order] == ["c", "d", "e"]  # input order restored for the sink
    tokens = rows_by_key(events)
    assert sorted(tokens) == list("abcde")
    for key, value, patches in [("a", 1, 2), ("c", 3, 3), ("d", 4, 2)]:
        np.testing.assert_array_equal(tokens[key], np.full((patches, 4), value, dtype=np.float32))
    assert encoder.calls[:2] == [2, 3] and encoder.calls[2:] == [1, 1, 1]


def test_an_image_too_large_alone_is_skipped_with_its_reason():
    class AlwaysOOM(FakeEncoder):
        def encode(self, images, features, token_order, chunk_rows=None):
            raise torch.OutOfMemoryError("simulated")

    pipeline = DevicePipeline(AlwaysOOM(), ("patch",), "none", "float32", depth=1)
    events = pipeline.submit(Batch(0, [item("huge", 5, 1)])) + pipeline.drain()
    (batch,) = events
    assert not batch.records and batch.skipped[0].status == "skipped"
    assert "out of memory encoding 5 patches" in batch.skipped[0].reason


def test_committer_commits_a_unit_on_its_end_with_every_batch(tmp_path):
    from vitok.pipeline.committer import Committer
    from vitok.storage import SidecarStamp
    from vitok.storage.claims import Claims
    from vitok.storage.format import FeatureLayout
    from vitok.storage.plan import UnitRef
    from vitok.storage.shards import get_format

    claims = Claims(tmp_path)
    claims.start()
    unit = UnitRef(index=0, name="shard-000000", kind="files", content="", offset=0, count=3, expected=3,
                   generation=0)
    assert claims.try_claim(unit.name)
    committed = []
    committer = Committer(tmp_path, get_format("npy"), {"patch": FeatureLayout(4)}, "float32", None, claims,
                          SidecarStamp("test", "0/1"), on_commit=committed.append).start()
    committer.begin(unit)
    pipeline = DevicePipeline(FakeEncoder(), ("patch",), "none", "float32", depth=2)
    committer.put(pipeline.submit(Batch(0, [item("x", 2, 1), item("y", 1, 2)])))
    committer.put(pipeline.submit(Batch(0, [item("z", 3, 3)])))
    committer.put(pipeline.end(0, UnitInfo()))
    assert not committed  # both batches are still in the device stage: no commit yet
    committer.put(pipeline.drain())
    stats = committer.finish()
    claims.stop()
    assert stats.shards_written == 1 and stats.ok == 3
    (sidecar,) = committed
    rows = {r.key: r.row for r in sidecar.records}  # a batch is encoded sorted by grid: y (1 patch) before x (2)
    assert rows == {"y": 0, "x": 1, "z": 2}


def pieces(key: str, steps: list[int], values: list[int], per_step: int = 2) -> list[Item]:
    """A video cut in time: one item per piece (``steps`` temporal steps each), the last one with the record."""
    from vitok.inputs.video_preprocess import PreparedVideo, VideoPiece

    grid, items, first = (sum(steps), 1, per_step), [], 0
    for part, (count, value) in enumerate(zip(steps, values)):
        last = part == len(steps) - 1
        image = PreparedVideo(torch.full((count * per_step, 1, 1, 1), value, dtype=torch.uint8), (count, 1, per_step),
                              (1, 1), piece=VideoPiece(first, grid, last))
        record = ImageRecord(key, "ok", key)
        record.grid, record.content_id = list(grid), f"{key}-pixels" if last else None
        items.append(Item(record, image, part=part, last=last))
        first += count
    return items


def test_a_videos_pieces_come_out_as_one_batch_and_a_piece_out_of_memory_skips_the_video_once():
    class OOMOnValue(FakeEncoder):  # a piece whose patches hold 9 runs out of memory
        def encode(self, images, features, token_order, chunk_rows=None):
            if int(images[0].patches.flatten()[0]) == 9:
                raise torch.OutOfMemoryError("simulated")
            return super().encode(images, features, token_order, chunk_rows)

    pipeline = DevicePipeline(OOMOnValue(), ("patch",), "none", "float32", depth=2)
    events = []
    for piece in pieces("v", [2, 2, 1], [1, 2, 3]):
        events += pipeline.submit(Batch(0, [piece]))
    for piece in pieces("oom", [2, 2, 1], [4, 9, 5]):  # its second piece: out of memory
        events += pipeline.submit(Batch(0, [piece]))
    for piece in pieces("gone", [2, 2], [6, 7])[:1]:  # its decoding stopped after one piece
        events += pipeline.submit(Batch(0, [piece]))
    pipeline.abandon(0, "gone")
    events += pipeline.end(0, UnitInfo()) + pipeline.drain()
    batches = [e for e in events if isinstance(e, EncodedBatch)]
    assert [r.key for b in batches for r in b.records] == ["v"] and batches[0].rows == {"patch": [10]}
    np.testing.assert_array_equal(rows_by_key(batches[:1])["v"][:, 0], [1] * 4 + [2] * 4 + [3] * 2)
    skipped = [r for b in batches for r in b.skipped]
    assert [r.key for r in skipped] == ["oom"] and skipped[0].content_id == "oom-pixels"  # the complete record
    assert "out of memory encoding a piece of 4 patches" in skipped[0].reason
    assert isinstance(events[-1], UnitEnd) and not pipeline._pieces
