"""``vitok extract`` and ``vitok plan``: the commands that write a store."""

from __future__ import annotations

import enum
import inspect
import json
import os
from typing import Annotated, Any

import typer

from ..run.options import ExtractOptions
from .app import _setup_logging, app, logger
from .flags import by_panel, option_parameters


def _extract_command(
    sources: list[str] | None,
    out: str,
    size: str | None,
    gpus: str | None,
    json_summary: bool,
    quiet: bool,
    **values: Any,
) -> None:
    """Extract tokens for every input of SOURCES into OUT (resumable: rerun the same command to continue).

    SOURCES are image folders or files, webdataset tars (a file, a folder of tars, or a quoted pattern such as
    '/data/{00000..00099}.tar'), parquet files, URLs, or '-' for a list on stdin. With no SOURCES, the plan already
    in OUT is resumed.

    Examples:

        vitok extract ./imgs --size base --pool mean

        vitok extract ./imgs -o out/ --model ~/models/Qwen3-VL-2B-Instruct --features merged,deepstack

        find /data -name '*.jpg' | vitok extract - -o out/ --format npy

        vitok extract '/data/laion/{00000..00099}.tar' -o out/ --pool mean
    """
    _setup_logging(quiet)
    from ..errors import UsageError
    from ..run.options import make_options

    values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}
    if size and values["model"] not in ("base", size):
        raise UsageError(f"--size {size} and --model {values['model']} name different models; give one")
    if size:
        values["model"] = size
    options = make_options(**values)
    sources = list(sources or [])
    if gpus and options.engine != "local":
        raise UsageError(f"--gpus starts one local process per GPU; --engine {options.engine} places one encode "
                         "actor per GPU itself: give one of them")
    if gpus:
        from ..run.gpus import run_per_gpu
        from ..storage.roots import check_location

        check_location(out, "-o")  # refused here, not by each child

        code, merged = run_per_gpu(gpus, out, sources, options, quiet)
        if code:
            raise typer.Exit(code)
        if json_summary:
            typer.echo(json.dumps(merged))
        return
    from ..run.extract import extract as run_extract
    from ..run.run_stats import started_by_cli
    from .progress import ProgressDisplay

    started_by_cli()
    options = options.replace(given=frozenset(_given_on_command_line(values) | ({"model"} if size else set())))
    with ProgressDisplay(not quiet) as progress:
        summary = run_extract(sources, out, options, progress=progress)
    _report(summary, out)
    if json_summary:
        typer.echo(json.dumps(summary.to_dict()))
    if summary.nothing_usable:
        raise typer.Exit(1)


def _given_on_command_line(values: dict[str, Any]) -> set[str]:
    """The options the user typed (a resume takes the others from the store)."""
    ctx = typer.main.get_current_context(silent=True)
    if ctx is None:
        return set(values)
    defaulted = {name for name in values
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") in ("DEFAULT", "DEFAULT_MAP")}
    return set(values) - defaulted


def _report(summary, out) -> None:
    if summary.nothing_usable and not summary.ok:
        logger.error("ALL %d input(s) of this run were skipped or failed: nothing was extracted. Check the sources "
                     "and settings; reasons: vitok info %s", summary.skipped + summary.failed, out)
    elif summary.nothing_usable:
        logger.error("ALL %d %s this run extracted hold NaN/Inf values in their tokens: nothing usable was "
                     "extracted (exports leave them out). Check the checkpoint and the store dtype; which: "
                     "vitok info %s", summary.ok, summary.media, out)
    if summary.ok and (summary.skipped or summary.failed):
        logger.info("skipped %d, failed %d input(s); reasons are in the manifest (vitok info %s)", summary.skipped,
                    summary.failed, out)
    if summary.failed:
        logger.info("%d input(s) could not be read; rerun the same command once they are readable", summary.failed)
    if summary.nonfinite and not summary.nothing_usable:
        logger.warning("%d %s hold NaN/Inf values in their tokens; exports leave them out (vitok info %s)",
                       summary.nonfinite, summary.media, out)
    logger.info("done: %d ok, %d skipped, %d failed, %d already done, %.1f s, %.2f %s/s -> %s", summary.ok,
                summary.skipped, summary.failed, summary.already_done, summary.seconds, summary.images_per_second,
                summary.media, out)
    if summary.shards_elsewhere:
        logger.info("%d shard(s) are still being written by another process", summary.shards_elsewhere)
    if summary.phases and summary.ok + summary.skipped + summary.failed:  # (a run with nothing to do measured nothing)
        from ..run.run_stats import describe

        for line in describe({"phases": summary.phases, "stages": summary.stages, "media": summary.media}):
            logger.info("%s", line)
    if summary.bottleneck:
        logger.info("%s", summary.bottleneck)


_extract_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("sources", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        list[str] | None, typer.Argument(help="Inputs; '-' reads one per line from stdin.", show_default=False)]),
    *by_panel([inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default="vitok-out",
                                  annotation=Annotated[str, typer.Option(
                                      "-o", "--out", help="Output folder (resumed if it holds a store).",
                                      rich_help_panel="Outputs")]),
    inspect.Parameter("size", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        str | None, typer.Option("--size", help="Preset name (same as --model).", rich_help_panel="Model")]),
    inspect.Parameter("gpus", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        str | None, typer.Option(help="One process per GPU of this machine: '0,1,2,3' or 'all'.",
                                 rich_help_panel="Cluster")]),
    inspect.Parameter("json_summary", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--json", help="Print a one-line JSON summary on stdout at the end.")]),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress output.")]),
    *option_parameters()]),
])
_extract_command.__annotations__ = {}
app.command("extract")(_extract_command)


PLAN_OPTIONS = ("files_from", "input_format", "image_column", "key_column", "meta_fields", "shard_size",
                "storage_options")


def _plan_command(sources: list[str] | None, out: str, **values: Any) -> None:
    """List SOURCES once and write OUT/plan, so the processes of a big job need not list millions of files.

    Example:

        vitok plan /data/images -o /scratch/out --shard-size 2000

        vitok plan --files-from all_images.txt -o /scratch/out
    """
    _setup_logging()
    from ..errors import UsageError
    from ..inputs.readers import ReaderOptions
    from ..inputs.sources import list_inputs
    from ..run.options import make_options
    from ..storage.plan import diff, listing_digest, load_plan, write_generation
    from ..storage.roots import store_root

    options = make_options(**{k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()})
    out = store_root(out, "-o", options.storage_options)
    if not sources and not options.files_from:
        raise UsageError("give at least one source, '-' for stdin, or --files-from")
    shard_size = options.shard_size
    listing = list_inputs(list(sources or []), options.files_from, None, options.input_format, out=out.local_path())
    video = options.input_format == "video" or getattr(listing, "media", "image") == "video"
    reader_options = ReaderOptions(options.meta_fields, options.image_column, options.key_column,
                                   media="video" if video else "image")
    existing = load_plan(out)
    if existing is not None:
        if existing.latest.listing_digest != listing_digest(listing):
            raise UsageError(f"{out} already holds a plan of other inputs ({diff(existing, listing).describe()})")
        typer.echo(f"{out} already holds this plan: {len(existing.units)} shards")
        return
    files_from = options.files_from if options.files_from in (None, "-") else os.path.abspath(options.files_from)
    from ..storage.maintenance import remove_plan_leftovers

    out.prepare()
    remove_plan_leftovers(out)
    generation = write_generation(out, listing, shard_size, 0, 0, [os.path.abspath(s) for s in sources or []],
                                  "initial", None, reader_options.to_dict(), files_from=files_from,
                                  list_cwd=os.getcwd())
    header = generation.header
    size = f" of {shard_size}" if header.reader == "files" else ""
    items = "?" if header.num_items is None else header.num_items
    typer.echo(f"{items} inputs in {header.num_units} shards{size} -> {out.show('plan')}")


_plan_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("sources", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        list[str] | None, typer.Argument(help="Inputs, as for extract; '-' reads them from stdin.",
                                         show_default=False)]),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default="vitok-out", annotation=Annotated[
        str, typer.Option("-o", "--out", help="Output folder that will hold the plan.")]),
    *option_parameters(ExtractOptions, PLAN_OPTIONS),
])
_plan_command.__annotations__ = {}
app.command("plan")(_plan_command)
