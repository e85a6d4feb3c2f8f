"""Content identity: what a record's hashes mean, computed in one place so anyone can recompute them.

Every ok record carries two hashes, and the run header the identity of what turned pixels into tokens:

    source_sha256   sha256 of the input file's bytes, as read (the tar member's or parquet cell's bytes for
                    archives), lowercase hex. Equal for byte-identical files.
    content_id      sha256 of the pixels the encoder saw, lowercase hex (version 1, ``CONTENT_ID``):
                        sha256( b"vitok-pixels/1 grid=T,H,W patch=C,P,P\\n" + the uint8 patch bytes )
                    the patches being the resized image cut into (T*H*W, C, P, P) uint8 rows in the encoder's row
                    order (2x2 merge blocks, ``vitok.inputs.preprocess.patchify``), one frame (before the temporal
                    repeat), T, H, W the grid in patches; a video's rows hold their F frames each
                    (``patch=C,F,P,P``, ``vitok.inputs.video_preprocess``). Equal pixels give an equal id whatever
                    the file's bytes, name or format; a change of resize settings or decoder output gives another.
    header "identity" (written by the run, ``run.settings_schema.header_identity``)
        vision_revision  sha256( canonical JSON of the encoder config (the header's settings.model.config) + b"\\n"
                         + the weights hash (settings.model.weights) ), lowercase hex
                         (``storage.records.vision_revision``). The weights hash is vitok's
                         hash of every tower tensor (``vitok.encoder.checkpoint.weights_hash``: blake2b-128 over the
                         tensors sorted by name, each ``name|dtype|shape`` then its bytes) or ``seeded-random:N``.
        decoder          the libraries that decode and resize (Pillow, libjpeg-turbo, ...) and the decode mode.

Two images with equal ``content_id`` encoded with the same vision revision and token settings have the same tokens:
that is what lets a run encode each distinct image once and take tokens from another store (``--reuse``).
The header settings that do not decide tokens (format, shard size, input options) are left out of that comparison
(``Settings.token_json``). No torch import here: the hashes take numpy arrays or anything with a buffer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

CONTENT_ID = "vitok-pixels/1: sha256 of 'vitok-pixels/1 grid=T,H,W patch=C,P,P\\n' + uint8 patches (T*H*W,C,P,P)"
SOURCE_HASH = "sha256 of the input file's bytes"


def source_sha256(data: bytes | memoryview) -> str:
    """sha256 of a file's bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


Sha256 = hashlib.sha256  # the same hash fed block by block (a file too large to hold: a video)


def content_id(patches: Any, grid: Sequence[int]) -> str:
    """The pixel content id of an image: ``patches`` is the (T*H*W, C, P, P) uint8 array (numpy, or a CPU torch
    tensor) in the encoder's row order, ``grid`` its (T, H, W) in patches. A video's patches are (T*H*W, C, F, P, P),
    F frames per row (the temporal patch), and its header says ``patch=C,F,P,P``."""
    patches = _as_numpy(patches)
    n, c, *frames, p, q = patches.shape if patches.ndim in (4, 5) else (0, 0, 0, 0)
    t, h, w = (int(v) for v in grid)
    if patches.dtype.itemsize != 1 or n != t * h * w or p != q:
        raise ValueError(f"content_id wants (T*H*W, C, P, P) uint8 patches for grid {tuple(grid)}, got "
                         f"{patches.dtype} {tuple(patches.shape)}")
    digest = ContentHash(grid, patches.shape[1:])
    digest.update(patches)
    return digest.hexdigest()


class ContentHash:
    """``content_id`` fed a piece at a time (a video cut in time: its rows in order, each piece's patches): the same
    digest as ``content_id`` of all the rows at once."""

    def __init__(self, grid: Sequence[int], row_shape: Sequence[int]) -> None:
        c, *frames, p, q = (int(v) for v in row_shape) if len(row_shape) in (3, 4) else (0, 0, 0)
        if p != q:
            raise ValueError(f"content_id wants square patches, got rows of shape {tuple(row_shape)}")
        t, h, w = (int(v) for v in grid)
        self.row_shape = tuple(int(v) for v in row_shape)
        patch = ",".join(str(v) for v in (c, *frames, p, q))
        self._digest = hashlib.sha256(f"vitok-pixels/1 grid={t},{h},{w} patch={patch}\n".encode())

    def update(self, patches: Any) -> None:
        patches = _as_numpy(patches)
        if patches.dtype.itemsize != 1 or tuple(patches.shape[1:]) != self.row_shape:
            raise ValueError(f"content_id wants uint8 rows of shape {self.row_shape}, got {patches.dtype} "
                             f"{tuple(patches.shape)}")
        self._digest.update(memoryview(patches.reshape(-1)) if patches.flags.c_contiguous else patches.tobytes())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _as_numpy(patches: Any) -> Any:
    return patches.numpy() if hasattr(patches, "numpy") else patches  # a torch tensor (on the CPU)
