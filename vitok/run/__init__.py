"""The run: deciding what to do, then wiring the stages of ``vitok.pipeline`` to do it (``vitok.extract``).

    options.py          ExtractOptions: every extract option declared once (the CLI's flags derive from it)
    job.py              what a run will do, decided and checked before anything is written (``prepare``)
    settings_schema.py  the settings that decide the tokens, the stored feature layouts, a new store's header
    parallel.py         which part of the work this process owns (torchrun, SLURM, --part); gpus.py: --gpus children
    extract.py          ``vitok.extract``: options, engine, job, run; SIGTERM and SIGINT stop it cleanly
    engines.py          --engine: the class that runs a job
    runner.py           the local engine: the loop that wires the stages; ray_engine.py: the same run on Ray Data
    summary.py          what a run reports: progress events and the summary
    run_stats.py        start-up phases, stage rates and the verdict on what limited a run
"""
