"""CUDA paths (run by scripts/gpu_check.sh on a lent GPU machine; skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_model, rel_error, vitok_from_reference

from vitok.errors import UsageError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GRIDS = [(1, 28, 28), (1, 30, 40), (1, 16, 16), (1, 28, 28), (1, 52, 50), (1, 2, 2)]


def _pair(dtype, attention, seed=0):
    reference, config = reference_model(seed=seed)
    model = vitok_from_reference(reference, config)
    reference = reference.to("cuda", dtype)
    model = model.to("cuda", dtype)
    model.set_attention(attention)
    return reference, model


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_cuda_parity_with_reference(dtype, tolerance, attention):
    reference, model = _pair(dtype, attention)
    n = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(n, model.config.patch_dim, device="cuda")
    with torch.no_grad():
        expected = reference(pixels, torch.tensor(GRIDS, device="cuda"))
        got = model(pixels, GRIDS, features=("patch", "merged", "deepstack")).features
    errors = {"patch": rel_error(got["patch"], expected.last_hidden_state),
              "merged": rel_error(got["merged"], expected.pooler_output)}
    for k, feature in enumerate(expected.deepstack_features):
        errors[f"deepstack{k}"] = rel_error(got["deepstack"][k], feature)
    print(f"{dtype} {attention}: {errors}")
    assert max(errors.values()) <= tolerance, errors


def test_device_selection():
    from vitok.parallel import Part, device_for
    from vitok.runtime import resolve_device, resolve_dtype

    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert device_for(Part(0, 2, 0, "torchrun"), "auto") == "cuda:0"


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 3e-2), ("float32", 1e-4)])
def test_extract_on_cuda_matches_cpu(tmp_path, dtype, tolerance):
    """Pinned per-image copies into one device buffer, one batch in flight: the same tokens as the CPU."""
    from helpers import all_tokens, make_folder

    import vitok

    folder = make_folder(tmp_path / "imgs", count=12)
    common = dict(model="qwen3-vl-tiny", store_dtype="float32", workers=2, features=["merged"], token_budget=1500)
    vitok.extract([str(folder)], tmp_path / "cpu", device="cpu", **common)
    summary = vitok.extract([str(folder)], tmp_path / "gpu", device="cuda", dtype=dtype, **common)
    assert summary.skipped >= 5
    cpu, gpu = all_tokens(tmp_path / "cpu"), all_tokens(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        err = np.abs(cpu[key] - gpu[key]).max() / np.abs(cpu[key]).max()
        assert err <= tolerance, (key, err)
