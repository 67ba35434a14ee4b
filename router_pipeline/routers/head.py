"""Head routers: a frozen encoder (features.py) and a small classifier over the three
policies. They are trained in seconds to minutes on a CPU and decide in milliseconds.

The classifiers are fitted with scikit-learn and stored as plain arrays (``head.npz``,
no pickle: loading a router never runs code from a file); prediction is numpy, checked
against scikit-learn's own in the tests.

- ``logistic``: standardised features, multinomial logistic regression with balanced
  class weights (each policy counts as much as the others, whatever its share).
- ``lda``: standardised features, linear discriminant analysis with a shrunk shared
  covariance (the policies' means, decorrelated by a covariance pulled towards the
  identity). Stored and served exactly like ``logistic``: it is the same softmax over
  linear scores, only fitted differently.
- ``knn``: cosine k-nearest neighbours, votes weighted by 1 / distance.

Probabilities are calibrated (``training.heads.fit_calibration``) on out-of-fold predictions of the training
rows, so that P(Complex_Query) matches how often such queries need the strong model,
without reordering the queries: P(Complex_Query) is a monotone (Platt) map of the raw
one, and the rest is shared between the other two policies by a temperature and a bias
on their log-probabilities. (A temperature over all three policies, the earlier form,
ranks queries by P(Complex_Query) against the others' mix: cross-fitted on the
development file that cost about 0.016 APGR, intervals clear of 0.) The decided
policy is the one most over-represented against its share of the training labels
(argmax P(policy) / prior(policy)): a calibrated router that is unsure still tells the
three policies apart instead of always naming the most common one.

A saved head router is a folder: ``router.json`` (kind, encoder, classifier,
classes, how it was chosen) + ``head.npz``, + the calibration and figures the
evaluation adds.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from router_pipeline.artifacts import ROUTER_FILE
from router_pipeline.policies import COMPLEX, POLICIES
from router_pipeline.routers.contract import PROBE_QUERY, RouteDecision, read_calibration, read_router_folder, \
    write_router_folder

HEAD_FILE = "head.npz"
CLASSIFIERS = ("logistic", "lda", "knn")
LINEAR = ("logistic", "lda")  # a softmax over linear scores of the standardised features
LINEAR_ARRAYS = ("mean", "scale", "coef", "intercept")
HEAD_KIND = "head"
REFIT = "re-run head_routers and released_router"


@dataclass
class Head:
    """A fitted classifier as arrays; ``proba`` gives P(policy) in POLICIES order."""

    classifier: str
    classes: list[str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    k: int = 5

    def proba(self, x: np.ndarray) -> np.ndarray:
        """P(policy) for each row (columns in POLICIES order), calibrated when fitted so."""
        return self.calibrated(self.raw_proba(x))

    def calibrated(self, p: np.ndarray) -> np.ndarray:
        """``raw_proba``'s P(policy) under this head's calibration (unchanged if it has none)."""
        if "temperature" not in self.arrays:
            return p
        if "complex_scale" not in self.arrays:  # calibrated by an earlier release: read as it was fitted
            return _scaled(p, float(self.arrays["temperature"]), self.arrays["bias"])
        return calibrated_proba(p, float(self.arrays["complex_scale"]), float(self.arrays["temperature"]),
                           self.arrays["bias"])

    def decide(self, proba: np.ndarray) -> list[str]:
        """The policy per row: argmax of P(policy) / prior(policy) when the priors are
        known, else argmax P(policy)."""
        prior = self.arrays.get("prior")
        score = proba / np.maximum(prior, 1e-12) if prior is not None else proba
        return [POLICIES[i] for i in np.argmax(score, axis=1)]

    def raw_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if len(self.classes) == 1:
            p = np.ones((len(x), 1))
        elif self.classifier in LINEAR:
            z = (x - self.arrays["mean"]) / self.arrays["scale"]
            logits = z @ self.arrays["coef"].T + self.arrays["intercept"]
            if logits.shape[1] == 1:  # scikit-learn's binary form: one column for classes[1]
                logits = np.hstack([np.zeros_like(logits), logits])
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
        else:
            p = self._knn(x)
        out = np.zeros((len(x), len(POLICIES)))
        for j, c in enumerate(self.classes):
            out[:, POLICIES.index(c)] = p[:, j]
        return out

    def _knn(self, x: np.ndarray) -> np.ndarray:
        train, labels = self.arrays["train"], self.arrays["labels"].astype(int)
        k = min(self.k, len(train))
        dist = 1 - _unit(x) @ _unit(train).T  # cosine distance
        near = np.argsort(dist, axis=1, kind="stable")[:, :k]
        d = np.take_along_axis(dist, near, axis=1)
        exact = d <= 1e-12
        # As scikit-learn: an exact match takes the whole vote; otherwise 1 / distance.
        w = np.where(exact.any(axis=1, keepdims=True), exact.astype(float), 1 / np.maximum(d, 1e-12))
        p = np.zeros((len(x), len(self.classes)))
        for j in range(len(self.classes)):
            p[:, j] = (w * (labels[near] == j)).sum(axis=1)
        return p / p.sum(axis=1, keepdims=True)

    def save(self, path: Path) -> None:
        np.savez(path, **self.arrays)

    @classmethod
    def load(cls, path: Path, classifier: str, classes: list[str], k: int) -> "Head":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(classifier, classes, {name: z[name] for name in z.files}, k)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:  # cut, garbage, or pickled
            raise ValueError(f"{path} is not a head the pipeline wrote (cut, corrupted or not arrays: "
                             f"{type(exc).__name__}); {REFIT}") from None

    def check(self, width: int, where: Path) -> None:
        """ValueError naming ``where`` unless the arrays fit an encoder of ``width`` features
        and the three policies: a head of the wrong width, or a broken one, never serves."""
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"{where}: {what}; {REFIT}")

        a = self.arrays
        need(self.classifier in CLASSIFIERS, f"unknown classifier {self.classifier!r}")
        need(isinstance(self.classes, list) and 1 <= len(self.classes) == len(set(self.classes))
             and set(self.classes) <= set(POLICIES), f"classes must be distinct policies of {POLICIES}")
        names = (LINEAR_ARRAYS if self.classifier in LINEAR else ("train", "labels")) if len(self.classes) > 1 else ()
        need(all(n in a for n in names), f"a {self.classifier} head needs the arrays {list(names)}")
        need(all(np.issubdtype(v.dtype, np.number) and np.isfinite(v).all() for v in a.values()),
             "every array must be finite numbers")
        if self.classifier in LINEAR and names:
            rows = a["coef"].shape[0] if a["coef"].ndim == 2 else -1
            need(a["mean"].shape == a["scale"].shape == (width,) and a["coef"].shape[1:] == (width,),
                 f"the head reads {a['coef'].shape[-1]} features, the encoder gives {width}")
            need(rows in ({len(self.classes)} | ({1} if len(self.classes) == 2 else set()))
                 and a["intercept"].shape == (rows,), f"coef has {rows} rows for {len(self.classes)} classes")
            need(bool((a["scale"] > 0).all()), "scale must be positive")
        elif names:
            need(a["train"].ndim == 2 and a["train"].shape[1] == width,
                 f"the head's neighbours have {a['train'].shape[-1]} features, the encoder gives {width}")
            need(a["labels"].shape == (len(a["train"]),) and bool(np.isin(a["labels"], range(len(self.classes))).all()),
                 "labels must number the classes, one per neighbour")
        for n in ("bias", "prior"):
            need(n not in a or a[n].shape == (len(POLICIES),), f"{n} must hold one value per policy")


def _scaled(p: np.ndarray, temperature: float, bias: np.ndarray) -> np.ndarray:
    logits = np.log(np.maximum(p, 1e-6)) / temperature + bias
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def calibrated_proba(p: np.ndarray, scale: float, temperature: float, bias: np.ndarray) -> np.ndarray:
    """P(Complex_Query) = sigmoid(scale * logit(raw P(Complex_Query)) + bias[Complex]),
    increasing in the raw one (scale > 0); the rest goes to the other policies by a
    temperature and their biases on their log-probabilities."""
    c = POLICIES.index(COMPLEX)
    raw = np.clip(p[:, c], 1e-300, 1 - 1e-15)  # wide: a sure head's extreme odds keep their order
    z = scale * (np.log(raw) - np.log1p(-raw)) + bias[c]
    p_c = np.exp(-np.logaddexp(0.0, -z))  # the sigmoid, without overflow or a lost tail
    rest = np.log(np.maximum(p, 1e-300)) / temperature + bias
    rest[:, c] = -np.inf
    rest = np.exp(rest - rest.max(axis=1, keepdims=True))
    out = rest / rest.sum(axis=1, keepdims=True) * (1 - p_c)[:, None]
    out[:, c] = p_c
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class HeadRouter:
    """A saved head router, loaded once; a ``contract.Router``."""

    mode = HEAD_KIND

    def __init__(self, path: str | Path, encoder=None, precision: str = "fast"):
        from router_pipeline.routers.features import folder_encoder

        self.path = Path(path)
        self.meta, head_file = read_router_folder(self.path, HEAD_KIND, HEAD_FILE)
        self.head = Head.load(head_file, self.meta["classifier"], self.meta["classes"], self.meta.get("k", 5))
        self.encoder = encoder or folder_encoder(self.meta, self.path, precision)
        self.head.check(self.encoder.encode([PROBE_QUERY]).shape[1], head_file)  # the encoder's width
        self.calibration = read_calibration(self.path)
        self.device = getattr(self.encoder, "device", "cpu")
        self.precision = getattr(self.encoder, "precision", "fp32")

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    def route(self, query: str, *, with_reasoning: bool = False):
        return self.route_batch([query], with_reasoning=with_reasoning)[0]

    def route_batch(self, queries: list[str], *, with_reasoning: bool = False, progress: bool = False,
                    batch_size: int = 16) -> list:
        if with_reasoning:
            raise ValueError(f"the released router is a {self.name} head router: it decides without reasoning")
        if not queries:
            return []
        t0 = time.perf_counter()
        proba = self.head.proba(self.encoder.encode(queries, batch_size=batch_size, progress=progress))
        per_query = (time.perf_counter() - t0) * 1000 / len(queries)
        return [RouteDecision(q, policy, {p: float(v) for p, v in zip(POLICIES, row)}, True, HEAD_KIND,
                              latency_ms=per_query)
                for q, policy, row in zip(queries, self.head.decide(proba), proba)]


def save_head_router(path: Path, name: str, encoder: dict, head: Head, **about) -> Path:
    """Write a head router folder (replacing an older one at ``path``)."""
    return write_router_folder(path, HEAD_KIND, HEAD_FILE, head.save,
                               {"name": name, "encoder": encoder, "classifier": head.classifier,
                                "classes": head.classes, "k": head.k, **about})


def export_head_router(folder: Path) -> dict | None:
    """Export the encoder of the head router at ``folder`` for the fast path (a Gemma
    encoder: its first blocks in bf16, hashed; MiniLM has nothing to export) and record
    it in router.json. Returns what was recorded, None when there is nothing to export."""
    from router_pipeline.routers.features import export_gemma, gemma_spec

    if not (folder / ROUTER_FILE).is_file():  # a LoRA adapter
        return None
    meta = json.loads((folder / ROUTER_FILE).read_text())
    from router_pipeline.routers.pool import MEMBERS_DIR, POOL_KIND  # a pool router reads the same encoder

    if meta.get("kind") == POOL_KIND and "members" in meta:  # an ensemble: its members' encoders
        exports = [(f"{MEMBERS_DIR}/{name}", export_head_router(folder / MEMBERS_DIR / name))
                   for name in meta["members"]]
        return next(({**e, "dir": f"{where}/{e['dir']}"} for where, e in exports if e is not None), None)
    if meta.get("kind") not in (HEAD_KIND, POOL_KIND) or (meta.get("encoder") or {}).get("encoder") != "gemma":
        return None
    meta["export"] = export_gemma(gemma_spec(meta["encoder"]), folder)
    (folder / ROUTER_FILE).write_text(json.dumps(meta, indent=2, default=float))
    return meta["export"]


def p_complex(proba: np.ndarray) -> np.ndarray:
    return proba[:, POLICIES.index(COMPLEX)]


__all__ = ["Head", "HeadRouter", "save_head_router", "export_head_router", "p_complex"]
