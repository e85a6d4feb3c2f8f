"""``vitok info``, ``verify``, ``export`` and ``viz``: the commands that read a store (none imports torch)."""

from __future__ import annotations

import enum
import inspect
import json
from typing import Annotated, Any

import typer

from ..consumers.export import ExportOptions  # light: the export's options record
from ..storage.keys import key_text
from ..storage.plan.changes import MODES as CHANGE_MODES
from ..storage.roots import STORAGE_OPTION_HELP
from .app import _safe, _setup_logging, app
from .flags import choice_type, option_parameters

StorageOption = Annotated[list[str] | None, typer.Option("--storage-option", metavar="KEY=VALUE",
                                                         help=STORAGE_OPTION_HELP)]


@app.command()
def info(
    out: Annotated[str, typer.Argument(help="A store written by vitok extract (a folder, or s3://BUCKET/PREFIX).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    storage_option: StorageOption = None,
) -> None:
    """Summarise a store: model, settings, planned vs done, images ok / skipped / failed (with reasons), damage."""
    _setup_logging(quiet=json_output)
    from ..storage.store import open_store
    from ..storage.verify import verify_store

    store = open_store(out, storage_options=storage_option)
    report = verify_store(store.root, quick=True)
    settings = store.header.settings
    skipped = {k: r for k, r in store.skipped.items() if k not in store.removed}
    failed = {k: r for k, r in store.failed.items() if k not in store.removed}
    if json_output:
        from ..run.run_stats import latest_stats

        typer.echo(json.dumps({
            "store": str(out), "model": settings.model.name, "weights": settings.model.weights,
            "features": list(settings.features), "pool": settings.pool, "store_dtype": settings.store_dtype,
            "format": settings.format, **report.to_dict(), "skipped": skipped, "failed": failed,
            "last_run": latest_stats(store.root),  # start-up phases, stage rates, what limited it (None: not kept)
        }))
        return
    echo = typer.echo
    echo(f"store      {out}")
    echo(f"model      {settings.model.name} ({settings.model.weights})")
    pool = f"{settings.pool} per temporal step" if settings.pool_by == "step" else settings.pool
    echo(f"features   {', '.join(settings.features)}  pool={pool}  stored as "
         f"{settings.store_dtype}  computed in {settings.compute_dtype}  format={settings.format}")
    if settings.video is not None:
        video = settings.video
        sampling = (f"{video['num_frames']} frames" if video.get("num_frames") else f"{video['fps']:g} fps"
                    if video.get("fps") and video.get("do_sample_frames") else "every frame")
        echo(f"sampling   {video['rule']} video processor, {sampling}, decoded by {video['decoder']}")
    planned = f" of {report.planned_shards} planned" if report.planned_shards else ""
    damaged = f", {len(report.shards_damaged)} damaged" if report.shards_damaged else ""
    echo(f"shards     {report.shards_done} done{planned}; {len(report.incomplete)} not done, "
         f"{len(report.in_progress)} in progress{damaged}")
    echo(f"{settings.media:10s} {report.images_ok} ok, {report.images_skipped} skipped, {report.images_failed} failed"
         + (f", {report.images_damaged} in damaged shards" if report.images_damaged else "")
         + (f", {report.images_removed} removed from the sources" if report.images_removed else ""))
    for title, table in (("skipped", skipped), ("failed", failed)):
        for key, reason in sorted(table.items())[:50]:
            echo(f"  {title:8s} {key_text(key)}: {_safe(reason)}")
        if len(table) > 50:
            echo(f"  ... and {len(table) - 50} more {title}")
    for line in report.input_errors:  # of the last attempt of each input still in the sources
        echo(f"  input    {_safe(line)}")
    nonfinite = store.nonfinite()
    if nonfinite:
        echo(f"nan/inf    {len(nonfinite)} {settings.media} hold NaN/Inf values (exports leave them out)")
        for key, count in sorted(nonfinite.items())[:10]:
            echo(f"  nan/inf  {key_text(key)}: {count} value(s)")
    if report.problems:
        echo(f"damage     {len(report.problems)} problem(s); run 'vitok verify {out}'")
        for problem in report.problems[:5]:
            echo(f"  damage   {_safe(problem)}")
    for line in report.in_view[:10]:
        echo(f"  in view  {_safe(line)}")
    for line in report.leftovers[:10]:
        echo(f"  leftover {line}")
    from ..run.run_stats import describe, latest_stats

    stats = latest_stats(store.root)
    if stats is not None:
        echo(f"last run   {stats.get('images', '?')} {stats.get('media', settings.media)} in "
             f"{stats.get('seconds', 0):.1f} s on {stats['device']}")
        for line in describe(stats):
            echo(line)


@app.command()
def verify(
    out: Annotated[str, typer.Argument(help="A store written by vitok extract (a folder, or s3://BUCKET/PREFIX).")],
    quick: Annotated[bool, typer.Option(help="Check sizes, keys and rows only, not the checksums.")] = False,
    embeds: Annotated[bool, typer.Option(
        "--embeds", help="Check served embeddings instead: OUT is a vllm-ec or sglang export, a folder or "
                         "s3://BUCKET/PREFIX (or a store, checked as it would be exported): tokens vs grid and merge "
                         "size, width, dtype, finite, contiguous."
    )] = False,
    sources: Annotated[bool, typer.Option(help="Also compare every record with its input as it is now: stale "
                                          "records (the input changed since it was extracted) fail the check."
                                          )] = False,
    detect_changes: Annotated[choice_type("verify_detect_changes", CHANGE_MODES[:2]) | None, typer.Option(
        help="With --sources: compare size and modification time, or the content (reads every input). "
             "[default: mtime]")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
    storage_option: StorageOption = None,
) -> None:
    """Check every shard against the manifest (checksums too) and the plan; exit 1 on any problem, on what export
    refuses (an unfinished store: shards not done, inputs or archives that could not be read; a store whose every
    image holds NaN/Inf values), on superseded rows left where plain readers look, or (with --sources) on a stale
    record. With --embeds, check every embedding of a serving export (or of a store, as it would be exported)
    against the model's contract instead; the store checks (--sources, --quick) are a separate run.

    Example: vitok verify out/ --sources
    """
    from ..errors import UsageError

    mode = getattr(detect_changes, "value", detect_changes)
    if embeds and (sources or quick):
        given = " and ".join(f for f, on in (("--sources", sources), ("--quick", quick)) if on)
        raise UsageError(f"--embeds checks served embeddings, {given} check a store's shards: run them apart "
                         f"(vitok verify {out} --embeds; vitok verify {out}{' --sources' if sources else ''}"
                         f"{' --quick' if quick else ''})")
    if mode is not None and not sources:
        raise UsageError("--detect-changes applies with --sources (it says how inputs are compared with their "
                         "records)")
    if embeds:
        from ..consumers.serving import verify_embeds

        result = verify_embeds(out, storage_options=storage_option)
        if json_output:
            typer.echo(json.dumps({"checked": result.checked, "layout": result.layout, "problems": result.problems,
                                   "clean": result.clean}))
            if not result.clean:
                raise typer.Exit(1)
            return
        for problem in result.problems[:50]:
            typer.echo(f"problem: {_safe(problem)}", err=True)
        if len(result.problems) > 50:
            typer.echo(f"... and {len(result.problems) - 50} more", err=True)
        typer.echo(f"{result.checked} embedding(s) checked ({result.layout}), {len(result.problems)} problem(s)")
        if not result.clean:
            raise typer.Exit(1)
        return
    from ..storage.roots import store_root
    from ..storage.verify import verify_store

    report = verify_store(store_root(out, storage_options=storage_option), quick=quick,
                          sources=(mode or "mtime") if sources else None)
    if json_output:
        typer.echo(json.dumps(report.to_dict()))
        if not report.clean:
            raise typer.Exit(1)
        return
    for problem in report.problems:
        typer.echo(f"problem: {_safe(problem)}", err=True)
    if report.all_nonfinite:  # what export refuses
        from ..consumers.export import every_image_nonfinite

        typer.echo(f"problem: {_safe(every_image_nonfinite(out, report.images_nonfinite, media=report.media))}",
                   err=True)
    for line in report.in_view:
        typer.echo(f"in view: {_safe(line)}", err=True)
    for reason in report.unfinished:  # the reasons export gives for refusing it
        typer.echo(f"incomplete: {_safe(reason)}", err=True)
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
    typer.echo(f"{report.shards_ok} shard(s) ok, {report.images_ok} {report.media} ok, "
               f"{report.images_skipped} skipped, {report.images_failed} failed"
               + (f", {report.images_damaged} in damaged shards" if report.images_damaged else "")
               + (f", {report.images_nonfinite} with NaN/Inf tokens" if report.images_nonfinite else ""))
    if not report.clean:
        raise typer.Exit(1)




def _export_command(store: str, dest: str, **values: Any) -> None:
    """Write a store's tokens where retrieval tools and inference servers read them. DEST is written aside and
    swapped in whole (in a bucket: each file put whole, the marker .vitok-export.json last); damaged or unfinished
    stores are refused; images with NaN/Inf tokens are left out and counted.

    Examples:

        vitok export out/ index/ --pool mean --normalize l2

        vitok export out/ /shared/ec-cache --layout vllm-ec

        vitok export out/ embeds/ --layout sglang

        vitok export s3://bucket/feats s3://bucket/ec-cache --layout vllm-ec
    """
    _setup_logging()
    from ..consumers.export import export as run_export

    result = run_export(store, dest, **{k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()})
    left = f"; {len(result.left_out)} left out (NaN/Inf)" if result.left_out else ""
    partial = "; PARTIAL store" if result.missing else ""
    typer.echo(f"{result.images} {result.counted} -> {dest} ({result.layout} layout{left}{partial})")


_export_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("store", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        str, typer.Argument(help="A store written by vitok extract (a folder, or s3://BUCKET/PREFIX).")]),
    inspect.Parameter("dest", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        str, typer.Argument(help="Output folder, or s3://BUCKET/PREFIX: new, empty, or an earlier export of this store "
                                 "(replaced whole; in a bucket, finished when its .vitok-export.json appears, "
                                 "written last).")]),
    *option_parameters(ExportOptions),
])
_export_command.__annotations__ = {}
app.command("export")(_export_command)


@app.command()
def viz(
    target: Annotated[str, typer.Argument(help="A store (then give KEY) or an image file (then give --model).")],
    key: Annotated[str | None, typer.Argument(help="The image's key in the store.")] = None,
    out: Annotated[str, typer.Option("-o", "--out", help="Picture to write (.png): a local path (a URL is "
                                                          "refused).")] = "tokens.png",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Encode an image file with this model.")] = None,
    feature: Annotated[str | None, typer.Option(help="Per-patch feature to draw. [default: patch]")] = None,
    storage_option: StorageOption = None,
) -> None:
    """Draw an image beside the first three principal components of its patch tokens and their norms.

    Examples:

        vitok viz out/ photos/cat.jpg -o cat.png

        vitok viz photos/cat.jpg --model qwen3-vl-2b -o cat.png
    """
    _setup_logging()
    from ..consumers.viz import image_picture, token_picture
    from ..errors import UsageError
    from ..storage.location import local_file_path

    out = local_file_path(out, "--out")
    if model is not None:
        written = image_picture(target, model, out)
    else:
        if key is None:
            raise UsageError("give the image's KEY in the store (vitok info lists them), or an image file with --model")
        from ..storage.store import open_store

        with open_store(target, storage_options=storage_option) as store:
            written = token_picture(store, key, out, feature)
    typer.echo(f"wrote {written}")


