"""Process-wide switches for kernels and decoders, in one place (the shape of timm's ``layers/config.py``).

Each switch has an environment variable, read once when first asked for, and can be read and set at run time::

    from vitok import settings
    settings.get("onednn")                 # "auto"
    settings.set("simplejpeg", "off")
    with settings.override(onednn="off"):  # tests and benchmarks
        ...

=============  ====================  ==========  =================================================================
switch         environment variable  values      what it does
=============  ====================  ==========  =================================================================
``onednn``     ``VITOK_ONEDNN``      auto|on|off  x86 CPUs: linear layers and short attention on oneDNN. ``auto``
                                                 times oneDNN against torch's own GEMM on the model's shapes at
                                                 first use and keeps the faster (``vitok.encoder.kernel_choice``).
``triton``     ``VITOK_TRITON``      on|off      CUDA: the 2D rotary as one Triton kernel (self-checked first).
``simplejpeg`` ``VITOK_SIMPLEJPEG``  on|off      plain JPEGs through simplejpeg (self-checked against Pillow).
=============  ====================  ==========  =================================================================

``1``/``0``, ``true``/``false`` and ``yes``/``no`` are accepted for ``on``/``off``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Switch:
    env: str
    default: str
    choices: tuple[str, ...]
    doc: str


SWITCHES: dict[str, Switch] = {
    "onednn": Switch("VITOK_ONEDNN", "auto", ("auto", "on", "off"),
                     "x86 CPU linear layers and attention on oneDNN; auto = timed against torch's GEMM"),
    "triton": Switch("VITOK_TRITON", "on", ("on", "off"), "CUDA rotary as one Triton kernel"),
    "simplejpeg": Switch("VITOK_SIMPLEJPEG", "on", ("on", "off"), "plain JPEGs decoded by simplejpeg"),
}
_ALIASES = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
_values: dict[str, str] = {}
_lock = threading.Lock()


def _normalise(name: str, value: str) -> str:
    switch = SWITCHES[name]
    text = _ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if text not in switch.choices:
        raise UsageError(f"{switch.env}={value!r}: {name} must be one of {', '.join(switch.choices)} (or 1/0)")
    return text


def _check_name(name: str) -> None:
    if name not in SWITCHES:
        raise UsageError(f"unknown vitok setting {name!r}; settings: {', '.join(SWITCHES)}")


def get(name: str) -> str:
    """The switch's current value: what ``set`` gave, else its environment variable, else its default."""
    _check_name(name)
    with _lock:
        if name not in _values:
            _values[name] = _normalise(name, os.environ.get(SWITCHES[name].env, SWITCHES[name].default))
        return _values[name]


def set(name: str, value: str) -> None:  # noqa: A001 - the settings module's verb, as timm's set_*
    """Change a switch for this process (DataLoader workers started later inherit it)."""
    _check_name(name)
    normalised = _normalise(name, value)
    with _lock:
        _values[name] = normalised
    os.environ[SWITCHES[name].env] = normalised  # worker processes read it from the environment


def enabled(name: str) -> bool:
    """True unless the switch is ``off``."""
    return get(name) != "off"


@contextlib.contextmanager
def override(**values: str) -> Iterator[None]:
    """Set switches for the duration of a ``with`` block, then restore them."""
    previous = {name: get(name) for name in values}
    env = {name: os.environ.get(SWITCHES[name].env) for name in values}
    try:
        for name, value in values.items():
            set(name, value)
        yield
    finally:
        for name, value in previous.items():
            with _lock:
                _values[name] = value
            if env[name] is None:
                os.environ.pop(SWITCHES[name].env, None)
            else:
                os.environ[SWITCHES[name].env] = env[name]


def describe() -> dict[str, str]:
    """Every switch and its current value (for the run header and ``vitok --version``)."""
    return {name: get(name) for name in SWITCHES}
