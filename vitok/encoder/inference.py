"""The encoder-loading and inference context, in one place: device and dtype choice, loading a model, and running a
packed batch (eval mode, ``torch.inference_mode``, non-blocking copies).

Reduced precision casts the whole tower (LayerNorm included), as the reference's ``model.to(bfloat16)`` does;
position interpolation and the rotary stay in float32 inside the model, as in the reference.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..inputs.preprocess import PreparedImage, normalize_patches
from ..inputs.preprocess_config import PreprocessConfig
from .checkpoint import (
    ModelSource,
    WeightsPrefetch,
    cached_weights_hash,
    check_state_dict,
    read_tower_state_dict,
    remember_weights_hash,
    resolve_model,
    weights_hash,
)
from .config import COMPUTE_DTYPES, EncoderConfig, check_preprocess_fits
from .model import EncoderOutput, VisionEncoder, init_random_weights

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}
_warned_random: set[str] = set()


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; ``cuda:N`` is checked to exist."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(f"--device {spec!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec!r} is not supported (auto, cpu, cuda, cuda:N)")
    return device


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on GPUs that support it, float32 elsewhere."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec is None or spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise UsageError(f"--dtype {spec!r} is not one of: auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


@dataclass
class Encoder:
    """A loaded tower on its device, with the preprocessing that belongs to it."""

    model: VisionEncoder
    source: ModelSource
    preprocess: PreprocessConfig
    device: torch.device
    dtype: torch.dtype
    weights_hash: str
    load_seconds: dict[str, float] = field(default_factory=dict)  # weights_read, weights_on_device

    @property
    def config(self) -> EncoderConfig:
        return self.model.config

    @torch.inference_mode()
    def encode(
        self, images: Sequence[PreparedImage], features: Sequence[str] = ("patch",), token_order: str = "block",
        chunk_rows: int | None = None,
    ) -> EncoderOutput:
        """Run a packed batch of prepared images; uint8 patches go to the device and are normalised there.

        A lone video of more than ``chunk_rows`` patches is encoded a few temporal steps at a time: each step attends
        only to itself in every family's tower (attention segments, Qwen2.5-VL's windows, the position tables are
        all per step), so the pieces' outputs joined are the whole video's, while activations stay bounded."""
        if chunk_rows is not None and len(images) == 1 and images[0].grid_thw[0] > 1 \
                and images[0].num_patches > chunk_rows:
            return self._encode_in_steps(images[0], features, token_order, chunk_rows)
        if len(images) == 1:
            patches = images[0].patches.to(self.device, non_blocking=True)
        else:
            # Each image's (pinned, when it comes from the DataLoader) patches straight into one buffer on the device:
            # asynchronous on a GPU, and no host-side concatenation on the thread that feeds it.
            patches = torch.empty((sum(im.num_patches for im in images), *images[0].patches.shape[1:]),
                                  dtype=images[0].patches.dtype, device=self.device)
            for im, rows in zip(images, patches.split([im.num_patches for im in images])):
                rows.copy_(im.patches, non_blocking=True)
        pixel_values = normalize_patches(patches, self.preprocess)
        return self.model(pixel_values, [im.grid_thw for im in images], features=features, token_order=token_order)

    def _encode_in_steps(self, video: PreparedImage, features: Sequence[str], token_order: str,
                         chunk_rows: int) -> EncoderOutput:
        t, h, w = video.grid_thw
        steps = max(1, chunk_rows // (h * w))  # temporal steps per piece
        pieces = []
        for start in range(0, t, steps):
            count = min(steps, t - start)
            rows = video.patches[start * h * w:(start + count) * h * w]
            piece = PreparedImage(rows, (count, h, w), video.original_size)
            pieces.append(self.encode([piece], features, token_order))
        joined = {name: torch.cat([p.features[name] for p in pieces], dim=1 if name == "deepstack" else 0)
                  for name in pieces[0].features}
        rows = {name: [sum(p.rows[name][0] for p in pieces)] for name in joined}
        return EncoderOutput([video.grid_thw], joined, rows, pieces[0].token_order)

    def needs_warm_up(self, workers: int) -> bool:
        """Whether to warm up while the decode workers start: always on a GPU (one-time set-up); on a CPU only when
        there are workers to overlap with and this machine has not yet timed the kernels of this tower's shapes
        (otherwise the warm-up would only cost a batch)."""
        if self.device.type == "cuda":
            return True
        from . import kernel_choice, kernels

        if workers == 0 or not kernels.onednn_linear_available():
            return False
        qkv = self.model.blocks[0].attn.qkv
        key = f"linear|{qkv.in_features}->{qkv.out_features}|bias=True|gelu=None|{self.dtype}"
        return not kernel_choice.known(key)

    @torch.inference_mode()
    def warm_up(self, features: Sequence[str] = ("patch",), token_order: str = "block") -> None:
        """Encode one dummy image, so the first real batch does not pay for one-time set-up (CUDA context and
        library handles, Triton kernels compiled or read from their disk cache, the CPU kernel choice's timing).
        On the CPU the image has ``TIMED_ROWS`` patches at least, so kernel choices are timed on as many rows as a
        real batch gives them. Nothing waits for the device here."""
        from .kernel_choice import TIMED_ROWS

        m = self.config.spatial_merge_size
        if self.device.type == "cuda":  # two sizes: the packed (varlen) attention path, as real batches take it
            grids = [(1, 2 * m, 2 * m), (1, 2 * m, 4 * m)]
        else:
            side = m * -(-int(TIMED_ROWS**0.5) // m)
            grids = [(1, side, side)]
        channels, p = len(self.preprocess.image_mean), self.config.patch_size
        images = [PreparedImage(torch.zeros((h * w, channels, p, p), dtype=torch.uint8), (t, h, w), (w * p, h * p))
                  for t, h, w in grids]
        if self.device.type == "cuda":
            for image in images:
                image.patches = image.patches.pin_memory()
        self.encode(images, features, token_order)


@contextlib.contextmanager
def _skip_init():
    """torch.nn.init's functions as no-ops while the tower is built: its weights stay uninitialised memory (never
    touched, so nearly free), and every one is then set from the checkpoint or the seed. (Not the meta device: a
    meta ``arange`` or ``normal_`` imports torch._dynamo, 1-1.5 s.)"""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_", "zeros_", "ones_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


class _Hashing:
    """``weights_hash`` of a state dict computed in a thread (hashlib releases the GIL on large buffers)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        import threading

        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(state,), name="vitok-weights-hash", daemon=True)
        self._thread.start()

    def _run(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self._digest = weights_hash(state)
        except BaseException as exc:  # raised in the caller
            self._error = exc

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


def load_encoder(
    model: str | ModelSource = "base",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    *,
    seed: int = 0,
    attention: str = "auto",
    preprocess: PreprocessConfig | None = None,
) -> Encoder:
    """Load a preset, checkpoint folder, ``.safetensors`` file or Hugging Face repo id onto a device.

    Args:
        model: preset name or path (see ``vitok.encoder.checkpoint``), or a source ``resolve_model`` returned.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        seed: seed of the random weights used when a preset has no checkpoint.
        attention: ``auto`` (varlen FlashAttention on CUDA half precision when available, else sdpa),
            ``sdpa``, ``varlen`` or ``eager``.
        preprocess: override the model's own preprocessing.
    """
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    check_preprocess_fits(preprocess or source.preprocess, source.encoder, f"--model {source.name}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    with _skip_init():  # no default initialisation (seconds for a 2B tower on a CPU): every weight is set below
        encoder = VisionEncoder(source.encoder)
    seconds["model_built"] = time.perf_counter() - started
    if source.random_weights:
        init_random_weights(encoder, seed)
        digest = f"seeded-random:{seed}"
        if source.name not in _warned_random:
            _warned_random.add(source.name)
            logger.warning(
                "MODEL %s HAS NO CHECKPOINT: running with seeded random weights (seed %d). Its tokens are "
                "deterministic but NOT meaningful features; pass --model PATH for real weights.",
                source.name,
                seed,
            )
    else:
        started = time.perf_counter()
        state = read_tower_state_dict(source)
        check_state_dict(encoder.state_dict(), state, f"{source.name} ({source.weight_files[0].parent})")
        digest = cached_weights_hash(source)  # an earlier load on this machine hashed these very files
        prefetch = None if digest else WeightsPrefetch.running_for(source)  # hashing them while they were read
        hashing = None if digest or prefetch else _Hashing(state)  # in a thread, while the weights go to the device
        encoder.load_state_dict(state, strict=True, assign=True)  # the checkpoint's tensors, no copy
        seconds["weights_read"] = time.perf_counter() - started
    started = time.perf_counter()
    encoder = encoder.to(device=torch_device, dtype=torch_dtype).eval()
    if torch_device.type == "cuda":  # once per run, at load: the copies are done before the hot path begins
        torch.cuda.synchronize(torch_device)
    seconds["weights_on_device"] = time.perf_counter() - started
    if not source.random_weights and digest is None:
        started = time.perf_counter()
        digest = (prefetch.result() if prefetch else None) or (hashing or _Hashing(state)).result()
        seconds["weights_hash_wait"] = time.perf_counter() - started
        remember_weights_hash(source, digest)
    if attention == "auto":
        attention = "varlen" if torch_device.type == "cuda" and torch_dtype != torch.float32 else "sdpa"
    encoder.set_attention(attention)
    return Encoder(encoder, source, preprocess or source.preprocess, torch_device, torch_dtype, digest, seconds)
