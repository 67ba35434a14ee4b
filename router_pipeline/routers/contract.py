"""The contract every router kind keeps: a decision per query, the settings a router is
loaded with, and how a router's files are read.

A router (``Router``) routes one query or a batch into ``RouteDecision``s and carries
the ``calibration`` its release recorded. The kinds (``head.HeadRouter``,
``lora.LoraRouter``) and how a saved folder names its kind live in ``registry``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from router_pipeline.artifacts import CALIBRATION_FILE, ROUTER_FILE
from router_pipeline.policies import COMPLEX, POLICIES
from router_pipeline.routers.prompt import MODES

RAISE = "raise"  # RouterConfig.fallback: fail instead of deciding for the router
PRECISIONS = ("fast", "fp32")  # fp32 is the reference; fast is bf16 weights where the hardware has bf16 units
PROBE_QUERY = "Who wrote Hamlet?"  # what a router is asked to check it answers (its width at load, /health)


class Router(Protocol):
    """What the server, the evaluation and the CLI need of any router kind."""

    mode: str
    calibration: dict

    def route(self, query: str, *, with_reasoning: bool = False) -> "RouteDecision": ...

    def route_batch(self, queries: list[str], *, with_reasoning: bool = False,
                    progress: bool = False) -> list["RouteDecision"]: ...


class RouterOutputError(ValueError):
    """The router produced no usable decision and the fallback is ``raise``."""


@dataclass
class RouteDecision:
    query: str
    policy: str  # the policy acted on (the fallback's when parse_ok is False)
    probabilities: dict[str, float]  # softmax over the policies' first tokens; {} when unparsed
    parse_ok: bool
    mode: str
    reasoning: str = ""
    parse_error: str | None = None
    fallback_used: bool = False
    policy_mass: float | None = None  # share of the full-vocabulary mass on the three policy tokens
    generated: str = ""
    latency_ms: float = 0.0
    # A pool router's decision: P(correct) of each model of its pool, and the model that
    # maximises P(correct) - lambda * cost at the router's lambda (``policy`` then reads it
    # as two tiers: Standard_Query for the cheapest model, Complex_Query for any other).
    p_correct: dict[str, float] = field(default_factory=dict)
    model: str | None = None
    ranked: tuple[str, ...] = ()  # a pool router's models best first (``model`` first)

    @property
    def confidence(self) -> float | None:
        return self.probabilities.get(self.policy) if self.probabilities else None

    @property
    def p_complex(self) -> float:
        """Score for thresholds: the probability that the query needs the strong model
        (Complex_Query); a fallback decision counts as certain."""
        if self.probabilities:
            return self.probabilities[COMPLEX]
        return 1.0 if self.policy == COMPLEX else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RouterConfig:
    mode: str | None = None  # None: the mode recorded with the adapter
    fallback: str = COMPLEX  # a policy, or "raise"
    max_new_tokens: int = 96  # reasoning mode, and fast mode's optional reasoning
    batch_size: int = 16
    min_policy_mass: float = 0.0  # fast mode: below this the model is not deciding -> fallback
    allow_hub: bool = False
    # Decision-first modes: run the fixed prompt prefix once and reuse its KV cache for
    # every query (a server's setting; a one-shot CLI call gains nothing from it).
    prefix_cache: bool = False
    # Head routers on Gemma: "fast" (bf16 weights where the CPU/GPU has bf16 units, the
    # release's exported encoder) or "fp32", the reference. LoRA routers run in fp32.
    precision: str = "fast"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown router mode {self.mode!r}; expected one of {MODES}")
        if self.fallback != RAISE and self.fallback not in POLICIES:
            raise ValueError(f"fallback must be a policy {POLICIES} or {RAISE!r}, got {self.fallback!r}")


def read_json_object(path: Path, holds: str, fix: str) -> dict:
    """A JSON object from a file the pipeline wrote, or ValueError saying what is wrong."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold an object with {holds}; found {type(value).__name__}")
    return value


def read_router_folder(path: Path, kind: str, arrays: str) -> tuple[dict, Path]:
    """(router.json's contents, the arrays file) of a saved ``kind`` router at ``path``,
    or an error naming what is missing or wrong."""
    meta = read_json_object(path / ROUTER_FILE, "the router's 'kind'", "retrain the router")
    if meta.get("kind") != kind:
        raise ValueError(f"{path / ROUTER_FILE} describes a {meta.get('kind')!r} router, not a {kind} router")
    if not (path / arrays).is_file():
        raise FileNotFoundError(f"{path / arrays} is missing: the {kind} router at {path} is incomplete")
    return meta, path / arrays


def write_router_folder(path: Path, kind: str, arrays: str, save, meta: dict) -> Path:
    """Write a ``kind`` router folder at ``path`` (``save(file)`` writes the arrays; router.json
    the kind and ``meta``), replacing an older one only once the new one is whole."""
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp / arrays)
    (tmp / ROUTER_FILE).write_text(json.dumps({"kind": kind, **meta}, indent=2, default=float))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def read_calibration(adapter_dir) -> dict:
    if adapter_dir is None:
        return {}
    path = Path(adapter_dir) / CALIBRATION_FILE
    if not path.exists():
        return {}
    return read_json_object(path, "the calibrated 'threshold'", "re-run router_evaluation and released_router")


def decisions_frame(decisions: list[RouteDecision], qids: list[str] | None = None):
    """One row per decision, with a column per policy probability (NaN when unparsed)."""
    import pandas as pd

    rows = []
    for i, d in enumerate(decisions):
        row = {k: v for k, v in d.to_dict().items() if k != "probabilities"}
        row.update({f"p_{p}": d.probabilities.get(p) for p in POLICIES})
        row["p_complex"] = d.p_complex
        if qids is not None:
            row["qid"] = qids[i]
        rows.append(row)
    return pd.DataFrame(rows)


