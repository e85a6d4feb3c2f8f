"""Encoder parity with transformers' Qwen3VLVisionModel, attention paths, isolation, token order, presets."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_model, rel_error, vitok_from_reference

from vitok.encoder.config import EncoderConfig
from vitok.encoder.geometry import block_order_positions
from vitok.encoder.model import VisionEncoder
from vitok.encoder.presets import get_preset, registry
from vitok.errors import UsageError

# square, wide, tall, larger than the 48x48 table, the smallest (2x2), and a repeat of the first grid
GRIDS = [(1, 6, 8), (1, 4, 10), (1, 12, 4), (1, 52, 50), (1, 2, 2), (1, 6, 8)]


def _inputs(grids, dim, seed=1):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _compare(reference, model, grids, dtype):
    pixels = _inputs(grids, model.config.patch_dim)
    with torch.no_grad():
        expected = reference(pixels, torch.tensor(grids))
        got = model(pixels, grids, features=("patch", "merged", "deepstack")).features
    errors = {
        "patch": rel_error(got["patch"], expected.last_hidden_state),
        "merged": rel_error(got["merged"], expected.pooler_output),
    }
    for k, feature in enumerate(expected.deepstack_features):
        errors[f"deepstack{k}"] = rel_error(got["deepstack"][k], feature)
    return errors


def test_float32_parity_with_reference(reference_pair):
    reference, _, model = reference_pair
    errors = _compare(reference, model, GRIDS, torch.float32)
    assert max(errors.values()) <= 1e-5, errors


def test_bfloat16_parity_with_reference():
    reference, config = reference_model(seed=3)
    model = vitok_from_reference(reference, config)
    errors = _compare(reference.to(torch.bfloat16), model.to(torch.bfloat16), GRIDS[:3] + GRIDS[4:], torch.bfloat16)
    assert max(errors.values()) <= 2e-2, errors


def test_video_grid_with_two_temporal_slices(reference_pair):
    reference, _, model = reference_pair
    errors = _compare(reference, model, [(2, 4, 6), (1, 4, 4)], torch.float32)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.slow
def test_sdpa_matches_eager_oracle(reference_pair):
    _, _, model = reference_pair
    pixels = _inputs(GRIDS, model.config.patch_dim)
    with torch.no_grad():
        sdpa = model(pixels, GRIDS, features=("patch",)).features["patch"]
        model.set_attention("eager")
        try:
            eager = model(pixels, GRIDS, features=("patch",)).features["patch"]
        finally:
            model.set_attention("sdpa")
    assert rel_error(sdpa, eager) <= 1e-5


def test_images_do_not_attend_to_each_other(reference_pair):
    _, _, model = reference_pair
    first, second = [(1, 6, 8)], [(1, 6, 8)]
    alone = _inputs(first, model.config.patch_dim, seed=5)
    other = _inputs(second, model.config.patch_dim, seed=6)
    with torch.no_grad():
        single = model(alone, first, features=("patch", "merged")).features
        paired = model(torch.cat([alone, other]), first + second, features=("patch", "merged")).split()[0]
    torch.testing.assert_close(paired["patch"], single["patch"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paired["merged"], single["merged"], rtol=1e-5, atol=1e-5)


def test_raster_order_is_a_permutation_of_block_order(reference_pair):
    _, _, model = reference_pair
    grids = [(1, 4, 6)]
    pixels = _inputs(grids, model.config.patch_dim)
    with torch.no_grad():
        block = model(pixels, grids).features["patch"]
        out = model(pixels, grids, token_order="raster")
    raster = out.features["patch"]
    assert out.token_order == "raster"
    rows, cols = block_order_positions(4, 6, 2)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        torch.testing.assert_close(raster[r * 6 + c], block[i], rtol=0, atol=0)


def test_unavailable_feature_is_a_usage_error_listing_what_exists():
    model = VisionEncoder(get_preset("small").encoder)
    with pytest.raises(UsageError, match="offers: patch"):
        model.check_features(["merged"])


def test_parameter_counts_closed_form_equals_meta_build():
    for preset in registry().values():
        with torch.device("meta"):
            model = VisionEncoder(preset.encoder)
        assert sum(p.numel() for p in model.parameters()) == preset.encoder.num_parameters(), preset.name
    # the released towers, as counted from the reference implementation
    assert get_preset("qwen3-vl-2b").encoder.num_parameters() == 406_957_056
    assert get_preset("qwen3-vl-8b").encoder.num_parameters() == 576_388_336


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(UsageError, match="divisible"):
        EncoderConfig(name="x", hidden_size=65, depth=1, num_heads=4, intermediate_size=8)


@pytest.mark.slow
def test_original_api_shapes():
    from vitok import Qwen3VisionTransformer, create_qwen3_vl_vit

    model = Qwen3VisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 56, 56)).shape == (2, 16, 32)
    small = create_qwen3_vl_vit("small")
    with torch.no_grad():
        assert small(torch.randn(1, 3, 224, 224)).shape == (1, 256, 512)


def test_original_vit_tokens_equal_packed_path():
    """The batched (B, 3, H, W) path gives the same tokens as the packed per-image path."""
    from vitok import Qwen3VisionTransformer
    from vitok.inputs.preprocess import patchify

    model = Qwen3VisionTransformer(embed_dim=32, depth=2, num_heads=4).eval()
    images = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        batched = model(images)
        rows = torch.cat([patchify(im, 14, 1).reshape(6, -1) for im in images])
        packed = model(rows, [(1, 2, 3)] * 2).features["patch"]
    torch.testing.assert_close(batched.reshape(12, -1), packed, rtol=1e-5, atol=1e-6)


def test_a_forward_pass_while_autograd_records_runs_backward_and_gives_the_inference_tokens(reference_pair):
    """The documented ``model(images)`` outside ``no_grad`` (fine-tuning, feature attribution): it ran out= kernels
    that autograd refuses."""
    from vitok import Qwen3VisionTransformer

    _, _, model = reference_pair
    pixels = _inputs(GRIDS, model.config.patch_dim).requires_grad_()
    recorded = model(pixels, GRIDS, features=("patch", "merged", "deepstack")).features
    recorded["merged"].sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    assert any(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        plain = model(pixels, GRIDS, features=("patch", "merged", "deepstack")).features
    # (under autograd the linears are plain F.linear; without it, the kernel this machine chose: rounding apart)
    assert rel_error(recorded["merged"].detach(), plain["merged"]) <= 1e-5
    model.zero_grad(set_to_none=True)

    vit = Qwen3VisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=4)
    vit(torch.randn(1, 3, 56, 56)).sum().backward()  # trainable weights, default grad mode
