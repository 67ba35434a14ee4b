"""Training the head routers: encode the training rows once, choose each head's
hyper-parameters by cross-validation on the training rows, fit, save.

Candidates (artifacts.HEADS):
- ``gemma``: shrinkage-LDA head on a frozen Gemma hidden state; the shrinkage and the
  layer with the best 5-fold cross-validated AUC (``cheapest_layer``: the fewest blocks
  within one standard error of it instead, an ablation);
- ``minilm_lda``: shrinkage-LDA head on MiniLM sentence embeddings (shrinkage by CV);
- ``logistic``: logistic head on MiniLM embeddings (regularisation by CV);
- ``knn``: cosine k-NN on MiniLM embeddings (k by CV).

Every head is calibrated on its out-of-fold predictions (fit_calibration), which are
saved beside it (OOF_FILE) as evidence for the release (release.py). The score
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
from typing import Literal

import numpy as np
import pandas as pd

from router_pipeline.artifacts import HEADS, OOF_FILE
from router_pipeline.routers.features import GemmaSpec, GemmaStates, MiniLM, Pooling
from router_pipeline.routers.head import CLASSIFIERS, Head, calibrated_proba, p_complex, save_head_router
from router_pipeline.policies import COMPLEX, POLICIES
from router_pipeline.local_models import GEMMA3_270M

MIN_ROWS_FOR_CV = 30  # fewer rows (or fewer than `folds` rows of a policy): the first grid value, uncalibrated


@dataclass(frozen=True)
class HeadConfig:
    base_model: str = GEMMA3_270M
    allow_hub: bool = False
    layers: tuple[int, ...] = (3, 6, 9, 12)  # Gemma layers tried (the state after this many blocks)
    # True: the fewest blocks whose CV AUC is within one standard error of the best. Off:
    # a tie on the training rows is no evidence for the cheaper block, and on questions
    # the router never saw the deeper one won (docs/results.md: "Choosing the recipe").
    cheapest_layer: bool = False
    pooling: Pooling = "mean"
    # The Gemma head's classifier. Shrinkage LDA ranks better than logistic regression on
    # Gemma's states on the development file (docs/results.md: "Choosing the recipe").
    gemma_classifier: Literal["lda", "logistic"] = "lda"
    # LDA's covariance shrinkage tried, the most regularised first (as c_values): it wins ties,
    # and it is the one used when there are too few rows to cross-validate.
    shrinkages: tuple[float, ...] = (0.95, 0.85, 0.7, 0.5, 0.3)
    # Logistic inverse regularisation strengths tried. Strong regularisation wins on the
    # development file for both encoders, hence the small values.
    c_values: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    knn_k: tuple[int, ...] = (5, 15, 45)
    folds: int = 5
    seed: int = 0
    batch_size: int = 16
    heads: tuple[str, ...] = HEADS  # any of HEADS


@dataclass
class HeadResult:
    name: str
    path: Path
    params: dict
    cv_auc: float
    grid: list[dict] = field(default_factory=list)
    encode_s: float = 0.0
    fit_s: float = 0.0


HYPER = ("c", "shrinkage", "k")  # fit_head's hyper-parameters
MINILM_HEADS = {"minilm_lda": "lda", "logistic": "logistic", "knn": "knn"}  # head name -> classifier on MiniLM


def grid(classifier: str, config: HeadConfig) -> list[dict]:
    """The hyper-parameters cross-validation tries for ``classifier``."""
    return {"logistic": [{"c": c} for c in config.c_values],
            "lda": [{"shrinkage": s} for s in config.shrinkages],
            "knn": [{"k": k} for k in config.knn_k]}[classifier]


def inner_folds(policies: list[str], folds: int, seed: int) -> np.ndarray:
    """The cross-validation fold of every training row: stratified by policy, seeded, the
    same for every head trained on the same rows (so their out-of-fold scores pair up)."""
    from sklearn.model_selection import StratifiedKFold

    strata = np.array(policies)
    fold_of = np.zeros(len(strata), dtype=int)
    for fold, (_, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(strata, strata)):
        fold_of[held] = fold
    return fold_of


def cross_validate(x: np.ndarray, policies: list[str], classifier: str, *, folds: int, seed: int,
                   **hyper) -> tuple[float, np.ndarray, float]:
    """(out-of-fold ROC AUC of P(Complex_Query), out-of-fold P(policy), standard error of
    that AUC across the folds), on ``inner_folds``."""
    from sklearn.metrics import roc_auc_score

    strata = np.array(policies)
    complex_ = strata == COMPLEX
    oof = np.zeros((len(strata), len(POLICIES)))
    fold_of = inner_folds(policies, folds, seed)
    fold_aucs = []
    for fold in range(folds):
        train, held = fold_of != fold, fold_of == fold
        oof[held] = fit_head(classifier, x[train], list(strata[train]), seed=seed, **hyper).proba(x[held])
        fold_aucs.append(roc_auc_score(complex_[held], p_complex(oof[held])))
    finite = np.array(fold_aucs)[np.isfinite(fold_aucs)]  # a fold of one class has no AUC
    se = float(np.std(finite, ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else math.nan
    return float(roc_auc_score(complex_, p_complex(oof))), oof, se


def _cv_possible(policies: list[str], folds: int) -> bool:
    counts = pd.Series(policies).value_counts()
    return len(policies) >= MIN_ROWS_FOR_CV and len(counts) >= 2 and counts.get(COMPLEX, 0) >= folds \
        and counts.min() >= folds


def chosen_index(scored: list[dict], cost: str | None = None) -> int:
    """The params fit_selected chooses among cross-validated ``scored`` ones (each with
    cv_auc and cv_se): the best CV AUC, or with ``cost`` the one-standard-error rule."""
    best = max(range(len(scored)), key=lambda i: (scored[i]["cv_auc"], -i))
    if cost is not None and math.isfinite(scored[best]["cv_auc"] - scored[best]["cv_se"]):
        floor = scored[best]["cv_auc"] - scored[best]["cv_se"]
        cheapest = min(s[cost] for s in scored if s["cv_auc"] >= floor)
        best = max((i for i, s in enumerate(scored) if s[cost] == cheapest), key=lambda i: (scored[i]["cv_auc"], -i))
    return best


def chosen_params(scored: list[dict], i: int) -> dict:
    return {k: v for k, v in scored[i].items() if k not in ("cv_auc", "cv_se")}


@dataclass
class Fitted:
    """A head chosen by cross-validation and fitted on every row, with the calibrated
    out-of-fold P(policy) of its chosen params on those rows and their ``inner_folds``
    (None without cross-validation): the evidence the release weighs."""

    head: Head
    params: dict
    grid: list[dict]
    cv_auc: float
    oof: np.ndarray | None = None
    folds: np.ndarray | None = None
    fit_s: float = 0.0


def fit_selected(x_for, policies: list[str], classifier: str, grid: list[dict], *, cv: bool, folds: int,
                 seed: int, cost: str | None = None) -> Fitted:
    """Cross-validate every params of ``grid`` (``x_for(params)`` gives the features),
    fit the chosen one on every row and calibrate it on its out-of-fold predictions.

    The chosen params have the best CV AUC; with ``cost`` (a key of the params whose
    smaller values are cheaper to serve, e.g. the Gemma block), the cheapest value whose
    best AUC is within one standard error of the best overall, then its best params (the
    one-standard-error rule, kept as an ablation: on questions the router never saw it
    lost to the best CV AUC). Ties go to the earlier params. Without enough rows for
    cross-validation: the first params, uncalibrated."""
    t0 = time.perf_counter()
    scored, oofs = [], []
    for params in grid:
        fit_params = {k: v for k, v in params.items() if k in HYPER}
        auc, oof, se = (cross_validate(x_for(params), policies, classifier, folds=folds, seed=seed, **fit_params)
                        if cv else (math.nan, None, math.nan))
        scored.append({**params, "cv_auc": auc, "cv_se": se})
        oofs.append(oof)
    best = chosen_index(scored, cost) if cv else 0
    params = chosen_params(scored, best)
    head = fit_head(classifier, x_for(params), policies, seed=seed, **{k: v for k, v in params.items() if k in HYPER})
    oof = oofs[best]
    if oof is not None:
        fit_calibration(head, oof, policies)
        oof = head.calibrated(oof)
    return Fitted(head, params, scored, scored[best]["cv_auc"], oof,
                  inner_folds(policies, folds, seed) if oof is not None else None, time.perf_counter() - t0)


def encode(queries: list[str], config: HeadConfig, *, progress: bool = False) -> tuple[dict, dict[str, float]]:
    """The features the configured heads read, ``{"gemma": {layer: states}, "minilm":
    embeddings}``, and the seconds each encoder took."""
    feats, seconds = {}, {}
    if "gemma" in config.heads:
        t0 = time.perf_counter()
        spec = GemmaSpec(config.base_model, max(config.layers), config.pooling, config.allow_hub)
        feats["gemma"] = GemmaStates(spec).encode_layers(queries, list(config.layers), batch_size=config.batch_size,
                                                         progress=progress)
        seconds["gemma"] = time.perf_counter() - t0
    if set(config.heads) & set(MINILM_HEADS):
        t0 = time.perf_counter()
        feats["minilm"] = MiniLM().encode(queries, progress=progress)
        seconds["minilm"] = time.perf_counter() - t0
    return feats, seconds


def encode_cached(queries: list[str], config: HeadConfig, folder: Path) -> tuple[dict, dict[str, float]]:
    """``encode``'s features for ``queries``, kept in ``folder`` and reused when the queries
    and the encoder settings are the same (benchmarks encode the same file many times)."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps([queries, config.base_model, list(config.layers), config.pooling]).encode())
    path = Path(folder) / f"features-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {"gemma": {layer: z[f"gemma_{layer}"] for layer in config.layers}, "minilm": z["minilm"]}, \
                {"cached": 0.0}
    feats, seconds = encode(queries, config, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no cache folder yet
    np.savez(path, minilm=feats["minilm"], **{f"gemma_{layer}": x for layer, x in feats["gemma"].items()})
    return feats, seconds


def fit_heads(feats: dict, policies: list[str], config: HeadConfig, *, cv: bool) -> dict[str, Fitted]:
    """Choose (by cross-validation) and fit every configured head on the rows of ``feats``."""
    fitted = {}
    for name in config.heads:
        if name == "gemma":
            by_layer = feats["gemma"]
            tried = [{"layer": layer, **hyper}
                     for layer, hyper in itertools.product(config.layers, grid(config.gemma_classifier, config))]
            fitted[name] = fit_selected(lambda p: by_layer[p["layer"]], policies, config.gemma_classifier, tried,
                                        cv=cv, folds=config.folds, seed=config.seed,
                                        cost="layer" if config.cheapest_layer else None)
        else:
            classifier = MINILM_HEADS[name]
            fitted[name] = fit_selected(lambda p: feats["minilm"], policies, classifier, grid(classifier, config),
                                        cv=cv, folds=config.folds, seed=config.seed)
    return fitted


def train_head_routers(examples: pd.DataFrame, config: HeadConfig, dest: dict[str, Path], *,
                       progress: bool = False, log=print) -> list[HeadResult]:
    """Fit every configured head on ``examples`` (qid, query, policy: the training rows,
    validation slice excluded) and save each to ``dest[name]``, with its out-of-fold
    P(Complex_Query) on those rows (OOF_FILE) when it was cross-validated."""
    if examples.empty:
        raise ValueError("no training rows for the head routers")
    queries, policies = list(examples["query"]), list(examples["policy"])
    cv = _cv_possible(policies, config.folds)
    if not cv:
        counts = pd.Series(policies).value_counts().to_dict()
        log(f"{len(policies)} training rows {counts}: {config.folds}-fold cross-validation needs at least "
            f"{MIN_ROWS_FOR_CV} rows and {config.folds} of each policy; each head takes the first value of its "
            "grid, uncalibrated")
    feats, seconds = encode(queries, config, progress=progress)
    results = []
    for name, f in fit_heads(feats, policies, config, cv=cv).items():
        if name == "gemma":
            encoder = GemmaSpec(config.base_model, f.params["layer"], config.pooling, config.allow_hub).to_dict()
        else:
            encoder = {"encoder": "minilm"}
        path = save_head_router(dest[name], name, encoder, f.head, params=f.params, cv_auc=f.cv_auc,
                                training_rows=len(policies), grid=f.grid)
        if f.oof is not None and "qid" in examples:
            pd.DataFrame({"qid": examples["qid"].to_numpy(), "fold": f.folds, "p_complex": p_complex(f.oof)}).to_csv(
                path / OOF_FILE, index=False)
        results.append(HeadResult(name, path, f.params, f.cv_auc, f.grid,
                                  seconds["gemma" if name == "gemma" else "minilm"], f.fit_s))
        log(f"{name} head ({f.head.classifier}): {f.params} (CV AUC {f.cv_auc:.3f})")
    return results


# -- fitting one head ----------------------------------------------------------
def fit_calibration(head: Head, oof_proba: np.ndarray, policies: list[str]) -> Head:
    """Fit the calibration (``calibrated_proba``) on out-of-fold P(policy) of the training rows
    by minimum log-loss, and record the training labels' policy shares as priors. A
    policy absent from the labels keeps P = 0."""
    from scipy.optimize import minimize

    y = np.array([POLICIES.index(p) for p in policies])
    prior = np.bincount(y, minlength=len(POLICIES)) / len(y)
    present = prior > 0
    c = POLICIES.index(COMPLEX)
    others = [i for i in range(len(POLICIES)) if i != c]

    def unpack(theta):  # theta: log scale, log temperature, Complex's bias, the second other policy's bias
        bias = np.zeros(len(POLICIES))
        bias[c], bias[others[1]] = theta[2], theta[3]
        bias[~present] = -50.0
        return float(np.exp(theta[0])), float(np.exp(theta[1])), bias

    def loss(theta):
        q = calibrated_proba(oof_proba, *unpack(theta))
        return -np.mean(np.log(np.maximum(q[np.arange(len(y)), y], 1e-12)))

    scale, temperature, bias = unpack(minimize(loss, np.zeros(4), method="L-BFGS-B").x)
    head.arrays.update(complex_scale=np.array(scale), temperature=np.array(temperature), bias=bias, prior=prior)
    return head


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, mean, scale): every feature centred and scaled (a constant one keeps scale 1)."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return (x - mean) / scale, mean, scale


def fit_head(classifier: str, x: np.ndarray, policies: list[str], *, c: float = 1.0, shrinkage: float = 0.5,
             k: int = 5, seed: int = 0) -> Head:
    """Fit a head on (features, oracle policies): ``c`` is logistic's inverse
    regularisation, ``shrinkage`` LDA's (0 the sample covariance, 1 the identity)."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; expected one of {CLASSIFIERS}")
    if len(policies) == 0:
        raise ValueError("no training labels for the head")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies in the head's labels: {sorted(unknown)}")
    classes = [p for p in POLICIES if p in set(policies)]
    y = np.array([classes.index(p) for p in policies])
    x = np.asarray(x, dtype=np.float64)
    if len(classes) == 1:
        return Head(classifier, classes, {}, k)
    if classifier == "knn":
        return Head("knn", classes, {"train": x.astype(np.float32), "labels": y}, k)
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression

    z, mean, scale = standardise(x)
    if classifier == "lda":
        model = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage)
    else:
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced", random_state=seed)
    model.fit(z, y)
    return Head(classifier, classes, {"mean": mean, "scale": scale, "coef": np.atleast_2d(model.coef_),
                                      "intercept": np.atleast_1d(model.intercept_)}, k)


