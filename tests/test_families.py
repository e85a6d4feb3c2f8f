"""Parity of every family's tower with its transformers module (every parameter random, several grids at once), its
checkpoint layout, and its image processor."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PHOTOS, randomize_, rel_error
from PIL import Image, ImageOps
from safetensors.torch import save_file

from vitok.encoder.config import EncoderConfig
from vitok.encoder.inference import load_encoder
from vitok.encoder.model import VisionEncoder

# square, wide, tall, a grid that is not a multiple of the window, the smallest (2x2), and a repeat
GRIDS = [(1, 8, 8), (1, 6, 14), (1, 12, 6), (1, 10, 6), (1, 2, 2), (1, 8, 8)]
SMALL = dict(depth=3, num_heads=4)


def qwen2_vl():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = Qwen2VLVisionConfig(embed_dim=64, hidden_size=48, mlp_ratio=2, **SMALL)
    return Qwen2VisionTransformerPretrainedModel._from_config(config), config, "qwen2_vl"


def qwen2_5_vl():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    # windows of 56 px = 2 x 2 merged tokens; block 1 attends to whole images
    config = Qwen2_5_VLVisionConfig(hidden_size=64, intermediate_size=80, out_hidden_size=48, window_size=56,
                                    fullatt_block_indexes=[1], **SMALL)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config), config, "qwen2_5_vl"


def qwen3_5():
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    config = Qwen3_5VisionConfig(hidden_size=64, intermediate_size=96, out_hidden_size=48, **SMALL)
    return Qwen3_5VisionModel._from_config(config), config, "qwen3_5"


def qwen3_vl():
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    config = Qwen3VLVisionConfig(hidden_size=64, intermediate_size=96, out_hidden_size=48,
                                 deepstack_visual_indexes=[0, 2], **SMALL)
    return Qwen3VLVisionModel._from_config(config), config, "qwen3_vl"


FAMILIES = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_5": qwen3_5, "qwen3_vl": qwen3_vl}


def pair(family: str, seed: int = 0):
    reference, config, model_type = FAMILIES[family]()
    randomize_(reference.eval(), seed)
    ours = VisionEncoder(EncoderConfig.from_hf_vision_config(config.to_dict(), family, model_type)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def reference_outputs(reference, family, pixels, grids):
    grid = torch.tensor(grids)
    out = reference(pixels, grid_thw=grid)
    patch = out.last_hidden_state
    if family == "qwen2_5_vl":  # the reference leaves its last hidden state in window order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, 2, reference.config.window_size, reference.config.patch_size)
        patch = patch.view(-1, 4, patch.shape[-1])[torch.argsort(window_index)].reshape(patch.shape)
    outputs = {"patch": patch, "merged": out.pooler_output}
    for k, tensor in enumerate(getattr(out, "deepstack_features", None) or []):
        outputs[f"deepstack{k}"] = tensor
    return outputs


def compare(reference, ours, family, grids, dtype):
    torch.manual_seed(1)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), ours.config.patch_dim)
    reference, ours = reference.to(dtype), ours.to(dtype)
    features = ("patch", "merged", "deepstack") if ours.config.deepstack_visual_indexes else ("patch", "merged")
    with torch.no_grad():
        expected = reference_outputs(reference, family, pixels.to(dtype), grids)
        got = ours(pixels, grids, features=features).features
    errors = {"patch": rel_error(got["patch"], expected["patch"]), "merged": rel_error(got["merged"],
                                                                                     expected["merged"])}
    for k in range(len(ours.config.deepstack_visual_indexes)):
        errors[f"deepstack{k}"] = rel_error(got["deepstack"][k], expected[f"deepstack{k}"])
    return errors


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_parity_on_mixed_grids(family):
    reference, ours = pair(family)
    errors = compare(reference, ours, family, GRIDS, torch.float32)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_parity(family):
    reference, ours = pair(family, seed=3)
    errors = compare(reference, ours, family, GRIDS[:4], torch.bfloat16)
    assert max(errors.values()) <= 2e-2, errors


def test_window_attention_equals_the_eager_oracle():
    _, ours = pair("qwen2_5_vl")
    pixels = torch.randn(sum(t * h * w for t, h, w in GRIDS), ours.config.patch_dim)
    with torch.no_grad():
        fast = ours(pixels, GRIDS, features=("patch", "merged")).features
        ours.set_attention("eager")
        eager = ours(pixels, GRIDS, features=("patch", "merged")).features
    assert rel_error(fast["merged"], eager["merged"]) <= 1e-5 and rel_error(fast["patch"], eager["patch"]) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_a_family_lacks_are_usage_errors(family):
    from vitok.errors import UsageError

    _, ours = pair(family)
    if family == "qwen3_vl":
        assert "deepstack" in ours.config.features
        return
    with pytest.raises(UsageError, match="offers: patch, merged"):
        ours.check_features(["deepstack"])


def released_folder(folder, family):
    """A checkpoint folder in the family's released layout: config.json, sharded safetensors and an index, the
    language model's tensors in a shard that is not even valid safetensors (reading it fails the load)."""
    reference, config, model_type = FAMILIES[family]()
    randomize_(reference, 7)
    prefix = "visual." if family.startswith("qwen2") else "model.visual."
    folder.mkdir(parents=True)
    tower = {prefix + k: v.contiguous() for k, v in reference.state_dict().items()}
    keys = sorted(tower)
    save_file({k: tower[k] for k in keys[::2]}, str(folder / "model-00001-of-00003.safetensors"))
    save_file({k: tower[k] for k in keys[1::2]}, str(folder / "model-00002-of-00003.safetensors"))
    (folder / "model-00003-of-00003.safetensors").write_bytes(b"language model, never read")
    weight_map = {k: f"model-0000{1 + i % 2}-of-00003.safetensors" for i, k in enumerate(keys)}
    weight_map["model.language_model.embed_tokens.weight"] = "model-00003-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    vision = config.to_dict()
    vision.pop("model_type", None)  # older releases leave it out: the top-level model_type decides
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vision_config": vision}))
    return reference


@pytest.mark.parametrize("family", FAMILIES)
def test_released_checkpoint_layout_loads_by_its_config(tmp_path, family):
    reference = released_folder(tmp_path / "ckpt", family).eval()
    encoder = load_encoder(str(tmp_path / "ckpt"), device="cpu", dtype="float32")
    assert encoder.config.family == family
    assert encoder.preprocess.patch_size == encoder.config.patch_size
    errors = compare(reference, encoder.model, family, GRIDS[:3], torch.float32)
    assert max(errors.values()) <= 1e-5, errors


PHOTO_FILES = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))
QWEN2_PROCESSOR = dict(patch_size=14, temporal_patch_size=2, merge_size=2,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                       min_pixels=3136, max_pixels=12845056)


@pytest.mark.parametrize("path", PHOTO_FILES, ids=lambda p: p.name)
def test_qwen2_family_pixels_equal_the_reference_processor(path):
    from transformers import Qwen2VLImageProcessor

    from vitok.encoder.config import preprocess_for_tower
    from vitok.encoder.presets import get_preset
    from vitok.inputs.preprocess import Preprocessor

    processor = Qwen2VLImageProcessor(**QWEN2_PROCESSOR)
    out = processor(images=[ImageOps.exif_transpose(Image.open(path))], return_tensors="pt")
    for preset in ("qwen2-vl-2b", "qwen2.5-vl-7b"):
        config = get_preset(preset).preprocess
        assert config == preprocess_for_tower(get_preset(preset).encoder)
        pre = Preprocessor(config)
        prepared = pre.load(path)
        assert prepared.grid_thw == tuple(out["image_grid_thw"][0].tolist())
        assert torch.equal(pre.pixel_values(prepared), out["pixel_values"])


# ---- configs not tried before: every family, every dimension a released or plausible config varies -------------

VISION_CONFIG_CLASSES = {
    "qwen2_vl": "transformers.models.qwen2_vl.configuration_qwen2_vl.Qwen2VLVisionConfig",
    "qwen2_5_vl": "transformers.models.qwen2_5_vl.configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig",
    "qwen3_vl": "transformers.models.qwen3_vl.configuration_qwen3_vl.Qwen3VLVisionConfig",
    "qwen3_vl_moe": "transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe.Qwen3VLMoeVisionConfig",
    "qwen3_5": "transformers.models.qwen3_5.configuration_qwen3_5.Qwen3_5VisionConfig",
    "qwen3_5_moe": "transformers.models.qwen3_5_moe.configuration_qwen3_5_moe.Qwen3_5MoeVisionConfig",
}


def vision_config_class(model_type: str):
    import importlib

    module, _, name = VISION_CONFIG_CLASSES[model_type].rpartition(".")
    return getattr(importlib.import_module(module), name)


# what a config.json may carry, fields left out included (each dict is completed by transformers' class)
PARTIAL_VISION_CONFIGS = [
    {},  # the class's default tower
    {"depth": 3, "num_heads": 4},
    {"num_hidden_layers": 5, "num_attention_heads": 2, "hidden_act": "gelu"},  # the classes' attribute_map aliases
    {"patch_size": 14, "spatial_merge_size": 3, "temporal_patch_size": 1, "in_channels": 1},
    {"rope_theta": 500.0, "initializer_range": 0.5, "torch_dtype": "bfloat16", "dtype": "bfloat16"},
]


@pytest.mark.parametrize("partial", PARTIAL_VISION_CONFIGS, ids=lambda d: ",".join(d) or "empty")
@pytest.mark.parametrize("model_type", VISION_CONFIG_CLASSES)
def test_fields_left_out_mean_the_transformers_defaults(model_type, partial):
    """vitok reads a vision_config that leaves fields out (or spells them as aliases) as transformers completes it."""
    complete = vision_config_class(model_type)(**partial).to_dict()
    expected = EncoderConfig.from_hf_vision_config(complete, "x", model_type)
    assert EncoderConfig.from_hf_vision_config(dict(partial), "x", model_type) == expected
    # the released family defaults, where they are shape-relevant
    reference = vision_config_class(model_type)(**partial)
    assert expected.depth == reference.depth and expected.num_heads == reference.num_heads
    assert tuple(getattr(reference, "deepstack_visual_indexes", ())) == expected.deepstack_visual_indexes


def test_the_defaults_table_is_transformers_own():
    from vitok.encoder.config import HF_VISION_DEFAULTS, MODEL_TYPES

    for model_type in VISION_CONFIG_CLASSES:
        defaults = vision_config_class(model_type)().to_dict()
        for key, value in HF_VISION_DEFAULTS[MODEL_TYPES[model_type]].items():
            assert defaults[key] == (list(value) if isinstance(value, tuple) else value), (model_type, key)


@pytest.mark.parametrize("name", __import__("vitok.encoder.config", fromlist=["x"]).ACTIVATIONS)
def test_every_activation_is_act2fn(name):
    from transformers.activations import ACT2FN

    from vitok.encoder.model import activate

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    for dtype in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(activate(x.to(dtype), name), ACT2FN[name](x.to(dtype)), rtol=0, atol=0)


def shaped_pair(family: str, **overrides):
    """A tiny reference tower of the family with ``overrides`` and vitok's tower read from its config."""
    import importlib

    classes = {
        "qwen2_vl": ("qwen2_vl", "Qwen2VisionTransformerPretrainedModel", dict(embed_dim=64, hidden_size=48)),
        "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel",
                       dict(hidden_size=64, intermediate_size=80, out_hidden_size=48, window_size=56,
                            fullatt_block_indexes=[1])),
        "qwen3_vl": ("qwen3_vl", "Qwen3VLVisionModel", dict(hidden_size=64, intermediate_size=96, out_hidden_size=48,
                                                             num_position_embeddings=64,
                                                             deepstack_visual_indexes=[1, 0])),
        "qwen3_5": ("qwen3_5", "Qwen3_5VisionModel", dict(hidden_size=64, intermediate_size=96, out_hidden_size=48,
                                                           num_position_embeddings=64)),
    }
    module, model_class, base = classes[family]
    config = vision_config_class(family)(**{"depth": 2, "num_heads": 4, **base, **overrides})
    reference = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), model_class)
    reference = randomize_(reference._from_config(config).eval(), 0)
    ours = VisionEncoder(EncoderConfig.from_hf_vision_config(config.to_dict(), family)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def compare_any(reference, ours, family, grids):
    """Largest absolute difference over patch, merged and each DeepStack output (any merge size)."""
    torch.manual_seed(1)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), ours.config.patch_dim)
    with torch.no_grad():
        out = reference(pixels, grid_thw=torch.tensor(grids))
        got = ours(pixels, grids, features=ours.config.features).features
    patch, unit = out.last_hidden_state, ours.config.spatial_merge_size**2
    if family == "qwen2_5_vl":  # the reference leaves its last hidden state in window order
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(torch.tensor(grids), ours.config.spatial_merge_size,
                                           reference.config.window_size, reference.config.patch_size)
        patch = patch.view(-1, unit, patch.shape[-1])[torch.argsort(index)].reshape(patch.shape)
    expected = {"patch": patch, "merged": out.pooler_output}
    for k, tensor in enumerate(getattr(out, "deepstack_features", None) or []):
        expected[f"deepstack{k}"] = tensor
    got = {"patch": got["patch"], "merged": got["merged"],
           **{f"deepstack{k}": t for k, t in enumerate(got.get("deepstack", []))}}
    assert got.keys() == expected.keys()
    return max((got[k].double() - expected[k].double()).abs().max().item() for k in got)


GRIDS_BY_MERGE = {1: [(1, 3, 5), (1, 1, 1), (1, 1, 7)], 2: [(1, 4, 6), (1, 2, 2), (1, 2, 10), (2, 4, 4)],
                  3: [(1, 6, 9), (1, 3, 3), (1, 3, 12)]}
# (family, overrides): shapes of released and plausible towers that the tiny defaults above do not exercise
SHAPES = [
    ("qwen2_vl", dict(patch_size=16, spatial_merge_size=3, hidden_act="gelu_pytorch_tanh")),
    ("qwen2_vl", dict(embed_dim=80, num_heads=1, temporal_patch_size=3, in_channels=1)),  # head dim 80
    ("qwen2_5_vl", dict(patch_size=16, window_size=112)),  # 112 / 32 = 3.5: windows of 3 merged tokens
    ("qwen2_5_vl", dict(window_size=60, fullatt_block_indexes=[])),  # 60 / 28: windows of 2, no full-attention block
    ("qwen2_5_vl", dict(spatial_merge_size=3, window_size=84, hidden_size=72, num_heads=1, fullatt_block_indexes=[1, 0],
                        hidden_act="gelu_pytorch_tanh")),  # head dim 72, unsorted full-attention blocks
    ("qwen2_5_vl", dict(spatial_merge_size=1, window_size=28, temporal_patch_size=1, hidden_act="swish")),
    ("qwen3_vl", dict(patch_size=14, spatial_merge_size=3, deepstack_visual_indexes=[1], hidden_size=88,
                      num_heads=1, hidden_act="gelu_new")),  # head dim 88, DeepStack on the last block
    ("qwen3_vl", dict(spatial_merge_size=1, num_position_embeddings=50, deepstack_visual_indexes=[],
                      temporal_patch_size=1, in_channels=4)),  # a non-square table, no DeepStack
    # as transformers: every index has a merger; a repeated block is tapped once, blocks past the last never
    ("qwen3_vl", dict(deepstack_visual_indexes=[1, 1, 5])),
    ("qwen3_vl", dict(deepstack_visual_indexes=[8, 16, 24])),  # the default on a shallow tower: no DeepStack output
    ("qwen3_5", dict(hidden_size=80, num_heads=2, temporal_patch_size=3, num_position_embeddings=16,
                     out_hidden_size=80, hidden_act="quick_gelu")),  # head dim 40
]


@pytest.mark.parametrize(("family", "overrides"), SHAPES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={v}" for k, v in v.items()))
def test_float32_parity_across_shapes(family, overrides):
    reference, ours = shaped_pair(family, **overrides)
    error = compare_any(reference, ours, family, GRIDS_BY_MERGE[ours.config.spatial_merge_size])
    assert error <= 1e-4, error


UNSUPPORTED = [  # (family, vision_config fields, the field the one-line error must name)
    ("qwen3_vl", dict(hidden_size=68, num_heads=2), "head_dim"),  # 34: transformers' rotary cannot run it either
    ("qwen3_vl", dict(hidden_act="prelu"), "hidden_act"),  # a learned activation: weights vitok does not have
    ("qwen2_5_vl", dict(window_size=20), "window_size"),  # smaller than one merged token
    ("qwen3_5", dict(rope_parameters={"rope_type": "default", "rope_theta": 1.0}), "rope_type"),
    ("qwen2_vl", dict(patch_size=[14, 16]), "patch_size"),
]


@pytest.mark.parametrize(("family", "fields", "named"), UNSUPPORTED, ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_configs_fail_at_load_in_one_line(tmp_path, family, fields, named):
    from vitok.encoder.checkpoint import resolve_model
    from vitok.errors import UsageError

    vision = {"model_type": family, "depth": 2, "num_heads": 4, "hidden_size": 64, "embed_dim": 64,
              "intermediate_size": 64, "out_hidden_size": 32, **fields}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": family, "vision_config": vision}))
    with pytest.raises(UsageError) as error:
        resolve_model(str(tmp_path))
    message = str(error.value)
    assert named in message and "\n" not in message, message


PROCESSORS = {"qwen2": dict(patch_size=14, size={"shortest_edge": 784, "longest_edge": 40000}),
              "qwen3": dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                            size={"shortest_edge": 1024, "longest_edge": 40000})}


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_extract_of_a_saved_checkpoint_equals_the_reference(tmp_path, family):
    """``vitok extract`` on a folder transformers saved (weights and preprocessor_config.json), read back with
    vitok.open, equals the reference tower run on the reference processor's pixels, merged and DeepStack outputs; an
    image the reference processor refuses is skipped with its reason in the manifest."""
    import numpy as np
    from helpers import in_process
    from test_checkpoint import saved_vl_folder
    from transformers import Qwen2VLImageProcessor

    import vitok

    reference = saved_vl_folder(tmp_path / "ckpt", family)
    processor = Qwen2VLImageProcessor(**PROCESSORS["qwen2" if family.startswith("qwen2") else "qwen3"])
    processor.save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (1, 1), (3, 100), (77, 33), (3, 700)]  # the last: aspect ratio over 200
    (tmp_path / "imgs").mkdir()
    for w, h in sizes:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{w}x{h}.png")
    deepstack = bool(reference.config.to_dict().get("deepstack_visual_indexes"))
    result = in_process("extract", str(tmp_path / "imgs"), "--model", str(tmp_path / "ckpt"), "-o",
                        str(tmp_path / "out"), "--workers", "0", "--quiet", "--device", "cpu", "--dtype", "float32",
                        "--store-dtype", "float32", "--features", "merged,deepstack" if deepstack else "merged")
    assert result.returncode == 0, result.stderr
    store = vitok.open(tmp_path / "out")
    keys = {key.rsplit("/", 1)[-1].removesuffix(".png"): key for key in store.keys()}
    assert set(keys) == {f"{w}x{h}" for w, h in sizes[:-1]}
    for w, h in sizes[:-1]:
        pixels = processor(images=[Image.open(tmp_path / "imgs" / f"{w}x{h}.png")], return_tensors="pt")
        with torch.no_grad():
            expected = reference(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
        np.testing.assert_allclose(store.get(keys[f"{w}x{h}"], "merged"), expected.pooler_output.numpy(), rtol=1e-5,
                                   atol=1e-5)
        if deepstack:
            stored = store.get(keys[f"{w}x{h}"], "deepstack")
            assert stored.shape[0] == len(expected.deepstack_features)
            for k, tensor in enumerate(expected.deepstack_features):
                np.testing.assert_allclose(stored[k], tensor.numpy(), rtol=1e-5, atol=1e-5)
    skipped = json.loads(next((tmp_path / "out" / "shards").glob("*.json")).read_text())
    assert "aspect ratio 233.3 exceeds 200" in json.dumps(skipped)


def test_deepstack_indexes_past_the_last_block_store_and_serve_the_blocks_tapped(tmp_path):
    """A Qwen3-VL config with DeepStack indexes past its last block (as the (8, 16, 24) default on a shallow tower):
    every index has a merger in the checkpoint, only the blocks that exist are tapped, and the store, its vLLM
    embeddings and their contract count those levels, as transformers' model does."""
    import numpy as np
    from helpers import in_process
    from test_checkpoint import saved_vl_folder

    import vitok
    from vitok.consumers.serving import EmbedsContract
    from vitok.inputs.preprocess import Preprocessor
    from vitok.inputs.preprocess_config import PreprocessConfig

    reference = saved_vl_folder(tmp_path / "ckpt", "qwen3_vl", deepstack_visual_indexes=[1, 5, 1])
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" /
                                                                                                  "a.png")
    result = in_process("extract", str(tmp_path / "imgs"), "--model", str(tmp_path / "ckpt"), "-o",
                        str(tmp_path / "out"), "--workers", "0", "--quiet", "--device", "cpu", "--dtype", "float32",
                        "--store-dtype", "float32", "--features", "merged,deepstack", "--min-pixels", "4096")
    assert result.returncode == 0, result.stderr
    store = vitok.open(tmp_path / "out")
    key = store.keys()[0]
    pre = Preprocessor(PreprocessConfig(min_pixels=4096))
    prepared = pre.load(tmp_path / "imgs" / "a.png")
    with torch.no_grad():
        expected = reference(pre.pixel_values(prepared), grid_thw=torch.tensor([prepared.grid_thw]))
    assert len(expected.deepstack_features) == 1
    np.testing.assert_allclose(store.get(key, "deepstack"), torch.stack(expected.deepstack_features).numpy(),
                               rtol=1e-5, atol=1e-5)
    embeds, _ = store.image_embeds(key)
    assert embeds.shape[1] == 2 * 32 and EmbedsContract.of_store(store.header).levels == 1
