"""The run: stages wired together by ``runner.py`` (``vitok.extract``).

    options.py    ExtractOptions: every extract option declared once (the CLI's flags derive from it)
    job.py        what a run will do, decided and checked before anything is written
    parallel.py   which part of the work this process owns (torchrun, SLURM, --part); gpus.py: --gpus children
    loader.py     decode workers: units -> chunks of prepared images, in order within each unit
    batcher.py    images -> batches under a token budget, never spanning units
    device.py     the device stage: encode, pool (pool.py), cast to the stored dtype, copy to the host
    sink.py       one output shard being written; committer.py: the writer thread that commits shards
    runner.py     the loop that wires them
"""
