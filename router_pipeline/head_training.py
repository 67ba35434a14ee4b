"""Training the head routers: encode the training rows once, choose each head's
hyper-parameters by cross-validation on the training rows, fit, save.

Candidates (artifacts.HEADS):
- ``gemma``: logistic head on a frozen Gemma hidden state; the layer and the
  regularisation are chosen by 5-fold cross-validation;
- ``logistic``: logistic head on MiniLM sentence embeddings (regularisation by CV);
- ``knn``: cosine k-NN on MiniLM embeddings (k by CV).

Every head is calibrated on its out-of-fold predictions (heads.calibrate). The score
cross-validation ranks by is the out-of-fold ROC AUC of P(Complex_Query)
against the label "Complex_Query": what APGR rewards (ranking the queries that need
the strong model first) without needing both grades, so council-labelled rows count
too. The validation slice is never seen here: it stays for calibration and for
choosing between the candidates (router_evaluation).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from router_pipeline.features import GemmaSpec, GemmaStates, MiniLM
from router_pipeline.heads import Head, calibrate, fit_head, p_complex, save_head_router
from router_pipeline.policies import COMPLEX, POLICIES

MIN_ROWS_FOR_CV = 30  # fewer rows (or fewer than `folds` rows of a policy): the first grid value, uncalibrated


@dataclass(frozen=True)
class HeadConfig:
    base_model: str = "gemma3-270m"
    allow_hub: bool = False
    layers: tuple[int, ...] = (3, 6, 9, 12)  # Gemma layers tried (the state after this many blocks)
    pooling: str = "mean"
    # Inverse regularisation strengths tried. Strong regularisation wins on the development
    # file for both encoders (README: "Choosing the recipe"), hence the small values.
    c_values: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    knn_k: tuple[int, ...] = (5, 15, 45)
    folds: int = 5
    seed: int = 0
    batch_size: int = 16
    heads: tuple[str, ...] = ("gemma", "logistic", "knn")


@dataclass
class HeadResult:
    name: str
    path: Path
    params: dict
    cv_auc: float
    grid: list[dict] = field(default_factory=list)
    encode_s: float = 0.0
    fit_s: float = 0.0


def cross_validate(x: np.ndarray, policies: list[str], classifier: str, *, folds: int, seed: int, c: float = 1.0,
                   k: int = 5) -> tuple[float, np.ndarray]:
    """(out-of-fold ROC AUC of P(Complex_Query), out-of-fold P(policy)), stratified
    seeded folds."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    strata = np.array(policies)
    oof = np.zeros((len(strata), len(POLICIES)))
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, strata):
        oof[held] = fit_head(classifier, x[train], list(strata[train]), c=c, k=k, seed=seed).proba(x[held])
    return float(roc_auc_score(strata == COMPLEX, p_complex(oof))), oof


def _cv_possible(policies: list[str], folds: int) -> bool:
    counts = pd.Series(policies).value_counts()
    return len(policies) >= MIN_ROWS_FOR_CV and len(counts) >= 2 and counts.get(COMPLEX, 0) >= folds \
        and counts.min() >= folds


def fit_selected(x_for, policies: list[str], classifier: str, grid: list[dict], *, cv: bool, folds: int,
                 seed: int) -> tuple[Head, dict, list[dict], float]:
    """Cross-validate every params of ``grid`` (``x_for(params)`` gives the features),
    fit the best on every row and calibrate it on its out-of-fold predictions. Without
    enough rows for cross-validation: the first params, uncalibrated."""
    scored, best, best_oof = [], None, None
    for params in grid:
        fit_params = {k: v for k, v in params.items() if k in ("c", "k")}
        auc, oof = (cross_validate(x_for(params), policies, classifier, folds=folds, seed=seed, **fit_params)
                    if cv else (math.nan, None))
        scored.append({**params, "cv_auc": auc})
        if best is None or auc > best["cv_auc"]:
            best, best_oof = scored[-1], oof
    params = {k: v for k, v in best.items() if k != "cv_auc"}
    head = fit_head(classifier, x_for(params), policies, seed=seed, **{k: v for k, v in params.items() if k in ("c", "k")})
    if best_oof is not None:
        calibrate(head, best_oof, policies)
    return head, params, scored, best["cv_auc"]


def train_head_routers(examples: pd.DataFrame, config: HeadConfig, dest: dict[str, Path], *,
                       progress: bool = False, log=print) -> list[HeadResult]:
    """Fit every configured head on ``examples`` (query, policy: the training rows,
    validation slice excluded) and save each to ``dest[name]``."""
    if examples.empty:
        raise ValueError("no training rows for the head routers")
    queries, policies = list(examples["query"]), list(examples["policy"])
    cv = _cv_possible(policies, config.folds)
    if not cv:
        counts = pd.Series(policies).value_counts().to_dict()
        log(f"{len(policies)} training rows {counts}: {config.folds}-fold cross-validation needs at least "
            f"{MIN_ROWS_FOR_CV} rows and {config.folds} of each policy; each head takes the first value of its "
            "grid, uncalibrated")
    results = []
    if "gemma" in config.heads:
        t0 = time.perf_counter()
        spec = GemmaSpec(config.base_model, max(config.layers), config.pooling, config.allow_hub)
        encoder = GemmaStates(spec)
        by_layer = encoder.encode_layers(queries, list(config.layers), batch_size=config.batch_size, progress=progress)
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        grid = [{"layer": layer, "c": c} for layer, c in itertools.product(config.layers, config.c_values)]
        head, params, scored, auc = fit_selected(lambda p: by_layer[p["layer"]], policies, "logistic", grid, cv=cv,
                                                 folds=config.folds, seed=config.seed)
        chosen = GemmaSpec(config.base_model, params["layer"], config.pooling, config.allow_hub)
        results.append(_save("gemma", dest, chosen.to_dict(), head, params, scored, auc, len(policies),
                             encode_s, time.perf_counter() - t0))
        log(f"gemma head: layer {params['layer']}, C {params['c']} (CV AUC {auc:.3f})")
    minilm = [h for h in ("logistic", "knn") if h in config.heads]
    if minilm:
        t0 = time.perf_counter()
        x = MiniLM().encode(queries, progress=progress)
        encode_s = time.perf_counter() - t0
        for name in minilm:
            t0 = time.perf_counter()
            grid = [{"c": c} for c in config.c_values] if name == "logistic" else [{"k": k} for k in config.knn_k]
            head, params, scored, auc = fit_selected(lambda p: x, policies, name, grid, cv=cv, folds=config.folds,
                                                     seed=config.seed)
            results.append(_save(name, dest, {"encoder": "minilm"}, head, params, scored, auc, len(policies),
                                 encode_s, time.perf_counter() - t0))
            log(f"{name} (MiniLM): {params} (CV AUC {auc:.3f})")
    return results


def _save(name, dest, encoder, head, params, scored, auc, rows, encode_s, fit_s) -> HeadResult:
    path = save_head_router(dest[name], name, encoder, head, params=params, cv_auc=auc, training_rows=rows,
                            grid=scored)
    return HeadResult(name, path, params, auc, scored, encode_s, fit_s)
