"""A pool router that needs no encoder and no data: heads fitted on synthetic rows, its
encoder reading "row i" as the i-th row. What the server's tests and benchmarks route
with when the question is the server, not the router (beside llm.fake_gemini and
llm.fake_openai, the stand-ins for the models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def synthetic(n=900, seed=0):
    """Model 0 (cheap) is right on x[0] > 0, model 1 on x[1] > 0, model 2 (dear) mostly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    correct = np.stack([x[:, 0] + 0.3 * rng.normal(size=n) > 0, x[:, 1] + 0.3 * rng.normal(size=n) > 0,
                        rng.random(n) < 0.7], axis=1)
    cost = np.tile([0.0005, 0.001, 0.004], (n, 1))
    return x, correct, cost


def stand_in_pool_router(folder, pool=None):
    """A pool router over three models (default: Gemini's flash-lite, flash and pro at list
    prices; ``pool``: any three, cheapest first) whose encoder reads "row i" as the i-th
    synthetic feature row, saved as the pipeline saves one, with a validation sweep
    recorded for the knob. (router, fitted heads, features)."""
    from router_pipeline.artifacts import CALIBRATION_FILE
    from router_pipeline.llm.pool import gemini_pool
    from router_pipeline.routers.pool import PoolRouter, save_pool_router, sweep
    from router_pipeline.training.pool import _json_sweep, fit_pool, pool_grid

    pool = pool or gemini_pool()
    x, correct, cost = synthetic(300)
    fitted = fit_pool(lambda p: x, correct, cost, pool.names, "lda", pool_grid("lda"), folds=3)
    path = save_pool_router(Path(folder) / "pool", {"encoder": "minilm"}, fitted.head, pool=pool.to_dict(),
                            params=fitted.params)
    val = slice(200, 300)
    p_val = fitted.head.proba(x[val])
    (path / CALIBRATION_FILE).write_text(json.dumps({
        "lambda": 0.0, "knob": "lambda", "knob_value": 0.0, "best_single_accuracy": float(correct[val].mean(0).max()),
        "validation_sweep": _json_sweep(sweep(p_val, correct[val], cost[val], fitted.head.costs))}))

    class Rows:
        def encode(self, queries):
            return x[[int(q.rsplit(" ", 1)[1]) if q.startswith("row ") else 0 for q in queries]]

    return PoolRouter(path, encoder=Rows()), fitted, x
