"""``--gpus``: one ``vitok extract`` child process per GPU of this machine, all into one store (the same parts as
torchrun would give them), and one exit code and one summary for all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from ..errors import UsageError
from .options import ExtractOptions
from .parallel import detect_part


def run_per_gpu(gpus: str, out: str, sources: list[str], options: ExtractOptions, quiet: bool = False
                ) -> tuple[int, dict[str, Any] | None]:
    """One child process per GPU, each ``vitok extract --part i --num-parts n --device cuda:g`` into one OUT: this
    process's part split between its GPUs.
    Returns the exit code for all of them and their merged summary (None when one failed)."""
    import torch

    if gpus == "all":
        ids = list(range(torch.cuda.device_count()))
    else:
        try:
            ids = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise UsageError(f"--gpus {gpus!r} must be 'all' or a comma list of GPU indexes") from None
    if not ids:
        raise UsageError("--gpus: no CUDA devices visible")
    if "-" in sources or options.files_from == "-":
        raise UsageError("--gpus cannot share stdin between processes; write the list to a file and use --files-from")
    # This process's own part (--part/--num-parts, a SLURM array task, a torchrun rank) is split between its GPUs:
    # child j of part p of N does part p + N*j of N*G, i.e. the shards of part p whose (index // N) % G == j, so the
    # children of all parts cover every part of N*G exactly once.
    parent = detect_part(options.part, options.num_parts)
    children = []
    for rank, gpu in enumerate(ids):
        child = options.replace(part=parent.index + parent.count * rank, num_parts=parent.count * len(ids),
                                device=f"cuda:{gpu}")
        cmd = [sys.executable, "-m", "vitok", "extract", *sources, "-o", str(out), *child.to_argv(), "--json"]
        if quiet:
            cmd.append("--quiet")
        children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ)))
    outputs = [child.communicate()[0] for child in children]
    summaries = [json.loads(text.strip().splitlines()[-1]) for text in outputs if text.strip()]
    code = exit_code_of([child.returncode for child in children])
    return code, (None if code else merge_summaries(summaries))


def exit_code_of(returncodes: list[int]) -> int:
    """One exit code for several children: a child killed by signal N (return code -N) counts as 128 + N."""
    return max((128 - c if c < 0 else c for c in returncodes), default=0)


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The summaries of the parts of one job as one summary of the same shape."""
    merged: dict[str, Any] = {}
    for key in summaries[0]:
        values = [s[key] for s in summaries]
        if key == "part":
            merged[key] = ",".join(values)
        elif key in ("out",):
            merged[key] = values[0]
        elif key == "seconds":
            merged[key] = max(values)
        elif key == "shards_other_parts":
            merged[key] = min(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[key] = sum(values)
        else:
            merged[key] = None if any(v is None for v in values) else values[0]
    seconds = merged.get("seconds") or 0
    done = merged["ok"] + merged["skipped"] + merged["failed"]
    merged["images_per_second"] = round(done / seconds, 3) if seconds else 0.0
    return merged
