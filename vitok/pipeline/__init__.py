"""The run: stages wired together by ``runner.py`` (``vitok.extract``).

    options.py    ExtractOptions: every extract option declared once (the CLI's flags derive from it)
    job.py        what a run will do, decided and checked before anything is written
    parallel.py   which part of the work this process owns (torchrun, SLURM, --part); gpus.py: --gpus children
    loader.py     decode workers: units -> chunks of prepared images, in order within each unit
    dedupe.py     each distinct image encoded once: rows copied from a committed shard or an earlier copy
    batcher.py    images -> batches under a token budget, never spanning units
    device.py     the device stage: encode, pool (pool.py), cast to the stored dtype (cast.py), copy to the host;
                  emits finished batches and each unit's end, in order
    sink.py       one output shard being written; committer.py: the writer thread that commits a unit at its end
    types.py      the data between the stages (Item, Chunk, Batch, EncodedBatch, UnitEnd), without torch
    run_stats.py  start-up phases, stage rates and the verdict on what limited a run
    runner.py     the local engine: the loop that wires them; ray_engine.py: the same run spread by Ray Data
"""
