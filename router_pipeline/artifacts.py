"""The artifact contract: where each thing the pipeline writes lives under one root.

This module is the whole contract between the pipeline and the routing server: the
Dagster side (the ``artifacts`` resource) and the serving side (CLI, server) both
locate adapters and the released router through ``Artifacts``, and the pipeline reads
the server's state database only through the queries below, so neither imports the
other.

    <root>/assets/<key>.parquet           DataFrame assets
    <root>/adapters/{sft,dpo}/             trained adapters (+ TRAINING_FILE)
    <root>/training/<run>/                 training runs and checkpoints (resumable)
    <root>/heads/<head>/                   head routers (HEADS): ROUTER_FILE + head.npz (heads.py) + OOF_FILE
    <root>/evaluation/<candidate>/         CALIBRATION_FILE, EVALUATION_FILE per candidate
    <root>/evaluation/                     SUMMARY_FILE, INTERVALS_FILE: every candidate
    <root>/router/                         the released router (adapter or head) + calibration + figures
    <root>/pool/<candidate>/               pool routers (training/pool.POOL_CANDIDATES, POOL_ENSEMBLES) with their knob's calibration
    <root>/evaluation/pool_<candidate>/    EVALUATION_FILE of a pool router on the test split
    <root>/pool_router/                    the released pool router + calibration + figures
    <root>/plots/                          PNGs shown in the Dagster UI
    <root>/cache/llm_cache.sqlite          every paid model response
    <root>/feedback/                       the routing server's state database (STATE_FILE)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
TRAINING_FILE = "router_training.json"  # training config, mode, rows and result of an adapter
CALIBRATION_FILE = "router_calibration.json"  # the threshold and the mapping the evaluation scored
EVALUATION_FILE = "evaluation.json"  # headline figures (the release gate compares these)
SUMMARY_FILE = "summary.csv"  # one row per candidate / reference router (evaluation/)
INTERVALS_FILE = "intervals.csv"  # paired-bootstrap APGR differences between candidates (evaluation/)
OOF_FILE = "oof_scores.csv"  # a head's out-of-fold P(Complex_Query) on its training rows: qid, fold, p_complex
ROUTER_FILE = "router.json"  # what kind of router a folder holds (head routers; adapters have ADAPTER_CONFIG)
MANIFEST_FILE = "manifest.json"  # a released router's files and their sha256, checked when it is loaded
CASCADE_FILE = "cascade.json"  # a released pool router's cascade: the plan it escalates along (routers/cascade.py)
CASCADE_HEADS_FILE = "cascade_heads.npz"  # a released learned cascade's heads (arrays; cascade.json names it)
STATE_FILE = "requests.sqlite"  # the routing server's default state database, in its feedback folder
STAGES = ("sft", "dpo")
# Head routers: frozen Gemma states; MiniLM with shrinkage LDA, logistic regression, k-NN.
HEADS = ("gemma", "minilm_lda", "logistic", "knn")

# What the pipeline reads from the state database (the ``outcomes``, ``traffic`` and ``cascade`` sources).
OUTCOME_FIELDS = ("query", "medium_grade", "large_grade", "request_id", "profile", "timestamp")
OUTCOMES_QUERY = f"SELECT {', '.join(OUTCOME_FIELDS)} FROM outcomes ORDER BY timestamp, request_id"  # oldest first
# Stored queries with the grades feedback gave them, per model (a JSON object: model -> grade).
TRAFFIC_QUERY = "SELECT query, grades FROM requests WHERE query IS NOT NULL ORDER BY rowid"
# What cascades answered (the ``cascade`` source): per request, model -> answer and model -> cost (JSON objects)
# and the answer two or more of them agreed on (NULL: none did), oldest first as ``export-outcomes`` writes them.
CASCADE_QUERY = ("SELECT request_id, query, answers, costs, agreed FROM cascade_outcomes "
                 "ORDER BY timestamp, request_id")


def check_names(names: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    """``names`` if every one is in ``allowed``, else ValueError naming the unknown ones."""
    unknown = set(names) - set(allowed)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; expected some of {list(allowed)}")
    return names


def install(src: Path, dest: Path) -> Path:
    """Copy the folder ``src`` to ``dest``, replacing what was there (through a temporary
    sibling, so a crash leaves the old folder or the new one)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@dataclass(frozen=True)
class Artifacts:
    root: Path

    @classmethod
    def from_settings(cls) -> "Artifacts":
        from router_pipeline import settings

        return cls(settings.load().artifacts_dir)

    @property
    def assets(self) -> Path:
        return self.root / "assets"

    def adapter(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown adapter {stage!r}; expected one of {STAGES}")
        return self.root / "adapters" / stage

    @property
    def training_runs(self) -> Path:
        return self.root / "training"

    def head(self, name: str) -> Path:
        if name not in HEADS:
            raise ValueError(f"unknown head router {name!r}; expected one of {HEADS}")
        return self.root / "heads" / name

    def candidate(self, name: str) -> Path:
        """Where a candidate router lives: an adapter (sft, dpo) or a head router."""
        return self.adapter(name) if name in STAGES else self.head(name)

    def evaluation(self, name: str) -> Path:
        return self.root / "evaluation" / self.candidate(name).name

    @property
    def release(self) -> Path:
        return self.root / "router"

    def pool_candidate(self, name: str) -> Path:
        return self.root / "pool" / name

    def pool_evaluation(self, name: str) -> Path:
        return self.root / "evaluation" / f"pool_{name}"

    @property
    def pool_release(self) -> Path:
        return self.root / "pool_router"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def feedback(self) -> Path:
        """The routing server's default feedback folder (its outcomes feed the retrain)."""
        return self.root / "feedback"

    @property
    def cache(self) -> Path:
        return self.root / "cache" / "llm_cache.sqlite"

    def default_router(self) -> Path | None:
        """The released router, else the SFT adapter (None when neither exists)."""
        for path in (self.release, self.adapter("sft")):
            if (path / ADAPTER_CONFIG).exists() or (path / ROUTER_FILE).exists():
                return path
        return None
