"""Cascades against the query-only pool router, judged by the cost-accuracy frontier,
cross-fitted.

Reads an outcomes file with ``<model>_grade`` / ``<model>_cost_usd`` and, where
recorded, ``<model>_answer`` (the MMLU-Pro six-model file beside the repository by
default; answers of only some models are read where present, and a file without any
runs query-only). The questions are cut into 5 outer folds, by question or by domain
(fewer folds when the file has fewer domains); in each fold, on the other folds' rows:

- the query-only router (pool_quality.py's: the mean log-odds of LDA on a Gemma 3 270M
  block and LDA on MiniLM, training/pool.py), whose out-of-fold P on the training rows
  the cascades read;
- a learned cascade for each candidate plan (the k most accurate models on the training
  rows, cheapest first, k = 2 .. all, and the next two together before the most
  accurate: training/cascade.py) and ridge strength; "learned cascade" is the recipe of
  best AIQ on its out-of-fold trace on the training rows;
- fixed cascades (accept on agreement): "next two agree, else best" (the second and third most
  accurate together, else the most accurate: Flash + Llama-70B, else Pro) and the best
  of every plan "some models together, perhaps one more, else the most accurate" by
  AIQ on the training rows.

"cascade" is one policy with one knob: at each value of lambda, the candidate (the
query-only router, every learned recipe, the fixed cascades) whose out-of-fold trace on
the training rows has the best accuracy - lambda x cost (training/cascade.py select).
By domain the training rows are cross-fitted by whole domains too, so the P the
cascades read and the traces that choose say how they hold on categories never seen.

Each routes the held-out fold at every value of its knob; a query's cost is the sum of
every model it called. Table: AIQ, accuracy at half the best single model's cost and at
its cost, and the least cost reaching its accuracy as a share of its cost. Intervals:
paired bootstraps of the rows within their folds (95%).

    python benchmarks/cascade_quality.py                       # MMLU-Pro, six models, both protocols
    python benchmarks/cascade_quality.py my.csv --split domain
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTCOMES = ROOT.parent / "shared" / "data" / "routing_outcomes" / "mmlu_pro_dev_outcomes.csv"
ALPHAS = (10.0, 100.0, 1000.0)  # the go-on heads' ridge strengths tried
FEATURES = ROOT / "artifacts" / "benchmarks" / "pool_quality"  # pool_quality.py's encoder cache, shared


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", nargs="?", default=str(DEFAULT_OUTCOMES))
    p.add_argument("--models", help="comma-separated models of the file (default: every one)")
    p.add_argument("--split", choices=("question", "domain", "both"), default="both")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--sample", type=int, default=0, help="a seeded sample of this many rows (a smoke run)")
    p.add_argument("--features", default=str(FEATURES), help="the encoder cache folder")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "cascade_quality"))
    args = p.parse_args(argv)

    from router_pipeline.evaluation import frontier as fr
    from router_pipeline.evaluation.cascade import with_cheapest
    from router_pipeline.labels.outcomes import read_outcomes
    from router_pipeline.labels.split import outer_folds
    from router_pipeline.routers.cascade import comparator_for, read_answers
    from router_pipeline.routers.pool import lambdas
    from router_pipeline.training.heads import HeadConfig, encode_cached

    t_start = time.perf_counter()
    outcomes = read_outcomes(args.outcomes, args.models.split(",") if args.models else None)
    frame = outcomes.frame
    if args.sample:
        frame = frame.sample(n=min(args.sample, len(frame)), random_state=0).reset_index(drop=True)
    models, correct = (
        outcomes.models,
        np.stack([(frame[m + "_grade"] == "Correct").to_numpy() for m in outcomes.models], 1),
    )
    cost = np.stack([frame[m + "_cost_usd"].to_numpy(float) for m in models], axis=1)
    raw = np.stack(
        [
            frame[m + "_answer"].to_numpy(object) if m + "_answer" in frame else np.full(len(frame), None)
            for m in models
        ],
        axis=1,
    )
    comparator = comparator_for(raw)
    answers = read_answers(raw, comparator)
    with_answers = [m for m, r in zip(models, (answers.canon != "").any(axis=0)) if r]
    print(
        f"{args.outcomes}: {len(frame)} rows ({len(outcomes.rejected)} rejected), models {models}; answers of "
        f"{with_answers or 'no model (query only)'} compared as {comparator}",
        flush=True,
    )
    config = HeadConfig()
    feats, seconds = encode_cached(list(frame["query"]), config, Path(args.features))
    print(f"features in {sum(seconds.values()):.0f} s", flush=True)
    sweep = lambdas(cost.mean(axis=0))  # the same knob values in every fold: points pool across folds
    questions = frame.rename(columns={"domain": "topic"}) if "domain" in frame else frame
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"outcomes": args.outcomes, "rows": len(frame), "models": models, "comparator": comparator}
    for by in ("question", "domain") if args.split == "both" else (args.split,):
        t0 = time.perf_counter()
        folds = outer_folds(questions, args.folds, config.seed, by)
        right = {}  # name -> (rows, points) per row and knob value, pooled over the held-out folds
        spent = {}
        chosen = []
        for fold in np.unique(folds):
            held = folds == fold
            # By domain, the training rows are cross-fitted by whole domains too: the P the
            # cascade reads and its out-of-fold traces then say how they hold on unseen ones.
            rest = questions[~held].reset_index(drop=True)
            inner = (outer_folds(rest, args.folds, config.seed, by)
                     if by == "domain" and rest["topic"].nunique() >= 2 else None)  # one domain left: random folds
            fitted = _fold(feats, answers, correct, cost, ~held, held, sweep, config, models, comparator, inner)
            for name, (r, c) in fitted["traces"].items():
                right.setdefault(name, np.zeros((len(frame), r.shape[1])))[held] = r
                spent.setdefault(name, np.zeros((len(frame), c.shape[1])))[held] = c
            chosen.append(fitted["chosen"])
            print(
                f"{by}: fold {fold + 1}/{len(np.unique(folds))} ({int(held.sum())} held-out rows) {fitted['chosen']} "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        curves = {name: with_cheapest(right[name], spent[name], correct, cost) for name in right}
        curves.update(zip([f"{m} alone" for m in models], fr.singles(correct, cost)))
        curves["random mix"] = fr.random_mix(correct, cost)
        curves["oracle"] = fr.oracle(correct, cost, sweep)
        report[by] = _report(by, curves, correct, cost, folds, models, args, fr, chosen, t0)
    (out / "cascade_quality.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out / 'cascade_quality.json'} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


def _fold(feats, answers, correct, cost, train, held, sweep, config, models, comparator, inner=None) -> dict:
    """Every router fitted on ``train`` and replayed on ``held``: name -> (right, cost) per
    (held row, knob value), with the recipes chosen on the training rows. ``inner``: the
    training rows' cross-fitting folds for what the cascades read (None: random ones)."""
    from router_pipeline.evaluation import frontier as fr
    from router_pipeline.evaluation.cascade import with_cheapest
    from router_pipeline.routers.cascade import FixedCascade, logit
    from router_pipeline.routers.pool import decide, ensemble
    from router_pipeline.training.cascade import (
        Trace,
        fit_cascade,
        fixed_plans,
        learned_plans,
        next_two_plan,
        replay,
        select,
        selected,
    )
    from router_pipeline.training.pool import fit_pool, oof_on, pool_grid

    grids = {
        "gemma": pool_grid("lda", layers=config.layers, shrinkages=config.shrinkages),
        "minilm": pool_grid("lda", shrinkages=config.shrinkages),
    }
    x_of = {"gemma": lambda p: feats["gemma"][p["layer"]], "minilm": lambda p: feats["minilm"]}
    oof, p_held, layer = [], {}, None
    for enc in ("gemma", "minilm"):
        f = fit_pool(
            lambda p, e=enc: x_of[e](p)[train],
            correct[train],
            cost[train],
            models,
            "lda",
            grids[enc],
            folds=config.folds,
            seed=config.seed,
        )
        oof.append(f.oof if inner is None else oof_on(f, x_of[enc](f.params)[train], correct[train], cost[train],
                                                      models, "lda", inner, config.seed))
        p_held[enc] = f.head.proba(x_of[enc](f.params)[held])
        layer = f.params.get("layer", layer)
    q_train, q_held = logit(ensemble(oof)), logit(ensemble(list(p_held.values())))
    costs = cost[train].mean(axis=0)
    a_train, a_held = answers.rows(train), answers.rows(held)
    c_train, k_train, c_held, k_held = correct[train], cost[train], correct[held], cost[held]

    def choices(p):  # the query-only routers at every lambda: one model per row
        rows = np.arange(len(p))[:, None]
        pick_ = np.stack([decide(p, costs, lam) for lam in sweep], axis=1)
        return c_held[rows, pick_], k_held[rows, pick_]

    def train_aiq(trace) -> float:
        return fr.aiq(with_cheapest(trace.right, trace.cost, c_train, k_train), k_train)

    traces = {"query-only router": choices(ensemble(list(p_held.values()))), "LDA on MiniLM": choices(p_held["minilm"])}
    # The learned cascade's recipe (plan, ridge strength) by the AIQ of its out-of-fold trace
    # on the training rows; the query-only router (every query jumps at step 0) is one.
    rows = np.arange(len(q_train))[:, None]
    only = np.stack([decide(np.exp(-np.logaddexp(0, -q_train)), costs, lam) for lam in sweep], axis=1)
    recipes = [("query-only", Trace(c_train[rows, only], k_train[rows, only]), None)]
    for plan, alpha in itertools.product(learned_plans(models, c_train, costs), ALPHAS):
        policy, trace = fit_cascade(
            plan, q_train, a_train, c_train, k_train, sweep, comparator=comparator, seed=config.seed, alpha=alpha,
            fold_of=inner,
        )
        recipes.append((f"{plan.describe()}, alpha {alpha:g}", trace, policy))
    recipe, _, policy = max(recipes, key=lambda r: train_aiq(r[1]))
    if policy is None:
        traces["learned cascade"] = traces["query-only router"]
    else:
        t = replay(policy, q_held, a_held, c_held, k_held, sweep)
        traces["learned cascade"] = (t.right, t.cost)
    # The cascade: per knob value, the candidate (the query-only router, every learned recipe,
    # the fixed cascades) whose out-of-fold trace on the training rows has the best accuracy
    # - lambda x cost (training/cascade.py select); no held-out row is read.
    candidates = {"query-only": (recipes[0][1], Trace(*traces["query-only router"]))}
    for name, trace, fitted in recipes[1:]:
        candidates[f"learned: {name}"] = (trace, replay(fitted, q_held, a_held, c_held, k_held, sweep))
    fixed = {}
    for name, plans in (
        ("fixed: next two agree, else best", [next_two_plan(models, c_train)]),
        ("fixed: best by validation", fixed_plans(models, c_train)),
    ):
        best = max(
            plans,
            key=lambda pl: train_aiq(replay(FixedCascade(pl, costs), q_train, a_train, c_train, k_train, sweep[:1])),
        )
        t = replay(FixedCascade(best, costs), q_held, a_held, c_held, k_held, sweep[:1])
        traces[name] = (t.right, t.cost)
        fixed[name] = best.describe()
        candidates[name] = (replay(FixedCascade(best, costs), q_train, a_train, c_train, k_train, sweep[:1]), t)
    choice = select([train for train, _ in candidates.values()], sweep)
    t = selected([test for _, test in candidates.values()], choice)
    traces["cascade"] = (t.right, t.cost)
    kinds = [n.split(":")[0] if n.startswith("learned") else n for n in candidates]
    picked = {k: int(sum(kinds[i] == k for i in choice)) for k in dict.fromkeys(kinds)}
    return {"traces": traces, "chosen": {"gemma block": layer, "learned": recipe, **fixed, "knob values": picked}}


def _report(by, curves, correct, cost, folds, models, args, fr, chosen, t0) -> dict:
    rng = fr.cost_range(cost)
    acc, mean_cost = correct.mean(axis=0), cost.mean(axis=0)
    best = int(np.argmax(acc))
    best_acc, best_cost, best_name = float(acc[best]), float(mean_cost[best]), models[best]
    rows = []
    for name, c in curves.items():
        f = c.frontier()
        rows.append(
            {
                "router": name,
                "AIQ": f.aiq(rng.lo, rng.hi),
                f"acc @ half {best_name}'s cost": f.accuracy_at(best_cost / 2),
                f"acc @ {best_name}'s cost": f.accuracy_at(best_cost),
                f"cost @ {best_name}'s acc / its cost": f.cost_at(best_acc) / best_cost,
            }
        )
    weights = fr.resample_weights(len(correct), args.resamples, 0, folds)
    cascade = curves["cascade"]

    def mean(w, v):
        return v.mean() if w is None else w @ v / w.sum()

    def aiq_minus(other):
        return fr.interval(lambda w: fr.aiq(cascade, cost, w) - fr.aiq(curves[other], cost, w), weights)

    def gain_at(share):  # the cascade at a share of the best model's cost, minus that model
        return fr.interval(
            lambda w: cascade.frontier(w).accuracy_at(share * mean(w, cost[:, best])) - mean(w, correct[:, best]),
            weights,
        )

    vs = {
        other: aiq_minus(other)
        for other in (
            "learned cascade",
            "query-only router",
            "random mix",
            "fixed: next two agree, else best",
            "fixed: best by validation",
            "LDA on MiniLM",
        )
    }
    at_cost, at_half = gain_at(1.0), gain_at(0.5)
    f = cascade.frontier()
    ratio = f.cost_at(best_acc) / best_cost
    print(
        f"\n## {by}: {len(np.unique(folds))} outer folds of {np.bincount(folds).tolist()} rows "
        f"({time.perf_counter() - t0:.0f} s)\n"
    )
    print(pd.DataFrame(rows).round(3).to_markdown(index=False))
    print("\nchosen per fold (on training rows): " + json.dumps(chosen, indent=None))
    for other, d in vs.items():
        print(f"cascade - {other} AIQ {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    print(
        f"cascade at half the best single model's cost - best single accuracy {at_half['diff']:+.3f} "
        f"[{at_half['lo']:+.3f}, {at_half['hi']:+.3f}]"
    )
    print(f"best single model {best_name}: accuracy {best_acc:.3f} at ${best_cost * 1000:.3f} per 1000")
    d = vs["query-only router"]
    print(f"cascade AIQ {fr.aiq(cascade, cost):.3f}")
    print(f"cascade - query-only router AIQ {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    print(
        f"cascade at the best single model's cost - best single accuracy {at_cost['diff']:+.3f} "
        f"[{at_cost['lo']:+.3f}, {at_cost['hi']:+.3f}]"
    )
    print(f"cascade cost at the best single model's accuracy {ratio:.2f} x its cost")
    print(f"cascade at half the best single model's cost: accuracy {f.accuracy_at(best_cost / 2):.3f}", flush=True)
    return {
        "table": rows,
        "intervals": vs,
        "at_cost": at_cost,
        "at_half": at_half,
        "cost_ratio": ratio,
        "folds": folds.tolist(),
        "chosen": chosen,
    }


if __name__ == "__main__":
    sys.exit(main())
