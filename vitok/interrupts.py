"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) as ``vitok.errors.Interrupted``, for every command that
writes: ``extract`` and ``export`` clean up what they were writing and the CLI prints ``interrupted by SIGTERM;
rerun the same command to resume`` (exit 143; 130 for SIGINT).

    with stop_on_signals():      # the signals raise Interrupted in the main thread
        ...
        with signals_held():     # a step that must not stop half-way (a swap of two folders): the signal is acted
            ...                  # on once the step is done
"""

from __future__ import annotations

import contextlib
import signal
import threading

from .errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise Interrupted in the main thread (once; repeats are ignored while cleaning up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_held():
    """Block SIGTERM and SIGINT in this thread for the block; one that arrived meanwhile is delivered at its end."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
