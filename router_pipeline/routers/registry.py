"""The router kinds and how a saved folder says which it holds: a head router's
``router.json`` names its kind; a LoRA adapter is a PEFT folder with the training record."""

from __future__ import annotations

from pathlib import Path

from router_pipeline.artifacts import ROUTER_FILE
from router_pipeline.routers.contract import Router, RouterConfig, read_json_object
from router_pipeline.routers.head import HEAD_KIND, HeadRouter
from router_pipeline.routers.lora import LORA_KIND, LoraRouter
from router_pipeline.routers.manifest import check_manifest
from router_pipeline.routers.pool import POOL_KIND, PoolRouter

KINDS = {HEAD_KIND: lambda path, config: HeadRouter(path, precision=config.precision),
         LORA_KIND: lambda path, config: LoraRouter(path, config=config),
         POOL_KIND: lambda path, config: PoolRouter(path, precision=config.precision)}


def kind_of(path: str | Path) -> str:
    described = Path(path) / ROUTER_FILE
    if not described.is_file():
        return LORA_KIND
    kind = read_json_object(described, "the router's 'kind'", "retrain the router").get("kind")
    if kind not in KINDS:
        raise ValueError(f"{described} names an unknown router kind {kind!r}; expected one of {sorted(KINDS)}")
    return kind


def load_router(path: str | Path, config: RouterConfig = RouterConfig()) -> Router:
    """The router saved at ``path``, of whichever kind it is; all route with
    ``route``/``route_batch`` and carry their ``calibration``. A release's files are
    checked against its manifest first (ReleaseIntegrityError naming the file)."""
    check_manifest(path)
    return KINDS[kind_of(path)](path, config)
