"""Routing among N models, judged by the cost-accuracy frontier, cross-fitted.

Reads any outcomes file with ``<model>_grade`` and ``<model>_cost_usd`` columns (the
MMLU-Pro six-model file beside the repository by default). The questions are cut into 5
outer folds, by question or by domain (whole categories held out, so each is once a
category never seen); for each fold every router is chosen and fitted on the other
folds' rows (hyper-parameters by 5-fold cross-validation, Platt calibration on
out-of-fold scores: training/pool.py) and routes the held-out fold at every value of
its knob. Each router's points pool the held-out rows of all folds at the same lambda.

Rows: the router (the mean log-odds of two heads per model: LDA on a frozen Gemma 3 270M
state, block and shrinkage by CV, and LDA on MiniLM embeddings: training/pool.py's
gemma_minilm_lda), its Gemma member alone (the ablation), LDA, logistic and k-NN heads
on MiniLM embeddings (the baselines), each single model, a random mix of models (the hull of the single models), and the oracle. For
each: AIQ (area under the non-decreasing cost-accuracy hull between the cheapest and
the dearest model's cost, over that range), accuracy at the cheapest model's cost, cost
at the best single model's accuracy and at 95% of it, and accuracy at half the best
model's cost. Intervals: paired bootstraps of the rows within their folds (95%).

    python benchmarks/pool_quality.py                           # MMLU-Pro, six models, both protocols
    python benchmarks/pool_quality.py my.csv --models a,b --split domain
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTCOMES = ROOT.parent / "shared" / "data" / "routing_outcomes" / "mmlu_pro_dev_outcomes.csv"
ROUTERS = {"router": "router: Gemma LDA + MiniLM LDA (mean log-odds)",
           "gemma_lda": "Gemma LDA alone (the router less its MiniLM member)", "minilm_lda": "LDA on MiniLM",
           "logistic": "logistic (MiniLM)", "knn": "k-NN (MiniLM)"}
BASELINES = ("minilm_lda", "logistic", "knn")
MEMBERS = ("gemma_lda", "minilm_lda")  # the router's: its P is their ensemble (routers.pool.ensemble)
CLASSIFIER = {"gemma_lda": "lda", "minilm_lda": "lda", "logistic": "logistic", "knn": "knn"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", nargs="?", default=str(DEFAULT_OUTCOMES))
    p.add_argument("--models", help="comma-separated models of the file (default: every one)")
    p.add_argument("--split", choices=("question", "domain", "both"), default="both")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--sample", type=int, default=0, help="a seeded sample of this many rows (a smoke run)")
    p.add_argument("--costs", help="model=USD per call for models the file records without <model>_cost_usd, "
                                   "e.g. medium=0.0006,large=0.01 for the two-tier MMLU file")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "pool_quality"))
    args = p.parse_args(argv)

    from router_pipeline.evaluation import frontier as fr
    from router_pipeline.labels.outcomes import read_outcomes
    from router_pipeline.labels.split import outer_folds
    from router_pipeline.routers.pool import decide, ensemble, lambdas
    from router_pipeline.training.heads import HeadConfig, encode_cached
    from router_pipeline.training.pool import fit_pool, pool_grid

    t_start = time.perf_counter()
    source = pd.read_csv(args.outcomes, dtype={"qid": str})
    for item in (args.costs.split(",") if args.costs else []):
        model, _, usd = item.partition("=")
        source[f"{model}_cost_usd"] = float(usd)
    outcomes = read_outcomes(source, args.models.split(",") if args.models else None)
    frame = outcomes.frame
    if args.sample:
        frame = frame.sample(n=min(args.sample, len(frame)), random_state=0).reset_index(drop=True)
        outcomes = type(outcomes)(frame, outcomes.models, outcomes.rejected)
    models, correct, cost = outcomes.models, outcomes.correct, outcomes.cost
    print(f"{args.outcomes}: {len(frame)} rows ({len(outcomes.rejected)} rejected), models {models}", flush=True)
    config = HeadConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    feats, seconds = encode_cached(list(frame["query"]), config, out)
    print(f"features in {sum(seconds.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})",
          flush=True)
    grid = {"gemma_lda": pool_grid("lda", layers=config.layers, shrinkages=config.shrinkages),
            "minilm_lda": pool_grid("lda", shrinkages=config.shrinkages),
            "logistic": pool_grid("logistic", c_values=config.c_values),
            "knn": pool_grid("knn", knn_k=config.knn_k)}
    sweep = lambdas(cost.mean(axis=0))  # the same knob values in every fold: points pool across folds
    questions = frame.rename(columns={"domain": "topic"}) if "domain" in frame else frame
    report = {"outcomes": args.outcomes, "rows": len(frame), "models": models, "encode_s": seconds}
    splits = ("question", "domain") if args.split == "both" else (args.split,)
    for by in splits:
        t0 = time.perf_counter()
        folds = outer_folds(questions, args.folds, config.seed, by)
        n_folds = int(folds.max()) + 1  # fewer when the file has fewer domains than --folds
        choice = {name: np.zeros((len(frame), len(sweep)), dtype=int) for name in ROUTERS}
        prob = {name: np.zeros(correct.shape) for name in ROUTERS}
        chosen = {name: [] for name in ROUTERS}
        two_tier = np.zeros(len(frame)) if len(models) == 2 else None  # today's P(Complex_Query) router
        for fold in range(n_folds):
            held = folds == fold
            if two_tier is not None:
                two_tier[held] = _two_tier_scores(feats, correct, cost, ~held, held, config)
            for name in CLASSIFIER:
                x_of = (lambda p, n=name: feats["gemma"][p["layer"]]) if name == "gemma_lda" else \
                    (lambda p: feats["minilm"])
                fitted = fit_pool(lambda p: x_of(p)[~held], correct[~held], cost[~held], models, CLASSIFIER[name],
                                  grid[name], folds=config.folds, seed=config.seed)
                prob[name][held] = fitted.head.proba(x_of(fitted.params)[held])
                chosen[name].append({k: v for k, v in fitted.params.items()})
            prob["router"][held] = ensemble([prob[m][held] for m in MEMBERS])
            chosen["router"].append(chosen["gemma_lda"][-1])
            for name in ROUTERS:  # fitted.head.costs: the training rows' mean cost per model, the same for all
                choice[name][held] = np.stack([decide(prob[name][held], fitted.head.costs, lam) for lam in sweep],
                                              axis=1)
            print(f"{by}: fold {fold + 1}/{n_folds} ({int(held.sum())} held-out rows; Gemma member "
                  f"{chosen['gemma_lda'][-1]}) "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        curves = {name: fr.curve(choice[name], correct, cost) for name in ROUTERS}
        single = dict(zip(models, fr.singles(correct, cost)))
        curves["random mix"] = fr.random_mix(correct, cost)
        curves["oracle"] = fr.oracle(correct, cost, sweep)
        report[by] = _report(by, curves, single, correct, cost, folds, models, args, fr, chosen, t0)
        if two_tier is not None:
            report[by]["apgr"] = _apgr(prob, two_tier, correct, cost, folds, args.resamples)
    (out / "pool_quality.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out / 'pool_quality.json'} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


def _two_tier_scores(feats, correct, cost, train, held, config) -> np.ndarray:
    """Two models: P(Complex_Query) of the two-tier router (the 9-cell labels of the cheaper
    and the dearer model's grades, training.heads.fit_heads) on the held-out rows."""
    from router_pipeline.policies import CORRECT, INCORRECT, oracle_cell
    from router_pipeline.routers.head import p_complex
    from router_pipeline.training.heads import fit_heads

    cheap, dear = np.argsort(cost.mean(axis=0))
    grade = lambda v: np.where(v, CORRECT, INCORRECT)  # noqa: E731
    labels = [oracle_cell(m, g).policy for m, g in zip(grade(correct[train, cheap]), grade(correct[train, dear]))]
    rows = {"gemma": {layer: x[train] for layer, x in feats["gemma"].items()}}
    head = fit_heads(rows, labels, replace(config, heads=("gemma",)), cv=True)["gemma"]
    return p_complex(head.head.proba(feats["gemma"][head.params["layer"]][held]))


def _apgr(prob: dict, two_tier: np.ndarray, correct: np.ndarray, cost: np.ndarray, folds: np.ndarray,
          resamples: int) -> dict:
    """Two models: APGR of each pool router's P(dearer right) - P(cheaper right) as the
    score, beside the two-tier router's P(Complex_Query) (what crossfit_quality.py reports),
    cross-fitted, with the paired interval of the pool router minus the two-tier one."""
    from router_pipeline.evaluation.metrics import crossfit_apgr, paired_bootstrap
    from router_pipeline.policies import CORRECT, INCORRECT

    cheap, dear = np.argsort(cost.mean(axis=0))
    # APGR needs the dearer model better on the rows it is read on: a fold where it is not
    # (by domain, chemistry: Flash beats Pro) has no gap to recover and is left out, said so.
    gapless = [int(f) for f in np.unique(folds)
               if correct[folds == f, dear].mean() <= correct[folds == f, cheap].mean()]
    if gapless:
        print(f"APGR over the folds where the dearer model is better: folds {[f + 1 for f in gapless]} "
              "have no quality gap and are left out")
        keep = ~np.isin(folds, gapless)
        prob, two_tier = {k: v[keep] for k, v in prob.items()}, two_tier[keep]
        correct, folds = correct[keep], folds[keep]
    scores = {name: p[:, dear] - p[:, cheap] for name, p in prob.items()}
    apgr = {name: crossfit_apgr(v, correct[:, cheap], correct[:, dear], folds) for name, v in scores.items()}
    apgr["two-tier router"] = crossfit_apgr(two_tier, correct[:, cheap], correct[:, dear], folds)
    for name, value in apgr.items():
        print(f"{name} APGR {value:.3f}")
    table = pd.DataFrame({"medium_label": np.where(correct[:, cheap], CORRECT, INCORRECT),
                          "large_label": np.where(correct[:, dear], CORRECT, INCORRECT)})
    d = paired_bootstrap(table, scores["router"], two_tier, resamples=resamples, folds=folds)
    print(f"pool router - two-tier router APGR {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    return {**apgr, "pool_minus_two_tier": d}


def _report(by, curves, single, correct, cost, folds, models, args, fr, chosen, t0) -> dict:
    rng = fr.cost_range(cost)
    acc = correct.mean(axis=0)
    per_1000 = cost.mean(axis=0) * 1000
    best = int(np.argmax(acc))
    best_acc, best_cost = float(acc[best]), float(cost.mean(axis=0)[best])
    rows = []
    for name, c in {**curves, **single}.items():
        f = c.frontier()
        rows.append({"router": ROUTERS.get(name, name), "AIQ": f.aiq(rng.lo, rng.hi),
                     "acc @ cheapest cost": f.accuracy_at(rng.lo),
                     f"acc @ half {models[best]}'s cost": f.accuracy_at(best_cost / 2),
                     f"$/1000 @ {models[best]}'s acc": f.cost_at(best_acc) * 1000,
                     "$/1000 @ 95% of it": f.cost_at(0.95 * best_acc) * 1000})
    weights = fr.resample_weights(len(correct), args.resamples, 0, folds)
    aiq = {name: fr.aiq(curves[name], cost) for name in ROUTERS}
    best_baseline = max(BASELINES, key=lambda b: aiq[b])
    intervals = {other: fr.interval(lambda w, o=other: fr.aiq(curves["router"], cost, w) - fr.aiq(curves[o], cost, w),
                                    weights)
                 for other in (*BASELINES, "gemma_lda", "random mix")}

    def gain_at_half(w):  # the router at half the best model's cost, minus that model
        mean = (lambda v: v.mean()) if w is None else (lambda v: w @ v / w.sum())
        return curves["router"].frontier(w).accuracy_at(mean(cost[:, best]) / 2) - mean(correct[:, best])

    at_half = fr.interval(gain_at_half, weights)
    table = pd.DataFrame(rows)
    print(f"\n## {by}: {len(np.bincount(folds))} outer folds of {np.bincount(folds).tolist()} rows ({time.perf_counter() - t0:.0f} s)\n")
    print(table.round(3).to_markdown(index=False))
    print("\nsingle models: " + "; ".join(f"{m} {a:.3f} at ${c:.3f}/1000" for m, a, c in zip(models, acc, per_1000)))
    print("router's Gemma blocks per fold: " + str([p.get("layer") for p in chosen["gemma_lda"]]))
    for other, d in intervals.items():
        print(f"router - {other} AIQ {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    print(f"router at half {models[best]}'s cost - {models[best]} accuracy {at_half['diff']:+.3f} "
          f"[{at_half['lo']:+.3f}, {at_half['hi']:+.3f}]")
    print(f"router AIQ {aiq['router']:.3f}")
    print(f"best baseline AIQ {aiq[best_baseline]:.3f} ({best_baseline})")
    d = intervals[best_baseline]
    print(f"router - best baseline AIQ {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    print(f"best single model {models[best]}: accuracy {best_acc:.3f} at ${best_cost * 1000:.3f} per 1000")
    print(f"router at half that cost: accuracy {curves['router'].frontier().accuracy_at(best_cost / 2):.3f}", flush=True)
    return {"table": rows, "intervals": intervals, "at_half": at_half, "best_baseline": best_baseline,
            "folds": folds.tolist(), "chosen": chosen}


if __name__ == "__main__":
    sys.exit(main())
