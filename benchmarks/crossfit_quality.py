"""Cross-fitted routing quality: every question of an outcomes file is a test row once.

One 80/20 split scores routers on about 1,000 rows, where a paired 95% interval is
about ±0.05 wide: too wide to tell close routers apart, and one split's luck moves the
point by as much. Here the questions are cut into 5 outer folds, by question or by
domain (whole subjects per fold, so every subject is once a subject never seen). For
each fold every candidate is chosen and fitted exactly as the pipeline's head_routers
asset does it (head_training.fit_heads: hyper-parameters by 5-fold cross-validation on
the other folds' rows, calibration on their out-of-fold predictions) and scores the
held-out fold. A router's APGR is each fold's APGR weighted by its rows (scores of two
folds' models are never ranked together); intervals are paired bootstraps of the rows
within their folds.

Rows: the pipeline's candidates (router: the Gemma head; LDA, logistic and k-NN on
MiniLM, every one of them a baseline) and two ablations of the router's block rule: the
fewest blocks within one standard error of the best CV AUC (the previous default), and
blocks 15 and 18 added to the grid. The encoded features are kept in ``--out`` and
reused by a later run on the same queries.

    python benchmarks/crossfit_quality.py                   # MMLU dev outcomes, by question and by domain
    python benchmarks/crossfit_quality.py my.csv --split domain
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
DEFAULT_OUTCOMES = ROOT.parent / "shared" / "data" / "routing_outcomes" / "mmlu_dev_outcomes.csv"
NAMES = {"gemma": "router: Gemma head (LDA, block and shrinkage by best CV AUC)",
         "minilm_lda": "LDA on MiniLM", "logistic": "logistic (MiniLM)", "knn": "k-NN (MiniLM)",
         "gemma_one_se": "Gemma head, fewest blocks within 1 SE of the best CV AUC (previous default)",
         "gemma_deeper": "Gemma head, blocks 15 and 18 in the grid too"}
BASELINES = ("minilm_lda", "logistic", "knn")  # every MiniLM head
DEEPER = (15, 18)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", nargs="?", default=str(DEFAULT_OUTCOMES))
    p.add_argument("--split", choices=("question", "domain", "both"), default="both")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "crossfit_quality"))
    args = p.parse_args(argv)

    from router_pipeline.evaluation import metrics as ev
    from router_pipeline.training.heads import (
        HYPER, HeadConfig, chosen_index, chosen_params, cross_validate, encode_cached, fit_heads,
    )
    from router_pipeline.training.heads import fit_calibration, fit_head
    from router_pipeline.routers.head import p_complex
    from router_pipeline.policies import COMPLEX, CORRECT, oracle_cell
    from router_pipeline.labels.questions import load_questions
    from router_pipeline.labels.split import outer_folds

    questions, _ = load_questions("outcomes", path=args.outcomes, sample_size=0)
    table = questions.rename(columns={"medium_grade": "medium_label", "large_grade": "large_label"})
    med, large = (table["medium_label"] == CORRECT).to_numpy(), (table["large_label"] == CORRECT).to_numpy()
    policies = np.array([oracle_cell(m, g).policy for m, g in zip(table["medium_label"], table["large_label"])])
    config = HeadConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    feats, seconds = encode_cached(list(questions["query"]), replace(config, layers=(*config.layers, *DEEPER)), out)
    print(f"{args.outcomes}: {len(questions)} questions, features in {sum(seconds.values()):.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})", flush=True)

    chosen = {"gemma": [], "gemma_one_se": [], "gemma_deeper": []}  # each Gemma head's params per fold

    def fit_fold(train: np.ndarray) -> dict:
        """Every candidate and ablation fitted on the ``train`` rows: name -> (head, features it reads)."""
        gemma = {layer: x[train] for layer, x in feats["gemma"].items()}
        rows = {"gemma": {layer: gemma[layer] for layer in config.layers}, "minilm": feats["minilm"][train]}
        y = list(policies[train])
        fitted = fit_heads(rows, y, config, cv=True)
        out = {name: (f.head, _x(feats, name, f.params)) for name, f in fitted.items()}
        router = fitted["gemma"]
        # The router's grid holds every block's CV AUC and SE: the one-SE ablation refits only its params.
        one_se = chosen_params(router.grid, chosen_index(router.grid, cost="layer"))
        out["gemma_one_se"] = (refit(gemma, y, one_se), _x(feats, "gemma", one_se))
        # The deeper grid: only blocks 15 and 18 are new, appended in the order a whole grid would have them.
        extra = fit_heads({"gemma": gemma}, y, replace(config, layers=DEEPER, heads=("gemma",)), cv=True)["gemma"]
        grid = router.grid + extra.grid
        deeper = chosen_params(grid, chosen_index(grid))
        out["gemma_deeper"] = (router.head if deeper == router.params else refit(gemma, y, deeper),
                               _x(feats, "gemma", deeper))
        for name, params in (("gemma", router.params), ("gemma_one_se", one_se), ("gemma_deeper", deeper)):
            chosen[name].append(params)
        return out

    def refit(gemma: dict, y: list[str], params: dict):
        """The Gemma head at ``params``, fitted and calibrated on its out-of-fold
        predictions, as fit_selected does for the params it chooses."""
        x, hyper = gemma[params["layer"]], {k: v for k, v in params.items() if k in HYPER}
        _, oof, _ = cross_validate(x, y, config.gemma_classifier, folds=config.folds, seed=config.seed, **hyper)
        return fit_calibration(fit_head(config.gemma_classifier, x, y, seed=config.seed, **hyper), oof, y)

    splits = ("question", "domain") if args.split == "both" else (args.split,)
    report = {"outcomes": args.outcomes, "questions": len(questions), "encode_s": seconds}
    for by in splits:
        t0 = time.perf_counter()
        folds = outer_folds(questions, args.folds, config.seed, by)
        n_folds = int(folds.max()) + 1  # fewer when the file has fewer domains than --folds
        scores = {name: np.zeros(len(questions)) for name in NAMES}
        decided = {name: np.empty(len(questions), dtype=object) for name in NAMES}
        for params in chosen.values():
            params.clear()
        for fold in range(n_folds):
            held = folds == fold
            for name, (head, x) in fit_fold(~held).items():
                proba = head.proba(x[held])
                scores[name][held], decided[name][held] = p_complex(proba), head.decide(proba)
            print(f"{by}: fold {fold + 1}/{n_folds} ({int(held.sum())} held-out rows; router {chosen['gemma'][-1]}, "
                  f"one-SE {chosen['gemma_one_se'][-1]}, deeper grid {chosen['gemma_deeper'][-1]}) "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        rng = np.random.default_rng(0)
        random = np.mean([ev.crossfit_apgr(rng.random(len(folds)), med, large, folds) for _ in range(20)])
        rows = []
        for name, label in NAMES.items():
            mix = ev.policy_mix(list(decided[name]))
            row = {"router": label, "apgr": ev.crossfit_apgr(scores[name], med, large, folds),
                   "per fold": " ".join(f"{ev.apgr_weighted(scores[name][folds == f], med[folds == f], large[folds == f]):.3f}"
                                        for f in range(n_folds)),
                   "ece": ev.expected_calibration_error(scores[name], policies == COMPLEX),
                   "decides S/C/A": "/".join(f"{v:.2f}" for v in mix.values())}
            if name != "gemma":
                d = ev.paired_bootstrap(table, scores["gemma"], scores[name], resamples=args.resamples, folds=folds)
                row["router - this"] = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            rows.append(row)
        best = max(BASELINES, key=lambda b: ev.crossfit_apgr(scores[b], med, large, folds))
        d = ev.paired_bootstrap(table, scores["gemma"], scores[best], resamples=args.resamples, folds=folds)
        frame = pd.DataFrame(rows).round(3).fillna("")
        print(f"\n## {by}: {len(np.bincount(folds))} outer folds of {np.bincount(folds).tolist()} rows "
              f"({time.perf_counter() - t0:.0f} s)\n")
        print(frame.to_markdown(index=False))
        print(f"labels' mix S/C/A: {'/'.join(f'{v:.2f}' for v in ev.policy_mix(list(policies)).values())}; "
              f"random (mean of 20) {random:.3f}")
        for name, params in chosen.items():
            print(f"{name} blocks per fold: {[p['layer'] for p in params]}")
        for name in ("gemma", *BASELINES):
            print(f"{name if name != 'gemma' else 'router'} APGR {ev.crossfit_apgr(scores[name], med, large, folds):.3f}")
        print(f"router - best baseline ({best}) {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]", flush=True)
        report[by] = {"folds": folds.tolist(), "table": rows, "random": random, "best_baseline": best,
                      "router_minus_best": d, "chosen": {k: list(v) for k, v in chosen.items()},
                      "per_query": {"qid": list(questions["qid"]), **{n: s.tolist() for n, s in scores.items()}}}
    (out / "crossfit_quality.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out / 'crossfit_quality.json'}")
    return 0


def _x(feats: dict, name: str, params: dict) -> np.ndarray:
    return feats["gemma"][params["layer"]] if name.startswith("gemma") else feats["minilm"]


if __name__ == "__main__":
    sys.exit(main())
