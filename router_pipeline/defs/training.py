"""Training assets: materialising them trains the router, locally or on Modal."""

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import dagster as dg
import pandas as pd
from pydantic import field_validator

from router_pipeline.artifacts import ADAPTER_CONFIG, HEADS, check_names
from router_pipeline.defs.config import derived, plain
from router_pipeline.defs.metadata import table
from router_pipeline.defs.plots import cv_by_layer, loss_curve, markdown_image
from router_pipeline.defs.resources import ArtifactStore, RouterFormat, TrainingCompute
from router_pipeline.labels.split import VALIDATION
from router_pipeline.training import compute as compute_module
from router_pipeline.training.heads import HeadConfig, train_head_routers
from router_pipeline.training.lora import DPO_DEFAULTS, TrainConfig, TrainResult

TRAINING_GROUP = "training"


class _Training(dg.Config):
    """LoRA/QLoRA training of one stage; every field and default is TrainConfig's
    (``quantization: 4bit`` trains QLoRA on CPU as on a GPU)."""

    def train_config(self, mode: str) -> TrainConfig:
        return replace(plain(self, TrainConfig), mode=mode)


SFTTrainingConfig = derived(TrainConfig, _Training, name="SFTTrainingConfig", exclude=("mode", "beta"))
DPOTrainingConfig = derived(TrainConfig, _Training, name="DPOTrainingConfig", exclude=("mode",), defaults=DPO_DEFAULTS)


def _dataset_mode(rows: pd.DataFrame, router_format: RouterFormat, stage: str) -> str:
    """The dataset must be in the configured format: a stale dataset would train the
    router to answer in a format the evaluation and the CLI do not read."""
    built_in = set(rows["mode"])
    if built_in != {router_format.mode}:
        raise dg.Failure(f"the {stage} dataset was built in mode {sorted(built_in)} but router_format.mode is "
                         f"{router_format.mode!r}: rematerialise the datasets")
    return router_format.mode


def _fit(context, stage: str, config: SFTTrainingConfig, rows: pd.DataFrame, artifacts: ArtifactStore,
         compute: TrainingCompute, router_format: RouterFormat, parent: Optional[Path] = None) -> dict:
    """Train one stage on the configured compute; returns the asset's metadata."""
    if rows.empty:
        raise dg.Failure(f"the {stage} dataset is empty: materialise more questions (sample_size)")
    cfg = config.train_config(_dataset_mode(rows, router_format, stage))
    layout = artifacts.layout()
    dest = layout.adapter(stage)
    context.log.info(f"training {stage} on {compute.where} ({len(rows)} rows, base {cfg.base_model})")
    gpu_seconds = None
    if compute.where == "modal":
        result, gpu_seconds = compute_module.launch_modal(stage, rows, cfg, dest, parent)
    else:
        result = compute_module.run_local(stage, rows, cfg, layout.training_runs, dest, parent)
    return _metadata(stage, result, gpu_seconds, compute, cfg, layout.plots)


def _metadata(stage: str, result: TrainResult, gpu_seconds, compute: TrainingCompute, cfg: TrainConfig,
              plots: Path) -> dict:
    plot = loss_curve(result.losses, plots / f"{stage}_loss.png", f"{stage.upper()} training loss")
    meta = {
        "adapter_dir": dg.MetadataValue.path(result.adapter_dir),
        "loss_curve": dg.MetadataValue.md(markdown_image(plot, f"{stage} loss")),
        "loss_curve_png": dg.MetadataValue.path(str(plot)),
        "final_loss": result.final_loss,
        "steps": result.steps,
        "examples_seen": result.examples_seen,
        "wall_s": round(result.wall_s, 1),
        "device": result.device,
        "quantization": result.quantization,
        "compute": compute.where,
        "mode": cfg.mode,
        "base_model": cfg.base_model,
        **result.metrics,
    }
    if gpu_seconds is not None:
        meta["gpu_seconds"] = round(gpu_seconds, 1)
        meta["estimated_cost_usd"] = round(gpu_seconds / 3600 * compute.a100_usd_per_hour, 4)
    return meta


@dg.asset(group_name=TRAINING_GROUP, kinds={"pytorch"})
def sft_adapter(context: dg.AssetExecutionContext, config: SFTTrainingConfig, artifacts: ArtifactStore,
                compute: TrainingCompute, router_format: RouterFormat, sft_dataset: pd.DataFrame) -> dg.MaterializeResult:
    """LoRA/QLoRA SFT of the router; the adapter lands in <artifacts>/adapters/sft."""
    return dg.MaterializeResult(metadata=_fit(context, "sft", config, sft_dataset, artifacts, compute, router_format))


@dg.asset(group_name=TRAINING_GROUP, kinds={"pytorch"}, deps=[sft_adapter])
def dpo_adapter(context: dg.AssetExecutionContext, config: DPOTrainingConfig, artifacts: ArtifactStore,
                compute: TrainingCompute, router_format: RouterFormat, dpo_dataset: pd.DataFrame) -> dg.MaterializeResult:
    """DPO from the SFT adapter (its frozen copy is the reference); <artifacts>/adapters/dpo."""
    parent = artifacts.layout().adapter("sft")
    if not (parent / ADAPTER_CONFIG).exists():
        raise dg.Failure(f"no SFT adapter at {parent}: materialise sft_adapter first")
    return dg.MaterializeResult(metadata=_fit(context, "dpo", config, dpo_dataset, artifacts, compute, router_format,
                                              parent))




class _HeadRouters(dg.Config):
    """Head routers on frozen encoders; every field and default is HeadConfig's."""

    @field_validator("heads", check_fields=False)
    @classmethod
    def _known_heads(cls, value: list[str]) -> list[str]:
        return check_names(value, HEADS, "heads")

    def head_config(self) -> HeadConfig:
        return plain(self, HeadConfig)


HeadRoutersConfig = derived(HeadConfig, _HeadRouters, name="HeadRoutersConfig")


@dg.asset(group_name=TRAINING_GROUP, kinds={"pytorch", "scikitlearn"})
def head_routers(context: dg.AssetExecutionContext, config: HeadRoutersConfig, artifacts: ArtifactStore,
                 compute: TrainingCompute, training_examples: pd.DataFrame) -> dg.Output[pd.DataFrame]:
    """Head routers on frozen encoders (a Gemma hidden state; MiniLM embeddings), fitted
    on the training rows with hyper-parameters chosen by cross-validation there; each
    lands in <artifacts>/heads/<name>/ as a servable candidate for router_evaluation."""
    rows = training_examples[training_examples["split"] != VALIDATION]
    if rows.empty:
        raise dg.Failure("no training rows (every example is in the validation slice): materialise more questions")
    layout = artifacts.layout()
    cfg = config.head_config()
    results = train_head_routers(rows, cfg, {name: layout.head(name) for name in cfg.heads},
                                 progress=compute.progress, log=context.log.info)
    summary = pd.DataFrame([{"head": r.name, "params": json.dumps(r.params), "cv_auc": r.cv_auc,
                             "encode_s": round(r.encode_s, 1), "fit_s": round(r.fit_s, 1), "path": str(r.path)}
                            for r in results])
    grid = pd.DataFrame([{"head": r.name, **g} for r in results for g in r.grid])
    meta = {"training_rows": len(rows), "heads": table(summary.drop(columns=["path"]).round(4)),
            "cross_validation": table(grid.round(4))}
    gemma = next((r for r in results if r.name == "gemma"), None)
    if gemma is not None and len(cfg.layers) > 1 and not grid["cv_auc"].isna().all():
        plot = cv_by_layer(grid[grid["head"] == "gemma"], gemma.params, layout.plots / "gemma_head_cv.png",
                           one_se=cfg.cheapest_layer)
        meta["gemma_cv_by_layer"] = dg.MetadataValue.md(markdown_image(plot, "CV AUC by Gemma layer"))
    return dg.Output(summary, metadata=meta)


training_job = dg.define_asset_job("training_job", selection=dg.AssetSelection.groups(TRAINING_GROUP),
                                   description="The head routers, and SFT then DPO of the LM router, on the configured compute.")
