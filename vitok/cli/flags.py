"""Typer parameters generated from the typed options records (``ExtractOptions``): each field's help, panel,
choices, bounds and default are declared once, in the record, and become the command's flags here."""

from __future__ import annotations

import enum
import inspect
from dataclasses import MISSING
from typing import Annotated, Any

import typer

from ..run.options import ExtractOptions, flag_of, option_fields


def choice_type(name: str, choices: tuple[str, ...]) -> type[enum.Enum]:
    return enum.Enum(f"{name}_choice", {c: c for c in choices}, type=str)  # typer shows [a|b|c]


def option_parameters(record: type = ExtractOptions, names: tuple[str, ...] | None = None) -> list[inspect.Parameter]:
    """Typer parameters for the fields of an options record (all of them, or ``names``), from their declarations."""
    import typing

    hints = typing.get_type_hints(record)
    params = []
    for f in option_fields(record):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata["cli"]
        flag = flag_of(f)
        decls = list(meta["flags"]) or [flag]
        kind: Any = hints[f.name]
        if meta["choices"]:
            kind = choice_type(f.name, meta["choices"])
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


def by_panel(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Flags grouped in --help as the data flows: model, inputs, outputs, preprocessing, speed, cluster."""
    from ..run.options import PANELS

    def panel(param: inspect.Parameter) -> int:
        info = param.annotation.__metadata__[0]
        name = getattr(info, "rich_help_panel", None)
        return PANELS.index(name) if name in PANELS else len(PANELS)

    return sorted(params, key=panel)


