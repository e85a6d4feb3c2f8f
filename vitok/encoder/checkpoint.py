"""Find a model by preset name or path and load the vision tower's weights (safetensors only, never pickle).

Accepted ``--model`` values:

- a preset name (``vitok models`` lists them): seeded random weights, unless a real checkpoint is given;
- a Hugging Face checkpoint folder: ``config.json`` with ``vision_config``, and ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``; only the tower's tensors are read, never the language model;
- a single ``.safetensors`` file holding just the tower (architecture from its metadata, a ``config.json``
  beside it, or the released preset whose tensor shapes it matches);
- a Hugging Face repo id (``Qwen/Qwen3-VL-2B-Instruct``): looked up in the local Hugging Face cache, and
  downloaded (only the shards holding the tower) when ``huggingface_hub`` is installed and a network exists.

Tensor names may carry the prefix ``model.visual.`` (Qwen3-VL releases), ``visual.`` (older layouts) or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # resolving a model (config.json, presets) must not import torch: usage errors come first
    import torch

from ..errors import CheckpointError, UsageError
from ..inputs.preprocess_config import PreprocessConfig
from ..inputs.video_config import VideoConfig
from .config import MODEL_TYPES, EncoderConfig, check_preprocess_fits, preprocess_for_tower, video_for_tower
from .presets import registry

logger = logging.getLogger(__name__)

TOWER_PREFIXES = ("model.visual.", "visual.", "")
ANCHOR_KEY = "patch_embed.proj.weight"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_METADATA_KEY = "vitok_encoder_config"


@dataclass
class ModelSource:
    """Where a model comes from, resolved but not yet loaded."""

    name: str  # what the manifest calls it: preset name, folder name or repo id
    encoder: EncoderConfig
    preprocess: PreprocessConfig
    weight_files: list[Path]  # safetensors files that hold the tower ([] = seeded random weights)
    prefix: str = ""  # tensor-name prefix of the tower inside those files
    video_settings: dict | None = None  # the checkpoint's video processor settings as found (None: the released)
    video_where: str = "the released video processor settings"  # where they were found

    @property
    def random_weights(self) -> bool:
        return not self.weight_files

    def video(self) -> VideoConfig:
        """How this model's video processor samples and preprocesses videos (UsageError when it cannot)."""
        return video_for_tower(self.encoder, self.video_settings, self.video_where)


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource`; errors say what was tried and what to do."""
    text = str(spec)
    presets = registry()
    if text in presets:
        preset = presets[text]
        return ModelSource(text, preset.encoder, preset.preprocess, [])
    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_folder(path, path.resolve().name)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: only .safetensors weights are read (vitok never unpickles .bin/.pt/.pth files); "
                "convert it with safetensors first"
            )
        return _resolve_single_file(path)
    if _looks_like_path(text):
        raise UsageError(f"--model {text!r}: {_missing_part(path)}; check the path (a Hugging Face repo id is "
                         "written owner/name)")
    if REPO_ID.match(text) and not path.exists():
        return _resolve_hub(text)
    raise UsageError(
        f"--model {text!r} is neither a preset, an existing folder or .safetensors file, nor a Hugging Face repo id; "
        f"valid presets: {', '.join(presets)}"
    )


def _looks_like_path(text: str) -> bool:
    """A local path, not a repo id: absolute, starting with . or ~, more than one separator, a separator other than
    the repo id's '/', or a first part that exists here (``models/Qwen3-VL`` beside a ``models`` folder)."""
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        return True
    return "/" in text and Path(text.split("/")[0]).expanduser().exists()


def _missing_part(path: Path) -> str:
    """Which part of a path is missing: ``folder /a/b does not exist (/a does)``."""
    path = Path(os.path.abspath(path))
    existing = next((p for p in path.parents if p.exists()), None)
    missing = path if existing is None else path.relative_to(existing).parts[0]
    return f"no such folder or file ({existing / missing} does not exist{f', {existing} does' if existing else ''})"


# ---- folders and files -------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from exc


def _resolve_folder(folder: Path, name: str) -> ModelSource:
    encoder, preprocess = _read_folder_configs(folder, name)
    files, prefix = _tower_files(folder)
    return ModelSource(name, encoder, preprocess, files, prefix, *_video_processor_config(folder))


def _video_processor_config(folder: Path) -> tuple[dict, str]:
    """The video processor's settings as transformers' ``get_video_processor_dict`` finds them: nested under
    ``video_processor`` in ``processor_config.json``, else ``video_preprocessor_config.json``, else the image
    processor's ``preprocessor_config.json`` read as the video processor's; none of them: the class's defaults."""
    nested = folder / "processor_config.json"
    if nested.is_file():
        data = _read_json(nested)
        if isinstance(data, dict) and isinstance(data.get("video_processor"), dict):
            return data["video_processor"], f"{nested} (video_processor)"
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return _read_json(folder / name), str(folder / name)
    return {}, f"{folder} (no video processor settings: the class defaults)"


def _read_folder_configs(folder: Path, name: str) -> tuple[EncoderConfig, PreprocessConfig]:
    """The tower's architecture from config.json, and its preprocessor_config.json when there is one."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json; a checkpoint folder needs config.json and safetensors weights"
        )
    config = _read_json(config_path)
    vision = config.get("vision_config")
    model_type = str(config.get("model_type") or "")
    if vision is None and ("depth" in config or model_type.endswith("_vision")):
        vision = config  # a standalone vision config (a vision model's save_pretrained)
    elif vision is None and model_type in MODEL_TYPES:
        vision = {}  # transformers builds the family's default tower
    if not isinstance(vision, dict):
        raise CheckpointError(f"{config_path}: no vision_config; is this a Qwen vision-language checkpoint?")
    try:
        encoder = EncoderConfig.from_hf_vision_config(vision, name, config.get("model_type"))
    except KeyError as exc:
        raise CheckpointError(f"{config_path}: vision_config lacks {exc.args[0]!r}") from exc
    preprocess = preprocess_for_tower(encoder)
    found = _image_processor_config(folder)
    if found is not None:
        data, where = found
        preprocess = PreprocessConfig.from_hf_preprocessor_config(data, preprocess, where)
        check_preprocess_fits(preprocess, encoder, f"{where} vs {config_path}")
    return encoder, preprocess


def _image_processor_config(folder: Path) -> tuple[dict, str] | None:
    """The image processor's settings as transformers' ``from_pretrained`` finds them: nested under
    ``image_processor`` in ``processor_config.json`` (what a transformers 5 processor's ``save_pretrained`` writes,
    with no ``preprocessor_config.json``) first, else ``preprocessor_config.json``; None when neither holds them."""
    nested = folder / "processor_config.json"
    if nested.is_file():
        data = _read_json(nested)
        settings = data.get("image_processor") if isinstance(data, dict) else None
        if isinstance(settings, dict):
            return settings, f"{nested} (image_processor)"
    legacy = folder / "preprocessor_config.json"
    if legacy.is_file():
        return _read_json(legacy), str(legacy)
    return None


def _tower_files(folder: Path) -> tuple[list[Path], str]:
    """The safetensors files of a folder that hold tower tensors, and the tower's prefix."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = _read_json(index_path).get("weight_map", {})
        prefix = _find_prefix(weight_map)
        if prefix is None:
            raise CheckpointError(f"{index_path}: no vision tower tensors (looked for *{ANCHOR_KEY})")
        names = sorted({file for key, file in weight_map.items() if key.startswith(prefix)})
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
        return [folder / n for n in names], prefix
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(pickles)}: vitok never unpickles weights)" if pickles else ""
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    holders, prefix = [], None
    for file in files:
        with _open_safetensors(file) as handle:
            keys = list(handle.keys())
        found = _find_prefix(keys)
        if found is not None:
            prefix = found if prefix is None else prefix
            holders.append(file)
    if prefix is None:
        raise CheckpointError(f"{folder}: no vision tower tensors in {', '.join(f.name for f in files)}")
    return holders, prefix


@contextlib.contextmanager
def _open_safetensors(path: Path, framework: str = "numpy"):
    """``safe_open`` whose errors (a truncated or damaged file) are one CheckpointError naming the file. Names,
    shapes and metadata need no framework: ``numpy`` keeps torch unimported (about a second) until weights are read."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework=framework)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read it as safetensors ({exc}); the file is truncated or damaged: "
                              "download or copy it again") from None
    with handle:
        try:
            yield handle
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read it as safetensors ({exc}); the file is truncated or "
                                  "damaged: download or copy it again") from None


def _find_prefix(keys: Iterable[str]) -> str | None:
    keys = set(keys)
    for prefix in TOWER_PREFIXES:
        if prefix + ANCHOR_KEY in keys:
            return prefix
    return None


def _resolve_single_file(path: Path) -> ModelSource:
    with _open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
        prefix = _find_prefix(keys)
        if prefix is None:
            raise CheckpointError(f"{path}: no vision tower tensors (looked for *{ANCHOR_KEY})")
        shapes = {k[len(prefix) :]: tuple(handle.get_slice(k).get_shape()) for k in keys if k.startswith(prefix)}
    name = path.stem
    if CONFIG_METADATA_KEY in metadata:
        encoder = EncoderConfig.from_dict({**json.loads(metadata[CONFIG_METADATA_KEY]), "name": name})
        return ModelSource(name, encoder, preprocess_for_tower(encoder), [path], prefix)
    if (path.parent / "config.json").is_file():
        encoder, preprocess = _read_folder_configs(path.parent, name)
        return ModelSource(name, encoder, preprocess, [path], prefix, *_video_processor_config(path.parent))
    for preset in registry().values():
        if _expected_shapes(preset.encoder) == shapes:
            logger.info("%s: tensor shapes match preset %s; using its architecture", path, preset.name)
            return ModelSource(name, replace(preset.encoder, name=name), preset.preprocess, [path], prefix)
    raise CheckpointError(
        f"{path}: cannot tell its architecture: no '{CONFIG_METADATA_KEY}' metadata, no config.json beside it, "
        "and its tensor shapes match no preset; put the checkpoint's config.json next to it"
    )


# ---- Hugging Face hub and cache ----------------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def _resolve_hub(repo_id: str) -> ModelSource:
    snapshot = _cached_snapshot(repo_id)
    if snapshot is not None:
        try:
            source = _resolve_folder(snapshot, repo_id)
        except CheckpointError:
            source = None  # config is cached but some shards are not: fetch them below if we can
        if source is not None:
            return source
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache ({hf_cache_dir()}) and huggingface_hub is not "
            "installed; install it (pip install 'vitok[hub]') to download, or pass a local checkpoint folder"
        ) from None
    try:
        folder = Path(
            huggingface_hub.snapshot_download(
                repo_id, allow_patterns=["config.json", "preprocessor_config.json", "processor_config.json",
                                  "video_preprocessor_config.json", "*.index.json"]
            )
        )
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index)["weight_map"]
            prefix = _find_prefix(weight_map) or "model.visual."
            shards = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
        else:
            shards = ["model.safetensors"]
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=shards))
    except Exception as exc:  # the hub raises many network error types; all mean the same to the user
        raise CheckpointError(
            f"cannot get {repo_id}: not in the local Hugging Face cache ({hf_cache_dir()}) and the download "
            f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); with no network, "
            "download it elsewhere (huggingface-cli download) and pass the folder with --model"
        ) from exc
    return _resolve_folder(folder, repo_id)


# ---- loading -----------------------------------------------------------------------------------------------------


def _expected_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    import torch

    from .model import VisionEncoder

    with torch.device("meta"):
        model = VisionEncoder(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_tower_state_dict(source: ModelSource) -> dict[str, torch.Tensor]:
    """Read exactly the tower's tensors (prefix stripped) from the source's safetensors files."""
    state: dict[str, torch.Tensor] = {}
    for file in source.weight_files:
        with _open_safetensors(file, "pt") as handle:
            for key in handle.keys():
                if key.startswith(source.prefix):
                    state[key[len(source.prefix) :]] = handle.get_tensor(key)
    if source.prefix == "":
        # A bare tower file may sit beside other modules' tensors only under a prefix; keep tower names.
        state = {k: v for k, v in state.items() if not k.startswith(("model.", "lm_head."))}
    return state


def check_state_dict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    """Strict comparison with errors that name each missing, unexpected or mis-shaped key."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        more = " ..." if len(missing) > 8 else ""
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{more}")
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    if misshaped:
        problems.append("wrong shape: " + "; ".join(misshaped[:8]))
    if problems:
        raise CheckpointError(f"{where}: " + " | ".join(problems))


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, bytes): equal hash = equal weights."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():  # the bytes themselves (no copy): hashlib releases the GIL on large buffers
            digest.update(tensor.view(torch.uint8).numpy().data)
    return "blake2b:" + digest.hexdigest()


HASH_CACHE_ENTRIES = 64  # checkpoints remembered per machine


def _hash_cache_key(source: ModelSource) -> str | None:
    """What identifies a checkpoint's tower on this machine without reading it: each weight file's real path, size,
    inode, modification time and change time (which no tool can set back: a file rewritten in place with its old
    time restored, ``cp -p``, still gets a new key), and the prefix (None when a file cannot be seen)."""
    try:
        files = [(os.path.realpath(f), (st := os.stat(f)).st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                  st.st_dev) for f in source.weight_files]
    except OSError:
        return None
    text = json.dumps({"files": files, "prefix": source.prefix, "hash": "blake2b-16"})
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _hash_cache_file() -> Path:
    from ..environment import cache_dir

    return cache_dir() / "weights-hashes.json"


def cached_weights_hash(source: ModelSource) -> str | None:
    """The ``weights_hash`` an earlier load on this machine computed for these exact files (their size, time and
    inode unchanged), so a repeated start-up does not hash gigabytes again (about 1 s per GB); None if unknown."""
    key = _hash_cache_key(source)
    if key is None:
        return None
    try:
        found = json.loads(_hash_cache_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) and found.startswith("blake2b:") else None


def remember_weights_hash(source: ModelSource, digest: str) -> None:
    """Keep ``digest`` for :func:`cached_weights_hash`; a cache that cannot be written only costs the next run time."""
    from ..atomic import AtomicFile

    key = _hash_cache_key(source)
    if key is None:
        return
    path = _hash_cache_file()
    try:
        entries = json.loads(path.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries.pop(key, None)
    entries[key] = digest  # newest last: the oldest are dropped first
    entries = dict(list(entries.items())[-HASH_CACHE_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with AtomicFile(path.parent, path.name, path) as atomic:
            atomic.handle.write(json.dumps(entries, indent=0).encode())
    except OSError as exc:
        logger.debug("cannot keep the weights hash in %s: %s", path, exc)


def save_tower(model: torch.nn.Module, path: str | os.PathLike, config: EncoderConfig) -> None:
    """Write a tower as one safetensors file with its architecture in the metadata (reloadable by path)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = config.to_dict()
    data.pop("name")
    save_file(state, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(data)})



# safetensors' dtype names -> torch's, as ``weights_hash`` writes them (``str(tensor.dtype)``)
SAFETENSORS_DTYPES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
                      "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
                      "U8": "torch.uint8", "BOOL": "torch.bool"}
PREFETCH_GAP = 1 << 20  # bytes between two tensors read through rather than skipped


@dataclass(frozen=True)
class _StoredTensor:
    file: Path
    start: int  # absolute byte offsets of its data in the file
    end: int
    dtype: str  # safetensors' name
    shape: tuple[int, ...]


def _tower_tensors(source: ModelSource) -> dict[str, _StoredTensor]:
    """The tower's tensors (prefix stripped, as ``read_tower_state_dict`` names them) and where their bytes lie, from
    the safetensors headers alone (an 8-byte length, then JSON): neither torch nor the data is needed. Unreadable
    headers are skipped: the load proper names what is wrong with a file."""
    tensors: dict[str, _StoredTensor] = {}
    for file in source.weight_files:
        try:
            with open(file, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length)) if 0 < length < 100_000_000 else {}
            for name, entry in header.items():
                if name == "__metadata__" or not name.startswith(source.prefix):
                    continue
                if source.prefix == "" and name.startswith(("model.", "lm_head.")):
                    continue
                begin, end = (8 + length + int(offset) for offset in entry["data_offsets"])
                tensors[name[len(source.prefix) :]] = _StoredTensor(file, begin, end, str(entry["dtype"]),
                                                                    tuple(entry["shape"]))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
    return tensors


def tower_byte_ranges(source: ModelSource) -> list[tuple[Path, int, int]]:
    """(file, start, end) of the tower's tensor data, file by file, adjacent tensors merged: what a prefetch that
    need not hash reads."""
    return _merged_ranges(_tower_tensors(source).values())


def _merged_ranges(tensors: Iterable[_StoredTensor]) -> list[tuple[Path, int, int]]:
    ranges: list[tuple[Path, int, int]] = []
    for tensor in sorted(tensors, key=lambda t: (str(t.file), t.start)):
        last = ranges[-1] if ranges else None
        if last and last[0] == tensor.file and tensor.start - last[2] <= PREFETCH_GAP:
            ranges[-1] = (tensor.file, last[1], max(tensor.end, last[2]))
        else:
            ranges.append((tensor.file, tensor.start, tensor.end))
    return ranges


class WeightsPrefetch:
    """Reads the tower's bytes in a background thread while torch imports, the inputs are listed and the run is
    planned, so that the load proper copies from the page cache; only the tower's tensors are read, never a full
    model's language weights. On the way it computes ``weights_hash`` from those very bytes (the same names, dtypes,
    shapes and bytes, in the same order), so a first start-up on a machine need not hash after the load either.
    Errors are left to the load to report."""

    _running: dict[str, WeightsPrefetch] = {}  # by _hash_cache_key: what a load in this process may wait for

    def __init__(self, source: ModelSource) -> None:
        self.tensors = _tower_tensors(source)
        self.digest: str | None = None
        self.key = _hash_cache_key(source)
        hashable = bool(self.tensors) and all(t.dtype in SAFETENSORS_DTYPES for t in self.tensors.values())
        self.hashing = hashable and self.key is not None and cached_weights_hash(source) is None
        self.thread = threading.Thread(target=self._read, name="vitok-weights-prefetch", daemon=True)
        if self.tensors:
            if self.hashing:
                WeightsPrefetch._running[self.key] = self
            self.thread.start()

    def _read(self) -> None:
        digest = hashlib.blake2b(digest_size=16)
        buffer = memoryview(bytearray(8 << 20))
        handles: dict[Path, int] = {}

        def read(file: Path, start: int, end: int) -> None:
            if file not in handles:
                handles[file] = os.open(file, os.O_RDONLY)
            while start < end:
                got = os.preadv(handles[file], [buffer[: min(len(buffer), end - start)]], start)
                if got <= 0:
                    raise OSError(f"{file}: ends at byte {start}, inside the tower's tensors")
                if self.hashing:
                    digest.update(buffer[:got])
                start += got

        try:
            if self.hashing:  # weights_hash's order: by name, each tensor's description then its bytes
                for name in sorted(self.tensors):
                    tensor = self.tensors[name]
                    digest.update(f"{name}|{SAFETENSORS_DTYPES[tensor.dtype]}|{tensor.shape}".encode())
                    read(tensor.file, tensor.start, tensor.end)
                self.digest = "blake2b:" + digest.hexdigest()
            else:
                for file, start, end in _merged_ranges(self.tensors.values()):
                    read(file, start, end)
        except OSError:
            self.digest = None
        finally:
            for handle in handles.values():
                os.close(handle)

    def result(self) -> str | None:
        """The digest, once the thread is done (None: it could not be computed from the files)."""
        self.thread.join()
        return self.digest

    @classmethod
    def running_for(cls, source: ModelSource) -> WeightsPrefetch | None:
        key = _hash_cache_key(source)
        return cls._running.get(key) if key is not None else None


def prefetch_weights(source: ModelSource) -> WeightsPrefetch | None:
    """Start a :class:`WeightsPrefetch` for a checkpoint (None for seeded random weights or unreadable headers)."""
    prefetch = WeightsPrefetch(source)
    return prefetch if prefetch.tensors else None
