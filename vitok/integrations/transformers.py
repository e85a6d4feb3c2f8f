"""Train or evaluate a transformers Qwen3-VL / Qwen3.5 / Qwen2.5-VL model on cached image and video features: the
vision tower never runs.

The features of each image or video (the merger's tokens and, for Qwen3-VL, the DeepStack levels) come from a vitok
store by key and reach the model through ``mm_encoder_outputs``, the argument transformers' Qwen-VL models take in
place of ``pixel_values`` / ``pixel_values_videos``; position ids (M-RoPE) come from ``image_grid_thw`` /
``video_grid_thw`` and ``mm_token_type_ids`` as usual::

    store = vitok.open("out/")        # extracted with the model's own tower: --features merged,deepstack
    collate = CachedImagesCollator(store, model.config, pad_token_id=tokenizer.pad_token_id)
    loader = DataLoader(samples, batch_size=8, collate_fn=collate)
    for batch in loader:              # samples: {"input_ids": [...], "images": [key, ...], "labels": [...]}
        loss = model(**batch).loss    # each image is ONE image-pad token in input_ids; the collator expands it
        loss.backward()

Videos: ``CachedVideosCollator(video_store, model.config, tokenizer=tokenizer, images=image_store)`` takes samples
``{"input_ids": [...], "videos": [key, ...], "images": [...]}`` where each video is ONE video-pad token (alone or
between vision start and end, as the chat template writes it) and expands it as transformers' processor does: for
Qwen3-VL and Qwen3.5, per temporal step the text ``<{time:.1f} seconds>`` (tokenized with ``tokenizer``), vision start,
the step's video-pad tokens and vision end, the template's own start/end pair dropped; for Qwen2-VL and Qwen2.5-VL one
block of video-pad tokens, and Qwen2.5-VL's ``second_per_grid_ts``. A store holds images or videos, never both: the
images of a sample come from a second store.

Extract with ``--store-dtype float32`` (or bfloat16 for a bf16 model) for features equal to the tower's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids, as transformers' processors write them
TIMESTAMP_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # Qwen3VLProcessor: times as text


def _holds(store, kind: str) -> None:
    """KeyError unless ``store`` is a store of ``kind`` (image or video): one store holds one kind."""
    videos = store.header.settings.video is not None
    if videos != (kind == "video"):
        other = "video" if videos else "image"
        raise KeyError(f"this store holds {other}s; {kind}s come from a store of {kind}s (one store holds one kind)")


def _features(store, keys: Sequence[str], kind: str, device=None, dtype=None):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    if "merged" not in store.features or store.header.settings.pool != "none":
        raise KeyError("the store must hold every merged token (--features merged, no --pool)")
    _holds(store, kind)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    merged = tuple(tensor(store.get(key, "merged")) for key in keys)
    deepstack: list[tuple[torch.Tensor, ...]] = []
    if "deepstack" in store.features:
        levels = [store.get(key, "deepstack") for key in keys]  # (K, n, O) each
        deepstack = [tuple(tensor(level[k]) for level in levels) for k in range(levels[0].shape[0])] if levels else []
    return BaseModelOutputWithDeepstackFeatures(pooler_output=merged, deepstack_features=deepstack)


def image_features(store, keys: Sequence[str], device=None, dtype=None):
    """``BaseModelOutputWithDeepstackFeatures`` of the images ``keys`` (in order), as ``get_image_features``
    returns it: per-image merged tokens and, per DeepStack level, per-image tokens."""
    return _features(store, keys, "image", device, dtype)


def video_features(store, keys: Sequence[str], device=None, dtype=None):
    """``BaseModelOutputWithDeepstackFeatures`` of the videos ``keys`` (in order), as ``get_video_features``
    returns it: per video its merged tokens (its temporal steps' rows one after another) and, per DeepStack level,
    per-video tokens. Pass it as ``mm_encoder_outputs={"video": ...}``."""
    return _features(store, keys, "video", device, dtype)


def _tapped(indexes, depth) -> list[int]:
    indexes = list(indexes or [])
    return [i for i in range(int(depth) if depth is not None else max(indexes, default=-1) + 1) if i in indexes]


def check_store_fits(store, vision) -> None:
    """Refuse a store whose features the model cannot take: merged tokens of another width (transformers then fails
    with a confusing count mismatch) or another number of DeepStack levels (training would inject only some)."""
    if vision is None:
        return
    tower = store.header.settings.model.config
    name = store.header.settings.model.name
    width, expected = tower.get("out_hidden_size"), getattr(vision, "out_hidden_size", None)
    if width is not None and expected is not None and int(width) != int(expected):
        raise ValueError(f"the store's merged tokens are {width} wide (tower {name}); this model takes {expected} "
                         "(vision_config.out_hidden_size): extract the store with this model's own tower")
    # the blocks tapped (a tower taps each block once, and never an index past its last block)
    wanted = _tapped(getattr(vision, "deepstack_visual_indexes", None), getattr(vision, "depth", None))
    stored = _tapped(tower.get("deepstack_visual_indexes"), tower.get("depth"))
    if wanted and "deepstack" in store.features and len(stored) != len(wanted):
        raise ValueError(f"the store holds {len(stored)} DeepStack level(s) (blocks {stored} of tower {name}); this "
                         f"model adds {len(wanted)} (vision_config.deepstack_visual_indexes {wanted}): extract the "
                         "store with this model's own tower")


class CachedFeaturesCollator:
    """Turns samples that name their images and videos by store key into the keyword arguments of a Qwen-VL model.

    A sample is ``{"input_ids": [...], "images": [key, ...], "videos": [key, ...]}`` (+ optional ``"labels"``), each
    image one ``image_token_id`` and each video one ``video_token_id`` in ``input_ids``, in the order of their keys.
    Each image placeholder is expanded to the image's merged tokens; each video placeholder as the model's processor
    expands it (module docstring). Every position the collator adds, and padding, gets label -100.
    """

    def __init__(self, config, images=None, videos=None, tokenizer=None, pad_token_id: int = 0, device=None,
                 dtype=None) -> None:
        self.stores = {"image": images, "video": videos}
        self.pad_token_id, self.device, self.dtype, self.tokenizer = pad_token_id, device, dtype, tokenizer
        def token(name: str) -> int:  # -1: the config has none (never in input_ids)
            value = getattr(config, name, None)
            return -1 if value is None else int(value)

        self.token_ids = {"image": token("image_token_id"), "video": token("video_token_id")}
        self.start, self.end = token("vision_start_token_id"), token("vision_end_token_id")
        self.model_type = str(getattr(config, "model_type", ""))
        vision = getattr(config, "vision_config", None)
        self.merge = int(getattr(vision, "spatial_merge_size", 2))
        self.temporal_patch = int(getattr(vision, "temporal_patch_size", 2))
        self._timestamp_ids: dict[str, list[int]] = {}
        wants_deepstack = bool(_tapped(getattr(vision, "deepstack_visual_indexes", None), getattr(vision, "depth",
                                                                                                 None)))
        for kind, store in self.stores.items():
            if store is None:
                continue
            _holds(store, kind)
            if "merged" not in store.features or store.header.settings.pool != "none":  # before DeepStack's advice
                raise KeyError(f"the store of {kind}s must hold every merged token (--features merged, no --pool)")
            if wants_deepstack and "deepstack" not in store.features:
                raise KeyError("this model adds DeepStack features: extract them too (--features merged,deepstack)")
            check_store_fits(store, vision)
        if videos is not None and self.timestamps and tokenizer is None:
            raise ValueError(f"{self.model_type} reads each temporal step's time as text (<t seconds>): pass the "
                             "model's tokenizer (tokenizer=...) to tokenize it")

    @property
    def timestamps(self) -> bool:
        return self.model_type in TIMESTAMP_FAMILIES

    def _time_ids(self, seconds: float) -> list[int]:
        text = f"<{seconds:.1f} seconds>"  # Qwen3VLProcessor.replace_video_token
        if text not in self._timestamp_ids:
            self._timestamp_ids[text] = [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]
        return self._timestamp_ids[text]

    def _video_tokens(self, key: str) -> tuple[list[int], list[int]]:
        """(ids, mm types) a video's placeholder expands to."""
        info = self.stores["video"].info(key)
        t, h, w = (int(v) for v in info["grid"])
        per_step = h * w // self.merge**2
        video = self.token_ids["video"]
        if not self.timestamps:  # Qwen2-VL, Qwen2.5-VL: one block
            return [video] * (t * per_step), [VIDEO] * (t * per_step)
        times = info["video"]["step_times"]
        if len(times) != t:
            raise ValueError(f"video {key!r}: {len(times)} step time(s) for {t} temporal step(s)")
        ids: list[int] = []
        types: list[int] = []
        for seconds in times:
            text = self._time_ids(float(seconds))
            ids += [*text, self.start, *[video] * per_step, self.end]
            types += [TEXT] * (len(text) + 1) + [VIDEO] * per_step + [TEXT]
        return ids, types

    def _image_tokens(self, key: str) -> tuple[list[int], list[int]]:
        n = int(np.prod(self.stores["image"].info(key)["grid"])) // self.merge**2
        return [self.token_ids["image"]] * n, [IMAGE] * n

    def _expand(self, ids: Sequence[int], labels: Sequence[int] | None, keys: dict[str, Sequence[str]]):
        ids = [int(i) for i in ids]
        if labels is not None and len(labels) != len(ids):  # shorter: an IndexError; longer: labels shifted silently
            raise ValueError(f"labels has {len(labels)} entries for {len(ids)} input_ids: give one label per input id")
        remaining = {}
        for kind, names in keys.items():
            if isinstance(names, (str, bytes)):  # a key, not a list: its characters were taken as keys
                raise ValueError(f"a sample's {kind}s must be a list of keys; got the string {names!r} "
                                 f"(write {kind}s=[{names!r}])")
            if names and self.token_ids[kind] < 0:
                raise ValueError(f"samples name {kind}s but the model's config has no {kind}_token_id")
            placeholders = sum(i == self.token_ids[kind] for i in ids)
            if placeholders != len(names):
                raise ValueError(f"{placeholders} {kind} placeholder(s) in input_ids for {len(names)} {kind} key(s)")
            if names and self.stores[kind] is None:
                raise ValueError(f"samples name {kind}s but the collator was given no store of {kind}s ({kind}s=...)")
            remaining[kind] = iter(names)
        out_ids: list[int] = []
        out_labels: list[int] = []
        types: list[int] = []
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == self.token_ids["image"]:
                expansion, kinds = self._image_tokens(next(remaining["image"]))
            elif token == self.token_ids["video"]:
                expansion, kinds = self._video_tokens(next(remaining["video"]))
                wrapped = (position > 0 and ids[position - 1] == self.start and position + 1 < len(ids)
                           and ids[position + 1] == self.end)
                if self.timestamps and wrapped:  # each step brings its own start/end: the template's pair goes
                    del out_ids[-1], out_labels[-1], types[-1]
                    position += 1
            else:
                out_ids.append(token)
                out_labels.append(int(labels[position]) if labels is not None else -100)
                types.append(TEXT)
                position += 1
                continue
            out_ids += expansion
            out_labels += [-100] * len(expansion)
            types += kinds
            position += 1
        return out_ids, out_labels, types

    def _second_per_grid_ts(self, key: str) -> float:
        """Qwen2.5-VL: temporal_patch_size / the sampled frame rate (transformers' VideoMetadata.sampled_fps)."""
        from ..consumers.serving import second_per_grid_ts

        return second_per_grid_ts(self.stores["video"].info(key)["video"], self.temporal_patch)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("no samples to collate (an empty batch)")
        expanded = [self._expand(s["input_ids"], s.get("labels"), {"image": s.get("images", []),
                                                                    "video": s.get("videos", [])}) for s in samples]
        length = max(len(ids) for ids, _, _ in expanded)
        batch = {name: torch.full((len(samples), length), fill, dtype=torch.long)
                 for name, fill in (("input_ids", self.pad_token_id), ("labels", -100), ("attention_mask", 0),
                                    ("mm_token_type_ids", 0))}
        for row, (ids, labels, types) in enumerate(expanded):
            n = len(ids)
            batch["input_ids"][row, :n] = torch.tensor(ids)
            batch["labels"][row, :n] = torch.tensor(labels)
            batch["attention_mask"][row, :n] = 1
            batch["mm_token_type_ids"][row, :n] = torch.tensor(types)
        encoder_outputs = {}
        for kind, extract in (("image", image_features), ("video", video_features)):
            keys = [key for s in samples for key in s.get(f"{kind}s", [])]
            if not keys:
                continue
            store = self.stores[kind]
            batch[f"{kind}_grid_thw"] = torch.tensor([store.info(key)["grid"] for key in keys], dtype=torch.long)
            encoder_outputs[kind] = extract(store, keys, self.device, self.dtype)
            if kind == "video" and self.model_type == "qwen2_5_vl":
                batch["second_per_grid_ts"] = torch.tensor([self._second_per_grid_ts(key) for key in keys])
        if encoder_outputs:
            batch["mm_encoder_outputs"] = encoder_outputs
        if not any("labels" in s for s in samples):
            batch.pop("labels")
        return batch


class CachedImagesCollator(CachedFeaturesCollator):
    """``CachedFeaturesCollator`` over a store of images (``videos=`` a store of videos, with ``tokenizer=`` for
    Qwen3-VL's timestamps, where samples name videos too). Each image is ONE ``image_token_id`` in ``input_ids``
    (between the vision start and end tokens, as the chat template writes it), expanded to its merged tokens."""

    def __init__(self, store, config, pad_token_id: int = 0, device=None, dtype=None, videos=None,
                 tokenizer=None) -> None:
        super().__init__(config, images=store, videos=videos, tokenizer=tokenizer, pad_token_id=pad_token_id,
                         device=device, dtype=dtype)


class CachedVideosCollator(CachedFeaturesCollator):
    """``CachedFeaturesCollator`` over a store of videos (``images=`` a store of images where samples name images
    too). ``tokenizer`` (the model's) tokenizes Qwen3-VL's and Qwen3.5's ``<t seconds>`` step times."""

    def __init__(self, store, config, tokenizer=None, pad_token_id: int = 0, device=None, dtype=None,
                 images=None) -> None:
        super().__init__(config, images=images, videos=store, tokenizer=tokenizer, pad_token_id=pad_token_id,
                         device=device, dtype=dtype)
