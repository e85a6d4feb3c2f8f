"""The Qwen vision encoder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5), all of it in this file.

Reads top to bottom like the architecture (transformers' towers are the numerical reference):

    pixel patches (N, C*T*p*p), rows in 2x2 merge-block order, one row per p x p patch
      -> PatchEmbed         Conv3d(kernel = stride = (T, p, p)) == one matrix multiply per patch
      -> + learned absolute position table (sqrt(P) x sqrt(P)), bilinearly resampled to each grid (fp32; Qwen3)
      -> [Qwen2.5-VL: tokens reordered window by window]
      -> L x Block          pre-norm: x += Attn(Norm(x)); x += MLP(Norm(x))
                            Attn: fused qkv, 2D rotary on q and k ([h|w|h|w], rotate_half, fp32); each image (each
                            temporal slice, or each window in the windowed blocks) attends only to itself
      -> "patch"            output of the last block, (N, D), back in merge-block order
      -> PatchMerger        Norm(D) per token, 2x2 shuffle to 4D, MLP(erf GELU) -> (N/4, O)  = "merged"
      -> DeepStack mergers  taps after blocks ``deepstack_visual_indexes``: shuffle, LN(4D), MLP -> "deepstack"

What differs between families is configuration (``EncoderConfig``) and a few small parts chosen here: LayerNorm or
RMSNorm, a GELU MLP or a SwiGLU one, the merger's module names. Submodule names equal each checkpoint's tensor names
(``blocks.N.attn.qkv``, ``blocks.N.mlp.linear_fc1`` / ``fc1`` / ``gate_proj``, ``merger.linear_fc1`` /
``merger.mlp.0``), so loading a checkpoint is a prefix strip and a strict ``load_state_dict``. The original
small/base/large ViTs are the Qwen3-VL shape with ``spatial_merge_size=1``, no position table and no merger.

Token order: ``patch`` (and ``block:N``) rows come in the reference's 2x2-block order by default; ask for
``token_order="raster"`` to get them row-major. ``merged`` and ``deepstack`` rows are row-major over the merged grid.
Per-grid tables live in ``vitok.encoder.geometry``, the attention kernels in ``vitok.encoder.attention``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from . import kernels
from .attention import ATTENTION_KERNELS, Rotary, apply_rotary
from .config import ACTIVATIONS as ACTIVATION_NAMES
from .config import TOKEN_ORDERS, EncoderConfig
from .features import block_index, check_features
from .geometry import GridTables, Segments, build_grid_tables

logger = logging.getLogger(__name__)

Grid = tuple[int, int, int]  # (t, h, w) in patches


# --------------------------------------------------------------------------------------------------------------
# Small parts that differ between families.
# --------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Qwen2.5-VL's norm: weight * x / rms(x), computed in float32 and rounded once, as the reference."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        as_float = x.float()
        normalised = as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalised.to(x.dtype)


def make_norm(config: EncoderConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(size, config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# transformers' ACT2FN entries without parameters, with the reference's arithmetic (same operations, same order).
ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "gelu_new": _tanh_gelu,
    "gelu_accurate": _tanh_gelu,
    "gelu_python_tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x,
                                                                                                                 3.0)))),
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "hardswish": F.hardswish,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES


def activate(x: torch.Tensor, act: str) -> torch.Tensor:
    """The blocks' activation, as transformers' ``ACT2FN[act]`` computes it."""
    return ACTIVATIONS[act](x)


class MLP(nn.Module):
    """fc1 -> activation -> fc2; Qwen3-VL, Qwen3.5 and the original ViTs name them ``linear_fc1``/``linear_fc2``."""

    names = ("linear_fc1", "linear_fc2")

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        setattr(self, self.names[0], nn.Linear(config.hidden_size, config.intermediate_size, bias=True))
        setattr(self, self.names[1], nn.Linear(config.intermediate_size, config.hidden_size, bias=True))
        self.act = config.hidden_act
        # GELU rides in the linear kernel (oneDNN on CPU, the cuBLASLt epilogue on CUDA); others run after it.
        self.fused = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(config.hidden_act)
        # CPU row chunks of at most 16 MiB of fp32 activations: a whole batch's 4D-wide activations exceed malloc's
        # mmap threshold, and each call would fault in fresh zeroed pages.
        self.cpu_rows = max(256, (4 << 20) // config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] > self.cpu_rows:
            return torch.cat([self(chunk) for chunk in x.split(self.cpu_rows)])
        first, second = (getattr(self, name) for name in self.names)
        hidden = kernels.apply(x, first, gelu=self.fused)
        return kernels.apply(hidden if self.fused else activate(hidden, self.act), second)


class Qwen2MLP(MLP):
    """Qwen2-VL names its MLP ``fc1``/``fc2`` (activation quick_gelu)."""

    names = ("fc1", "fc2")


class SwiGLU(nn.Module):
    """Qwen2.5-VL: down(silu(gate(x)) * up(x)), every projection with a bias. gate and up run as one matrix multiply
    (their weights concatenated once per load), which reads x once."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, i), nn.Linear(d, i)
        self.down_proj = nn.Linear(i, d)
        self.act = config.hidden_act
        self._fused: tuple | None = None

    def _gate_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple((p.data_ptr(), p._version) for p in (self.gate_proj.weight, self.up_proj.weight,
                                                           self.gate_proj.bias, self.up_proj.bias))
        if self._fused is None or self._fused[0] != key:
            weight = torch.cat([self.gate_proj.weight, self.up_proj.weight]).detach()
            bias = torch.cat([self.gate_proj.bias, self.up_proj.bias]).detach()
            self._fused = (key, weight, bias)
        return self._fused[1], self._fused[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gate_proj.weight.requires_grad:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = kernels.linear(x, *self._gate_up()).chunk(2, dim=-1)
        return kernels.apply(activate(gate, self.act) * up, self.down_proj)


def make_mlp(config: EncoderConfig) -> nn.Module:
    if config.mlp == "swiglu":
        return SwiGLU(config)
    return Qwen2MLP(config) if config.family == "qwen2_vl" else MLP(config)


class PatchMerger(nn.Module):
    """Fuse each 2x2 block of patches into one token: (N, D) -> (N/4, O). Qwen3-VL / Qwen3.5 names.

    The final merger normalises each token before the shuffle (over D); DeepStack mergers normalise after it (over
    4D). Both use the exact erf GELU, whatever the blocks use.
    """

    def __init__(self, config: EncoderConfig, postshuffle_norm: bool = False) -> None:
        super().__init__()
        self.wide = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = make_norm(config, self.wide if postshuffle_norm else config.hidden_size)
        self.linear_fc1 = nn.Linear(self.wide, self.wide)
        self.linear_fc2 = nn.Linear(self.wide, config.out_hidden_size)

    def layers(self) -> tuple[nn.Module, nn.Linear, nn.Linear]:
        return self.norm, self.linear_fc1, self.linear_fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, fc1, fc2 = self.layers()
        if self.postshuffle_norm:
            x = norm(x.view(-1, self.wide))  # (N/4, 4D), features [(0,0) | (0,1) | (1,0) | (1,1)] x D
        else:
            x = norm(x).view(-1, self.wide)
        return kernels.apply(kernels.apply(x, fc1, gelu="none"), fc2)


class Qwen2PatchMerger(PatchMerger):
    """Qwen2-VL / Qwen2.5-VL names: ``ln_q`` (LayerNorm / RMSNorm) and ``mlp`` = [Linear, GELU, Linear]."""

    def __init__(self, config: EncoderConfig) -> None:
        nn.Module.__init__(self)
        self.wide = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = False
        self.ln_q = make_norm(config, config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(self.wide, self.wide), nn.GELU(), nn.Linear(self.wide,
                                                                                       config.out_hidden_size))

    def layers(self) -> tuple[nn.Module, nn.Linear, nn.Linear]:
        return self.ln_q, self.mlp[0], self.mlp[2]


# --------------------------------------------------------------------------------------------------------------
# The shared parts, in the order data flows through them.
# --------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (T, p, p) over one flattened patch is a matrix multiply: run it as one."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(
            config.in_channels, config.hidden_size, kernel, stride=kernel, bias=config.patch_embed_bias
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight  # (D, C, T, p, p)
        # The reference casts pixels to the weight dtype before its conv; so do we (bf16 rounds the pixels).
        return kernels.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1), self.proj.bias)  # (N, D)


class VisionRotaryEmbedding(nn.Module):
    """Inverse frequencies of the axial 2D rotary: head_dim/4 per axis, theta 10000. Not in the checkpoint."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        dim = config.head_dim // 2
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class Attention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.kernel = "sdpa"

    def forward(self, x: torch.Tensor, rotary: Rotary, segments: Segments) -> torch.Tensor:
        n = x.shape[0]
        # (N, 3, H, hd): rows [Q | K | V], head-major
        qkv = kernels.apply(x, self.qkv).view(n, 3, self.num_heads, self.head_dim)
        qk = apply_rotary(qkv[:, :2], rotary)  # (N, 2, H, hd)
        out = ATTENTION_KERNELS[self.kernel](qk[:, 0], qk[:, 1], qkv[:, 2], segments, self.scale)  # (N, H, hd)
        return kernels.apply(out.reshape(n, -1), self.proj)


class Block(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config, config.hidden_size)
        self.attn = Attention(config)
        self.norm2 = make_norm(config, config.hidden_size)
        self.mlp = make_mlp(config)

    def forward(self, x: torch.Tensor, rotary: Rotary, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, segments)
        return x + self.mlp(self.norm2(x))


@dataclass
class EncoderOutput:
    """Packed outputs of one batch. ``features[name]`` rows are the images' rows concatenated in input order;
    ``deepstack`` is (K, rows, O). Use ``split()`` for one dict per image."""

    grid_thw: list[Grid]
    features: dict[str, torch.Tensor]
    rows: dict[str, list[int]]  # rows per image for each feature
    token_order: str

    def split(self) -> list[dict[str, torch.Tensor]]:
        per_image: list[dict[str, torch.Tensor]] = [{} for _ in self.grid_thw]
        for name, packed in self.features.items():
            dim = 1 if name == "deepstack" else 0
            for item, chunk in zip(per_image, packed.split(self.rows[name], dim=dim)):
                item[name] = chunk
        return per_image


@dataclass
class BatchTables:
    """What a batch's forward needs besides the pixels, built from the per-grid tables."""

    pos: torch.Tensor | None  # (N, D) float32 position embeddings
    rotary: Rotary
    segments: Segments  # temporal slices of images
    windows: Segments | None  # Qwen2.5-VL: windows (rows in window order)
    to_windows: torch.Tensor | None  # block-order rows -> window order
    from_windows: torch.Tensor | None  # window order -> block order
    to_raster: torch.Tensor | None  # block order -> raster order


class VisionEncoder(nn.Module):
    """One vision tower for every preset and family; see the module docstring for the data flow."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = (
            nn.Embedding(config.num_position_embeddings, config.hidden_size) if config.num_position_embeddings else None
        )
        self.rotary_pos_emb = VisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        qwen2 = config.family in ("qwen2_vl", "qwen2_5_vl")
        self.merger = (Qwen2PatchMerger(config) if qwen2 else PatchMerger(config)) if config.has_merger else None
        self.deepstack_merger_list = nn.ModuleList(
            [PatchMerger(config, postshuffle_norm=True) for _ in config.deepstack_visual_indexes]
        )
        self._grid_cache: dict[tuple[int, int, str], GridTables] = {}

    # ---- settings ----------------------------------------------------------------------------------------------

    def set_attention(self, kernel: str) -> None:
        """Choose the attention kernel: ``sdpa`` (default), ``varlen`` (CUDA half precision) or ``eager``."""
        if kernel not in ATTENTION_KERNELS:
            raise UsageError(f"attention kernel {kernel!r} is not one of: {', '.join(ATTENTION_KERNELS)}")
        for block in self.blocks:
            block.attn.kernel = kernel

    def check_features(self, features: Sequence[str]) -> tuple[str, ...]:
        """Validate requested outputs against what this tower has; the error lists what it offers."""
        return check_features(self.config, features)

    # ---- geometry ----------------------------------------------------------------------------------------------

    def grid_tables(self, h: int, w: int, device: torch.device) -> GridTables:
        key = (h, w, str(device))
        tables = self._grid_cache.get(key)
        if tables is None:
            if h % self.config.spatial_merge_size or w % self.config.spatial_merge_size:
                raise UsageError(f"grid {h}x{w} is not a multiple of the merge size {self.config.spatial_merge_size}")
            cpu = build_grid_tables(self.config, self.rotary_pos_emb.inv_freq, h, w)
            # non_blocking: a blocking copy would wait for the batches already queued on the GPU
            tables = GridTables(*(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t
                                  for t in vars(cpu).values()))
            if len(self._grid_cache) > 4096:  # native-resolution streams have many grids; keep memory bounded
                self._grid_cache.clear()
            self._grid_cache[key] = tables
        return tables

    def _batch_tables(self, grid_thw: Sequence[Grid], device: torch.device, raster: bool) -> BatchTables:
        """One entry per temporal slice of each image (slices share their grid's tables)."""
        slice_grids = [(h, w) for t, h, w in grid_thw for _ in range(t)]
        slices = [self.grid_tables(h, w, device) for h, w in slice_grids]
        starts = list(itertools.accumulate((h * w for h, w in slice_grids[:-1]), initial=0))

        def cat(parts: list[torch.Tensor]) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        rotary = Rotary(cat([tab.cos for tab in slices]), cat([tab.sin for tab in slices]))
        pos = None
        if self.pos_embed is not None:
            # Resampled once per distinct grid in the batch (a uniform batch pays for one image), in fp32 products
            # and sum, cast once, as transformers 5.x does.
            per_grid = {}
            for grid, tab in zip(slice_grids, slices):
                if grid not in per_grid:
                    per_grid[grid] = (self.pos_embed(tab.pos_index) * tab.pos_weight[:, :, None]).sum(1)
            pos = cat([per_grid[grid] for grid in slice_grids])
        segments = Segments([h * w for h, w in slice_grids])
        windows = to_windows = from_windows = None
        if self.config.window_size:
            to_windows = cat([tab.window_rows + start for tab, start in zip(slices, starts)])
            from_windows = torch.empty_like(to_windows)
            from_windows[to_windows] = torch.arange(len(to_windows), device=to_windows.device)
            windows = Segments([size for tab in slices for size in tab.window_sizes])
        to_raster = cat([tab.to_raster + start for tab, start in zip(slices, starts)]) if raster else None
        return BatchTables(pos, rotary, segments, windows, to_windows, from_windows, to_raster)

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: Sequence[Grid],
        features: Sequence[str] = ("patch",),
        token_order: str = "block",
    ) -> EncoderOutput:
        """Encode a packed batch.

        Args:
            pixel_values: (N, C*T*p*p) patches of all images, each image's rows in merge-block order.
            grid_thw: (t, h, w) per image, in patches; N = sum(t*h*w).
            features: which named outputs to compute: ``patch``, ``merged``, ``deepstack``, ``block:N``.
            token_order: ``block`` (the reference's order) or ``raster`` for ``patch`` and ``block:N`` rows.
        """
        if token_order not in TOKEN_ORDERS:
            raise UsageError(f"token order {token_order!r} is not one of: {', '.join(TOKEN_ORDERS)}")
        features = self.check_features(features)
        grid_thw = [tuple(int(v) for v in g) for g in grid_thw]
        expected = sum(t * h * w for t, h, w in grid_thw)
        if pixel_values.shape != (expected, self.config.patch_dim):
            raise UsageError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected ({expected}, {self.config.patch_dim}) "
                f"for grids {grid_thw}"
            )
        merge_unit = self.config.spatial_merge_size**2
        per_patch = [f for f in features if f == "patch" or f.startswith("block:")]
        reorder = bool(per_patch) and token_order == "raster" and merge_unit > 1
        tables = self._batch_tables(grid_thw, pixel_values.device, reorder)

        x = self.patch_embed(pixel_values)  # (N, D)
        if tables.pos is not None:
            x += tables.pos.to(x.dtype)
        rotary = tables.rotary
        if tables.to_windows is not None:  # Qwen2.5-VL: rows window by window for every block
            x, rotary = x[tables.to_windows], rotary.permuted(tables.to_windows)

        def block_order(h: torch.Tensor) -> torch.Tensor:
            """Rows back in merge-block order (from window order), then raster order when asked."""
            if tables.from_windows is not None:
                h = h[tables.from_windows]
            return h[tables.to_raster] if tables.to_raster is not None else h

        taps = self.config.deepstack_layers if "deepstack" in features else ()
        mergers = self.config.deepstack_visual_indexes  # block i feeds merger mergers.index(i), as in the reference
        blocks_out = {block_index(f, self.config.depth): f for f in features if f.startswith("block:")}
        needed = [max(taps) + 1 if taps else 0, *(i + 1 for i in blocks_out)]
        if "patch" in features or "merged" in features:
            needed.append(self.config.depth)
        out: dict[str, torch.Tensor] = {}
        deepstack = []
        full = set(self.config.fullatt_block_indexes)
        for index, block in enumerate(self.blocks[: max(needed)]):
            segments = tables.windows if tables.windows is not None and index not in full else tables.segments
            x = block(x, rotary, segments)  # (N, D)
            if index in taps:
                unwindowed = x[tables.from_windows] if tables.from_windows is not None else x
                deepstack.append(self.deepstack_merger_list[mergers.index(index)](unwindowed))  # (N/4, O)
            if index in blocks_out:
                out[blocks_out[index]] = block_order(x)

        patch_rows = [t * h * w for t, h, w in grid_thw]
        rows: dict[str, list[int]] = {f: patch_rows for f in blocks_out.values()}
        if "patch" in features:
            out["patch"] = block_order(x)
            rows["patch"] = patch_rows
        if "merged" in features:
            # the merger works on each group of m x m rows alone: merging in block order equals the reference's
            # merging in window order followed by its inverse reordering
            out["merged"] = self.merger(x[tables.from_windows] if tables.from_windows is not None else x)
            rows["merged"] = [n // merge_unit for n in patch_rows]
        if "deepstack" in features:
            out["deepstack"] = torch.stack(deepstack)  # (K, N/4, O)
            rows["deepstack"] = [n // merge_unit for n in patch_rows]
        order = "raster" if token_order == "raster" or merge_unit == 1 else "block2x2"
        return EncoderOutput(grid_thw, out, rows, order)


def init_random_weights(model: VisionEncoder, seed: int = 0) -> None:
    """Seeded random weights, identical on every machine: N(0, 0.02) matrices, zero biases, unit norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".norm" in name or name.startswith("norm") or ".ln_q" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
                param.copy_(values)
