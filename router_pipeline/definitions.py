"""The Dagster definitions of router_pipeline: everything under ``defs/``.

``dg dev``, ``dg check defs``, ``dagster dev`` and ``dagster asset materialize -m
router_pipeline.definitions`` load this module. The definitions are built when it is
loaded (not when it is imported): the resources and the retrain schedule take the
environment of that moment (router_pipeline.settings).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg


def build_defs() -> dg.Definitions:
    """The defs/ package, found the ``dg`` way through the package's dg.toml (package data,
    so an installed wheel loads exactly as a checkout does)."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs()
