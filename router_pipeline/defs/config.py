"""Dagster config classes derived from the plain dataclasses that own each setting: a
field per dataclass field, with its name, type and default, so a default is written once
(in the dataclass) and the launchpad shows it."""

from __future__ import annotations

import dataclasses
import typing

import dagster as dg


def derived(settings: type, base: type = dg.Config, *, name: str | None = None, defaults: dict | None = None,
            exclude: tuple[str, ...] = (), types: dict | None = None) -> type:
    """A subclass of ``base`` (a ``dg.Config`` carrying the methods and validators), named
    ``name`` (default: base's), with a
    field for each field of the dataclass ``settings`` not in ``exclude`` or already on
    ``base``. Tuples become lists (Dagster's config has no tuples); ``defaults`` and
    ``types`` replace a field's default or type."""
    hints, defaults, types = typing.get_type_hints(settings), defaults or {}, types or {}
    annotations, namespace = {}, {}
    for f in dataclasses.fields(settings):
        if f.name in exclude or f.name in getattr(base, "model_fields", {}):
            continue
        kind = types.get(f.name, hints[f.name])
        value = defaults.get(f.name, f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        if typing.get_origin(kind) is tuple:
            kind, value = list[typing.get_args(kind)[0]], value if value is dataclasses.MISSING else list(value)
        annotations[f.name] = kind
        if value is not dataclasses.MISSING:  # else a required field
            namespace[f.name] = value
    name = name or base.__name__
    return type(name, (base,), {"__annotations__": annotations, "__module__": base.__module__, "__qualname__": name,
                                "__doc__": base.__doc__, **namespace})


def plain(config: dg.Config, settings: type):
    """The dataclass ``settings`` made from a derived config's values (lists back to tuples)."""
    hints = typing.get_type_hints(settings)
    values = {}
    for f in dataclasses.fields(settings):
        if f.name in config.model_fields:
            v = getattr(config, f.name)
            values[f.name] = tuple(v) if typing.get_origin(hints[f.name]) is tuple else v
    return settings(**values)
