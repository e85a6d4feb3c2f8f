"""Preset registry: every ``configs/*.toml`` file is one named model (encoder shape + preprocessing).

A preset is data, not a class: one encoder implementation serves them all.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UsageError
from ..inputs.preprocess_config import PreprocessConfig
from .config import EncoderConfig


@dataclass(frozen=True)
class Preset:
    """A named model: its tower, how its images are preprocessed, and where real weights live."""

    name: str
    encoder: EncoderConfig
    preprocess: PreprocessConfig
    hf_repo: str | None  # Hugging Face repo whose vision tower this preset describes, if released
    description: str  # the comment block at the top of the preset file


def _config_files() -> dict[str, str]:
    try:  # installed: configs/ is the package vitok.configs
        root = resources.files("vitok.configs")
    except ModuleNotFoundError:  # a source tree on PYTHONPATH: configs/ sits beside vitok/
        root = Path(__file__).resolve().parents[2] / "configs"
    return {Path(entry.name).stem: entry.read_text() for entry in root.iterdir() if entry.name.endswith(".toml")}


def _parse(name: str, text: str) -> Preset:
    data = tomllib.loads(text)
    comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    description = " ".join(comments[1:]) if len(comments) > 1 else ""
    return Preset(
        name=name,
        encoder=EncoderConfig.from_dict({"name": name, **data["encoder"]}),
        preprocess=PreprocessConfig.from_dict(data.get("preprocess", {})),
        hf_repo=data.get("hf_repo"),
        description=description,
    )


@functools.cache
def registry() -> dict[str, Preset]:
    """All presets by name, sorted."""
    return {name: _parse(name, text) for name, text in sorted(_config_files().items())}


def get_preset(name: str) -> Preset:
    """Look up a preset; an unknown name lists the valid ones."""
    presets = registry()
    if name not in presets:
        raise UsageError(f"unknown model preset {name!r}; valid presets: {', '.join(presets)}")
    return presets[name]
