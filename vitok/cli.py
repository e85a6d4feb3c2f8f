"""The ``vitok`` command: a thin Typer layer over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="vitok",
    help="Extract Qwen3-VL vision-encoder tokens from image collections into HDF5/NPY shards with a manifest.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("vitok")
_state = {"debug": False}


def _setup_logging(quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vitok: %(message)s"))
    root = logging.getLogger("vitok")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
    if version:
        from . import __version__

        typer.echo(f"vitok {__version__}")
        raise typer.Exit()


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


class _Progress:
    """A rich progress bar on a terminal; a plain log line every few seconds otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._task = None
        self._last = 0.0

    def __enter__(self):
        if self.enabled and self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]extract"), BarColumn(), TextColumn("{task.completed}/{task.total} images"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self._bar.__enter__()
        return self

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        elapsed = max(event.elapsed, 1e-9)
        rate = f"{event.images_done / elapsed:.1f} img/s, {event.tokens_done / elapsed:.0f} tok/s"
        if self._bar is not None:
            if self._task is None:
                self._task = self._bar.add_task("extract", total=event.images_total, rate=rate)
            self._bar.update(self._task, completed=event.images_done, rate=rate)
        elif time.monotonic() - self._last > 10 or event.images_done == event.images_total:
            self._last = time.monotonic()
            logger.info("%d/%d images, %d skipped, %s", event.images_done, event.images_total, event.skipped, rate)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


@app.command()
def extract(
    sources: Annotated[list[str] | None, typer.Argument(help="Image folders or files; '-' reads paths from stdin.", show_default=False)] = None,  # noqa: E501
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (resumed if it holds a store).")] = Path("vitok-out"),  # noqa: E501
    size: Annotated[str | None, typer.Option("--size", help="Preset name (same as --model); see 'vitok models'.")] = None,  # noqa: E501
    model: Annotated[str | None, typer.Option("--model", "-m", help="Preset, checkpoint folder, .safetensors file or HF repo id. [default: base]")] = None,  # noqa: E501
    features: Annotated[str | None, typer.Option(help="Comma list of patch, merged, deepstack. [default: merged for Qwen towers, patch for small/base/large]")] = None,  # noqa: E501
    pool: Annotated[str, typer.Option(help="none | mean | max | cls. 'cls' returns the FIRST token: the encoder has no class token.")] = "none",  # noqa: E501
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (bf16 on GPUs that support it, else fp32) | float32 | bfloat16 | float16.")] = "auto",  # noqa: E501
    store_dtype: Annotated[str, typer.Option(help="Stored dtype: float16 | float32 | bfloat16 (lossless bits, read back as float32).")] = "float16",  # noqa: E501
    format: Annotated[str, typer.Option("--format", help="hdf5 | npy.")] = "hdf5",
    shard_size: Annotated[int, typer.Option(help="Images per shard (the unit of resume and of parallel work).")] = 1000,
    compression: Annotated[str | None, typer.Option(help="HDF5 compression: gzip | lzf.")] = None,
    token_budget: Annotated[int | None, typer.Option(help="Patches per encoder batch. [default: 4096 CPU, 32768 CUDA]")] = None,  # noqa: E501
    workers: Annotated[int | None, typer.Option(help="Decode/preprocess worker processes. [default: from CPU count]")] = None,  # noqa: E501
    token_order: Annotated[str, typer.Option(help="Order of 'patch' rows: block (reference 2x2-block order) | raster (row-major).")] = "block",  # noqa: E501
    min_pixels: Annotated[int | None, typer.Option(help="Qwen resize: least pixels after resize.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Qwen resize: most pixels after resize.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Resize every image to this square size instead.")] = None,
    backend: Annotated[str | None, typer.Option(help="Resize backend: torchvision (reference default) | pil.")] = None,  # noqa: E501
    fast_decode: Annotated[bool, typer.Option(help="Decode JPEGs at reduced DCT scale when the target is >=2x smaller (faster, not bit-exact).")] = False,  # noqa: E501
    allow_truncated: Annotated[bool, typer.Option(help="Decode truncated files as far as they go (recorded in the manifest).")] = False,  # noqa: E501
    max_image_pixels: Annotated[int | None, typer.Option(help="Refuse images whose header claims more pixels. [default: 178956970]")] = None,  # noqa: E501
    files_from: Annotated[str | None, typer.Option(help="File with one image path per line ('-' = stdin).")] = None,
    part: Annotated[int | None, typer.Option(help="This process's part (0-based) of --num-parts.")] = None,
    num_parts: Annotated[int | None, typer.Option(help="Split the plan's shards over this many processes.")] = None,
    gpus: Annotated[str | None, typer.Option(help="Run one process per GPU on this machine: '0,1,2,3' or 'all'.")] = None,  # noqa: E501
    overwrite: Annotated[bool, typer.Option(help="Delete the store in OUT and start over.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights of a preset without a checkpoint.")] = 0,
    attention: Annotated[str, typer.Option(help="auto | sdpa | varlen | eager.")] = "auto",
    json_summary: Annotated[bool, typer.Option("--json", help="Print a one-line JSON summary at the end.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Extract tokens for every image in SOURCES into OUT (resumable: rerun the same command to continue).

    Examples:

        vitok extract ./imgs --size base --pool mean

        vitok extract ./imgs -o out/ --model ~/models/Qwen3-VL-2B-Instruct --features merged,deepstack

        find /data -name '*.jpg' | vitok extract - -o out/ --format npy
    """
    _setup_logging(quiet)
    if size and model and size != model:
        raise typer.BadParameter(
            f"--size {size} and --model {model} name different models; give one", param_hint="--model"
        )
    sources = list(sources or [])
    if not sources and not files_from:
        raise typer.BadParameter("give at least one source folder or file, '-' for stdin, or --files-from")
    options = dict(
        model=model or size or "base", device=device, dtype=dtype, features=_csv(features), pool=pool,
        store_dtype=store_dtype, format=format, shard_size=shard_size, compression=compression,
        token_budget=token_budget, workers=workers, token_order=token_order, min_pixels=min_pixels,
        max_pixels=max_pixels, image_size=image_size, backend=backend, fast_decode=fast_decode,
        allow_truncated=allow_truncated, max_image_pixels=max_image_pixels, overwrite=overwrite, part=part,
        num_parts=num_parts, files_from=files_from, seed=seed, attention=attention,
    )
    if gpus:
        _run_per_gpu(gpus, out, sources, json_summary)
        return
    from .runner import extract as run_extract

    with _Progress(not quiet) as progress:
        summary = run_extract(sources, out, progress=progress, **options)
    if summary.skipped:
        logger.info("skipped %d image(s); reasons are in the manifest (vitok info %s)", summary.skipped, out)
    logger.info(
        "done: %d ok, %d skipped, %d already done, %.1f s, %.2f images/s -> %s",
        summary.ok, summary.skipped, summary.already_done, summary.seconds, summary.images_per_second, out,
    )
    if json_summary:
        typer.echo(json.dumps(summary.to_dict()))


def _run_per_gpu(gpus: str, out: Path, sources: list[str], json_summary: bool) -> None:
    """One child process per GPU, each a `vitok extract --part i --num-parts n --device cuda:g` into the same OUT."""
    import torch

    from .errors import UsageError

    if gpus == "all":
        ids = list(range(torch.cuda.device_count()))
    else:
        try:
            ids = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise UsageError(f"--gpus {gpus!r} must be 'all' or a comma list of GPU indexes") from None
    if not ids:
        raise UsageError("--gpus: no CUDA devices visible")
    if "-" in sources:
        raise UsageError("--gpus cannot share stdin between processes; write the paths to a file and use --files-from")
    argv = sys.argv[1:]
    base = [a for i, a in enumerate(argv) if not (a.startswith("--gpus") or (i > 0 and argv[i - 1] == "--gpus"))]
    # Every child lists the sources; the first to finish writes the plan and the others check theirs equals it.
    children = []
    for rank, gpu in enumerate(ids):
        cmd = [sys.executable, "-m", "vitok", *base, "--part", str(rank), "--num-parts", str(len(ids)),
               "--device", f"cuda:{gpu}", "--quiet"]
        children.append(subprocess.Popen(cmd, env=dict(os.environ)))
    codes = [c.wait() for c in children]
    if any(codes):
        raise typer.Exit(max(codes))
    if json_summary:
        from .store import verify_store

        report = verify_store(out)
        typer.echo(json.dumps({"ok": report.images_ok, "skipped": report.images_skipped, "gpus": ids}))


@app.command()
def plan(
    sources: Annotated[list[str], typer.Argument(help="Image folders or files; '-' reads paths from stdin.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder that will hold the plan.")] = Path("vitok-out"),  # noqa: E501
    shard_size: Annotated[int, typer.Option(help="Images per shard.")] = 1000,
    files_from: Annotated[str | None, typer.Option(help="File with one image path per line ('-' = stdin).")] = None,
) -> None:
    """List SOURCES once and write OUT/plan.jsonl, so the processes of a big job need not list millions of files.

    Example:

        vitok plan /data/images -o /scratch/out --shard-size 2000
    """
    _setup_logging()
    from .runner import ExtractOptions, build_plan

    out.mkdir(parents=True, exist_ok=True)
    result = build_plan(sources, out, ExtractOptions(shard_size=shard_size, files_from=files_from))
    typer.echo(f"{len(result.keys)} images in {result.num_shards} shards of {result.shard_size} -> {out}/plan.jsonl")


@app.command()
def models() -> None:
    """List the model presets with their real parameter counts (computed, not estimated)."""
    from rich.console import Console
    from rich.table import Table

    from .presets import registry

    table = Table("preset", "params", "width", "depth", "heads", "patch", "outputs", "weights from")
    for name, preset in registry().items():
        enc = preset.encoder
        table.add_row(
            name, f"{enc.num_parameters():,}", str(enc.hidden_size), str(enc.depth), str(enc.num_heads),
            str(enc.patch_size), ",".join(enc.features), preset.hf_repo or "random (seeded)",
        )
    Console(width=160).print(table)


@app.command()
def info(out: Annotated[Path, typer.Argument(help="A store written by vitok extract.")]) -> None:
    """Summarise a store: model, settings, images ok and skipped (with reasons), shards."""
    from .store import open_store

    store = open_store(out)
    settings = store.meta["settings"]
    typer.echo(f"store      {out}")
    typer.echo(f"model      {settings['model']['name']} ({settings['model']['weights']})")
    typer.echo(f"features   {', '.join(settings['features'])}  pool={settings['pool']}  "
               f"stored as {settings['store_dtype']}  computed in {settings['compute_dtype']}")
    typer.echo(f"images     {len(store)} ok, {len(store.skipped)} skipped, in {len(store.shards)} shard(s)")
    for key, reason in sorted(store.skipped.items())[:50]:
        typer.echo(f"  skipped  {key}: {reason}")
    if len(store.skipped) > 50:
        typer.echo(f"  ... and {len(store.skipped) - 50} more")


@app.command()
def verify(out: Annotated[Path, typer.Argument(help="A store written by vitok extract.")]) -> None:
    """Check every shard against the manifest and the plan; exit 1 on any problem or unfinished shard."""
    from .store import verify_store

    report = verify_store(out)
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    if report.incomplete:
        typer.echo(f"incomplete: {len(report.incomplete)} planned shard(s) not done: "
                   f"{', '.join(report.incomplete[:10])}", err=True)
    typer.echo(f"{report.shards_ok} shard(s) ok, {report.images_ok} images ok, {report.images_skipped} skipped")
    if not report.clean:
        raise typer.Exit(1)


@app.command()
def bench(
    args: Annotated[list[str] | None, typer.Argument(help="Arguments passed to scripts/bench.py.")] = None,
) -> None:
    """Run the benchmark (scripts/bench.py) from a source checkout."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    if not script.is_file():
        raise typer.BadParameter("scripts/bench.py is not here; run it from a source checkout")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *(args or [])]))


def main() -> None:
    """Console entry point: library errors become one line on stderr and an exit code (2 = usage)."""
    from .errors import VitokError

    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except VitokError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"vitok: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("vitok: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("vitok: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _state["debug"]:
            raise
        typer.echo(
            f"vitok: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True
        )
        sys.exit(1)
