"""Everything that depends only on an image's grid, computed once per grid on the host and cached by the encoder.

Rows of an image come in the reference's merge-block order: patch (r, c) of an h x w grid sorts by
(r // m, c // m, r % m, c % m). Attention runs over segments: each temporal slice of each image, or (Qwen2.5-VL) each
window of ``window_size`` pixels over the merged grid, after reordering the tokens window by window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


def window_order(h: int, w: int, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's window attention for one temporal slice of an h x w grid: the order of its merge units window by
    window (windows of ``window`` x ``window`` units, row-major, the last row and column cut short), and the number of
    tokens in each window. As transformers' ``get_vision_window_index``, padding included."""
    units_h, units_w = h // merge, w // merge
    index = torch.arange(units_h * units_w).reshape(units_h, units_w)
    pad_h, pad_w = window - units_h % window, window - units_w % window
    padded = torch.nn.functional.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
    windows_h, windows_w = (units_h + pad_h) // window, (units_w + pad_w) // window
    padded = padded.reshape(windows_h, window, windows_w, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    sizes = (padded != -100).sum(1)
    order = padded.reshape(-1)
    return order[order != -100], [int(s) * merge * merge for s in sizes if s > 0]


@dataclass
class GridTables:
    """Per-grid constants (one temporal slice): position-table taps, rotary cos/sin, raster permutation, windows."""

    pos_index: torch.Tensor | None  # (n, 4) long: taps into the flattened position table
    pos_weight: torch.Tensor | None  # (n, 4) float32: bilinear weights
    cos: torch.Tensor  # (n, head_dim/2) float32, angles [h | w]; both halves of a head use the same angles
    sin: torch.Tensor  # (n, head_dim/2) float32
    to_raster: torch.Tensor  # (n,) long: block-order rows -> raster order
    window_rows: torch.Tensor | None = None  # (n,) long: block-order rows listed window by window
    window_sizes: list[int] = field(default_factory=list)  # tokens of each window


def build_grid_tables(config, inv_freq: torch.Tensor, h: int, w: int) -> GridTables:
    merge = config.spatial_merge_size
    rows, cols = block_order_positions(h, w, merge)
    pos_index = pos_weight = None
    if config.num_position_embeddings:
        side = int(config.num_position_embeddings**0.5)
        row_taps, row_weights = _bilinear_axis(rows, h, side)
        col_taps, col_weights = _bilinear_axis(cols, w, side)
        pos_index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
        pos_weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    # Rotary angles: row and column each use head_dim/4 frequencies. The reference lays them out [h | w | h | w]
    # over a head; the two halves are equal, so only [h | w] is kept (see model.apply_rotary).
    freqs = torch.stack([rows, cols], dim=-1)[..., None].float() * inv_freq.float().cpu()  # (n, 2, hd/4)
    cos, sin = freqs.cos().flatten(1), freqs.sin().flatten(1)  # (n, hd/2)
    to_raster = torch.empty(h * w, dtype=torch.long)
    to_raster[rows * w + cols] = torch.arange(h * w)
    tables = GridTables(pos_index, pos_weight, cos, sin, to_raster)
    if config.window_size:
        units, tables.window_sizes = window_order(h, w, merge, config.window_size // merge // config.patch_size)
        unit = merge * merge
        tables.window_rows = (units[:, None] * unit + torch.arange(unit)).reshape(-1)  # tokens of each unit
    return tables


@dataclass
class Segments:
    """Which rows attend to which: consecutive segments (temporal slices of images, or windows), as host integers.

    Runs of consecutive segments with the same length are attended as one dense batch, so a batch of same-size
    images (or of full windows) costs one attention call per layer, not one per segment.
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
