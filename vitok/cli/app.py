"""The ``vitok`` command: a thin Typer layer over the library (the library never imports this package).

    app.py    the Typer app, logging, the entry point that turns library errors into one line and an exit code;
              ``models`` and ``bench``
    flags.py  Typer parameters generated from the typed options records (an option is declared once)
    run.py    ``extract`` and ``plan``: the commands that write a store
    read.py   ``info``, ``verify``, ``export``, ``viz``: the commands that read one (they never import torch)

Heavy imports happen inside commands. Output hygiene: progress and logs go to stderr; stdout carries only what a
command prints on purpose (``--json``, ``info``, ``verify``).
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

app = typer.Typer(
    name="vitok",
    help="Extract Qwen vision-encoder tokens from image collections (folders, webdataset tars, parquet) into "
         "HDF5/NPY/webdataset shards with a manifest.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
logger = logging.getLogger("vitok")
_state = {"debug": False}


def _setup_logging(quiet: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vitok: %(message)s"))
    root = logging.getLogger("vitok")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def _print_version(value: bool) -> None:
    if value:
        from ..version import __version__

        typer.echo(f"vitok {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    _state["debug"] = debug



def _safe(text: str) -> str:
    """Keys may hold surrogate escapes (names that were not UTF-8): print them escaped, never crash."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# the commands, in the order of the data flow (registration order is --help's order)
from . import run  # noqa: E402, F401, I001
from . import read  # noqa: E402, F401


@app.command()
def models() -> None:
    """List the model presets with their real parameter counts (computed, not estimated)."""
    from rich.console import Console
    from rich.table import Table

    from ..encoder.presets import registry

    table = Table("preset", "family", "params", "width", "depth", "heads", "patch", "outputs", "weights from")
    for name, preset in registry().items():
        enc = preset.encoder
        table.add_row(
            name, enc.family, f"{enc.num_parameters():,}", str(enc.hidden_size), str(enc.depth), str(enc.num_heads),
            str(enc.patch_size), ",".join(enc.features), preset.hf_repo or "random (seeded)",
        )
    Console(width=160).print(table)


@app.command(add_help_option=False,  # '--help' goes to the benchmark's own parser, which lists its options
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Run the benchmark (vitok vs the transformers reference, printed as ratios); '--help' lists its options."""
    from ..bench import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


def _is_click_exception(exc: BaseException) -> bool:
    """Usage errors of whichever click typer uses (typer 0.29 vendors its own copy as typer._click)."""
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__) and hasattr(exc, "show")


def main() -> None:
    """Console entry point: library errors become one line on stderr and an exit code (2 = usage)."""
    from ..errors import Interrupted, VitokError

    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except VitokError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"vitok: error: {_safe(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        typer.echo(f"vitok: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("vitok: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as exc:
        if type(exc).__name__ == "Exit" and hasattr(exc, "exit_code"):  # typer.Exit / click's Exit
            sys.exit(exc.exit_code)
        if _is_click_exception(exc):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            typer.echo("vitok: aborted", err=True)
            sys.exit(130)
        if _state["debug"]:
            raise
        typer.echo(f"vitok: internal error: {type(exc).__name__}: {_safe(str(exc))} (rerun with --debug for the "
                   "traceback)", err=True)
        sys.exit(1)

