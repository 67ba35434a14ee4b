"""The pool router: P(correct | query) for every model of a pool, from a frozen encoder's
features, and the decision ``argmax_m P_m - lambda * cost_m``.

One small head per model on the features the head routers use (``features.py``):
shrinkage LDA or logistic regression (a linear score per model, then a Platt map fitted
on out-of-fold scores so that P_m is a frequency and comparable across models), or
k-NN (P_m: the distance-weighted share of the nearest training queries model m got
right). ``cost_m`` is the model's mean cost per query on the training rows (USD).
An ensemble router averages its members' calibrated log-odds (``ensemble``): a Gemma
head and a MiniLM head err on different queries, and their mean ranks better than
either (benchmarks/pool_quality.py). ``lambda`` (USD^-1) is the single knob: 0 picks the model most likely to be right, a
large value the cheapest; ``knob`` sets it on validation rows from what the user asks
for (a budget per 1,000 queries, a share of the best model's accuracy, or lambda itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

POOL_HEAD_FILE = "pool_head.npz"
MEMBERS_DIR = "members"  # an ensemble's member routers, each a whole pool router folder
POOL_KIND = "pool"
KNOBS = ("budget", "quality", "lambda")


@dataclass
class PoolHead:
    """Per-model heads as arrays: ``proba`` gives P(correct) per (row, model)."""

    models: list[str]
    classifier: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    k: int = 15

    @property
    def costs(self) -> np.ndarray:
        """Each model's expected cost per query (USD), from the training rows."""
        return self.arrays["costs"]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """A log-odds score per (row, model), increasing in P(correct): linear heads' own;
        k-NN's share of right neighbours as log-odds."""
        x = np.asarray(x, dtype=np.float64)
        if self.classifier == "knn":
            share = np.clip(self._knn(x), 1e-3, 1 - 1e-3)
            return np.log(share / (1 - share))
        z = (x - self.arrays["mean"]) / self.arrays["scale"]
        return z @ self.arrays["coef"].T + self.arrays["intercept"]

    def proba(self, x: np.ndarray) -> np.ndarray:
        return self.calibrated(self.scores(x))

    def calibrated(self, scores: np.ndarray) -> np.ndarray:
        """P(correct) from ``scores``: each model's Platt map when fitted, else the sigmoid."""
        z = self.arrays["platt_a"] * scores + self.arrays["platt_b"] if "platt_a" in self.arrays else scores
        return np.exp(-np.logaddexp(0.0, -z))

    def _knn(self, x: np.ndarray) -> np.ndarray:
        train, correct = self.arrays["train"], self.arrays["correct"].astype(float)
        k = min(self.k, len(train))
        dist = 1 - _unit(x) @ _unit(train).T
        near = np.argsort(dist, axis=1, kind="stable")[:, :k]
        w = 1 / np.maximum(np.take_along_axis(dist, near, axis=1), 1e-6)
        return np.einsum("nk,nkm->nm", w, correct[near]) / w.sum(axis=1, keepdims=True)

    def save(self, path: Path) -> None:
        np.savez(path, **self.arrays)

    def check(self, width: int, where: Path) -> None:
        """ValueError naming ``where`` unless the arrays fit an encoder of ``width`` features
        and one head per model: a head of the wrong width never serves."""
        a, m = self.arrays, len(self.models)
        if self.classifier == "knn":
            ok = a["train"].ndim == 2 and a["train"].shape[1] == width and a["correct"].shape == (len(a["train"]), m)
        else:
            ok = a["coef"].shape == (m, width) and a["mean"].shape == a["scale"].shape == (width,)
        if not ok or a["costs"].shape != (m,):
            raise ValueError(f"{where}: the pool head does not fit {m} models on an encoder of {width} features; "
                             "retrain the pool router")

    @classmethod
    def load(cls, path: Path, models: list[str], classifier: str, k: int) -> "PoolHead":
        with np.load(path, allow_pickle=False) as z:
            return cls(models, classifier, {name: z[name] for name in z.files}, k)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ensemble(probs: list[np.ndarray]) -> np.ndarray:
    """P(correct) of an ensemble: the sigmoid of its members' mean log-odds."""
    if len(probs) == 1:
        return probs[0]
    logits = [np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1)) for p in probs]
    return np.exp(-np.logaddexp(0.0, -np.mean(logits, axis=0)))


def decide(p: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """The model index per row: argmax P(correct) - lam * cost (ties: the cheaper model)."""
    if math.isinf(lam):
        return np.full(len(p), int(np.argmin(costs)))
    utility = p - lam * np.asarray(costs)[None, :]
    order = np.argsort(costs, kind="stable")  # scan cheapest first so a tie goes to the cheaper model
    return order[np.argmax(utility[:, order], axis=1)]


def ranked(p: np.ndarray, costs: np.ndarray, lam: float) -> list[int]:
    """One row's model indices best first by P(correct) - lam * cost, ties to the cheaper
    model (its first is ``decide``'s choice): where to go when the choice cannot serve."""
    cost_rank = np.argsort(np.argsort(costs, kind="stable"), kind="stable")
    if math.isinf(lam):
        return [int(i) for i in np.argsort(costs, kind="stable")]
    return [int(i) for i in np.lexsort((cost_rank, -(np.asarray(p, float) - lam * np.asarray(costs))))]


def lambdas(costs: np.ndarray, points: int = 200) -> np.ndarray:
    """The knob's sweep: 0, a log grid wide enough that its ends pick the most likely and
    the cheapest model for every row (P differences in [1e-4, 1] against the costs'
    differences), and infinity."""
    spread = np.diff(np.sort(np.asarray(costs, float)))
    spread = spread[spread > 0]
    if not len(spread):
        return np.array([0.0, math.inf])
    lo, hi = 1e-4 / spread.max(), 1.0 / spread.min()
    return np.concatenate([[0.0], np.geomspace(lo, hi * 10, points), [math.inf]])


@dataclass(frozen=True)
class Knob:
    """What the user asks the router for; ``knob`` turns it into lambda on validation rows."""

    kind: str = "quality"  # budget | quality | lambda
    value: float = 0.95  # USD per 1,000 queries | share of the best model's accuracy | lambda

    def __post_init__(self):
        if self.kind not in KNOBS:
            raise ValueError(f"unknown knob {self.kind!r}; expected one of {KNOBS}")
        if not math.isfinite(self.value) or self.value < 0 or (self.kind == "quality" and self.value > 1):
            raise ValueError(f"knob {self.kind} needs a finite value >= 0 (a share <= 1 for quality), got {self.value!r}")


def sweep(p: np.ndarray, correct: np.ndarray, cost: np.ndarray, costs: np.ndarray,
          values: np.ndarray | None = None) -> list[dict]:
    """What the router does on some rows at each lambda of ``values`` (default: ``lambdas``):
    accuracy and USD per 1,000 queries. ``p``: its P(correct); ``correct``, ``cost``: what
    each model did and cost on those rows."""
    rows = np.arange(len(p))
    out = []
    for lam in (lambdas(costs) if values is None else values):
        pick_ = decide(p, costs, lam)
        out.append({"lambda": float(lam), "accuracy": float(correct[rows, pick_].mean()),
                    "usd_per_1000": float(cost[rows, pick_].mean() * 1000)})
    return out


def pick(figures: list[dict], best_accuracy: float, want: Knob) -> dict:
    """The point of a sweep (``sweep`` on validation rows) that ``want`` asks for. budget:
    the best accuracy whose spend per 1,000 queries stays within the budget (the cheapest
    point when none does); quality: the cheapest point reaching that share of
    ``best_accuracy`` (the best single model's; the most accurate point when none does);
    lambda: as given (the figures of the nearest swept lambda)."""
    if want.kind == "budget":
        within = [f for f in figures if f["usd_per_1000"] <= want.value + 1e-12]
        chosen = max(within, key=lambda f: (f["accuracy"], -f["usd_per_1000"])) if within else \
            min(figures, key=lambda f: f["usd_per_1000"])
    elif want.kind == "quality":
        reaching = [f for f in figures if f["accuracy"] >= want.value * best_accuracy - 1e-12]
        chosen = min(reaching, key=lambda f: f["usd_per_1000"]) if reaching else \
            max(figures, key=lambda f: f["accuracy"])
    else:
        chosen = {**min(figures, key=lambda f: abs(math.log1p(f["lambda"]) - math.log1p(want.value))
                        if math.isfinite(f["lambda"]) else math.inf), "lambda": want.value}
    return {**chosen, "knob": want.kind, "value": want.value}


def knob(p: np.ndarray, correct: np.ndarray, cost: np.ndarray, costs: np.ndarray, want: Knob) -> dict:
    """lambda from validation rows only, with the validation figures at that lambda (``pick``
    over ``sweep``; a lambda knob is scored at itself)."""
    values = np.array([want.value]) if want.kind == "lambda" else None
    chosen = pick(sweep(p, correct, cost, costs, values), float(correct.mean(axis=0).max()), want)
    return {**chosen, "validation_rows": len(p)}


class PoolRouter:
    """A saved pool router, loaded once. ``route``/``route_batch`` give each query's
    P(correct) per model and the model chosen at the release's lambda (a ``Router``, so
    the evaluation, the CLI and the server drive it as any kind); ``at`` chooses again at
    another lambda, ``lambda_for`` turns a knob into one from the validation sweep the
    release recorded."""

    mode = POOL_KIND

    def __init__(self, path: str | Path, encoder=None, precision: str = "fast"):
        from router_pipeline.artifacts import ROUTER_FILE
        from router_pipeline.routers.contract import read_calibration, read_json_object

        self.path = Path(path)
        self.meta = read_json_object(self.path / ROUTER_FILE, "the router's 'kind'", "retrain the router")
        if "members" in self.meta:  # an ensemble: every member a whole router, one knob over their mean
            if self.meta.get("kind") != POOL_KIND or not self.meta["members"]:
                raise ValueError(f"{self.path / ROUTER_FILE}: an ensemble needs kind {POOL_KIND!r} and members")
            self.parts = [_load_part(self.path / MEMBERS_DIR / name, None, precision) for name in self.meta["members"]]
            if any(head.models != self.meta["models"] for _, head in self.parts):
                raise ValueError(f"{self.path}: a member routes among other models than {self.meta['models']}; "
                                 "retrain the pool router")
        else:
            self.parts = [_load_part(self.path, encoder, precision)]
        self.encoder = self.parts[0][0]
        self.device = getattr(self.encoder, "device", "cpu")
        self.precision = getattr(self.encoder, "precision", "fp32")
        self.calibration = read_calibration(self.path)
        lam = self.calibration.get("lambda", 0.0)
        self.lam = math.inf if lam is None else float(lam)

    @property
    def costs(self) -> np.ndarray:
        """Each model's mean cost per query (USD) on the training rows."""
        return self.parts[0][1].costs

    def proba(self, queries: list[str]) -> np.ndarray:
        """P(correct) per (query, model)."""
        return ensemble([head.proba(encoder.encode(list(queries))) for encoder, head in self.parts])

    @property
    def models(self) -> list[str]:
        return list(self.meta["models"])

    def pool(self):
        """The pool the router was trained for (names, backends, prices: llm.pool.Pool)."""
        from router_pipeline.llm.pool import pool_from_dict

        if "pool" not in self.meta:
            raise ValueError(f"{self.path}: router.json records no 'pool': retrain the pool router")
        return pool_from_dict(self.meta["pool"])

    def choose(self, queries: list[str], lam: float | None = None) -> tuple[np.ndarray, list[str]]:
        p = self.proba(queries)
        pick_ = decide(p, self.costs, self.lam if lam is None else lam)
        return p, [self.models[i] for i in pick_]

    def route(self, query: str, *, with_reasoning: bool = False):
        return self.route_batch([query])[0]

    def route_batch(self, queries: list[str], *, with_reasoning: bool = False, progress: bool = False) -> list:
        import time

        t0 = time.perf_counter()
        p, chosen = self.choose(list(queries))
        ms = (time.perf_counter() - t0) * 1000 / max(len(queries), 1)
        return [self._decision(q, row, model, ms) for q, row, model in zip(queries, p, chosen)]

    def at(self, decision, lam: float):
        """``decision`` with the model chosen again at ``lam``."""
        from dataclasses import replace

        p = np.array([decision.p_correct[m] for m in self.models])
        order = [self.models[i] for i in ranked(p, self.costs, lam)]
        return replace(decision, model=order[0], policy=self._policy(order[0]), ranked=tuple(order))

    def lambda_for(self, want: Knob) -> float:
        """The lambda of ``want`` on the validation rows of the release (its recorded sweep)."""
        if want.kind == "lambda":
            return want.value
        figures = self.calibration.get("validation_sweep")
        if not figures:
            raise ValueError(f"{self.path}: the calibration records no validation sweep: only 'router' and "
                             "'router-lambda-<value>' can be served; re-run pool_evaluation")
        figures = [{**f, "lambda": math.inf if f["lambda"] is None else f["lambda"]} for f in figures]
        return pick(figures, float(self.calibration["best_single_accuracy"]), want)["lambda"]

    def _policy(self, model: str) -> str:
        from router_pipeline.policies import COMPLEX, STANDARD

        return STANDARD if model == self.models[int(np.argmin(self.costs))] else COMPLEX

    def _decision(self, query: str, p: np.ndarray, model: str, ms: float):
        from router_pipeline.routers.contract import RouteDecision

        order = tuple(self.models[i] for i in ranked(p, self.costs, self.lam))
        return RouteDecision(query, self._policy(model), {}, True, POOL_KIND, latency_ms=ms,
                             p_correct={m: round(float(v), 6) for m, v in zip(self.models, p)}, model=model,
                             ranked=order)


def _load_part(path: Path, encoder, precision: str) -> tuple:
    """(encoder, head) of the single pool router folder at ``path``, the head checked
    against the encoder's width."""
    from router_pipeline.routers.contract import PROBE_QUERY, read_router_folder
    from router_pipeline.routers.features import folder_encoder

    meta, head_file = read_router_folder(path, POOL_KIND, POOL_HEAD_FILE)
    head = PoolHead.load(head_file, meta["models"], meta["classifier"], meta.get("k", 15))
    encoder = encoder or folder_encoder(meta, path, precision)
    head.check(encoder.encode([PROBE_QUERY]).shape[1], head_file)  # the encoder's width
    return encoder, head


def save_pool_router(path: Path, encoder: dict, head: PoolHead, **about) -> Path:
    """Write a pool router folder (replacing an older one at ``path``)."""
    from router_pipeline.routers.contract import write_router_folder

    return write_router_folder(path, POOL_KIND, POOL_HEAD_FILE, head.save,
                               {"models": head.models, "encoder": encoder, "classifier": head.classifier,
                                "k": head.k, **about})


def save_pool_ensemble(path: Path, members: dict, **about) -> Path:
    """Write an ensemble's folder: ``members`` (name -> a function writing that member's
    pool router folder at the path it is given) under ``members/``, router.json naming them."""
    from router_pipeline.routers.contract import write_router_folder

    def save(folder: Path) -> None:
        for name, write in members.items():
            write(folder / name)

    return write_router_folder(path, POOL_KIND, MEMBERS_DIR, save, {"members": list(members), **about})
