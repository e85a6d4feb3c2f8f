"""The client side of vLLM's encoder cache: requests that make a vLLM consumer load an image's exported encoder
output (``vitok export STORE DEST --layout vllm-ec``) instead of running its vision tower. Imports neither torch nor
vLLM (torch only when ``request`` builds a grid tensor).

What vLLM does with a request (vLLM 0.33-0.34: ``vllm/multimodal/processing/inputs.py``,
``ProcessorInputs.get_mm_hashes``; ``vllm/distributed/ec_transfer/ec_connector/example_connector.py``):

- an image's cache key (its mm_hash) is the request's uuid **verbatim only when the request carries no
  ``mm_processor_kwargs`` and no ``media_io_kwargs`` for images**; with either, the uuid is hashed with them and the
  model id, no entry has that name, and the tower runs, silently. Set pixel limits on the server, never per request;
- a uuid without an entry runs the tower on the consumer; nothing reports the miss;
- a consumer (``ec_role: ec_consumer``) takes an image given by its grid alone, ``{"image_grid_thw": G}``: the grid
  sizes the placeholder and the embedding comes from the cache, so no pixels travel or are decoded. Sending the image
  itself works too (the server decodes it only to count its tokens).

Usage::

    cache = VllmCache.from_export("/shared/ec-cache")        # or VllmCache.from_store("out/"): what export writes
    prompt = "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\\n" \\
             "<|im_start|>assistant\\n"
    llm.generate(cache.request(prompt, ["photos/cat.jpg"]))  # grid only
    cache.chat_part("photos/cat.jpg", "https://host/cat.jpg")  # an OpenAI chat content part carrying the uuid

A key that changes content in place keeps its uuid (``--key store`` names entries after the key), so a consumer
keeps serving the old entry until the export is redone and the server's own cache forgets it; ``--key content``
names entries by the pixels' content id, which a changed image cannot share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..storage.keys import key_from_text, key_text

IMAGE_PAD = "<|image_pad|>"  # Qwen's image placeholder: one per image in a text prompt


@dataclass(frozen=True)
class CacheEntry:
    """One image (or video) as the cache holds it: its exact store key, the entry's uuid, its grid in patches (a
    video's ``video_grid_thw``), its rows."""

    key: str
    uuid: str
    image_grid_thw: tuple[int, int, int]
    tokens: int
    modality: str = "image"  # or video: an entry of a store of videos


class VllmCache:
    """The images of a vllm-ec export (or of a store, named as its export names them), by exact key."""

    def __init__(self, entries: Iterable[CacheEntry]) -> None:
        self.entries = {entry.key: entry for entry in entries}

    @classmethod
    def from_export(cls, dest: str | os.PathLike, storage_options=None) -> VllmCache:
        """The entries a vllm-ec export (a folder, or ``s3://BUCKET/PREFIX``) lists in ``uuids.jsonl`` (exact keys
        from ``key_bytes_hex`` or the text)."""
        from ..storage.roots import store_root
        from .export_target import read_marker
        from .serving import UUIDS_FILE, entry_grid

        root = store_root(dest, "DEST", storage_options)
        marker = read_marker(root)
        if marker is None or marker.layout != "vllm-ec":
            raise UsageError(f"{dest} is not a vllm-ec export (vitok export STORE DEST --layout vllm-ec writes one)")
        entries = []
        for line in root.read(UUIDS_FILE).decode("ascii").splitlines():
            row = json.loads(line)
            if "key_bytes_hex" in row:
                key = bytes.fromhex(row["key_bytes_hex"]).decode("utf-8", "surrogateescape")
            else:
                key = key_from_text(row["key"])
            (t, h, w), = entry_grid(row)
            entries.append(CacheEntry(key, row["uuid"], (int(t), int(h), int(w)), int(row["tokens"]),
                                      row.get("modality", "image")))
        return cls(entries)

    @classmethod
    def from_store(cls, store, key: str = "store") -> VllmCache:
        """The entries ``vitok export STORE DEST --layout vllm-ec --key KEY`` writes for ``store`` (a path or an open
        store), without reading a token: images whose tokens were counted NaN/Inf at extraction are left out, as
        export leaves them out (export also leaves out values found non-finite then: ``from_export`` is exact)."""
        from ..storage.store import open_store
        from .export import KEY_MODES, nonfinite_reason
        from .serving import EmbedsContract, _embeds_needs, content_entry_name, entry_name, store_modality

        if key not in KEY_MODES:
            raise UsageError(f"key {key!r} is not one of: {', '.join(KEY_MODES)}")
        opened = open_store(store) if isinstance(store, (str, os.PathLike)) else store
        try:
            merge = EmbedsContract.of_store(opened.header).merge_size
            _embeds_needs(opened)
            modality = store_modality(opened)
            entries = []
            for name in opened.keys():
                record = opened.info(name)
                if nonfinite_reason(record):
                    continue
                if key == "content" and not record.get("content_id"):
                    raise UsageError(f"key 'content' needs a content_id in every record; {key_text(name)!r} has none")
                t, h, w = (int(v) for v in record["grid"])
                uuid = content_entry_name(str(record["content_id"])) if key == "content" else entry_name(name)
                entries.append(CacheEntry(name, uuid, (t, h, w), t * h * w // merge**2, modality))
            return cls(entries)
        finally:
            if opened is not store:
                opened.close()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str | bytes) -> bool:
        return _key(key) in self.entries

    def __getitem__(self, key: str | bytes) -> CacheEntry:
        try:
            return self.entries[_key(key)]
        except KeyError:
            raise KeyError(f"{key_text(_key(key))!r} is not in this cache (left out of the export, or not in the "
                           "store)") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def request(self, prompt: str | Sequence[int], keys: Sequence[str | bytes], images: Sequence[Any] | None = None
                ) -> dict[str, Any]:
        """A prompt for ``LLM.generate`` whose images are served from the cache: ``multi_modal_uuids`` names each
        image's entry, in order, and nothing makes vLLM hash them (no processor or media kwargs). Without
        ``images`` the request carries each image's grid alone (``{"image_grid_thw": (n, 3)}``, a consumer's
        grid-only item: no pixels); with them, the images themselves (decoded by the server only to count tokens).
        A text prompt must hold one ``<|image_pad|>`` per image."""
        entries = [self[k] for k in keys]
        if not entries:
            raise ValueError("a request needs at least one image")
        videos = [e for e in entries if e.modality != "image"]
        if videos:  # vLLM's video items need their frames' metadata; a grid-only video item is not verified
            raise ValueError(f"{key_text(videos[0].key)!r} is a video: request() builds image requests; pass the "
                             "video's uuid as multi_modal_uuids={'video': [uuid]} (uuids.jsonl gives its "
                             "video_grid_thw and video_metadata)")
        if isinstance(prompt, str) and prompt.count(IMAGE_PAD) != len(entries):
            raise ValueError(f"the prompt holds {prompt.count(IMAGE_PAD)} {IMAGE_PAD} placeholder(s) for "
                             f"{len(entries)} image(s)")
        if images is None:
            import torch

            data: Any = {"image_grid_thw": torch.tensor([e.image_grid_thw for e in entries], dtype=torch.long)}
        else:
            if len(images) != len(entries):
                raise ValueError(f"{len(images)} image(s) given for {len(entries)} key(s)")
            data = list(images)
        text = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        return {**text, "multi_modal_data": {"image": data}, "multi_modal_uuids": {"image": [e.uuid for e in entries]}}

    def chat_part(self, key: str | bytes, url: str) -> dict[str, Any]:
        """An OpenAI chat content part for ``vllm serve``: the image by URL (fetched and decoded by the server only
        to count its tokens) with the uuid of its entry. Send no ``mm_processor_kwargs`` with the request."""
        return {"type": "image_url", "image_url": {"url": url}, "uuid": self[key].uuid}


def _key(key: str | bytes) -> str:
    return key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key
