"""``vitok.extract``: options checked, the engine chosen, the job decided (``job.prepare``), then run; SIGTERM and
SIGINT raise ``Interrupted`` in the main thread (``vitok.interrupts``) so that the run stops cleanly."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..interrupts import stop_on_signals
from .engines import engine_class
from .job import prepare
from .options import ExtractOptions, make_options, option_fields
from .run_stats import import_seconds
from .summary import ExtractSummary, ProgressEvent


def extract(sources: Sequence[str] | str = (), out: str | os.PathLike = "vitok-out",
            options: ExtractOptions | None = None, *, stdin=None,
            progress: Callable[[ProgressEvent], None] | None = None, **option_values: Any) -> ExtractSummary:
    """Extract visual tokens for every input of ``sources`` into the store ``out`` (resumable).

    Args:
        sources: folders, files (images, tars, parquet), brace patterns, URLs, or ``-`` for a list on stdin;
            empty to resume the plan already in ``out``.
        out: output folder (created; resumed if it holds a store made with the same settings).
        options: an :class:`ExtractOptions` (``vitok.ExtractOptions``); the defaults when None.
        stdin: binary stream to read ``-`` from (default: ``sys.stdin.buffer``).
        progress: called on the run loop's thread after every chunk of images.
        **option_values: fields of :class:`ExtractOptions`, instead of or on top of ``options``.

    Returns:
        counts, timings and sizes of this run.
    """
    imports = import_seconds()
    started = time.perf_counter()
    if options is None:
        opts = make_options(**option_values)
    elif option_values:
        opts = make_options(**{**{f.name: getattr(options, f.name) for f in option_fields(options)}, **option_values})
    else:
        opts = options.validate()
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    with stop_on_signals():
        engine = engine_class(opts.engine)
        configuring = time.perf_counter()
        opts, context = engine.configure(opts)
        configured = time.perf_counter() - configuring
        try:
            job = prepare([str(s) for s in sources], out, opts, stdin)
        except BaseException:
            engine.release(context)
            raise
        run = engine(job, progress, started=started, **context)
        if imports is not None:
            run.phases["imports"] = imports
        if job.torch_import_seconds >= 0.01:  # (inside the run's time: after the cheap checks, before the model)
            run.phases["torch_import"] = job.torch_import_seconds
        if engine.configure_phase:
            run.phases[engine.configure_phase] = configured
        run.phases["plan"] = time.perf_counter() - started - configured - job.torch_import_seconds
        return run.execute()
