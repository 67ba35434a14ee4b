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

Besides the pipeline's candidates (router: the Gemma head; logistic and k-NN on MiniLM)
it scores four ablations: the Gemma head fitted by logistic regression (an older
recipe), LDA on MiniLM (is the gain the classifier's or the encoder's?), the Gemma head
on the block with the best CV AUC whatever it costs (the previous recipe: does the
router's cheapest block within one standard error lose anything?), and the router's own
head under the earlier calibration (a temperature over all three policies, which
reorders queries by P(Complex_Query)).

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
NAMES = {"gemma": "router (Gemma head)", "logistic": "logistic (MiniLM)", "knn": "k-NN (MiniLM)",
         "gemma_logistic": "Gemma head by logistic regression (older recipe)", "minilm_lda": "LDA on MiniLM",
         "gemma_best_auc": "Gemma head, block by best CV AUC whatever it costs (previous recipe)",
         "gemma_temperature": "Gemma head, earlier calibration (one temperature over all policies)"}
BASELINES = ("logistic", "knn")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", nargs="?", default=str(DEFAULT_OUTCOMES))
    p.add_argument("--split", choices=("question", "domain", "both"), default="both")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "crossfit_quality"))
    args = p.parse_args(argv)

    from router_pipeline import evaluation as ev
    from router_pipeline.head_training import HYPER, HeadConfig, cross_validate, encode, fit_heads, fit_selected, grid
    from router_pipeline.heads import calibrate, fit_head, p_complex
    from router_pipeline.policies import COMPLEX, CORRECT, oracle_cell
    from router_pipeline.questions import load_questions
    from router_pipeline.split import outer_folds

    questions, _ = load_questions("outcomes", path=args.outcomes, sample_size=0)
    table = questions.rename(columns={"medium_grade": "medium_label", "large_grade": "large_label"})
    med, large = (table["medium_label"] == CORRECT).to_numpy(), (table["large_label"] == CORRECT).to_numpy()
    policies = np.array([oracle_cell(m, g).policy for m, g in zip(table["medium_label"], table["large_label"])])
    config = HeadConfig()
    t0 = time.perf_counter()
    feats, seconds = encode(list(questions["query"]), config, progress=True)
    print(f"{args.outcomes}: {len(questions)} questions, encoded in {time.perf_counter() - t0:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})", flush=True)

    chosen, best_auc = [], []  # the router head's params in each fold, and the best-AUC ablation's

    def fit_fold(train: np.ndarray) -> dict:
        """Every candidate and ablation fitted on the ``train`` rows: name -> (head, features it reads)."""
        rows = {"gemma": {layer: x[train] for layer, x in feats["gemma"].items()}, "minilm": feats["minilm"][train]}
        y = list(policies[train])
        fitted = fit_heads(rows, y, config, cv=True)
        out = {name: (f.head, _features(feats, name, f.params)) for name, f in fitted.items()}
        chosen.append(fitted["gemma"].params)
        f = fit_heads(rows, y, replace(config, gemma_classifier="logistic", heads=("gemma",)), cv=True)["gemma"]
        out["gemma_logistic"] = (f.head, _features(feats, "gemma", f.params))
        head, *_ = fit_selected(lambda _: rows["minilm"], y, "lda", grid("lda", config), cv=True,
                                folds=config.folds, seed=config.seed)
        out["minilm_lda"] = (head, feats["minilm"])
        # The router's grid already holds every block's CV AUC: refit only the params each ablation reads.
        router = fitted["gemma"]
        best = {k: v for k, v in max(router.grid, key=lambda g: g["cv_auc"]).items() if k not in ("cv_auc", "cv_se")}
        best_auc.append(best)
        out["gemma_best_auc"] = (refit(rows, y, best, calibrate), _features(feats, "gemma", best))
        out["gemma_temperature"] = (refit(rows, y, router.params, _temperature_calibrated),
                                    _features(feats, "gemma", router.params))
        return out

    def refit(rows: dict, y: list[str], params: dict, calibrate_with):
        """The Gemma head at ``params``, fitted on ``rows`` and calibrated by ``calibrate_with``
        on its out-of-fold predictions, as fit_selected does for the params it chooses."""
        x, hyper = rows["gemma"][params["layer"]], {k: v for k, v in params.items() if k in HYPER}
        _, oof, _ = cross_validate(x, y, config.gemma_classifier, folds=config.folds, seed=config.seed, **hyper)
        return calibrate_with(fit_head(config.gemma_classifier, x, y, seed=config.seed, **hyper), oof, y)

    splits = ("question", "domain") if args.split == "both" else (args.split,)
    report = {"outcomes": args.outcomes, "questions": len(questions), "encode_s": seconds}
    for by in splits:
        t0 = time.perf_counter()
        folds = outer_folds(questions, args.folds, config.seed, by)
        scores = {name: np.zeros(len(questions)) for name in NAMES}
        decided = {name: np.empty(len(questions), dtype=object) for name in NAMES}
        for fold in range(args.folds):
            held = folds == fold
            for name, (head, x) in fit_fold(~held).items():
                proba = head.proba(x[held])
                scores[name][held], decided[name][held] = p_complex(proba), head.decide(proba)
            print(f"{by}: fold {fold + 1}/{args.folds} ({int(held.sum())} held-out rows, router's head "
                  f"{chosen[-1]}, best-AUC head {best_auc[-1]}) {time.perf_counter() - t0:.0f} s", flush=True)
        rng = np.random.default_rng(0)
        random = np.mean([ev.crossfit_apgr(rng.random(len(folds)), med, large, folds) for _ in range(20)])
        rows = []
        for name, label in NAMES.items():
            mix = ev.policy_mix(list(decided[name]))
            row = {"router": label, "apgr": ev.crossfit_apgr(scores[name], med, large, folds),
                   "per fold": " ".join(f"{ev.apgr_weighted(scores[name][folds == f], med[folds == f], large[folds == f]):.3f}"
                                        for f in range(args.folds)),
                   "ece": ev.expected_calibration_error(scores[name], policies == COMPLEX),
                   "decides S/C/A": "/".join(f"{v:.2f}" for v in mix.values())}
            if name != "gemma":
                d = ev.paired_bootstrap(table, scores["gemma"], scores[name], resamples=args.resamples, folds=folds)
                row["router - this"] = f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            rows.append(row)
        best = max(BASELINES, key=lambda b: ev.crossfit_apgr(scores[b], med, large, folds))
        d = ev.paired_bootstrap(table, scores["gemma"], scores[best], resamples=args.resamples, folds=folds)
        frame = pd.DataFrame(rows).round(3).fillna("")
        print(f"\n## {by}: {args.folds} outer folds of {np.bincount(folds).tolist()} rows "
              f"({time.perf_counter() - t0:.0f} s)\n")
        print(frame.to_markdown(index=False))
        print(f"labels' mix S/C/A: {'/'.join(f'{v:.2f}' for v in ev.policy_mix(list(policies)).values())}; "
              f"random (mean of 20) {random:.3f}")
        for name in ("gemma", *BASELINES):
            print(f"{name if name != 'gemma' else 'router'} APGR {ev.crossfit_apgr(scores[name], med, large, folds):.3f}")
        print(f"router - best baseline ({best}) {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]", flush=True)
        report[by] = {"folds": folds.tolist(), "table": rows, "random": random, "best_baseline": best,
                      "router_minus_best": d, "per_query": {"qid": list(questions["qid"]),
                                                            **{n: s.tolist() for n, s in scores.items()}}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossfit_quality.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out / 'crossfit_quality.json'}")
    return 0


def _temperature_calibrated(head, oof: np.ndarray, policies: list[str]):
    """The earlier calibration, for the ablation: one temperature over all three
    policies' log-probabilities and a bias per policy (minimum log-loss on the
    out-of-fold predictions). Head.proba still reads heads calibrated this way."""
    from scipy.optimize import minimize

    from router_pipeline.heads import _scaled
    from router_pipeline.policies import POLICIES

    y = np.array([POLICIES.index(p) for p in policies])
    prior = np.bincount(y, minlength=len(POLICIES)) / len(y)

    def loss(theta):
        q = _scaled(oof, float(np.exp(theta[0])), np.concatenate([[0.0], theta[1:]]))
        return -np.mean(np.log(np.maximum(q[np.arange(len(y)), y], 1e-12)))

    theta = minimize(loss, np.zeros(len(POLICIES)), method="L-BFGS-B").x
    head.arrays.update(temperature=np.array(float(np.exp(theta[0]))), bias=np.concatenate([[0.0], theta[1:]]),
                       prior=prior)
    return head


def _features(feats: dict, name: str, params: dict) -> np.ndarray:
    return feats["gemma"][params["layer"]] if name == "gemma" else feats["minilm"]


if __name__ == "__main__":
    sys.exit(main())
