"""Shared fixtures: the transformers reference with every parameter randomised, test images, tiny presets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from s3server import moto_endpoint, s3  # noqa: F401  (fixtures: a real S3 endpoint on loopback)

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "examples" / "images"
ODD = Path(__file__).resolve().parent / "data" / "odd"

TINY_VISION = dict(
    depth=3, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
    num_position_embeddings=2304, deepstack_visual_indexes=[0, 2],
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases and norm affines included), at the scale of trained towers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.02 * noise)
            else:
                param.copy_(0.05 * noise)
    return model


def reference_model(seed: int = 0, **overrides):
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    config = Qwen3VLVisionConfig(**{**TINY_VISION, **overrides})
    model = Qwen3VLVisionModel(config).eval()
    return randomize_(model, seed), config


def vitok_from_reference(reference, config, name: str = "tiny"):
    from vitok.encoder.config import EncoderConfig
    from vitok.encoder.model import VisionEncoder

    model = VisionEncoder(EncoderConfig.from_hf_vision_config(config.to_dict(), name)).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="session")
def reference_pair():
    reference, config = reference_model()
    return reference, config, vitok_from_reference(reference, config)


@pytest.fixture(scope="session", autouse=True)
def _kernel_choices_in_a_temporary_cache(tmp_path_factory):
    """The tests time kernels into their own cache, never the user's ~/.cache/vitok (subprocesses inherit it)."""
    import os

    os.environ["VITOK_CACHE_DIR"] = str(tmp_path_factory.mktemp("vitok-cache"))
    yield


@pytest.fixture(autouse=True)
def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


@pytest.fixture(autouse=True)
def _pristine_vitok_logger():
    """The CLI points the 'vitok' logger at its own stream and stops propagation; in-process CLI tests would leave
    it so for the next test (whose caplog would then see nothing). Every test starts from the library's state."""
    import logging

    logger = logging.getLogger("vitok")
    logger.handlers[:], logger.propagate, logger.level = [], True, logging.NOTSET
    yield


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs mounted for the test (skips where mounting needs a root this process is not)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
