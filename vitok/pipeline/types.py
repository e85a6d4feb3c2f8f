"""The data that moves between the run's stages, in a module without heavy imports (torch is imported only by the
methods that handle tensors), so the writer side, the store and the CLI can name these types without torch.

    Item          one input after the decode stage: its record, and its pixels when ok (or one piece of a long
                  video's: ``part``)
    Chunk         what a decode worker sends: consecutive items of one unit, their patches in one tensor, or one
                  piece of a video cut in time (``part``, ``more``)
    Batch         items of one unit encoded together (the batcher's output)
    EncodedBatch  a finished batch on the host: records in row order and packed arrays in the stored dtype
    UnitEnd       a unit has no more inputs; the device stage emits it after the unit's last batch
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..storage.records import ImageRecord, UnitInfo

if TYPE_CHECKING:
    import torch

    from ..inputs.preprocess import PreparedImage


@dataclass
class Item:
    """One input after the decode stage: its record (status ok/skipped/failed), and its pixels when ok."""

    record: ImageRecord
    image: PreparedImage | None = None
    # A piece of a video cut in time (``inputs.video_preprocess.VideoPiece``): its position among the video's pieces,
    # which come in order; the last one's record is complete (ok, or skipped with no image: decoding stopped and the
    # pieces before it are dropped). None: a whole input.
    part: int | None = None
    last: bool = True


@dataclass
class Chunk:
    unit: int  # the unit's index in the plan
    seq: int  # position of this chunk in its unit
    items: list[Item]
    end: bool = False  # the unit's last chunk
    part: int = 0  # a piece of a video cut in time: which (its one item's ``part``); chunks of one seq come in order
    more: bool = False  # more pieces of this seq follow
    unit_error: str | None = None  # why the rest of the unit could not be read
    unit_failed: bool = False  # ... because it was unavailable (retried later) rather than damaged
    rows: list[int] = field(default_factory=list)  # patch rows of each decoded image, in order
    patches: torch.Tensor | None = None  # all decoded images' patches, concatenated
    busy: float = 0.0  # seconds the worker spent reading and decoding this chunk (run_stats)

    def pack(self) -> Chunk:
        images = [item.image for item in self.items if item.image is not None]
        present = [image.patches for image in images if image.patches is not None]
        if present:
            import torch

            self.patches = torch.cat(present) if len(present) > 1 else present[0]  # (a video's piece: no copy)
            self.rows = [len(p) for p in present]
            for image in images:
                image.patches = None  # sent once, inside ``patches``
        return self

    def pin_memory(self) -> Chunk:  # called by the DataLoader's pinning thread (CUDA)
        if self.patches is not None:
            self.patches = self.patches.pin_memory()
        return self

    def unpack(self) -> list[Item]:
        views = iter(self.patches.split(self.rows) if self.patches is not None else ())
        for item in self.items:
            if item.image is not None and item.image.jpeg is None:  # (a GPU-decoded JPEG has no patches yet)
                item.image.patches = next(views)
        return self.items


@dataclass
class Batch:
    unit: int
    items: list[Item]
    order: list[int] | None = None  # after sorting by grid: positions of the items in input order


@dataclass
class EncodedBatch:
    """A finished batch: the ok images' records in row order and their packed arrays (stored dtype, host)."""

    unit: int
    records: list[ImageRecord]
    arrays: dict[str, np.ndarray]  # feature -> (rows, dim) or (levels, rows, dim)
    rows: dict[str, list[int]]  # feature -> rows of each image
    skipped: list[ImageRecord] = field(default_factory=list)  # ran out of device memory on their own
    order: list[int] | None = None  # the images in input order (they are encoded sorted by grid)


@dataclass
class UnitEnd:
    """The end of a unit, queued behind its batches: the device stage hands it on only once every batch launched
    before it has finished, so whoever receives it in order may commit the unit (nobody counts batches in flight)."""

    unit: int
    info: UnitInfo  # what the sidecar says about the unit (where it came from, why it stopped early)


@dataclass
class RunCounts:
    """What the run loop did with the images it was handed, beside what the committer wrote."""

    images_encoded: int = 0  # sent to the encoder
    batches_encoded: int = 0  # encoder batches run
    duplicates: int = 0  # not encoded: the same pixels were encoded earlier in this unit or in a committed shard
    reused: int = 0  # not encoded: tokens taken from a --reuse store
    carried: int = 0  # not read: unchanged images of a shard --update replaced, moved into its new shard
