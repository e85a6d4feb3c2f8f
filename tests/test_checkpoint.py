"""Loading towers from checkpoint folders, sharded indexes, single files and a Hugging Face cache layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VISION, reference_model
from safetensors.torch import save_file

from vitok.encoder.checkpoint import resolve_model, save_tower
from vitok.encoder.inference import load_encoder
from vitok.errors import CheckpointError, UsageError

GRIDS = [(1, 4, 6), (1, 2, 2)]


def write_released_layout(folder, reference, config, prefix="model.visual."):
    """config.json + two safetensors shards + index, as released: tower keys plus language-model tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tower = {prefix + k: v.contiguous() for k, v in reference.state_dict().items()}
    keys = sorted(tower)
    half = len(keys) // 2
    lm = {"model.language_model.embed_tokens.weight": torch.randn(32, 16), "lm_head.weight": torch.randn(32, 16)}
    shard1 = {k: tower[k] for k in keys[:half]} | {"model.language_model.norm.weight": torch.ones(16)}
    shard2 = {k: tower[k] for k in keys[half:]}
    save_file(shard1, str(folder / "model-00001-of-00003.safetensors"))
    save_file(shard2, str(folder / "model-00002-of-00003.safetensors"))
    # A language-model-only shard that is not even valid safetensors: reading it would fail the load.
    (folder / "model-00003-of-00003.safetensors").write_bytes(b"not read by vitok")
    weight_map = {k: "model-00001-of-00003.safetensors" for k in shard1}
    weight_map |= {k: "model-00002-of-00003.safetensors" for k in shard2}
    weight_map |= {k: "model-00003-of-00003.safetensors" for k in lm}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    vision = {**config.to_dict(), "model_type": "qwen3_vl"}
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": vision}))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 1048576, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }))
    return folder


def _outputs(model, pixels, grids):
    with torch.no_grad():
        return model(pixels, grids, features=("patch", "merged", "deepstack")).features


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    reference, config = reference_model(seed=7)
    folder = write_released_layout(tmp_path_factory.mktemp("ckpt") / "Qwen3-VL-Tiny", reference, config)
    return reference, config, folder


@pytest.mark.slow
def test_sharded_folder_loads_only_the_tower_and_matches_reference(released):
    reference, _, folder = released
    encoder = load_encoder(str(folder), device="cpu", dtype="float32")
    assert encoder.source.name == "Qwen3-VL-Tiny"
    assert encoder.preprocess.max_pixels == 1048576 and encoder.preprocess.min_pixels == 4096
    assert encoder.weights_hash.startswith("blake2b:")
    n = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(n, encoder.config.patch_dim)
    got = _outputs(encoder.model, pixels, GRIDS)
    with torch.no_grad():
        expected = reference(pixels, torch.tensor(GRIDS))
    torch.testing.assert_close(got["merged"], expected.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["deepstack"][1], expected.deepstack_features[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["visual.", ""])
def test_other_prefixes(tmp_path, prefix):
    reference, config = reference_model(seed=2)
    folder = checkpoint_folder(tmp_path, lambda state: {prefix + k: v for k, v in state.items()}, reference, config)
    encoder = load_encoder(folder, device="cpu", dtype="float32")
    torch.testing.assert_close(encoder.model.pos_embed.weight, reference.pos_embed.weight)


def test_single_tower_file_round_trip(tmp_path, released):
    encoder = load_encoder(str(released[2]), device="cpu", dtype="float32")
    path = tmp_path / "tower.safetensors"
    save_tower(encoder.model, path, encoder.config)
    again = load_encoder(str(path), device="cpu", dtype="float32")
    assert again.weights_hash == encoder.weights_hash
    assert again.config.deepstack_visual_indexes == tuple(TINY_VISION["deepstack_visual_indexes"])


def checkpoint_folder(folder, change=lambda state: state, reference=None, config=None):
    """A one-file checkpoint folder (config.json + model.safetensors) of a tower state dict after ``change``."""
    if reference is None:
        reference, config = reference_model()
    state = change({k: v.contiguous() for k, v in reference.state_dict().items()})
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"vision_config": config.to_dict()}))
    return str(folder)


def test_wrong_shape_names_the_key(tmp_path):
    folder = checkpoint_folder(tmp_path, lambda state: state | {"blocks.1.attn.qkv.weight": torch.zeros(5, 5)})
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight"):
        load_encoder(folder, device="cpu")


def test_missing_key_is_named(tmp_path):
    folder = checkpoint_folder(tmp_path, lambda state: {k: v for k, v in state.items() if k != "merger.norm.bias"})
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): merger\.norm\.bias"):
        load_encoder(folder, device="cpu")


def test_unexpected_key_is_named(tmp_path):
    folder = checkpoint_folder(tmp_path, lambda state: state | {"blocks.9.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensor\(s\): blocks\.9\.extra"):
        load_encoder(folder, device="cpu")


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UsageError, match="valid presets: .*base.*qwen3-vl-2b"):
        resolve_model("no-such-model")


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": reference_model()[1].to_dict()}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="never unpickles"):
        resolve_model(str(tmp_path))


def test_repo_id_resolves_through_a_local_cache(tmp_path, monkeypatch, released):
    reference, config, _ = released
    repo = tmp_path / "hub" / "models--Qwen--Qwen3-VL-Tiny"
    write_released_layout(repo / "snapshots" / "0123abcd", reference, config)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    source = resolve_model("Qwen/Qwen3-VL-Tiny")
    assert source.name == "Qwen/Qwen3-VL-Tiny" and len(source.weight_files) == 2


def test_repo_id_without_cache_or_network_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="pass the folder with --model|pass a local checkpoint folder"):
        resolve_model("Qwen/Not-Cached")


def test_random_preset_is_deterministic_and_says_so(caplog):
    import logging

    from vitok.encoder import inference as runtime

    runtime._warned_random.discard("qwen3-vl-tiny")
    with caplog.at_level(logging.WARNING, logger="vitok"):
        first = load_encoder("qwen3-vl-tiny", device="cpu")
    second = load_encoder("qwen3-vl-tiny", device="cpu")
    assert sum("NOT meaningful" in r.getMessage() for r in caplog.records) == 1
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


# ---- folders as transformers writes them (save_pretrained of the whole vision-language model) ---------------------

TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
TINY_TOWERS = {
    "qwen2_vl": dict(depth=2, embed_dim=64, hidden_size=32, num_heads=4),
    "qwen2_5_vl": dict(depth=2, hidden_size=64, intermediate_size=96, out_hidden_size=32, num_heads=4, window_size=56,
                       fullatt_block_indexes=[1]),
    "qwen3_vl": dict(depth=2, hidden_size=64, intermediate_size=96, out_hidden_size=32, num_heads=4,
                     deepstack_visual_indexes=[1, 0], num_position_embeddings=64),
    "qwen3_5": dict(depth=2, hidden_size=64, intermediate_size=96, out_hidden_size=32, num_heads=4,
                    num_position_embeddings=64),
}
VL_CLASSES = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
              "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
              "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
              "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration")}


def saved_vl_folder(folder, family, dtype=None, shard=None, leave_out=(), prefix=None, **tower):
    """A tiny vision-language model of the family written by transformers' save_pretrained (config.json with the
    vision_config nested, weights under model.visual.), optionally in bf16/fp16, sharded with an index, with vision
    fields left out of config.json, or with the tower renamed to another prefix; ``tower`` overrides the tiny tower's
    vision_config. Returns the reference tower."""
    import transformers
    from conftest import randomize_

    config_class, model_class = (getattr(transformers, name) for name in VL_CLASSES[family])
    text = dict(TINY_TEXT)
    if family != "qwen3_5":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    model = model_class(config_class(vision_config={**TINY_TOWERS[family], **tower}, text_config=text)).eval()
    randomize_(model.model.visual, 5)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    config = json.loads((folder / "config.json").read_text())
    for key in leave_out:
        config["vision_config"].pop(key, None)
    for alias, key in (("num_attention_heads", "num_heads"), ("num_hidden_layers", "depth")):  # the attribute_map
        if alias in leave_out:
            config["vision_config"][alias] = TINY_TOWERS[family][key]
    (folder / "config.json").write_text(json.dumps(config))
    if prefix is not None:
        from safetensors.torch import load_file

        rename = lambda key: prefix + key.removeprefix("model.visual.") if key.startswith("model.visual.") else key  # noqa: E731
        for file in folder.glob("*.safetensors"):
            save_file({rename(k): v for k, v in load_file(file).items()}, str(file))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
            index.write_text(json.dumps(data))
    return model.model.visual.float()


# family, stored dtype, shard size, vision fields left out of config.json (their defaults apply; an alias named there
# is written instead of its field), prefix
SAVED = [
    ("qwen3_vl", torch.bfloat16, "20KB", ("patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels",
                                          "hidden_act", "rope_parameters", "model_type", "num_heads",
                                          "num_attention_heads"), None),
    ("qwen3_5", torch.float16, None, ("patch_size", "hidden_act", "model_type"), None),
    ("qwen2_5_vl", torch.bfloat16, "20KB", ("patch_size", "hidden_act", "tokens_per_second", "depth",
                                            "num_hidden_layers"), "visual."),
    ("qwen2_vl", None, None, ("mlp_ratio", "hidden_act", "patch_size"), "visual."),
]


@pytest.mark.parametrize(("family", "dtype", "shard", "leave_out", "prefix"), SAVED, ids=[s[0] for s in SAVED])
def test_folders_saved_by_transformers_load_and_match(tmp_path, family, dtype, shard, leave_out, prefix):
    reference = saved_vl_folder(tmp_path / "ckpt", family, dtype, shard, leave_out, prefix)
    encoder = load_encoder(str(tmp_path / "ckpt"), device="cpu", dtype="float32")
    grids = [(1, 4, 6), (1, 2, 2)]
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), encoder.config.patch_dim)
    with torch.no_grad():
        expected = reference(pixels, grid_thw=torch.tensor(grids))
        got = encoder.model(pixels, grids, features=encoder.config.features).features
    torch.testing.assert_close(got["merged"], expected.pooler_output, rtol=1e-5, atol=1e-5)
    for k, tensor in enumerate(getattr(expected, "deepstack_features", None) or []):
        torch.testing.assert_close(got["deepstack"][k], tensor, rtol=1e-5, atol=1e-5)


def test_a_processor_that_does_not_fit_the_tower_is_refused_at_resolve(tmp_path):
    reference, config = reference_model()
    folder = checkpoint_folder(tmp_path, reference=reference, config=config)
    # a preprocessor_config.json without patch_size means Qwen2VLImageProcessor's 14, not the tower's 16
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"merge_size": 2, "image_mean": [0.5] * 3}))
    with pytest.raises(UsageError, match="patch_size 14 does not fit the vision tower's patch_size 16") as error:
        resolve_model(folder)
    assert "\n" not in str(error.value)


def test_a_standalone_vision_config_without_depth_takes_the_class_default(tmp_path):
    """config.json written by a vision model's own save_pretrained, leaving out fields at their defaults (depth 27)."""
    from transformers import Qwen3VLVisionConfig

    vision = Qwen3VLVisionConfig(hidden_size=32, num_heads=2).to_diff_dict()
    vision.pop("depth", None)
    (tmp_path / "config.json").write_text(json.dumps(vision))
    save_file({"patch_embed.proj.weight": torch.zeros(32, 3, 2, 16, 16)}, str(tmp_path / "model.safetensors"))
    source = resolve_model(str(tmp_path))
    assert source.encoder.depth == 27 and source.encoder.deepstack_visual_indexes == (8, 16, 24)
    assert source.encoder.hidden_size == 32 and source.prefix == ""


def test_image_processor_settings_nested_in_processor_config_are_read_first_as_transformers_does(tmp_path, released):
    """transformers 5's processor.save_pretrained writes processor_config.json with the image processor's settings
    under "image_processor" and no preprocessor_config.json; from_pretrained reads the nested ones first."""
    import shutil

    from transformers import AutoImageProcessor

    _, _, original = released
    folder = tmp_path / "saved-by-transformers-5"
    shutil.copytree(original, folder)
    legacy = json.loads((folder / "preprocessor_config.json").read_text())
    nested = {**legacy, "size": {"shortest_edge": 65536, "longest_edge": 200704}}
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": nested, "processor_class": "X"}))
    for keep_legacy in (True, False):  # both files (nested wins), or only the nested one
        if not keep_legacy:
            (folder / "preprocessor_config.json").unlink()
        reference = AutoImageProcessor.from_pretrained(str(folder))
        preprocess = resolve_model(str(folder)).preprocess
        assert (preprocess.min_pixels, preprocess.max_pixels) == (65536, 200704)
        assert (reference.size["shortest_edge"], reference.size["longest_edge"]) == (65536, 200704)
