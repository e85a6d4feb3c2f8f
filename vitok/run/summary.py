"""What a run reports: progress while it goes, and its summary at the end (``vitok extract --json`` prints it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ProgressEvent:
    images_done: int
    images_total: int | None  # None while archives of unknown size remain
    patches_done: int  # input patches sent to the encoder
    skipped: int  # inputs not encoded: skipped (bad image) or failed (unreadable, retried later)
    elapsed: float
    shards_done: int = 0
    shards_total: int = 0
    media: str = "images"  # what the counts count: "images" or "videos" (storage.records.media_noun)


@dataclass
class ExtractSummary:
    out: str
    part: str
    images_planned: int | None  # in this process's part; None when archives of unknown size were planned
    ok: int
    skipped: int
    failed: int  # inputs that could not be read (retried by the next run once readable)
    already_done: int  # images in shards a previous run completed
    shards_written: int
    shards_already_done: int
    shards_elsewhere: int  # claimed by another running process
    shards_other_parts: int  # not done, belonging to other parts
    seconds: float
    images_per_second: float
    patches: int  # input patches this run encoded (merged tokens are patches / merge_size**2)
    output_bytes: int
    data_wait_seconds: float  # the loop waited for decoded images
    encode_seconds: float  # launching batches and finishing them (device waits included)
    device_wait_seconds: float  # of which: waiting for the device (the device was the bottleneck)
    images_encoded: int = 0  # images this run sent to the encoder
    batches_encoded: int = 0  # encoder batches this run ran
    duplicates: int = 0  # not encoded: the same pixels were encoded earlier in this unit or in a committed shard
    reused: int = 0  # not encoded: tokens taken from a --reuse store
    carried: int = 0  # not read: unchanged images of a shard --update replaced, moved into its new shard
    nonfinite: int = 0  # of ok: images whose tokens hold NaN/Inf values (exports leave them out)
    skipped_reasons: dict[str, str] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # start-up, seconds (vitok.run.run_stats)
    stages: dict[str, Any] = field(default_factory=dict)  # steady-state rates per stage (vitok.run.run_stats)
    bottleneck: str = ""  # what limited the run, in words (the run's last line)
    media: str = "images"  # what ok/skipped/failed and the rates count: "images" or "videos"

    @property
    def nothing_usable(self) -> bool:
        """No input this run attempted gave usable tokens: every one was skipped, failed, or holds NaN/Inf values
        (almost always a wrong path, setting or checkpoint). The run then exits 1."""
        return self.ok == self.nonfinite and self.ok + self.skipped + self.failed > 0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "skipped_reasons"}
