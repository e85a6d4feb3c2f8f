"""The store format, owned here: what is in an output folder, how a shard is committed, how it is checked.

    OUT/README.txt              this layout, in words, for someone who finds the folder without vitok
    OUT/vitok.json              run header (``RunHeader``): vitok version, model, weights hash, resolved settings
                                and their fingerprint, library versions (decoders included)
    OUT/plan/NNNN.json          the plan: what goes into which shard (``storage.plan``), one generation per file:
                                0000 from the first listing, one more per --update (and its content files)
    OUT/shards/<shard>.h5       token data of one shard (or <shard>/ holding .npy files, or <shard>.tar)
    OUT/shards/<shard>.json     the shard's sidecar (``Sidecar``): per-image records, file sizes and checksums,
                                the settings fingerprint, the digest of its plan unit's inputs (``binding.py``). Its
                                existence is the commit (``vitok.storage.shards``).
    OUT/shards/.superseded/     shards a later plan generation or attempt replaced whole, moved out of where plain
                                readers look before what replaces them is published (``shards.retire``)
    OUT/.claims/                which running process holds which shard (``claims.py``)
    OUT/.index/                 key and content index, a cache of the sidecars (``index.py``; rebuilt on change)
    OUT/stats/<run>.json        what each run measured: start-up phases, stage rates, the verdict

Formats are classes behind ``format.ShardFormat`` (HDF5, NPY, webdataset tars); a new one is one class registered
with ``register_format``. ``store.py`` reads a store back (``vitok.open``), ``verify.py`` checks it; neither imports
torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import NotAStoreError, StoreError
from ..version import __version__
from .files import atomic_write_text, create_exclusive
from .format import FeatureLayout, ShardFormat
from .layout import META_FILE, README_FILE, SHARDS_DIR
from .records import SCHEMA_VERSION, ImageRecord, RunHeader, Sidecar, dumps
from .roots import StoreRoot, store_root
from .shards import FORMATS, check_shard, commit, get_format, iter_sidecars, register_format

__all__ = [
    "FORMATS", "META_FILE", "README_FILE", "SCHEMA_VERSION", "SHARDS_DIR", "FeatureLayout", "ImageRecord",
    "RunHeader", "ShardFormat", "Sidecar", "SidecarStamp", "StoreRoot", "atomic_write_text", "check_shard", "commit",
    "create_exclusive", "get_format", "iter_sidecars", "new_store", "read_header", "register_format", "store_readme",
    "store_root", "write_readme",
]


def read_header(out: str | Path | StoreRoot) -> RunHeader:
    """The run header of the store in ``out``; StoreError when there is none or it is damaged."""
    root = store_root(out)
    path = root.show(META_FILE)
    local = root.local_path()
    if local is not None and not local.exists():
        raise NotAStoreError(f"{root} does not exist (give a folder written by vitok extract)")
    if local is not None and not local.is_dir():
        raise NotAStoreError(f"{root} is a file, not a vitok store (a folder holding {META_FILE})")
    try:
        data = root.read(META_FILE)
    except FileNotFoundError:
        raise NotAStoreError(f"{root} is not a vitok store (no {META_FILE})") from None
    try:
        return RunHeader.from_json(json.loads(data), path)
    except (ValueError, StoreError) as exc:
        damage = str(exc) if isinstance(exc, StoreError) else f"{path} is damaged ({exc})"
        raise StoreError(f"{damage}; the shards and the plan are intact: restore {META_FILE} from a copy, or delete "
                         f"it and rerun the extract that made the store with the same options (its shards are checked "
                         f"against them), or rerun with --overwrite to start over") from None


@dataclass(frozen=True)
class SidecarStamp:
    """What every sidecar a process commits says of who wrote it: the store's settings fingerprint, the process's
    part of the work and vitok's version."""

    fingerprint: str
    part: str
    vitok_version: str = __version__

    def fields(self) -> dict[str, str]:
        return asdict(self)


def new_store(out: str | Path | StoreRoot, header: RunHeader) -> tuple[RunHeader, bool]:
    """Start the store in ``out`` (which exists) with ``header``: created exclusively, so that of many processes
    starting one store at once exactly one writes it, and the README beside it (written again when this version
    describes the store otherwise). Returns the header in force and
    whether this call created it (if not, the caller compares it with its own)."""
    root = store_root(out)
    created = root.create(META_FILE, dumps(header.to_json()).encode()) is not None
    if not created:
        header = read_header(root)
    try:
        current = root.read(README_FILE).decode("utf-8", "replace")
    except OSError:
        current = None
    if current != store_readme(header):  # new, or written by a vitok that promised plain readers otherwise
        write_readme(root, header)
    return header, created


def store_readme(header: RunHeader) -> str:
    """The text of OUT/README.txt: enough to read the store with h5py or numpy alone."""
    settings = header.settings
    dtype = settings.store_dtype
    bits = "uint16 bit patterns of bfloat16: shift left by 16 into float32" if dtype == "bfloat16" else "IEEE floats"
    lines = [
        f"vitok store (schema {header.schema}), written by vitok {header.vitok_version} on {header.created}.",
        f"Model: {settings.model.name} ({settings.model.family}), weights {settings.model.weights}.",
        f"Features: {', '.join(settings.features)}; pool: {settings.pool}; stored as {dtype} ({bits}); "
        f"format: {settings.format}.",
        "",
        "Layout:",
        "  vitok.json            run header: model, weights hash, resolved settings (JSON)",
        "  plan/NNNN.json        the plan, one generation per file (NNNN.json names its content, one JSON line",
        "                        per input or archive, and its unit index): which inputs go into which shard",
        "  shards/<name>.json    one per finished shard: a record per input (key, source, status ok/skipped/failed,",
        "                        reason, row, grid, original size), file sizes and blake2b checksums, and under",
        "                        unit.inputs a digest of the plan unit it was made from (another plan's: redo it)",
        "  shards/<name>.h5      HDF5 (or <name>/ with .npy files, or <name>.tar for webdataset), holding:",
        "      keys              (n,) the ok images' keys in row order (UTF-8 strings)",
        "      grids             (n, 3) int32 (t, h, w) of each image, in patches",
        "      <feature>         (rows, dim) tokens of all images concatenated; deepstack (K, rows, dim)",
        "      <feature>_offsets (n+1,) int64: image i owns rows offsets[i]:offsets[i+1]",
        "  A shard without its .json sidecar is unfinished: ignore it.",
        "  shards/.superseded/   shards that later runs replaced whole (an input changed, removed or rewritten, then",
        "                        vitok extract --update; an archive read again by a retry). Each is moved here before",
        "                        what replaces it is written, so shards/*.h5 (or shards/*/, shards/*.tar) hold every",
        "                        key of the store exactly once, with its current tokens, and nothing else: read them",
        "                        all and you read the store. Their sidecars stay here, a record of what was there",
        "                        before; their data is deleted once every shard the plan holds is done.",
        "  A tar input NAME.tar has one shard: shards/NAME.<ext>, or shards/NAME~<suffix>.<ext> once vitok read it",
        "  again (~gN: rewritten, then --update; ~rN: a retry). Join an input with its tokens through that one file.",
        "  .index/               a cache of the sidecars for fast key lookups (vitok rebuilds it; safe to delete)",
        "Records also carry source_sha256 (sha256 of the file's bytes) and content_id (sha256 of",
        "'vitok-pixels/1 grid=T,H,W patch=C,P,P\\n' + the uint8 patches the encoder saw, in its row order). An image",
        "whose pixels equal another's has copied_from naming the record its rows were copied from, '<shard>/<key>'",
        "(that shard's sidecar, in shards/ or shards/.superseded/, holds it; its content_id is this record's, whatever",
        "the key holds later). vitok.json's 'identity' holds the vision revision (sha256 of the encoder config and the",
        "weights hash) and the decoders.",
        "",
        "Token order: " + "; ".join(f"{f}: {o}" for f, o in settings.token_order.items()),
        "Read it with vitok:  import vitok; store = vitok.open(this_folder); store[key]",
    ]
    return "\n".join(lines) + "\n"


def write_readme(out: Path | StoreRoot, header: RunHeader) -> None:
    store_root(out).write(README_FILE, store_readme(header).encode())
