"""Dagster run config and resource fields, derived from the specs in ``settings/specs.py``.

Every field of a spec becomes an optional field of the same name (unset: the run's profile
decides), with the spec's help text as its description. Nothing here lists a field by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from lorasum_assets.settings.specs import check_limits, with_overrides

PROFILE_DEFAULT_NOTE = "Unset: the run's profile decides."


def _config_type(annotation: Any) -> Any:
    """Dagster config has lists, not tuples."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return list[typing.get_args(annotation)[0]]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _config_type(args[0]) if len(args) == 1 else annotation
    return annotation


def spec_fields(spec_cls: type, exclude: Iterable[str] = (), note: str = PROFILE_DEFAULT_NOTE) -> dict[str, tuple[Any, Any]]:
    """Pydantic field definitions for every field of ``spec_cls``, each optional; ``note`` says
    what an unset field means."""
    hints = typing.get_type_hints(spec_cls)
    skipped = set(exclude)
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(spec_cls):
        if f.name in skipped:
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = list(default) if isinstance(default, tuple) else default
        out[f.name] = (
            _config_type(hints[f.name]) | None,
            Field(default=None, description=f"{help_text} {note} (built-in default: {shown!r})"),
        )
    return out


def config_class(
    name: str, spec_cls: type, doc: str, *, base: type = dg.Config, exclude: Iterable[str] = (), **extra: tuple[Any, Any]
) -> type:
    """A ``dg.Config`` (or ``base``) subclass holding every field of ``spec_cls``, each optional,
    plus ``extra`` fields."""
    cls = create_model(name, __base__=base, __doc__=doc, **spec_fields(spec_cls, exclude), **extra)
    cls.__module__ = base.__module__ if base is not dg.Config else __name__
    return cls


def resolve(default: Any, config: Any) -> Any:
    """The profile's spec with the run's overrides applied, checked against its limits."""
    names = {f.name for f in dataclasses.fields(default)}
    values = config if isinstance(config, dict) else {name: getattr(config, name, None) for name in names}
    spec = with_overrides(default, {k: v for k, v in values.items() if k in names})
    check_limits(spec)
    return spec
