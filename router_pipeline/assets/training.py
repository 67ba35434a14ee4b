"""Training assets: materialising them trains the router, locally or on Modal."""

from pathlib import Path
from typing import Optional

import dagster as dg
import pandas as pd

from router_pipeline import compute
from router_pipeline.paths import artifacts_dir
from router_pipeline.plots import loss_curve, markdown_image
from router_pipeline.training import DPO_DEFAULTS, TrainConfig, TrainResult

TRAINING_GROUP = "training"
A100_USD_PER_HOUR = 2.10  # Modal's list price for an A100 40GB; override in config
_D = TrainConfig()  # the one source of training defaults


class SFTTrainingConfig(dg.Config):
    """Dagster-side mirror of TrainConfig; every default comes from TrainConfig."""

    compute: str = "local"  # local | modal
    base_model: str = _D.base_model  # production: google/gemma-2b (set allow_hub)
    allow_hub: bool = _D.allow_hub
    lora_r: int = _D.lora_r
    lora_alpha: int = _D.lora_alpha
    lora_dropout: float = _D.lora_dropout
    target_modules: list[str] = list(_D.target_modules)
    learning_rate: float = _D.learning_rate
    epochs: float = _D.epochs
    batch_size: int = _D.batch_size
    grad_accum: int = _D.grad_accum
    lr_scheduler: str = _D.lr_scheduler
    warmup_ratio: float = _D.warmup_ratio
    max_length: int = _D.max_length
    seed: int = _D.seed
    max_steps: int = _D.max_steps
    max_rows: int = _D.max_rows  # > 0: a seeded sample of this many rows (a CPU time budget)
    quantization: str = _D.quantization  # auto (4-bit on CUDA) | 4bit | none
    save_steps: int = _D.save_steps
    gpu_usd_per_hour: float = A100_USD_PER_HOUR

    def train_config(self, mode: str) -> TrainConfig:
        fields = {k: v for k, v in self.model_dump().items() if k in TrainConfig.__dataclass_fields__}
        return TrainConfig.from_dict({**fields, "mode": mode})


class DPOTrainingConfig(SFTTrainingConfig):
    learning_rate: float = DPO_DEFAULTS["learning_rate"]
    epochs: float = DPO_DEFAULTS["epochs"]
    beta: float = _D.beta

    def train_config(self, mode: str) -> TrainConfig:
        return TrainConfig.from_dict({**super().train_config(mode).to_dict(), "beta": self.beta})


def adapter_dir(stage: str) -> Path:
    return artifacts_dir() / "adapters" / stage


def _mode(frame: pd.DataFrame) -> str:
    """The completion format the dataset was built in (its ``mode`` column)."""
    return str(frame["mode"].iloc[0])


def _train(context, stage: str, config: SFTTrainingConfig, rows: pd.DataFrame, parent: Optional[Path] = None):
    if config.compute not in compute.COMPUTES:
        raise dg.Failure(f"compute must be one of {compute.COMPUTES}, got {config.compute!r}")
    if rows.empty:
        raise dg.Failure(f"the {stage} dataset is empty: materialise more questions (sample_size)")
    cfg = config.train_config(_mode(rows))
    dest = adapter_dir(stage)
    gpu_seconds = None
    context.log.info(f"training {stage} on {config.compute} ({len(rows)} rows, base {cfg.base_model})")
    if config.compute == "modal":
        result, gpu_seconds = compute.launch_modal(stage, rows, cfg, dest, parent)
    else:
        result = compute.run_local(stage, rows, cfg, artifacts_dir() / "training", dest, parent)
    return result, gpu_seconds, _metadata(stage, result, gpu_seconds, config)


def _metadata(stage: str, result: TrainResult, gpu_seconds, config) -> dict:
    plot = loss_curve(result.losses, artifacts_dir() / "plots" / f"{stage}_loss.png", f"{stage.upper()} training loss")
    meta = {
        "adapter_dir": dg.MetadataValue.path(result.adapter_dir),
        "loss_curve": dg.MetadataValue.md(markdown_image(plot, f"{stage} loss")),
        "loss_curve_png": dg.MetadataValue.path(str(plot)),
        "final_loss": result.final_loss,
        "steps": result.steps,
        "examples_seen": result.examples_seen,
        "wall_s": round(result.wall_s, 1),
        "device": result.device,
        "compute": config.compute,
        "base_model": config.base_model,
    }
    for key, value in result.metrics.items():
        meta[key] = value
    if gpu_seconds is not None:
        meta["gpu_seconds"] = round(gpu_seconds, 1)
        meta["estimated_cost_usd"] = round(gpu_seconds / 3600 * config.gpu_usd_per_hour, 4)
    return meta


@dg.asset(group_name=TRAINING_GROUP, kinds={"pytorch"})
def sft_adapter(context: dg.AssetExecutionContext, config: SFTTrainingConfig, sft_dataset: pd.DataFrame) -> dg.MaterializeResult:
    """LoRA/QLoRA SFT of the router; the adapter lands in artifacts/adapters/sft."""
    _, _, meta = _train(context, "sft", config, sft_dataset)
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name=TRAINING_GROUP, kinds={"pytorch"}, deps=[sft_adapter])
def dpo_adapter(context: dg.AssetExecutionContext, config: DPOTrainingConfig, dpo_dataset: pd.DataFrame) -> dg.MaterializeResult:
    """DPO from the SFT adapter (its frozen copy is the reference); artifacts/adapters/dpo."""
    parent = adapter_dir("sft")
    if not (parent / "adapter_config.json").exists():
        raise dg.Failure(f"no SFT adapter at {parent}: materialise sft_adapter first")
    _, _, meta = _train(context, "dpo", config, dpo_dataset, parent)
    return dg.MaterializeResult(metadata=meta)


TRAINING_ASSETS = [sft_adapter, dpo_adapter]
