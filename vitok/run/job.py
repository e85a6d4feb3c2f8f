"""What a run will do, decided before anything is written: options, model, inputs, plan, store, part.

Everything cheap is checked first (options, the model's config, the sources, the output folder, the stored
settings), the model's weights are loaded only when there is work to do, and nothing is written until the run can
start. A finished store is resumed without loading the model or writing a byte (read-only mounts included).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..encoder.checkpoint import ModelSource, prefetch_weights, resolve_model
from ..encoder.features import check_features, default_features
from ..errors import (
    InputsChangedError,
    SettingsMismatchError,
    StoreAccessError,
    StoreError,
    StoreUnavailableError,
    UsageError,
)
from ..inputs.preprocess_config import PreprocessConfig
from ..inputs.readers import ReaderOptions
from ..inputs.sources import FileListing, Listing, kind_of, list_inputs, listing_kind
from ..inputs.video_config import VideoConfig
from ..storage import META_FILE, RunHeader, iter_sidecars, read_header
from ..storage.layout import STORE_ENTRIES
from ..storage.plan import Plan, PlanDiff, diff, listing_digest, load_plan
from ..storage.plan.binding import Bindings
from ..storage.plan.changes import changed_inputs, half_current_units
from ..storage.plan.retries import base_and_attempt, committed_units, retry_units
from ..storage.records import media_noun
from ..storage.roots import StoreRoot, store_root
from ..storage.shards import check_shard, committed, in_parallel, list_shards, read_sidecar
from .options import ExtractOptions
from .parallel import Part, detect_part
from .settings_schema import check_settings, feature_layouts, options_from_settings, video_limits_from_settings

logger = logging.getLogger(__name__)


@dataclass
class Job:
    out: StoreRoot  # where the store lives (a folder, a bucket: ``storage.roots``)
    options: ExtractOptions
    part: Part
    source: ModelSource
    preprocess: PreprocessConfig
    features: tuple[str, ...]
    reader_options: ReaderOptions
    listing: Listing | None  # None: resumed from the stored plan without listing the sources
    sources: list[str]
    plan: Plan | None  # the stored plan, if any
    plan_diff: PlanDiff | None  # what --update adds
    header: RunHeader | None  # the stored header, if any
    device: Any = None  # torch.device
    dtype: Any = None  # torch.dtype
    listing_digest: str | None = None  # of the listing, once computed
    torch_import_seconds: float = 0.0  # spent importing torch while preparing (a start-up phase of its own)
    files_from: str | None = None  # the --files-from list, absolute ("-": stdin), recorded in the plan
    list_cwd: str | None = None  # the directory its relative lines are read against, recorded with it
    video: VideoConfig | None = None  # a store of videos: how they are sampled and preprocessed

    @property
    def media(self) -> str:
        """What this job's inputs are called in its messages: "images" or "videos"."""
        return media_noun(self.video)

    def preprocessor(self, token_budget: int | None = None, cut_in_time: bool = True):
        """What turns this job's inputs into patches in the decode workers: images or videos (one store holds one);
        ``token_budget``: the encoder's, whose step groups a long video's pieces keep (``--video-chunk-patches``);
        ``cut_in_time`` False: every video whole, for an engine whose encoders take no pieces (``--engine ray``)."""
        if self.video is not None:
            from ..inputs.video_preprocess import VideoPreprocessor

            chunk = max(self.options.video_chunk_patches, token_budget or 0)  # at least one encoder batch
            return VideoPreprocessor(self.video, chunk if cut_in_time else None, token_budget)
        from ..inputs.preprocess import Preprocessor

        return Preprocessor(self.preprocess)


    @classmethod
    def for_stream(cls, out: StoreRoot, options: ExtractOptions, source: ModelSource, preprocess: PreprocessConfig,
                   features: tuple[str, ...], device: Any, dtype: Any) -> Job:
        """A job whose inputs come as a stream (``integrations.ray.write_store``): no listing, plan or stored
        header, one part."""
        return cls(out, options, Part(0, 1, None, "single"), source, preprocess, features, ReaderOptions(),
                   listing=None, sources=[], plan=None, plan_diff=None, header=None, device=device, dtype=dtype)

    @property
    def layouts(self):
        return feature_layouts(self.source.encoder, self.features)


def check_out_folder(out: Path | StoreRoot, overwrite: bool = False) -> RunHeader | None:
    """The stored header, None for a new or empty folder; refuse a file or a folder that is not a store. A damaged
    header is no obstacle to ``overwrite`` (its repair hint says to use it)."""
    out = store_root(out)
    local = out.local_path()
    if local is not None:
        if local.exists() and not local.is_dir():
            raise UsageError(f"-o {out} exists and is not a folder")
        if not local.is_dir():
            above = next((p for p in Path(os.path.abspath(local)).parents if p.exists()), None)
            if above is not None and not above.is_dir():  # refused before the model loads, not at the first write
                raise UsageError(f"-o {out} cannot be created: {above} is a file, not a folder")
            return None
    entries = out.list()
    if any(e.name == META_FILE for e in entries):
        try:
            return read_header(out)
        except StoreError:
            if overwrite:
                return None
            raise
    foreign = [e.name for e in entries if not e.name.startswith(".") and e.name not in STORE_ENTRIES]
    if foreign:
        raise UsageError(f"-o {out} is a non-empty folder that is not a vitok store (it holds {foreign[0]}); choose "
                         "an empty or new folder")
    return None


def check_decode(decode: str, device) -> None:
    if decode == "gpu" and device.type != "cuda":
        raise UsageError(f"--decode gpu needs a CUDA device; this run's device is {device} (leave --decode exact)")


def preprocess_for(source: ModelSource, options: ExtractOptions) -> PreprocessConfig:
    """The model's preprocessing with the options' overrides."""
    preprocess = source.preprocess.replace(
        min_pixels=options.min_pixels, max_pixels=options.max_pixels, backend=options.backend,
        max_image_pixels=options.max_image_pixels, fast_decode=options.fast_decode,
        allow_truncated=options.allow_truncated, decode=options.decode,
    )
    if (options.min_pixels or options.max_pixels) and preprocess.min_pixels > preprocess.max_pixels:
        # (a checkpoint's own preprocessor_config.json may say so: transformers' smart_resize tries max first)
        raise UsageError(f"--min-pixels {preprocess.min_pixels} is larger than --max-pixels {preprocess.max_pixels}")
    if options.image_size:
        if options.image_size**2 > preprocess.max_pixels:
            raise UsageError(f"--image-size {options.image_size} gives {options.image_size**2} pixels, more than "
                             f"--max-pixels {preprocess.max_pixels}; raise --max-pixels or choose a smaller size")
        preprocess = preprocess.replace(mode="fixed", image_size=options.image_size)
    return preprocess


VIDEO_ONLY = ("pool_steps", "fps", "num_frames", "min_frames", "max_frames", "video_min_pixels", "video_max_pixels",
              "cap_pixels_per_frame", "max_video_patches", "max_video_frames", "max_video_seconds")
IMAGE_ONLY = ("min_pixels", "max_pixels", "image_size", "backend", "fast_decode", "allow_truncated")


def video_for(source: ModelSource, options: ExtractOptions) -> VideoConfig:
    """The model's video processor with the options' overrides (the frame-level limits included)."""
    video = source.video()
    pixels = video.pixels.replace(min_pixels=options.video_min_pixels, max_pixels=options.video_max_pixels,
                                  max_image_pixels=options.max_image_pixels)
    if pixels.min_pixels > pixels.max_pixels and (options.video_min_pixels or options.video_max_pixels):
        raise UsageError(f"--video-min-pixels {pixels.min_pixels} is larger than --video-max-pixels "
                         f"{pixels.max_pixels}")
    return video.replace(pixels=pixels, fps=options.fps, num_frames=options.num_frames, min_frames=options.min_frames,
                         max_frames=options.max_frames, cap_pixels_per_frame=options.cap_pixels_per_frame or None,
                         decoder=options.video_decoder, max_video_patches=options.max_video_patches,
                         max_video_frames=options.max_video_frames, max_video_seconds=options.max_video_seconds)


def check_media(options: ExtractOptions, video: bool) -> None:
    """Options of the other medium are refused (they would be recorded and do nothing)."""
    wrong = [name for name in (IMAGE_ONLY if video else VIDEO_ONLY)
             if getattr(options, name) not in (None, False) and (options.given is None or name in options.given)]
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        raise UsageError(f"{flag} applies to {'images' if video else 'videos'}; these inputs are "
                         f"{'videos' if video else 'images'}" + (" (their pixel budget: --video-min-pixels, "
                                                                 "--video-max-pixels)" if video else ""))


def prepare(sources: list[str], out: Path | StoreRoot, options: ExtractOptions, stdin=None) -> Job:
    """Validate everything cheap and decide what to do; writes nothing."""
    out = store_root(out, "-o", options.storage_options)
    header = check_out_folder(out, options.overwrite)
    if header is not None and not options.overwrite:  # a resume: options not given are the store's
        options = options.from_store({**video_limits_from_settings(header.settings),
                                      **(header.options or options_from_settings(header.settings))})
    plan = None if options.overwrite else load_plan(out)
    if plan is not None and header is None:  # planned (vitok plan), not extracted yet: options not given are the plan's
        options = options.from_store(plan.recorded_options())
    part = detect_part(options.part, options.num_parts)
    source = resolve_model(options.model)
    prefetch_weights(source)  # the checkpoint's bytes come off the disk while torch imports and inputs are listed
    features = check_features(source.encoder, options.features or default_features(source.encoder))
    preprocess = preprocess_for(source, options)
    reader_options = ReaderOptions(options.meta_fields, options.image_column, options.key_column)
    list_cwd = os.getcwd()
    if options.update and not sources and not options.files_from and plan is not None:
        sources, options = recorded_sources(out, plan, options)
        list_cwd = plan.latest.list_cwd or list_cwd  # relative list lines mean what they meant when planned
    listing = None
    if sources or options.files_from:
        local = out.local_path()
        listing = list_inputs(sources, options.files_from, stdin, options.input_format, cwd=list_cwd,
                              out=os.path.abspath(local) if local is not None else None)
        report_listing(listing)
    elif plan is None:
        raise UsageError("give at least one source folder or file, '-' for stdin, or --files-from (or -o a store "
                         "that already holds a plan, to resume it)")
    if listing is not None and listing.media == "video" and options.input_format == "auto":
        options = options.replace(input_format="video")  # recorded: a resume lists videos again
    video = None
    if options.input_format == "video":
        reader_options.media = "video"  # (decided by the listing when the format was auto)
        check_media(options, video=True)
        if options.decode == "gpu":  # nvJPEG takes JPEGs; a video is decoded exactly, as an image nvJPEG refuses
            logger.warning("--decode gpu applies to JPEG images only: videos are decoded on the CPU, exactly, by "
                           "--video-decoder %s (as with --decode exact; the store records exact)",
                           options.video_decoder)
            options = options.replace(decode="exact")
        video = video_for(source, options)
        preprocess = video.pixels  # the device normalises a video's patches with its processor's settings
    else:
        check_media(options, video=False)
    started = time.perf_counter()
    from ..encoder.inference import resolve_device, resolve_dtype  # torch: only once the cheap checks passed

    if video is not None:  # the decoder loads here (torchcodec: FFmpeg's libraries, and torch's compiler stack)
        from ..inputs.video_decode import check_decoder

        check_decoder(video.decoder)

    torch_seconds = time.perf_counter() - started
    from .parallel import device_for

    device = resolve_device(device_for(part, options.device))
    check_decode(options.decode, device)
    job = Job(out, options, part, source, preprocess, features, reader_options, listing,
              [_absolute(s) for s in sources], plan, None, None if options.overwrite else header,
              device, resolve_dtype(options.dtype, device), torch_import_seconds=torch_seconds,
              files_from=_absolute(options.files_from) if options.files_from else None, list_cwd=list_cwd,
              video=video)
    if plan is not None and listing is not None:
        job.plan_diff = _compare(job)
    if listing is not None and (plan is None or job.plan_diff is not None):
        check_listing(listing, job.plan_diff, reader_options)
    if plan is not None and plan.kind == "files" and plan.shard_size != options.shard_size:
        raise SettingsMismatchError(f"{out} is planned in shards of {plan.shard_size} images, not "
                                    f"{options.shard_size}; pass --shard-size {plan.shard_size} to resume")
    if job.header is not None:
        check_settings(job, weights=None)
    return job


def recorded_sources(out: StoreRoot, plan: Plan, options: ExtractOptions) -> tuple[list[str], ExtractOptions]:
    """A bare ``--update``: the sources (and --files-from list) the plan was last listed from, to list them again."""
    sources, files_from = plan.sources, plan.latest.files_from
    if "-" in sources or files_from == "-":
        raise UsageError(f"{out} was planned from a list read on stdin, which cannot be read again: give the list "
                         f"again with --update (... | vitok extract - -o {out} --update)")
    if not sources and not files_from:
        raise UsageError(f"the plan of {out} records no sources to list again: give them with --update")
    logger.info("--update: listing the plan's sources again: %s", ", ".join([*sources, *filter(None, [files_from])]))
    if files_from:
        options = options.replace(files_from=files_from)
    return list(sources), options


def report_listing(listing: Listing) -> None:
    """Say what the listing left out: files of other kinds, archives among loose images, folders not listed."""
    beside = listing.beside
    if beside:
        kinds = sorted({kind_of(p) for p in beside})
        what = "video(s)" if kinds == ["video"] else "archive(s)" if "video" not in kinds else "archive(s) or video(s)"
        logger.warning("%d %s beside the loose images were not read (%s%s): one store holds one kind of input; "
                       "extract them into another store: vitok extract %s --input-format %s -o OTHER",
                       len(beside), what, beside[0], ", ..." if len(beside) > 1 else "", os.path.dirname(beside[0]),
                       "|".join(kinds))
    others = listing.ignored - len(beside)
    if others > 0:
        media = getattr(listing, "media", "image")  # a folder read as videos ignores its images
        logger.info("ignored %d file(s) that are not %ss (by extension%s)", others, media,
                    " or content" if media == "video" else "")
    for path, reason in listing.errors[:20]:
        logger.warning("could not list %s: %s (recorded; the next run lists it again)", path, reason)


def check_listing(listing: Listing, changes: PlanDiff | None, reader_options: ReaderOptions) -> None:
    """What planning would refuse, found before anything is written: two inputs with one key, parquet files without
    the columns asked for (only the inputs this run plans)."""
    if getattr(listing, "kind", None) != "parquet":
        columns = {"--image-column": reader_options.image_column, "--key-column": reader_options.key_column}
        for flag, value in columns.items():
            if value is not None:
                logger.warning("%s %s applies to parquet inputs only; these inputs have no columns, so it is ignored",
                               flag, value)
    if isinstance(listing, FileListing):
        if len(listing.roots) > 1:
            for _ in listing.items():  # raises on two different files with one key
                pass
        return
    if listing.kind == "parquet":
        from ..inputs.readers.parquet import check_columns

        paths = listing.paths if changes is None else [*changes.added, *changes.changed]
        check_columns(paths, reader_options.image_column, reader_options.key_column)


def check_committed(out: Path | StoreRoot, fingerprint: str) -> None:
    """A store whose header is gone: refuse settings other than those of its committed shards before a new header
    is written (a refused run writes nothing)."""
    out = store_root(out)
    for shard in committed(out):
        found = read_sidecar(out, shard).fingerprint
        if found not in (None, fingerprint):
            raise SettingsMismatchError(
                f"shard {shard} in {out} was written with other settings (fingerprint {found}, this run "
                f"{fingerprint}), and the store's header is gone; use the same settings, another -o, or --overwrite")


def _absolute(source: str) -> str:
    return source if source == "-" or "://" in source else os.path.abspath(source)


def _compare(job: Job) -> PlanDiff | None:
    """None when the sources list exactly what the plan holds; the difference for --update; else refuse."""
    plan, listing = job.plan, job.listing
    if listing_kind(listing) != plan.kind:
        raise InputsChangedError(f"{job.out} holds a plan of {plan.kind} inputs; these sources are "
                                 f"{listing_kind(listing)} inputs: use another -o, or --overwrite")
    job.listing_digest = listing_digest(listing)
    if job.listing_digest == plan.latest.listing_digest:
        changes = PlanDiff([], [])
    else:
        changes = diff(plan, listing)
    gone = set(changes.removed)
    found = [c for c in changed_inputs(job.out, plan, job.options.detect_changes) if c.input not in gone]
    changes.changed = [c.input for c in found]
    changes.reasons = {c.input: c.reason for c in found[:3]}
    if changes.empty:
        return None
    changes.half_current = half_current_units(job.out, plan)
    if _only_unlisted_before(plan, listing, changes):
        logger.info("inputs of folders that could not be listed before: planned now (%s)", changes.describe())
        return changes
    if not job.options.update:
        raise InputsChangedError(
            f"the sources changed since {job.out} was planned ({changes.describe()}); rerun with --update to extract "
            "the new and changed inputs into new shards (finished shards stay), or --overwrite to start over")
    return changes


def _only_unlisted_before(plan: Plan, listing: Listing, changes: PlanDiff) -> bool:
    """The only change is inputs added under folders the last listing could not read: a retry, not an update."""
    folders = [path.rstrip("/") + "/" for path, _ in plan.latest.listing_errors or []]
    if not folders or changes.removed or changes.changed or not changes.added:
        return False
    if isinstance(listing, FileListing):
        paths = (listing.roots[root].path(key) for key, root in changes.added)
    else:
        paths = iter(changes.added)
    return all(any(path.startswith(folder) for folder in folders) for path in paths)


# ---- which units are left --------------------------------------------------------------------------------------


@dataclass
class Work:
    mine: list  # UnitRefs of this part (plan units + retries)
    todo: list
    done_images: int = 0
    done_shards: int = 0
    other_parts_pending: int = 0
    damaged: set[str] = field(default_factory=set)  # committed shards whose data does not check out: redone
    bindings: Bindings | None = None  # digests of the plan's units (what each shard's sidecar records)


def remaining_work(job: Job, plan: Plan, fingerprint: str | None) -> Work:
    """This part's units not committed yet (a committed shard whose data does not check out is redone), plus
    retries of inputs that could not be read before and can be now."""
    done: dict[str, Any] = {}
    damaged: set[str] = set()
    bindings = Bindings(plan.units)
    names_mine = {u.name for u in plan.units if job.part.owns(u.index)}
    listed = list_shards(job.out)  # one listing: every committed shard's sizes (an object store: one request per 1,000)
    shards = committed(job.out, listed)

    def examine(name: str):
        """The shard's sidecar (or why it cannot be read) and what is wrong with its data (sizes, keys, rows)."""
        try:
            sidecar = read_sidecar(job.out, name)
        except (StoreAccessError, StoreUnavailableError):
            raise  # the store cannot be read: not a damaged shard
        except (FileNotFoundError, StoreError) as exc:
            return exc, None
        if fingerprint is not None and sidecar.fingerprint not in (None, fingerprint):
            return sidecar, None  # refused below, in order
        return sidecar, check_shard(job.out, sidecar, listed=listed)

    ours = [name for name in shards if base_and_attempt(name, plan.legacy_names)[0] in names_mine]
    for name, (sidecar, problems) in zip(ours, in_parallel(examine, ours)):  # (an object store: one GET each)
        if isinstance(sidecar, FileNotFoundError):  # removed since it was listed
            continue
        if isinstance(sidecar, StoreError):  # a damaged sidecar vouches for nothing: the shard is redone
            logger.warning("shard %s will be redone: %s", name, sidecar)
            damaged.add(name)
            continue
        if fingerprint is not None and sidecar.fingerprint not in (None, fingerprint):
            raise SettingsMismatchError(
                f"shard {name} in {job.out} was written with other settings (fingerprint {sidecar.fingerprint}, "
                f"this run {fingerprint}): the store mixes runs; use another -o, or --overwrite to start over")
        unbound = None if problems else bindings.problem(sidecar, base_and_attempt(name, plan.legacy_names)[0])
        if problems or unbound:  # damaged, or made from other inputs than the plan's unit holds now
            logger.warning("shard %s will be redone: %s", name, problems[0] if problems else unbound)
            damaged.add(name)
            continue
        done[name] = sidecar
    superseded = plan.superseded()  # replaced by a later generation (--update), or removed: never read
    mine = [u for u in plan.units if job.part.owns(u.index) and u.name not in superseded]
    done_units = {base_and_attempt(name, plan.legacy_names)[0] for name in done}  # an archive's latest attempt
    # is its only committed shard (a retry replaces the earlier ones whole)
    todo = [u for u in mine if u.name not in done_units]
    retries = retry_units(plan, done)
    work = Work(mine, todo + retries, damaged=damaged, bindings=bindings)
    work.done_shards = sum(u.name in done_units for u in mine)
    work.done_images = sum(s.count("ok") + s.count("skipped") for s in done.values())
    units_done = committed_units(job.out, plan, listed)
    work.other_parts_pending = sum(1 for u in plan.units if not job.part.owns(u.index) and u.name not in units_done
                                   and u.name not in superseded)
    return work


__all__ = ["Job", "Work", "iter_sidecars", "prepare", "remaining_work"]
