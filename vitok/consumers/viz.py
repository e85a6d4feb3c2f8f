"""Pictures of tokens: the image beside the first three principal components of its patch tokens mapped to RGB on
the patch grid (the figure DINOv2 made familiar), and the norm of each token as a heat map. matplotlib is the
``vitok[viz]`` extra."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..inputs.sources import is_tar


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("pictures need matplotlib: pip install 'vitok[viz]'") from None
    return plt


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """(n, D) -> (n, 3) in [0, 1]: the first three principal components, each scaled to its range."""
    centred = tokens.astype(np.float64) - tokens.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = centred @ vt[:3].T
    if components.shape[1] < 3:
        components = np.pad(components, ((0, 0), (0, 3 - components.shape[1])))
    low, high = components.min(0), components.max(0)
    return (components - low) / np.where(high > low, high - low, 1.0)


def raster_grid(tokens: np.ndarray, h: int, w: int, merge: int, order: str) -> np.ndarray:
    """Rows of one image's per-patch tokens as an (h, w, D) grid, from block or raster order."""
    if order.startswith("block") and merge > 1:
        from ..encoder.geometry import block_order_positions

        rows, cols = block_order_positions(h, w, merge)
        grid = np.empty((h, w, tokens.shape[-1]), dtype=tokens.dtype)
        grid[rows.numpy(), cols.numpy()] = tokens
        return grid
    return tokens.reshape(h, w, -1)


def _image_of(record: dict):
    """The picture a record came from, read again from its file, tar member or parquet row (None if gone)."""
    from PIL import Image

    from ..inputs.decode import load_any_image

    source, member = record.get("source", ""), record.get("member")
    try:
        if member and is_tar(source):
            with tarfile.open(source) as tar:
                return load_any_image(Image.open(io.BytesIO(tar.extractfile(member).read())))
        if member and source.lower().endswith(".parquet"):
            return None
        return load_any_image(source)
    except Exception:  # the source moved or is damaged: draw the tokens alone
        return None


def draw(tokens_grid: np.ndarray, image, out: Path, title: str) -> Path:
    plt = _pyplot()
    h, w, d = tokens_grid.shape
    flat = tokens_grid.reshape(-1, d)
    panels = [("image", image)] if image is not None else []
    panels += [("first 3 principal components", pca_rgb(flat).reshape(h, w, 3)),
               ("token norm", np.linalg.norm(flat, axis=-1).reshape(h, w))]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for axis, (name, picture) in zip(axes[0], panels):
        shown = axis.imshow(picture, interpolation="nearest", cmap="viridis" if name == "token norm" else None)
        if name == "token norm":
            figure.colorbar(shown, ax=axis, fraction=0.046)
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))  # non-UTF-8 names
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def token_picture(store, key: str, out, feature: str | None = None) -> Path:
    """The picture of one stored image's per-patch tokens (``patch`` or ``block:N``; else ``merged``)."""
    per_patch = [f for f in store.features if f == "patch" or f.startswith("block:")]
    feature = feature or (per_patch[0] if per_patch else "merged")
    try:
        record = store.info(key)
    except KeyError as exc:  # not in the store, or skipped/failed there (the reason)
        raise UsageError(f"{exc.args[0]}; vitok info {store.root} lists the keys and skips") from None
    if store.header.settings.pool != "none" or feature == "deepstack":
        raise UsageError("a picture needs every token of one feature: a store without --pool, not deepstack")
    _, h, w = record["grid"]
    merge = int(store.header.settings.model.config.get("spatial_merge_size", 2))
    tokens = store.get(key, feature)
    if feature == "merged":
        grid = tokens.reshape(h // merge, w // merge, -1)
    else:
        grid = raster_grid(tokens[: h * w], h, w, merge, store.header.settings.token_order[feature])
    return draw(grid, _image_of(record), out, f"{key} ({feature}, grid {h}x{w})")


def image_picture(path, model: str, out, device: str = "auto") -> Path:
    """The picture of one image file encoded by ``model`` (patch tokens, raster order)."""
    from ..encoder.inference import load_encoder
    from ..inputs.preprocess import Preprocessor

    encoder = load_encoder(model, device=device)
    prepared = Preprocessor(encoder.preprocess).load(path)
    tokens = encoder.encode([prepared], ("patch",), "raster").features["patch"].float().cpu().numpy()
    _, h, w = prepared.grid_thw
    from ..inputs.decode import load_any_image

    return draw(tokens[: h * w].reshape(h, w, -1), load_any_image(path), out, f"{Path(path).name} ({model}, patch)")
