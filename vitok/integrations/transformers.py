"""Train or evaluate a transformers Qwen3-VL / Qwen3.5 model on cached image features: the vision tower never runs.

The features of each image (the merger's tokens and, for Qwen3-VL, the DeepStack levels) come from a vitok store by
key and reach the model through ``mm_encoder_outputs``, the argument transformers' Qwen3-VL models take in place of
``pixel_values``; position ids (M-RoPE) come from ``image_grid_thw`` and ``mm_token_type_ids`` as usual::

    store = vitok.open("out/")        # extracted with the model's own tower: --features merged,deepstack
    collate = CachedImagesCollator(store, model.config, pad_token_id=tokenizer.pad_token_id)
    loader = DataLoader(samples, batch_size=8, collate_fn=collate)
    for batch in loader:              # samples: {"input_ids": [...], "images": [key, ...], "labels": [...]}
        loss = model(**batch).loss    # each image is ONE image-pad token in input_ids; the collator expands it
        loss.backward()

Extract with ``--store-dtype float32`` (or bfloat16 for a bf16 model) for features equal to the tower's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def image_features(store, keys: Sequence[str], device=None, dtype=None):
    """``BaseModelOutputWithDeepstackFeatures`` of the images ``keys`` (in order), as ``get_image_features``
    returns it: per-image merged tokens and, per DeepStack level, per-image tokens."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    if "merged" not in store.features or store.header.settings.pool != "none":
        raise KeyError("the store must hold every merged token (--features merged, no --pool)")

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    merged = tuple(tensor(store.get(key, "merged")) for key in keys)
    deepstack: list[tuple[torch.Tensor, ...]] = []
    if "deepstack" in store.features:
        levels = [store.get(key, "deepstack") for key in keys]  # (K, n, O) each
        deepstack = [tuple(tensor(level[k]) for level in levels) for k in range(levels[0].shape[0])] if levels else []
    return BaseModelOutputWithDeepstackFeatures(pooler_output=merged, deepstack_features=deepstack)


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


class CachedImagesCollator:
    """Turns samples that name their images by store key into the keyword arguments of a Qwen3-VL model.

    A sample is ``{"input_ids": [...], "images": [key, ...]}`` (+ optional ``"labels"``), where each image is one
    ``image_token_id`` in ``input_ids`` (between the vision start and end tokens, as the chat template writes it).
    Each placeholder is expanded to the image's number of merged tokens; image and padding positions get label -100.
    """

    def __init__(self, store, config, pad_token_id: int = 0, device=None, dtype=None) -> None:
        self.store, self.pad_token_id, self.device, self.dtype = store, pad_token_id, device, dtype
        self.image_token_id = int(config.image_token_id)
        vision = getattr(config, "vision_config", None)
        self.merge = int(getattr(vision, "spatial_merge_size", 2))
        wants_deepstack = bool(_tapped(getattr(vision, "deepstack_visual_indexes", None), getattr(vision, "depth",
                                                                                                 None)))
        if wants_deepstack and "deepstack" not in store.features:
            raise KeyError("this model adds DeepStack features: extract them too (--features merged,deepstack)")
        check_store_fits(store, vision)

    def _expand(self, ids: Sequence[int], labels: Sequence[int] | None, keys: Sequence[str]):
        counts = [int(np.prod(self.store.info(key)["grid"])) // self.merge**2 for key in keys]
        placeholders = sum(int(i) == self.image_token_id for i in ids)
        if placeholders != len(keys):
            raise ValueError(f"{placeholders} image placeholder(s) in input_ids for {len(keys)} image key(s)")
        out_ids, out_labels, types = [], [], []
        remaining = iter(counts)
        for position, token in enumerate(ids):
            if int(token) == self.image_token_id:
                n = next(remaining)
                out_ids += [self.image_token_id] * n
                out_labels += [-100] * n
                types += [1] * n
            else:
                out_ids.append(int(token))
                out_labels.append(int(labels[position]) if labels is not None else -100)
                types.append(0)
        return out_ids, out_labels, types

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        expanded = [self._expand(s["input_ids"], s.get("labels"), s.get("images", [])) for s in samples]
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
        keys = [key for s in samples for key in s.get("images", [])]
        if keys:
            batch["image_grid_thw"] = torch.tensor([self.store.info(key)["grid"] for key in keys], dtype=torch.long)
            batch["mm_encoder_outputs"] = {"image": image_features(self.store, keys, self.device, self.dtype)}
        if not any("labels" in s for s in samples):
            batch.pop("labels")
        return batch
