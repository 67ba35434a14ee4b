"""Training the pool router: a head per model of the pool on frozen features, its
hyper-parameters by cross-validation on the training rows (the mean over models of the
out-of-fold ROC AUC of P(correct)), Platt-calibrated on out-of-fold scores.

LDA here is fitted in closed form for every model at once: the features standardised,
the within-class covariance of model m's labels is the total covariance minus its
between-class term, shrunk towards a scaled identity, and solved against the
difference of the two class means; one covariance per fold serves every model (what
makes a grid of blocks x shrinkages x models cheap on a CPU).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from router_pipeline.routers.head import CLASSIFIERS
from router_pipeline.training.heads import standardise
from router_pipeline.routers.pool import PoolHead


def _constant(y: np.ndarray) -> float:
    """The log-odds of a label that never varies on these rows: a constant P, no direction."""
    p = float(np.mean(y))
    return float(np.log(max(p, 1e-6) / max(1 - p, 1e-6)))


def _lda(z: np.ndarray, correct: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """(coef (models, d), intercept (models,)) of binary shrinkage LDA per model."""
    n, d = z.shape
    total = np.cov(z, rowvar=False, bias=True)
    coefs, intercepts = [], []
    for y in correct.T:
        p1 = float(y.mean())
        if p1 in (0.0, 1.0):
            coefs.append(np.zeros(d))
            intercepts.append(_constant(y))
            continue
        mu1, mu0 = z[y].mean(axis=0), z[~y].mean(axis=0)
        delta = mu1 - mu0
        within = total - p1 * (1 - p1) * np.outer(delta, delta)
        shrunk = (1 - shrinkage) * within + shrinkage * (np.trace(within) / d) * np.eye(d)
        w = np.linalg.solve(shrunk, delta)
        coefs.append(w)
        intercepts.append(-0.5 * w @ (mu1 + mu0) + np.log(p1 / (1 - p1)))
    return np.array(coefs), np.array(intercepts)


def _logistic(z: np.ndarray, correct: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    coefs, intercepts = [], []
    for y in correct.T:
        if y.all() or not y.any():
            coefs.append(np.zeros(z.shape[1]))
            intercepts.append(_constant(y))
            continue
        model = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(z, y)
        coefs.append(model.coef_[0])
        intercepts.append(float(model.intercept_[0]))
    return np.array(coefs), np.array(intercepts)


def fit_pool_head(classifier: str, x: np.ndarray, correct: np.ndarray, costs: np.ndarray, models: list[str], *,
                  shrinkage: float = 0.5, c: float = 1e-3, k: int = 15, seed: int = 0) -> PoolHead:
    """A head per model on (features, which models were right), uncalibrated. ``costs``:
    each model's mean cost per query on these rows."""
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; expected one of {CLASSIFIERS}")
    correct = np.asarray(correct, bool)
    if correct.shape != (len(x), len(models)):
        raise ValueError(f"correct must be (rows, models) = {(len(x), len(models))}, got {correct.shape}")
    arrays = {"costs": np.asarray(costs, float)}
    if classifier == "knn":
        arrays.update(train=np.asarray(x, np.float32), correct=correct)
        return PoolHead(list(models), "knn", arrays, k)
    z, mean, scale = standardise(np.asarray(x, np.float64))
    coef, intercept = _lda(z, correct, shrinkage) if classifier == "lda" else _logistic(z, correct, c, seed)
    arrays.update(mean=mean, scale=scale, coef=coef, intercept=intercept)
    return PoolHead(list(models), classifier, arrays, k)


def fit_platt(head: PoolHead, oof_scores: np.ndarray, correct: np.ndarray) -> PoolHead:
    """Each model's P(correct) = sigmoid(a * score + b), fitted on out-of-fold scores."""
    from sklearn.linear_model import LogisticRegression

    a, b = np.ones(len(head.models)), np.zeros(len(head.models))
    for m, y in enumerate(np.asarray(correct, bool).T):
        if y.all() or not y.any():
            a[m], b[m] = 0.0, _constant(y)
            continue
        fit = LogisticRegression(C=1e4, max_iter=1000).fit(oof_scores[:, [m]], y)
        a[m], b[m] = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    head.arrays.update(platt_a=a, platt_b=b)
    return head


def inner_folds(n: int, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n) % folds)


def _mean_auc(scores: np.ndarray, correct: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y, s) for s, y in zip(scores.T, correct.T) if 0 < y.mean() < 1]
    return float(np.mean(aucs)) if aucs else float("nan")


@dataclass
class FittedPool:
    head: PoolHead
    params: dict
    cv_auc: float
    grid: list[dict]
    oof: np.ndarray  # calibrated out-of-fold P(correct) of the training rows


def fit_pool(x_for, correct: np.ndarray, cost: np.ndarray, models: list[str], classifier: str, grid: list[dict], *,
             folds: int = 5, seed: int = 0) -> FittedPool:
    """Cross-validate ``grid`` (dicts of layer / shrinkage / c / k; ``x_for(params)`` the
    features they read), fit the best on every row, Platt-calibrate it on its out-of-fold
    scores. ``cost``: (rows, models) USD per call on these rows."""
    correct = np.asarray(correct, bool)
    costs = np.asarray(cost, float).mean(axis=0)
    fold_of = inner_folds(len(correct), folds, seed)
    scored, oofs = [], []
    for params in grid:
        hyper = {k: v for k, v in params.items() if k != "layer"}
        x = x_for(params)
        oof = np.zeros(correct.shape)
        for f in range(folds):
            held = fold_of == f
            head = fit_pool_head(classifier, x[~held], correct[~held], costs, models, seed=seed, **hyper)
            oof[held] = head.scores(x[held])
        scored.append({**params, "cv_auc": _mean_auc(oof, correct)})
        oofs.append(oof)
    best = max(range(len(grid)), key=lambda i: (scored[i]["cv_auc"], -i))  # ties: the earlier (more regularised)
    params = grid[best]
    hyper = {k: v for k, v in params.items() if k != "layer"}
    head = fit_platt(fit_pool_head(classifier, x_for(params), correct, costs, models, seed=seed, **hyper),
                     oofs[best], correct)
    return FittedPool(head, params, scored[best]["cv_auc"], scored, head.calibrated(oofs[best]))


def oof_on(fitted: FittedPool, x: np.ndarray, correct: np.ndarray, cost: np.ndarray, models: list[str],
           classifier: str, fold_of: np.ndarray, seed: int = 0) -> np.ndarray:
    """``fitted``'s recipe cross-fitted again on other folds (whole domains, say) and read
    through its own Platt map: what it would say of rows like those it never saw."""
    correct, costs = np.asarray(correct, bool), np.asarray(cost, float).mean(axis=0)
    hyper = {k: v for k, v in fitted.params.items() if k != "layer"}
    scores = np.zeros(correct.shape)
    for f in np.unique(fold_of):
        held = fold_of == f
        scores[held] = fit_pool_head(classifier, x[~held], correct[~held], costs, models, seed=seed,
                                     **hyper).scores(x[held])
    return fitted.head.calibrated(scores)


def pool_grid(classifier: str, *, layers=None, shrinkages=(0.95, 0.85, 0.7, 0.5, 0.3),
              c_values=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3), knn_k=(5, 15, 45)) -> list[dict]:
    hyper = {"lda": [{"shrinkage": s} for s in shrinkages], "logistic": [{"c": c} for c in c_values],
             "knn": [{"k": k} for k in knn_k]}[classifier]
    if layers is None:
        return hyper
    return [{"layer": layer, **h} for layer, h in itertools.product(layers, hyper)]


# -- the pipeline's pool routers ------------------------------------------------
# Candidate -> (encoder, classifier), or an ensemble -> its members (each a candidate).
# gemma_minilm_lda is the recipe pool_quality.py measures as "router"; its members and
# the MiniLM heads are candidates too: the choice is evidence's.
POOL_CANDIDATES = {"gemma_lda": ("gemma", "lda"), "minilm_lda": ("minilm", "lda"),
                   "minilm_logistic": ("minilm", "logistic"), "minilm_knn": ("minilm", "knn")}
POOL_ENSEMBLES = {"gemma_minilm_lda": ("gemma_lda", "minilm_lda")}


@dataclass(frozen=True)
class PoolSpec:
    """How the pool routers are trained and how their knob is set (on validation rows)."""

    candidates: tuple[str, ...] = ("gemma_minilm_lda", "gemma_lda", "minilm_lda", "minilm_knn")  # POOL_CANDIDATES, POOL_ENSEMBLES
    knob: str = "quality"  # budget (USD per 1,000 queries) | quality (share of the best model's accuracy) | lambda
    knob_value: float = 0.95


@dataclass
class PoolResult:
    name: str
    path: object
    params: dict
    cv_auc: float
    calibration: dict  # lambda, the knob, the validation sweep it was read from
    training_p: np.ndarray | None = None  # P(correct) of the training rows, out-of-fold (in-sample without CV)


def _json_sweep(figures: list[dict]) -> list[dict]:
    """A sweep as JSON can hold it: lambda infinity (the cheapest model) written as null."""
    return [{**f, "lambda": None if np.isinf(f["lambda"]) else f["lambda"]} for f in figures]


def train_pool_routers(train, validation, spec: PoolSpec, heads, pool: dict, dest: dict, *,
                       progress: bool = False, log=print) -> list[PoolResult]:
    """Fit each candidate of ``spec`` on ``train`` (an ``Outcomes`` of the training rows),
    set its knob on ``validation`` (the held-out slice: an ``Outcomes`` of the same
    models) and save it to ``dest[name]`` with the pool it routes among (``pool``, a
    ``Pool.to_dict()``) and its calibration: lambda, the knob and the validation sweep
    that later knobs (a serving model name) are read from."""
    import json

    from router_pipeline.artifacts import CALIBRATION_FILE
    from router_pipeline.routers.features import GemmaSpec
    from router_pipeline.routers.pool import Knob, ensemble, knob, save_pool_ensemble, save_pool_router, sweep
    from router_pipeline.training.heads import MIN_ROWS_FOR_CV, encode

    want = Knob(spec.knob, spec.knob_value)
    unknown = [c for c in spec.candidates if c not in POOL_CANDIDATES and c not in POOL_ENSEMBLES]
    if unknown or not spec.candidates:
        raise ValueError(f"unknown pool candidates {unknown}; expected some of "
                         f"{sorted(POOL_CANDIDATES) + sorted(POOL_ENSEMBLES)}")
    if validation.frame.empty:
        raise ValueError("no validation rows: the knob is set on them (materialise more questions)")
    models, n = train.models, len(train.frame)
    singles = sorted({m for c in spec.candidates for m in POOL_ENSEMBLES.get(c, (c,))})
    encoders = {POOL_CANDIDATES[c][0] for c in singles}
    config = replace(heads, heads=tuple(sorted({"gemma" if e == "gemma" else "minilm_lda" for e in encoders})))
    feats, _ = encode(list(train.frame["query"]) + list(validation.frame["query"]), config, progress=progress)
    cv = n >= MIN_ROWS_FOR_CV
    if not cv:
        log(f"{n} training rows: fewer than {MIN_ROWS_FOR_CV}, so each pool router takes the first value of its "
            "grid, uncalibrated")

    def fit(name: str) -> dict:
        encoder, classifier = POOL_CANDIDATES[name]
        if encoder == "gemma":
            grid = pool_grid(classifier, layers=config.layers, shrinkages=config.shrinkages, c_values=config.c_values)
            x_of = lambda p: feats["gemma"][p["layer"]]  # noqa: E731
        else:
            grid = pool_grid(classifier, shrinkages=config.shrinkages, c_values=config.c_values, knn_k=config.knn_k)
            x_of = lambda p: feats["minilm"]  # noqa: E731
        if cv:
            fitted = fit_pool(lambda p: x_of(p)[:n], train.correct, train.cost, models, classifier, grid,
                              folds=config.folds, seed=config.seed)
            head, params, cv_auc, training_p = fitted.head, fitted.params, fitted.cv_auc, fitted.oof
        else:
            params, cv_auc = grid[0], float("nan")
            hyper = {k: v for k, v in params.items() if k != "layer"}
            head = fit_pool_head(classifier, x_of(params)[:n], train.correct, train.cost.mean(axis=0), models,
                                 seed=config.seed, **hyper)
            training_p = head.proba(x_of(params)[:n])
        enc = GemmaSpec(config.base_model, params["layer"], config.pooling, config.allow_hub).to_dict() \
            if encoder == "gemma" else {"encoder": "minilm"}
        about = {"pool": pool, "params": params, "cv_auc": cv_auc, "training_rows": n, "candidate": name}
        return {"head": head, "params": params, "cv_auc": cv_auc, "p_val": head.proba(x_of(params)[n:]),
                "training_p": training_p,
                "write": lambda path: save_pool_router(path, enc, head, **about)}

    fitted = {name: fit(name) for name in singles}
    results = []
    for name in spec.candidates:
        members = POOL_ENSEMBLES.get(name)
        if members is None:
            f = fitted[name]
            params, cv_auc, p_val, training_p = f["params"], f["cv_auc"], f["p_val"], f["training_p"]
            path = f["write"](dest[name])
        else:
            params = {m: fitted[m]["params"] for m in members}
            cv_auc = float(np.mean([fitted[m]["cv_auc"] for m in members]))
            p_val = ensemble([fitted[m]["p_val"] for m in members])
            training_p = ensemble([fitted[m]["training_p"] for m in members])
            path = save_pool_ensemble(dest[name], {m: fitted[m]["write"] for m in members}, models=models, pool=pool,
                                      params=params, cv_auc=cv_auc, training_rows=n, candidate=name)
        costs = fitted[POOL_ENSEMBLES.get(name, (name,))[0]]["head"].costs
        figures = sweep(p_val, validation.correct, validation.cost, costs)
        chosen = knob(p_val, validation.correct, validation.cost, costs, want)
        calibration = {"lambda": None if np.isinf(chosen["lambda"]) else chosen["lambda"], "knob": want.kind,
                       "knob_value": want.value, "validation_accuracy": chosen["accuracy"],
                       "validation_usd_per_1000": chosen["usd_per_1000"], "validation_rows": len(p_val),
                       "best_single_accuracy": float(validation.correct.mean(axis=0).max()),
                       "validation_sweep": _json_sweep(figures)}
        (path / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=1))
        log(f"{name}: {params} (CV AUC {cv_auc:.3f}); {want.kind} {want.value} -> lambda {chosen['lambda']:.4g}, "
            f"validation accuracy {chosen['accuracy']:.3f} at ${chosen['usd_per_1000']:.3f}/1000")
        results.append(PoolResult(name, path, params, cv_auc, calibration, training_p))
    return results
