"""Where training runs: in this process (``local``) or on Modal GPUs (``modal``).

The Modal functions in modal_app.py call ``remote_job``, which calls the same
train_sft / train_dpo as the local path. The Dagster assets call ``run_local`` or
``launch_modal``; both leave the adapter under artifacts/adapters/<stage>/.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import pandas as pd

from router_pipeline import settings
from router_pipeline.artifacts import STAGES, TRAINING_FILE, install
from router_pipeline.training.lora import COLUMNS, TrainConfig, TrainResult, data_hash, train_dpo, train_sft

APP_NAME = "router-pipeline"


def run_name(stage: str, rows: pd.DataFrame, cfg: TrainConfig, parent: str | None = None) -> str:
    """A run folder per (stage, data, config, parent adapter): an interrupted run of the
    same job resumes from its checkpoints; changed data or config starts afresh."""
    blob = json.dumps([stage, data_hash(rows[list(COLUMNS[stage])]), cfg.to_dict(), parent], sort_keys=True)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def train_stage(stage, rows, cfg, workdir, sft_adapter=None, callbacks=None) -> TrainResult:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if stage == "sft":
        return train_sft(rows, cfg, workdir, callbacks)
    return train_dpo(rows, sft_adapter, cfg, workdir, callbacks)


def run_local(stage: str, rows: pd.DataFrame, cfg: TrainConfig, root: Path, dest: Path,
              sft_adapter: Path | None = None) -> TrainResult:
    workdir = root / run_name(stage, rows, cfg, _adapter_id(sft_adapter))
    result = train_stage(stage, rows, cfg, workdir, sft_adapter)
    install(Path(result.adapter_dir), dest)
    result.adapter_dir = str(dest)
    return result


def _adapter_id(path: Path | None) -> str | None:
    if path is None:
        return None
    meta = Path(path) / TRAINING_FILE
    return hashlib.sha256(meta.read_bytes()).hexdigest()[:12] if meta.exists() else str(path)


def pack_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for item in sorted(Path(path).iterdir()):
            tar.add(item, arcname=item.name)
    return buf.getvalue()


def unpack_dir(blob: bytes, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def remote_job(stage: str, records: list[dict], config: dict, name: str, root: str,
               sft_adapter_tar: bytes | None = None, commit=None, dataset_root: str | None = None) -> dict:
    """The body of the Modal functions: keep the rows handed over (``dataset_root``),
    train in ``root/name`` (a Volume, so that a retried container resumes from its
    checkpoints), commit, return the adapter."""
    from transformers import TrainerCallback

    class CommitOnSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if commit is not None:
                commit()

    t0 = time.perf_counter()
    rows = pd.DataFrame.from_records(records)
    if dataset_root is not None:
        Path(dataset_root).mkdir(parents=True, exist_ok=True)
        rows.to_parquet(Path(dataset_root) / f"{name}.parquet", index=False)
    workdir = Path(root) / name
    sft_dir = unpack_dir(sft_adapter_tar, workdir / "parent_adapter") if sft_adapter_tar else None
    result = train_stage(stage, rows, TrainConfig.from_dict(config), workdir, sft_dir,
                    [CommitOnSave()])
    if commit is not None:
        commit()
    return {"result": result.to_dict(), "adapter_tar": pack_dir(Path(result.adapter_dir)),
            "gpu_seconds": time.perf_counter() - t0}


class ModalCredentialsMissing(RuntimeError):
    pass


def require_modal_credentials() -> None:
    if not settings.modal_credentials_present():
        raise ModalCredentialsMissing(
            "compute='modal' needs MODAL_TOKEN_ID and MODAL_TOKEN_SECRET in the environment (or `modal token new`)"
        )


def launch_modal(stage: str, rows: pd.DataFrame, cfg: TrainConfig, dest: Path,
                 sft_adapter: Path | None = None) -> tuple[TrainResult, float]:
    """Call the deployed ``train_<stage>`` function of the Modal app, stream its logs,
    and unpack the adapter it returns into ``dest``. Returns (result, GPU seconds)."""
    import modal

    require_modal_credentials()
    fn = modal.Function.from_name(APP_NAME, f"train_{stage}")
    name = run_name(stage, rows, cfg, _adapter_id(sft_adapter))
    records = rows[list(COLUMNS[stage])].to_dict("records")
    parent = (pack_dir(sft_adapter),) if sft_adapter is not None else ()  # train_dpo only
    with modal.enable_output():  # the container's logs stream into this process (Dagster's compute logs)
        reply = fn.remote(records, cfg.to_dict(), name, *parent)
    tmp = dest.with_name(dest.name + ".incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    install(unpack_dir(reply["adapter_tar"], tmp), dest)
    shutil.rmtree(tmp, ignore_errors=True)
    result = TrainResult(**reply["result"])
    result.adapter_dir = str(dest)
    return result, float(reply["gpu_seconds"])


# -- routing (the evaluation's model work) -------------------------------------
def route_queries(router_dir: str | Path, queries: list[str], router_config: dict,
                  progress: bool = False) -> list[dict]:
    """Route every query with the router saved at ``router_dir`` (an adapter or a head
    router); plain dicts (RouteDecision.to_dict())."""
    from router_pipeline.routers.contract import RouterConfig
    from router_pipeline.routers.registry import load_router

    router = load_router(router_dir, RouterConfig(**router_config))
    return [d.to_dict() for d in router.route_batch(queries, progress=progress)]


def remote_route(adapter_tar: bytes, queries: list[str], router_config: dict, root: str) -> dict:
    """The body of the Modal evaluate_router function: unpack the adapter, route."""
    t0 = time.perf_counter()
    name = hashlib.sha256(adapter_tar).hexdigest()[:12]
    adapter = unpack_dir(adapter_tar, Path(root) / f"eval-{name}" / "adapter")
    return {"decisions": route_queries(adapter, queries, router_config), "gpu_seconds": time.perf_counter() - t0}


def launch_modal_route(adapter_dir: Path, queries: list[str], router_config: dict) -> tuple[list[dict], float]:
    """Route on the deployed T4 function; returns (decisions, GPU seconds)."""
    import modal

    require_modal_credentials()
    fn = modal.Function.from_name(APP_NAME, "evaluate_router")
    with modal.enable_output():
        reply = fn.remote(pack_dir(adapter_dir), queries, router_config)
    return reply["decisions"], float(reply["gpu_seconds"])
