"""The Qwen3-VL vision encoder, all of it in this file.

Reads top to bottom like the architecture (transformers' ``Qwen3VLVisionModel`` is the numerical reference):

    pixel patches (N, C*T*p*p), rows in 2x2 merge-block order, one row per p x p patch
      -> PatchEmbed         Conv3d(kernel = stride = (T, p, p)) == one matrix multiply per patch
      -> + learned absolute position table (sqrt(P) x sqrt(P)), bilinearly resampled to each grid (fp32)
      -> L x Block          pre-norm: x += Attn(LN(x)); x += MLP(LN(x))
                            Attn: fused qkv, 2D rotary on q and k ([h|w|h|w], rotate_half, fp32),
                            each image (each temporal slice) attends only to itself
      -> "patch"            output of the last block, (N, D)
      -> PatchMerger        LN(D) per token, then 2x2 shuffle to 4D, MLP(erf GELU) -> (N/4, O)  = "merged"
      -> DeepStack mergers  taps after blocks ``deepstack_visual_indexes``: shuffle, LN(4D), MLP -> "deepstack"

Submodule names equal the checkpoint's tensor names (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``merger.*``,
``deepstack_merger_list.*``), so loading a checkpoint is a prefix strip and a strict ``load_state_dict``.

The same module serves the original small/base/large ViTs: ``spatial_merge_size=1`` (block order is raster
order), no position table, no merger.

Token order. ``patch`` rows come in the reference's 2x2-block order by default: for a grid of h x w patches the
row of patch (r, c) is ordered by (r // 2, c // 2, r % 2, c % 2). Ask for ``token_order="raster"`` to get them
row-major (reshape-able to (h, w, D)). ``merged`` and ``deepstack`` rows are always row-major over the
(h/2) x (w/2) merged grid: each 2x2 block becomes one token in block-raster order.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import EncoderConfig
from .errors import UsageError
from .features import block_index, check_features

logger = logging.getLogger(__name__)

Grid = tuple[int, int, int]  # (t, h, w) in patches


# --------------------------------------------------------------------------------------------------------------
# Geometry: everything that depends only on an image's grid, computed once per grid and cached.
# --------------------------------------------------------------------------------------------------------------


def block_order_positions(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch of an h x w grid, listed in merge-block order."""
    n = torch.arange(h * w)
    blocks_w = w // merge
    in_col = n % merge
    in_row = (n // merge) % merge
    block_col = (n // (merge * merge)) % blocks_w
    block_row = n // (merge * merge * blocks_w)
    return block_row * merge + in_row, block_col * merge + in_col


def _bilinear_axis(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two taps into a ``side``-long table and their weights for positions on an axis of ``size`` (align_corners).

    Written with the same float32 operations as the reference so the weights agree bit for bit.
    """
    index = index.to(torch.float32)
    src = index * (side - 1) / torch.clamp(torch.tensor(size - 1), min=1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    distance = (src[:, None] - floor[:, None] - offsets).abs()
    return taps, (1 - distance).clamp(min=0)


@dataclass
class GridTables:
    """Per-grid constants (one temporal slice): position-table taps, rotary cos/sin, raster permutation."""

    pos_index: torch.Tensor | None  # (n, 4) long: taps into the flattened position table
    pos_weight: torch.Tensor | None  # (n, 4) float32: bilinear weights
    cos: torch.Tensor  # (n, head_dim/2) float32, angles [h | w]; both halves of a head use the same angles
    sin: torch.Tensor  # (n, head_dim/2) float32
    to_raster: torch.Tensor  # (n,) long: block-order rows -> raster order


def build_grid_tables(config: EncoderConfig, inv_freq: torch.Tensor, h: int, w: int) -> GridTables:
    rows, cols = block_order_positions(h, w, config.spatial_merge_size)
    pos_index = pos_weight = None
    if config.num_position_embeddings:
        side = int(config.num_position_embeddings**0.5)
        row_taps, row_weights = _bilinear_axis(rows, h, side)
        col_taps, col_weights = _bilinear_axis(cols, w, side)
        pos_index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
        pos_weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    # Rotary angles: row and column each use head_dim/4 frequencies. The reference lays them out [h | w | h | w]
    # over a head; the two halves are equal, so only [h | w] is kept (see apply_rotary).
    freqs = torch.stack([rows, cols], dim=-1)[..., None].float() * inv_freq.float().cpu()  # (n, 2, hd/4)
    cos, sin = freqs.cos().flatten(1), freqs.sin().flatten(1)  # (n, hd/2)
    to_raster = torch.empty(h * w, dtype=torch.long)
    to_raster[rows * w + cols] = torch.arange(h * w)
    return GridTables(pos_index, pos_weight, cos, sin, to_raster)


@dataclass
class Segments:
    """Which rows attend to which: one segment per temporal slice of each image, as host integers.

    Runs of consecutive segments with the same length are attended as one dense batch, so a batch of
    same-size images costs one attention call per layer, not one per image.
    """

    lengths: list[int]
    runs: list[tuple[int, int, int]] = field(init=False)  # (first row, number of segments, segment length)
    _cu_seqlens: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.runs = []
        start = 0
        for length in self.lengths:
            if self.runs and self.runs[-1][2] == length:
                first, count, _ = self.runs[-1]
                self.runs[-1] = (first, count + 1, length)
            else:
                self.runs.append((start, 1, length))
            start += length

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        """int32 (S+1,) segment boundaries on the device, built once per batch (the varlen kernel's input)."""
        if self._cu_seqlens is None:
            cu = torch.tensor([0, *self.lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self._cu_seqlens = cu.to(device, non_blocking=True)
        return self._cu_seqlens


# --------------------------------------------------------------------------------------------------------------
# Attention kernels. ``sdpa`` is the default; ``eager`` is the test oracle; ``varlen`` is FlashAttention over the
# packed batch (CUDA, fp16/bf16, torch >= 2.10) and falls back to ``sdpa`` elsewhere.
# --------------------------------------------------------------------------------------------------------------


def _attend_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float) -> torch.Tensor:
    out = []
    start = 0
    for length in segments.lengths:
        qs, ks, vs = (t[start : start + length].transpose(0, 1) for t in (q, k, v))  # (H, S, hd)
        weights = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1, dtype=torch.float32).to(qs.dtype)
        out.append((weights @ vs).transpose(0, 1))  # (S, H, hd)
        start += length
    return torch.cat(out, dim=0)


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float) -> torch.Tensor:
    if len(segments.runs) == 1:
        return _attend_run(q, k, v, segments.runs[0][1], segments.runs[0][2], scale)
    out = torch.empty_like(q)
    for first, count, length in segments.runs:
        rows = slice(first, first + count * length)
        out[rows] = _attend_run(q[rows], k[rows], v[rows], count, length, scale)
    return out


def _attend_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int, length: int, scale: float):
    heads, head_dim = q.shape[1:]
    if kernels.cpu_attention_applies(q, length):
        qb, kb, vb = (t.view(count, length, heads, head_dim) for t in (q, k, v))  # (B, S, H, hd)
        return kernels.cpu_attention(qb, kb, vb, scale).view(count * length, heads, head_dim)
    qb, kb, vb = (t.view(count, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
    out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
    return out.transpose(1, 2).reshape(count * length, heads, head_dim)


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float):
    kernel = _varlen_kernel()
    usable = kernel is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if not usable or len(segments.runs) == 1:
        return _attend_sdpa(q, k, v, segments, scale)
    cu = segments.cu_seqlens(q.device)
    return kernel(q, k, v, cu, cu, segments.max_length, segments.max_length, scale=scale)


ATTENTION_KERNELS = {"sdpa": _attend_sdpa, "eager": _attend_eager, "varlen": _attend_varlen}


# --------------------------------------------------------------------------------------------------------------
# Modules, in the order data flows through them.
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


@dataclass
class Rotary:
    """A batch's rotary angles, (N, head_dim/2) float32 each; ``neg_sin`` is kept so no pass negates a head half."""

    cos: torch.Tensor
    sin: torch.Tensor
    neg_sin: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.neg_sin = -self.sin


def apply_rotary(qk: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate q and k together in float32, like the reference, rounding once back to their dtype.

    The reference computes ``q * cos + rotate_half(q) * sin`` with cos/sin repeated over both head halves, i.e.
    per half ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``. Written per half, a bf16 input is read directly
    by float32 arithmetic (no float32 copy of q and k, no concatenation): two passes instead of seven.
    """
    fused = kernels.fused_rotary(qk, rotary.cos, rotary.sin)  # CUDA: the same arithmetic in one Triton kernel
    if fused is not None:
        return fused
    x = qk.unflatten(-1, (2, -1))  # (N, 2, H, 2, hd/2): [q|k], heads, [first|second half]
    first, second = x[..., 0, :], x[..., 1, :]
    cos, sin, neg_sin = (t[:, None, None, :] for t in (rotary.cos, rotary.sin, rotary.neg_sin))  # (N, 1, 1, hd/2)
    out = torch.empty_like(x)
    torch.addcmul(first * cos, second, neg_sin, out=out[..., 0, :])
    torch.addcmul(second * cos, first, sin, out=out[..., 1, :])
    return out.flatten(-2)


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


class MLP(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else "none"
        # CPU row chunks of at most 16 MiB of fp32 activations: a whole batch's 4D-wide activations exceed malloc's
        # mmap threshold, and each call would fault in fresh zeroed pages (~3% of a CPU forward).
        self.cpu_rows = max(256, (4 << 20) // config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] > self.cpu_rows:
            return torch.cat([self(chunk) for chunk in x.split(self.cpu_rows)])
        return kernels.apply(kernels.apply(x, self.linear_fc1, gelu=self.approximate), self.linear_fc2)


class Block(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary: Rotary, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Fuse each 2x2 block of patches into one token: (N, D) -> (N/4, O).

    The final merger normalises each token before the shuffle (LN over D); DeepStack mergers normalise
    after it (LN over 4D). Both use the exact erf GELU, whatever the blocks use.
    """

    def __init__(self, config: EncoderConfig, postshuffle_norm: bool) -> None:
        super().__init__()
        self.wide = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.wide if postshuffle_norm else config.hidden_size, eps=config.layer_norm_eps)
        self.linear_fc1 = nn.Linear(self.wide, self.wide)
        self.linear_fc2 = nn.Linear(self.wide, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, self.wide))  # (N/4, 4D), features [(0,0) | (0,1) | (1,0) | (1,1)] x D
        else:
            x = self.norm(x).view(-1, self.wide)
        return kernels.apply(kernels.apply(x, self.linear_fc1, gelu="none"), self.linear_fc2)


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


class VisionEncoder(nn.Module):
    """One vision tower for every preset; see the module docstring for the data flow."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = (
            nn.Embedding(config.num_position_embeddings, config.hidden_size) if config.num_position_embeddings else None
        )
        self.rotary_pos_emb = VisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.merger = PatchMerger(config, postshuffle_norm=False) if config.has_merger else None
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
            tables = GridTables(
                *(t.to(device, non_blocking=True) if t is not None else None for t in vars(cpu).values())
            )
            if len(self._grid_cache) > 4096:  # native-resolution streams have many grids; keep memory bounded
                self._grid_cache.clear()
            self._grid_cache[key] = tables
        return tables

    def _batch_tables(self, grid_thw: Sequence[Grid], device: torch.device, raster: bool):
        """Per-batch tables: one entry per temporal slice of each image (slices share their grid's tables)."""
        slice_grids = [(h, w) for t, h, w in grid_thw for _ in range(t)]
        slices = [self.grid_tables(h, w, device) for h, w in slice_grids]

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
        to_raster = None
        if raster:
            starts = itertools.accumulate(segments.lengths[:-1], initial=0)
            to_raster = torch.cat([tab.to_raster + start for tab, start in zip(slices, starts)])
        return pos, rotary, segments, to_raster

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
            token_order: ``block`` (the reference's order) or ``raster`` for ``patch`` rows.
        """
        if token_order not in ("block", "raster"):
            raise UsageError(f"token order {token_order!r} is not one of: block, raster")
        features = self.check_features(features)
        grid_thw = [tuple(int(v) for v in g) for g in grid_thw]
        expected = sum(t * h * w for t, h, w in grid_thw)
        if pixel_values.shape != (expected, self.config.patch_dim):
            raise UsageError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected ({expected}, {self.config.patch_dim}) "
                f"for grids {grid_thw}"
            )
        device = pixel_values.device
        merge_unit = self.config.spatial_merge_size**2
        per_patch = [f for f in features if f == "patch" or f.startswith("block:")]
        reorder = bool(per_patch) and token_order == "raster" and merge_unit > 1
        pos, rotary, segments, to_raster = self._batch_tables(grid_thw, device, reorder)

        x = self.patch_embed(pixel_values)  # (N, D)
        if pos is not None:
            x += pos.to(x.dtype)

        taps = self.config.deepstack_visual_indexes if "deepstack" in features else ()
        blocks_out = {block_index(f, self.config.depth): f for f in features if f.startswith("block:")}
        needed = [max(taps) + 1 if taps else 0, *(i + 1 for i in blocks_out)]
        if "patch" in features or "merged" in features:
            needed.append(self.config.depth)
        out: dict[str, torch.Tensor] = {}
        deepstack = []
        for index, block in enumerate(self.blocks[: max(needed)]):
            x = block(x, rotary, segments)  # (N, D)
            if index in taps:
                deepstack.append(self.deepstack_merger_list[taps.index(index)](x))  # (N/4, O)
            if index in blocks_out:
                out[blocks_out[index]] = x[to_raster] if reorder else x

        patch_rows = [t * h * w for t, h, w in grid_thw]
        rows: dict[str, list[int]] = {f: patch_rows for f in blocks_out.values()}
        if "patch" in features:
            out["patch"] = x[to_raster] if reorder else x
            rows["patch"] = patch_rows
        if "merged" in features:
            out["merged"] = self.merger(x)
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
            if ".norm" in name or name.startswith("norm"):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
                param.copy_(values)
