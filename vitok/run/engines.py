"""``--engine``: which class runs a job. The local engine (``runner.Run``) and Ray's (``ray_engine.RayRun``, a
subclass that spreads decoding and encoding over a cluster) write the same store; a new engine is one more class
here."""

from __future__ import annotations

from .runner import Run


def engine_class(name: str) -> type[Run]:
    """``--engine``: the class that runs the job (``Run``, or a subclass that spreads the work otherwise)."""
    if name == "ray":
        from .ray_engine import RayRun

        return RayRun
    return Run
