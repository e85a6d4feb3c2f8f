"""The ``vitok`` command: a thin Typer layer over the library. Heavy imports happen inside commands.

``vitok extract``'s flags are generated from the fields of :class:`vitok.pipeline.options.ExtractOptions` (help, panel,
choices and defaults come from there), so an option is declared once. Output hygiene: progress and logs go to
stderr; stdout carries only what a command prints on purpose (``--json``, ``info``, ``verify``).
"""

from __future__ import annotations

import enum
import inspect
import json
import logging
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from ..pipeline.options import ExtractOptions, flag_of

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
        from .. import __version__

        typer.echo(f"vitok {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    _state["debug"] = debug


# ---- extract: flags generated from ExtractOptions ----------------------------------------------------------------


def _choices(name: str, choices: tuple[str, ...]) -> type[enum.Enum]:
    return enum.Enum(f"{name}_choice", {c: c for c in choices}, type=str)  # typer shows [a|b|c]


def _option_parameters(record: type = ExtractOptions, names: tuple[str, ...] | None = None) -> list[inspect.Parameter]:
    """Typer parameters for the fields of an options record (all of them, or ``names``), from their declarations."""
    import typing

    hints = typing.get_type_hints(record)
    params = []
    for f in fields(record):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata["cli"]
        flag = flag_of(f)
        decls = list(meta["flags"]) or [flag]
        kind: Any = hints[f.name]
        if meta["choices"]:
            kind = _choices(f.name, meta["choices"])
            kind = kind | None if f.default is None else kind
        elif meta["listing"]:
            kind = str | None
        elif meta.get("multiple"):
            kind = list[str] | None
        elif f.default is False:
            kind, decls = bool, [f"{flag}/--no-{flag[2:]}"]
        info = typer.Option(*decls, help=meta["help"], rich_help_panel=meta["panel"], metavar=meta["metavar"],
                            show_default=f.default not in (None, False))
        default = f.default if f.default is not MISSING else None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, info]))
    return params


def _extract_command(
    sources: list[str] | None,
    out: Path,
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
    from ..pipeline.options import make_options

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
        from ..pipeline.gpus import run_per_gpu

        code, merged = run_per_gpu(gpus, out, sources, options, quiet)
        if code:
            raise typer.Exit(code)
        if json_summary:
            typer.echo(json.dumps(merged))
        return
    from ..pipeline.run_stats import started_by_cli
    from ..pipeline.runner import extract as run_extract
    from .progress import ProgressDisplay

    started_by_cli()
    options.given = frozenset(_given_on_command_line(values) | ({"model"} if size else set()))
    with ProgressDisplay(not quiet) as progress:
        summary = run_extract(sources, out, options, progress=progress)
    _report(summary, out)
    if json_summary:
        typer.echo(json.dumps(summary.to_dict()))
    if summary.all_skipped:
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
    if summary.all_skipped:
        logger.error("ALL %d input(s) of this run were skipped or failed: nothing was extracted. Check the sources "
                     "and settings; reasons: vitok info %s", summary.skipped + summary.failed, out)
    elif summary.skipped or summary.failed:
        logger.info("skipped %d, failed %d input(s); reasons are in the manifest (vitok info %s)", summary.skipped,
                    summary.failed, out)
    if summary.failed:
        logger.info("%d input(s) could not be read; rerun the same command once they are readable", summary.failed)
    logger.info("done: %d ok, %d skipped, %d failed, %d already done, %.1f s, %.2f images/s -> %s", summary.ok,
                summary.skipped, summary.failed, summary.already_done, summary.seconds, summary.images_per_second, out)
    if summary.shards_elsewhere:
        logger.info("%d shard(s) are still being written by another process", summary.shards_elsewhere)
    if summary.phases:
        from ..pipeline.run_stats import describe

        for line in describe({"phases": summary.phases, "stages": summary.stages}):
            logger.info("%s", line)
    if summary.bottleneck:
        logger.info("%s", summary.bottleneck)


def _by_panel(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Flags grouped in --help as the data flows: model, inputs, outputs, preprocessing, speed, cluster."""
    from ..pipeline.options import PANELS

    def panel(param: inspect.Parameter) -> int:
        info = param.annotation.__metadata__[0]
        name = getattr(info, "rich_help_panel", None)
        return PANELS.index(name) if name in PANELS else len(PANELS)

    return sorted(params, key=panel)


_extract_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("sources", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        list[str] | None, typer.Argument(help="Inputs; '-' reads one per line from stdin.", show_default=False)]),
    *_by_panel([inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=Path("vitok-out"),
                                  annotation=Annotated[Path, typer.Option(
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
    *_option_parameters()]),
])
_extract_command.__annotations__ = {}
app.command("extract")(_extract_command)


PLAN_OPTIONS = ("files_from", "input_format", "image_column", "key_column", "meta_fields", "shard_size")


def _plan_command(sources: list[str] | None, out: Path, **values: Any) -> None:
    """List SOURCES once and write OUT/plan, so the processes of a big job need not list millions of files.

    Example:

        vitok plan /data/images -o /scratch/out --shard-size 2000

        vitok plan --files-from all_images.txt -o /scratch/out
    """
    _setup_logging()
    from ..errors import UsageError
    from ..inputs.plan import diff, listing_digest, load_plan, write_generation
    from ..inputs.readers import ReaderOptions
    from ..inputs.sources import list_inputs
    from ..pipeline.options import make_options

    options = make_options(**{k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()})
    if not sources and not options.files_from:
        raise UsageError("give at least one source, '-' for stdin, or --files-from")
    shard_size = options.shard_size
    reader_options = ReaderOptions(options.meta_fields, options.image_column, options.key_column)
    listing = list_inputs(list(sources or []), options.files_from, None, options.input_format)
    existing = load_plan(out)
    if existing is not None:
        if existing.latest["listing_digest"] != listing_digest(listing):
            raise UsageError(f"{out} already holds a plan of other inputs ({diff(existing, listing).describe()})")
        typer.echo(f"{out} already holds this plan: {len(existing.units)} shards")
        return
    generation = write_generation(out, listing, shard_size, 0, 0, [os.path.abspath(s) for s in sources or []],
                                  "initial", None, reader_options.to_dict())
    header = generation.header
    size = f" of {shard_size}" if header["reader"] == "files" else ""
    typer.echo(f"{header.get('num_items', '?')} inputs in {header['num_units']} shards{size} -> {out}/plan")


_plan_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("sources", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
        list[str] | None, typer.Argument(help="Inputs, as for extract; '-' reads them from stdin.",
                                         show_default=False)]),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=Path("vitok-out"), annotation=Annotated[
        Path, typer.Option("-o", "--out", help="Output folder that will hold the plan.")]),
    *_option_parameters(ExtractOptions, PLAN_OPTIONS),
])
_plan_command.__annotations__ = {}
app.command("plan")(_plan_command)


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


def _safe(text: str) -> str:
    """Keys may hold surrogate escapes (names that were not UTF-8): print them escaped, never crash."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@app.command()
def info(
    out: Annotated[Path, typer.Argument(help="A store written by vitok extract.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Summarise a store: model, settings, planned vs done, images ok / skipped / failed (with reasons), damage."""
    _setup_logging(quiet=json_output)
    from ..storage.store import open_store
    from ..storage.verify import verify_store

    store = open_store(out)
    report = verify_store(out, quick=True)
    settings = store.header.settings
    skipped = {k: r for k, r in store.skipped.items() if k not in store.removed}
    failed = {k: r for k, r in store.failed.items() if k not in store.removed}
    if json_output:
        typer.echo(json.dumps({
            "store": str(out), "model": settings["model"]["name"], "weights": settings["model"]["weights"],
            "features": settings["features"], "pool": settings["pool"], "store_dtype": settings["store_dtype"],
            "format": settings["format"], **report.to_dict(), "skipped": skipped, "failed": failed,
        }))
        return
    echo = typer.echo
    echo(f"store      {out}")
    echo(f"model      {settings['model']['name']} ({settings['model']['weights']})")
    echo(f"features   {', '.join(settings['features'])}  pool={settings['pool']}  stored as "
         f"{settings['store_dtype']}  computed in {settings['compute_dtype']}  format={settings['format']}")
    planned = f" of {report.planned_shards} planned" if report.planned_shards else ""
    damaged = f", {len(report.shards_damaged)} damaged" if report.shards_damaged else ""
    echo(f"shards     {report.shards_done} done{planned}; {len(report.incomplete)} not done, "
         f"{len(report.in_progress)} in progress{damaged}")
    echo(f"images     {report.images_ok} ok, {report.images_skipped} skipped, {report.images_failed} failed"
         + (f", {report.images_damaged} in damaged shards" if report.images_damaged else "")
         + (f", {report.images_removed} removed from the sources" if report.images_removed else ""))
    for title, table in (("skipped", skipped), ("failed", failed)):
        for key, reason in sorted(table.items())[:50]:
            echo(f"  {title:8s} {_safe(key)}: {_safe(reason)}")
        if len(table) > 50:
            echo(f"  ... and {len(table) - 50} more {title}")
    for line in report.input_errors:  # of the last attempt of each input still in the sources
        echo(f"  input    {_safe(line)}")
    nonfinite = store.nonfinite()
    if nonfinite:
        echo(f"nan/inf    {len(nonfinite)} image(s) hold NaN/Inf values (exports leave them out)")
        for key, count in sorted(nonfinite.items())[:10]:
            echo(f"  nan/inf  {_safe(key)}: {count} value(s)")
    if report.problems:
        echo(f"damage     {len(report.problems)} problem(s); run 'vitok verify {out}'")
        for problem in report.problems[:5]:
            echo(f"  damage   {_safe(problem)}")
    for line in report.leftovers[:10]:
        echo(f"  leftover {line}")
    from ..pipeline.run_stats import describe, latest_stats

    stats = latest_stats(Path(out))
    if stats is not None:
        echo(f"last run   {stats.get('images', '?')} images in {stats.get('seconds', 0):.1f} s on {stats['device']}")
        for line in describe(stats):
            echo(line)


@app.command()
def verify(
    out: Annotated[Path, typer.Argument(help="A store written by vitok extract.")],
    quick: Annotated[bool, typer.Option(help="Check sizes, keys and rows only, not the checksums.")] = False,
    embeds: Annotated[bool, typer.Option(
        "--embeds", help="Check served embeddings instead: OUT is a vllm-ec or sglang export (or a store, checked as "
                         "it would be exported): tokens vs grid and merge size, width, dtype, finite, contiguous."
    )] = False,
    sources: Annotated[bool, typer.Option(help="Also compare every record with its input as it is now: stale "
                                          "records (the input changed since it was extracted) fail the check."
                                          )] = False,
    detect_changes: Annotated[_choices("verify_detect_changes", ("mtime", "hash")), typer.Option(
        help="With --sources: compare size and modification time, or the content (reads every input).")] = "mtime",
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
) -> None:
    """Check every shard against the manifest (checksums too) and the plan; exit 1 on any problem, unfinished
    shard or (with --sources) stale record. With --embeds, check every embedding of a serving export against the
    model's contract.

    Example: vitok verify out/ --sources
    """
    if embeds:
        from ..consumers.serving import verify_embeds

        result = verify_embeds(out)
        for problem in result.problems[:50]:
            typer.echo(f"problem: {_safe(problem)}", err=True)
        if len(result.problems) > 50:
            typer.echo(f"... and {len(result.problems) - 50} more", err=True)
        typer.echo(f"{result.checked} embedding(s) checked ({result.layout}), {len(result.problems)} problem(s)")
        if not result.clean:
            raise typer.Exit(1)
        return
    from ..storage.verify import verify_store

    mode = getattr(detect_changes, "value", detect_changes)
    report = verify_store(out, quick=quick, sources=mode if sources else None)
    if json_output:
        typer.echo(json.dumps(report.to_dict()))
        if not report.clean:
            raise typer.Exit(1)
        return
    for problem in report.problems:
        typer.echo(f"problem: {_safe(problem)}", err=True)
    if report.incomplete:
        typer.echo(f"incomplete: {len(report.incomplete)} planned shard(s) not done: "
                   f"{', '.join(report.incomplete[:10])}", err=True)
    for line in report.in_progress[:10]:
        typer.echo(f"in progress: {line}", err=True)
    for line in report.leftovers[:10]:
        typer.echo(f"leftover: {line}", err=True)
    for line in report.input_errors[:20]:
        typer.echo(f"input: {_safe(line)}", err=True)
    for line in report.nonfinite[:20]:
        typer.echo(f"warning: {_safe(line)}", err=True)
    for line in report.stale[:20]:
        typer.echo(f"stale: {_safe(line)}", err=True)
    if report.stale:
        typer.echo(f"stale: {len(report.stale)} input(s) changed since they were extracted; rerun extract with "
                   "--update to extract them again", err=True)
    typer.echo(f"{report.shards_ok} shard(s) ok, {report.images_ok} images ok, {report.images_skipped} skipped, "
               f"{report.images_failed} failed" + (f", {report.images_damaged} in damaged shards"
                                                    if report.images_damaged else ""))
    if not report.clean:
        raise typer.Exit(1)


from ..consumers.export import KEY_MODES, LAYOUTS, POOLS  # noqa: E402 - light (no numpy): the export's choices, owned there


@app.command()
def export(
    store: Annotated[Path, typer.Argument(help="A store written by vitok extract.")],
    dest: Annotated[Path, typer.Argument(help="Output folder: new, empty, or an earlier export of this store "
                                              "(replaced whole).")],
    layout: Annotated[_choices("layout", LAYOUTS), typer.Option(
        help="embedding-reader: img_emb/*.npy + metadata/*.parquet (clip-retrieval, embedding-reader, autofaiss); "
             "vllm-ec: vLLM's encoder-cache connector folder (<uuid>/encoder_cache.safetensors + uuids.jsonl); "
             "sglang: parquet records of bf16 features for SGLang's precomputed_embedding items.")
    ] = "embedding-reader",
    feature: Annotated[str | None, typer.Option(help="Feature to export (embedding-reader). [default: the store's "
                                                     "first]")] = None,
    pool: Annotated[_choices("export_pool", POOLS) | None, typer.Option(
        help="Reduce each image's tokens to one vector (needed when the store holds every token).")] = None,
    normalize: Annotated[_choices("normalize", ("l2",)) | None, typer.Option(
        help="Scale every vector to unit length (for inner-product search).")] = None,
    dtype: Annotated[_choices("export_dtype", ("float16", "float32")), typer.Option(
        help="Stored vector dtype (embedding-reader).")] = "float16",
    key: Annotated[_choices("export_key", KEY_MODES), typer.Option(
        help="vllm-ec: name entries by the store key, or by the records' content_id.")] = "store",
    allow_partial: Annotated[bool, typer.Option(
        "--allow-partial", help="Export an unfinished store (shards not done, inputs that failed), saying what is "
                                "missing.")] = False,
) -> None:
    """Write a store's tokens where retrieval tools and inference servers read them. DEST is written aside and
    swapped in whole; damaged or unfinished stores are refused; images with NaN/Inf tokens are left out and counted.

    Examples:

        vitok export out/ index/ --pool mean --normalize l2

        vitok export out/ /shared/ec-cache --layout vllm-ec

        vitok export out/ embeds/ --layout sglang
    """
    _setup_logging()
    from ..consumers.export import export as run_export

    def value(v):
        return v.value if isinstance(v, enum.Enum) else v

    result = run_export(store, dest, value(layout), feature=feature, pool=value(pool), normalize=value(normalize),
                        dtype=value(dtype), key=value(key), allow_partial=allow_partial)
    left = f"; {len(result.left_out)} left out (NaN/Inf)" if result.left_out else ""
    partial = "; PARTIAL store" if result.missing else ""
    typer.echo(f"{result.images} image(s) -> {dest} ({result.layout} layout{left}{partial})")


@app.command()
def viz(
    target: Annotated[str, typer.Argument(help="A store (then give KEY) or an image file (then give --model).")],
    key: Annotated[str | None, typer.Argument(help="The image's key in the store.")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Picture to write (.png).")] = Path("tokens.png"),
    model: Annotated[str | None, typer.Option("--model", "-m", help="Encode an image file with this model.")] = None,
    feature: Annotated[str | None, typer.Option(help="Per-patch feature to draw. [default: patch]")] = None,
) -> None:
    """Draw an image beside the first three principal components of its patch tokens and their norms.

    Examples:

        vitok viz out/ photos/cat.jpg -o cat.png

        vitok viz photos/cat.jpg --model qwen3-vl-2b -o cat.png
    """
    _setup_logging()
    from ..consumers.viz import image_picture, token_picture
    from ..errors import UsageError

    if model is not None:
        written = image_picture(target, model, out)
    else:
        if key is None:
            raise UsageError("give the image's KEY in the store (vitok info lists them), or an image file with --model")
        from ..storage.store import open_store

        with open_store(target) as store:
            written = token_picture(store, key, out, feature)
    typer.echo(f"wrote {written}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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
