"""Which part of the plan this process does, learned from the launcher's environment (no coordinator).

Precedence: explicit ``--part/--num-parts``, then torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), then SLURM
(job arrays ``SLURM_ARRAY_TASK_*`` times multi-task jobs ``SLURM_PROCID``/``SLURM_NTASKS``). Shard ``i`` belongs to
part ``i % num_parts``. A shard finished by any process is done for every later run, whatever its part count.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Part:
    index: int
    count: int
    local_rank: int | None  # which GPU of this node to use, when the launcher says
    launcher: str  # explicit | torchrun | slurm | single
    origin: str = ""  # the flags or variables the part was read from

    def owns(self, shard_index: int) -> bool:
        return shard_index % self.count == self.index

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def detect_part(part: int | None = None, num_parts: int | None = None, env: Mapping[str, str] | None = None) -> Part:
    env = os.environ if env is None else env
    if part is not None or num_parts is not None:
        if num_parts is None:
            raise UsageError("--part needs --num-parts")
        if part is None:
            part = _slurm_array_index(env, num_parts)
            if part is None:
                raise UsageError("--num-parts needs --part (or a SLURM array task id to take it from)")
        if not 0 <= part < num_parts:
            raise UsageError(f"--part {part} must be in 0..{num_parts - 1}")
        return Part(part, num_parts, _int(env, "LOCAL_RANK") or _int(env, "SLURM_LOCALID"), "explicit",
                    f"--part {part} --num-parts {num_parts}")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is not None and world is not None:
        if world < 1 or not 0 <= rank < world:
            raise UsageError(f"RANK={rank} WORLD_SIZE={world} from the environment do not make a part")
        return Part(rank, world, _int(env, "LOCAL_RANK"), "torchrun", f"RANK={rank} WORLD_SIZE={world}")
    array_count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    tasks = _int(env, "SLURM_NTASKS") or 1
    procid = _int(env, "SLURM_PROCID") or 0
    if array_count is not None or tasks > 1:
        array_index, array_parts = 0, 1
        if array_count is not None:
            array_index = _slurm_array_index(env, None)
            array_parts = array_count
        origin = " ".join(f"{k}={env[k]}" for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID",
                                                    "SLURM_NTASKS") if env.get(k))
        return Part(array_index * tasks + procid, array_parts * tasks, _int(env, "SLURM_LOCALID"), "slurm", origin)
    return Part(0, 1, None, "single")


def _slurm_array_index(env: Mapping[str, str], num_parts: int | None) -> int | None:
    """0-based position of this array task; ids may start at any base and step."""
    task_id = _int(env, "SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return None
    if num_parts is not None:
        # Any num_parts consecutive ids map one-to-one onto parts, so a resubmission of a few ids of the
        # original array (e.g. --array=3,7) redoes exactly those parts.
        return task_id % num_parts
    low, high = _int(env, "SLURM_ARRAY_TASK_MIN"), _int(env, "SLURM_ARRAY_TASK_MAX")
    step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    if low is None or count is None or (high is not None and (high - low) // step + 1 != count):
        raise UsageError(
            "this SLURM array's task ids are sparse, so the part of each task is ambiguous: pass --num-parts N "
            "(the size of the original array); each task then does part SLURM_ARRAY_TASK_ID % N"
        )
    return (task_id - low) // step


def device_for(part: Part, requested: str) -> str:
    """``auto`` under a launcher that names a local rank -> that rank's GPU (modulo the GPUs SLURM left visible)."""
    if requested != "auto" or part.local_rank is None:
        return requested
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{part.local_rank % torch.cuda.device_count()}"
