"""What the machine and its libraries were when a store was written (stored in the run header, for the record).

Exact pixel parity depends on the decoder stack: libjpeg-turbo's output has changed between releases, so the header
keeps Pillow's, its libjpeg-turbo's, simplejpeg's and torchvision's versions beside torch's.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

from . import settings
from .version import __version__


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return None


def cache_dir() -> Path:
    """This machine's cache of measured and computed facts (kernel choices, checkpoint hashes):
    ``$VITOK_CACHE_DIR``, default ``~/.cache/vitok``. Losing it costs time, never a result."""
    return Path(os.environ.get("VITOK_CACHE_DIR") or Path.home() / ".cache" / "vitok")


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_description() -> str:
    """e.g. ``AMD EPYC (2 cores, AVX-512)``: the CPU a figure comes from."""
    import os

    flags = cpu_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()} ({cores} cores, {isa})"


def decoder_versions() -> dict[str, str | None]:
    from PIL import features

    return {
        "pillow": _version("pillow"),
        "libjpeg_turbo": features.version("libjpeg_turbo") if features.check("libjpeg_turbo") else None,
        "simplejpeg": _version("simplejpeg") if settings.enabled("simplejpeg") else None,
        "torchvision": _version("torchvision"),
        "torchcodec": _version("torchcodec"),  # videos (with the system's FFmpeg libraries)
        "av": _version("av"),  # videos with --video-decoder pyav (its FFmpeg bundled)
    }


def describe_environment(encoder: Any = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "vitok": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "h5py": _version("h5py"),
        "decoders": decoder_versions(),
        "settings": settings.describe(),
        "cpu": cpu_description(),
    }
    if encoder is not None:
        info["device"] = str(encoder.device)
        if encoder.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(encoder.device)
        info["weight_files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns]
                                for p in encoder.source.weight_files if p.exists()]
    return info
