"""Router training: LoRA SFT, then DPO from the SFT adapter, with TRL + PEFT.

The same two functions run everywhere: in-process for the local compute and the
tests, and inside the Modal functions of modal_app.py. ``quantization='4bit'`` trains
QLoRA (4-bit NF4 base, double quantisation, bf16 compute where the device has bf16
units, 8-bit AdamW, gradient checkpointing) with the same code on CUDA and on CPU;
``'none'`` trains LoRA on an fp32 base; ``'auto'`` picks 4-bit on CUDA and fp32 on
CPU (benchmarks/lora_precision.py measures the two on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from router_pipeline.artifacts import ADAPTER_CONFIG, TRAINING_FILE
from router_pipeline.routers.features import cpu_has_bf16
from router_pipeline.routers.lora import import_bitsandbytes, load_4bit
from router_pipeline.local_models import GEMMA3_270M

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    base_model: str = GEMMA3_270M  # production: google/gemma-2b (allow_hub=True)
    mode: str = "fast"  # the completion format the data was built with
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # Every linear layer of the blocks, as QLoRA does: on CPU it costs little more than attention only.
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 2e-4
    epochs: float = 3.0
    batch_size: int = 8
    grad_accum: int = 2
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_length: int = 512  # router_format cuts long queries, so prompts stay well below this
    seed: int = 42
    max_steps: int = -1  # > 0 caps optimizer steps (smoke runs)
    max_rows: int = 0  # > 0: train on a seeded sample of this many rows (a CPU time budget)
    beta: float = 0.1  # DPO only
    quantization: Literal["auto", "4bit", "none"] = "auto"  # auto: 4-bit on CUDA, none (fp32 LoRA) on CPU
    save_steps: int = 50
    allow_hub: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


DPO_DEFAULTS = {"learning_rate": 5e-5, "epochs": 1.0}
COLUMNS = {"sft": ("prompt", "completion"), "dpo": ("prompt", "chosen", "rejected")}  # what TRL reads per stage
REWARD_SAMPLE = 64  # DPO pairs scored after training for reward accuracy / margin


@dataclass
class TrainResult:
    adapter_dir: str
    stage: str
    losses: list[tuple[int, float]]
    final_loss: float | None
    examples_seen: int
    steps: int
    wall_s: float
    device: str
    metrics: dict = field(default_factory=dict)
    quantization: str = "none"  # what the base trained in: "4bit" (QLoRA) or "none" (fp32)

    def to_dict(self) -> dict:
        return asdict(self)


def data_hash(frame: pd.DataFrame) -> str:
    blob = frame.to_json(orient="records", force_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def device_info() -> tuple[str, bool]:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}", True
    return "cpu", False


def _use_4bit(cfg: TrainConfig, cuda: bool) -> bool:
    return cfg.quantization == "4bit" or (cfg.quantization == "auto" and cuda)


def load_base(cfg: TrainConfig):
    """(model, tokenizer) for training: the base in 4-bit NF4 (QLoRA) or in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router_pipeline.local_models import resolve_model

    path = resolve_model(cfg.base_model, allow_hub=cfg.allow_hub)
    import_bitsandbytes(cfg.allow_hub)
    _, cuda = device_info()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not _use_4bit(cfg, cuda):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer
    from peft import prepare_model_for_kbit_training

    # Freezes the base and turns on gradient checkpointing.
    return prepare_model_for_kbit_training(load_4bit(path, "cuda" if cuda else "cpu")), tokenizer


def _common_args(cfg: TrainConfig, out: Path, cuda: bool, four_bit: bool) -> dict:
    import torch

    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()
    return dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        # Paged: optimizer state moves to host memory under GPU memory pressure (a CPU has nothing to page).
        optim=("paged_adamw_8bit" if cuda else "adamw_8bit") if four_bit else "adamw_torch",
        activation_checkpointing=four_bit,  # gradient checkpointing's name in transformers 5
        max_length=cfg.max_length,
        dataloader_num_workers=0,
        per_device_eval_batch_size=cfg.batch_size,
        disable_tqdm=False,
    )


def _prepare(cfg: TrainConfig, out: Path):
    """Seed, device, base model and the trainer arguments both stages share."""
    from transformers import set_seed

    set_seed(cfg.seed)
    device, cuda = device_info()
    model, tokenizer = load_base(cfg)
    return model, tokenizer, device, _common_args(cfg, out, cuda, _use_4bit(cfg, cuda))


def _lora(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


@contextlib.contextmanager
def supervised_positions_only():
    """Project through the LM head only where a label is supervised, on every device.

    TRL's fused LM head scores only the supervised positions on Triton devices and
    every position elsewhere (to keep tile shapes fixed for compilers such as Neuron).
    On CPU that makes the 262k-token vocabulary projection of Gemma cost as much as the
    rest of the model at every prompt position; the loss needs two positions in fast
    mode. The loss is the same either way (tested)."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _release_freed_memory_callback():
    """glibc keeps the heap that variable-shape batches free, so a CPU run's RSS grows
    step after step. Hand it back to the OS after each step; a no-op off glibc.
    Measured: 8 SFT steps stay at 1.9-2.2 GB with it; a 75-step MMLU run still peaked at
    12.6 GB (14.7 GB without it), so something else grows too."""
    import ctypes
    import ctypes.util

    from transformers import TrainerCallback

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None

    class ReleaseFreedMemory(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trim(0)

    return ReleaseFreedMemory()


def _train(trainer, out: Path) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last:
        log.info("resuming from %s", last)
    release = _release_freed_memory_callback()
    if release is not None:
        trainer.add_callback(release)
    with supervised_positions_only():
        trainer.train(resume_from_checkpoint=last)


def sample_rows(rows: pd.DataFrame, cfg: TrainConfig, stage: str) -> pd.DataFrame:
    """At most ``cfg.max_rows`` rows, chosen by a seeded hash of each prompt (stable
    when rows are added), in their original order."""
    if cfg.max_rows <= 0 or cfg.max_rows >= len(rows):
        return rows
    from router_pipeline.text import unit_interval

    rank = rows["prompt"].map(lambda p: unit_interval(stage, cfg.seed, p))
    return rows.loc[sorted(rank.sort_values(kind="stable").index[:cfg.max_rows])]


def _finish(trainer, tokenizer, cfg: TrainConfig, stage: str, out: Path, frame: pd.DataFrame, t0: float,
            device: str, extra: dict | None = None, parent: str | None = None) -> TrainResult:
    adapter_dir = out / "adapter"
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    tokenizer.save_pretrained(str(adapter_dir))
    history = trainer.state.log_history
    losses = [(h["step"], float(h["loss"])) for h in history if "loss" in h]
    result = TrainResult(
        adapter_dir=str(adapter_dir), stage=stage, losses=losses,
        final_loss=losses[-1][1] if losses else None,
        examples_seen=int(trainer.state.global_step * cfg.batch_size * cfg.grad_accum),
        steps=int(trainer.state.global_step), wall_s=time.perf_counter() - t0, device=device,
        metrics=extra or {}, quantization="4bit" if _use_4bit(cfg, device != "cpu") else "none",
    )
    meta = {"stage": stage, "config": cfg.to_dict(), "data_hash": data_hash(frame), "rows": len(frame),
            "mode": cfg.mode, "parent_adapter": parent, "result": {k: v for k, v in result.to_dict().items() if k != "losses"}}
    (adapter_dir / TRAINING_FILE).write_text(json.dumps(meta, indent=2))
    return result


def sft_trainer(rows: pd.DataFrame, cfg: TrainConfig, out: Path, callbacks: list | None = None):
    """The configured SFTTrainer (exposed so the completion-only masking can be tested)."""
    from datasets import Dataset

    import_bitsandbytes(cfg.allow_hub)
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, device, common = _prepare(cfg, out)
    args = SFTConfig(completion_only_loss=True, packing=False, **common)
    dataset = Dataset.from_pandas(rows[list(COLUMNS["sft"])].reset_index(drop=True), preserve_index=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora(cfg), callbacks=callbacks)
    return trainer, tokenizer, device


def train_sft(rows: pd.DataFrame, cfg: TrainConfig, out: str | Path, callbacks: list | None = None) -> TrainResult:
    """LoRA SFT on prompt-completion rows; loss on the completion only."""
    out = Path(out)
    if rows.empty:
        raise ValueError("the SFT dataset is empty: nothing to train on")
    t0 = time.perf_counter()
    rows = sample_rows(rows, cfg, "sft")
    trainer, tokenizer, device = sft_trainer(rows, cfg, out, callbacks)
    _train(trainer, out)
    return _finish(trainer, tokenizer, cfg, "sft", out, rows, t0, device)


def train_dpo(rows: pd.DataFrame, sft_adapter: str | Path, cfg: TrainConfig, out: str | Path,
              callbacks: list | None = None) -> TrainResult:
    """DPO from the SFT adapter; TRL keeps a frozen copy of it as the reference."""
    from datasets import Dataset

    import_bitsandbytes(cfg.allow_hub)
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    out = Path(out)
    if rows.empty:
        raise ValueError("the DPO dataset is empty: nothing to train on")
    sft_adapter = Path(sft_adapter)
    if not (sft_adapter / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"no SFT adapter at {sft_adapter}: materialise sft_adapter first")
    t0 = time.perf_counter()
    rows = sample_rows(rows, cfg, "dpo")
    base, tokenizer, device, common = _prepare(cfg, out)
    model = PeftModel.from_pretrained(base, str(sft_adapter), is_trainable=True)
    args = DPOConfig(beta=cfg.beta, **common)
    dataset = Dataset.from_pandas(rows[list(COLUMNS["dpo"])].reset_index(drop=True), preserve_index=False)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=callbacks)
    _train(trainer, out)
    # Reward accuracy and margin of the trained adapter on a bounded sample of its
    # training pairs (the per-step logs are taken before each update, and a pass over
    # every pair would cost as much as training did).
    sample = dataset.shuffle(seed=cfg.seed).select(range(min(REWARD_SAMPLE, len(dataset))))
    with supervised_positions_only():
        trainer.evaluate(eval_dataset=sample)
    final = next(h for h in reversed(trainer.state.log_history) if "eval_rewards/accuracies" in h)
    metrics = {
        "reward_accuracy": float(final["eval_rewards/accuracies"]),
        "reward_margin": float(final["eval_rewards/margins"]),
        "reward_sample_pairs": len(sample),
        "train_data_loss": float(final["eval_loss"]),
    }
    return _finish(trainer, tokenizer, cfg, "dpo", out, rows, t0, device, metrics, parent=str(sft_adapter))


