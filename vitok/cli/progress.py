"""How ``vitok extract`` shows progress: a rich bar on a terminal (stderr), a plain log line every few seconds
otherwise (a pipe, a batch job's log). CLI side only: the library reports progress events to a callback."""

from __future__ import annotations

import logging
import sys
import time

from ..storage.records import per_second

logger = logging.getLogger("vitok")


class ProgressDisplay:
    """A rich progress bar on a terminal (stderr); a plain log line every few seconds otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._task = None
        self._last = 0.0

    def __enter__(self):
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]extract"), BarColumn(),
                TextColumn("{task.completed}/{task.total} {task.fields[media]}"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._bar.__enter__()
        return self

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        elapsed = max(event.elapsed, 1e-9)
        rate = (f"{event.images_done / elapsed:.1f} {per_second(event.media)}, "
                f"{event.patches_done / elapsed:.0f} patches/s")
        if self._bar is not None:
            if self._task is None:
                self._task = self._bar.add_task("extract", total=event.images_total, rate=rate, media=event.media)
            self._bar.update(self._task, completed=event.images_done, total=event.images_total, rate=rate)
        elif time.monotonic() - self._last > 10 or event.shards_done == event.shards_total:
            self._last = time.monotonic()
            total = event.images_total if event.images_total is not None else "?"
            logger.info("%d/%s %s, %d/%d shards, %d skipped or failed, %s", event.images_done, total, event.media,
                        event.shards_done, event.shards_total, event.skipped, rate)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
