"""Which head router recipe? Each choice alone and together, on the pipeline's own split.

Encodes every question of an outcomes file once with frozen Gemma 3 270M (the raw
output of blocks 3, 6, 9, 12 and 18; mean over the query's tokens and the last
position) and with MiniLM, splits exactly as the pipeline does (80/20 by question or
by domain; the validation slice held out), then fits each variant on the training
rows with the pipeline's own code (head_training.fit_selected: cross-validation on
the training rows, calibration on out-of-fold predictions) and scores it on the test
rows: APGR with a paired-bootstrap 95% interval against the default recipe and
against MiniLM logistic, ECE of P(Complex_Query), and the policy mix it decides. The
classifier (shrinkage LDA or logistic regression) is varied on both encoders; two
variants use more of Gemma (blocks 3, 6 and 9 side by side) and both encoders
(the mean of the default recipe's and the MiniLM baseline's probabilities).
benchmarks/crossfit_quality.py scores the main variants on every row, with tighter
intervals.

    python benchmarks/head_ablation.py                    # MMLU dev outcomes, split by question
    python benchmarks/head_ablation.py --split domain
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTCOMES = ROOT.parent / "shared" / "data" / "routing_outcomes" / "mmlu_dev_outcomes.csv"
LAYERS = (3, 6, 9, 12, 18)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", nargs="?", default=str(DEFAULT_OUTCOMES))
    p.add_argument("--split", choices=("question", "domain"), default="question")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "head_ablation"))
    args = p.parse_args(argv)

    from router_pipeline.evaluation import metrics as ev
    from router_pipeline.routers.features import GemmaSpec, GemmaStates, MiniLM
    from router_pipeline.training.heads import HeadConfig, _cv_possible, fit_selected, grid
    from router_pipeline.routers.head import p_complex
    from router_pipeline.policies import COMPLEX, oracle_cell
    from router_pipeline.labels.questions import load_questions
    from router_pipeline.labels.split import TEST, assign_split, validation_mask

    questions, _ = load_questions("outcomes", path=args.outcomes, sample_size=0)
    side = assign_split(questions, 0.2, 42, args.split)
    domains = questions["topic"] if args.split == "domain" else None
    train_all = side != TEST
    # The validation slice of the training rows, as training_examples holds it out.
    val = validation_mask(questions["qid"][train_all], 0.1, 42, None if domains is None else domains[train_all])
    val = val.reindex(questions.index, fill_value=False).astype(bool)
    train, test = (train_all & ~val).to_numpy(), (side == TEST).to_numpy()
    table = questions.rename(columns={"medium_grade": "medium_label", "large_grade": "large_label"})
    table = table.assign(medium_cost=np.nan, large_cost=np.nan)
    policies = np.array([oracle_cell(m, g).policy for m, g in zip(table["medium_label"], table["large_label"])])
    test_table = table[test].reset_index(drop=True)
    print(f"{args.outcomes}: split by {args.split}, {train.sum()} training, {int(val.sum())} validation, "
          f"{test.sum()} test rows", flush=True)

    t0 = time.perf_counter()
    gemma = GemmaStates(GemmaSpec(layer=max(LAYERS), pooling="mean+last"))
    by_layer = gemma.encode_layers(list(questions["query"]), list(LAYERS), progress=True)
    gemma_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    minilm = MiniLM().encode(list(questions["query"]))
    minilm_s = time.perf_counter() - t0
    width = gemma.model.config.hidden_size
    feats = {("gemma", layer, pool): x[:, sl] for layer, x in by_layer.items()
             for pool, sl in (("mean", slice(0, width)), ("last", slice(width, None)), ("mean+last", slice(None)))}
    feats[("minilm", 0, "mean")] = minilm
    feats[("gemma", 0, "mean 3+6+9")] = np.concatenate([by_layer[layer][:, :width] for layer in (3, 6, 9)], axis=1)
    print(f"encoded: Gemma to block {max(LAYERS)} {gemma_s:.0f} s, MiniLM {minilm_s:.0f} s", flush=True)

    d = HeadConfig()
    y = list(policies[train])
    cv = _cv_possible(y, d.folds)
    C, LDA = ("logistic", [{"c": c} for c in d.c_values]), ("lda", grid("lda", d))

    def variant(encoder, layers, pool, fit, calibrated=True, cost=None):
        classifier, hyper = fit
        tried = [{"layer": layer, **h} for layer in layers for h in hyper]
        f = fit_selected(lambda q: feats[(encoder, q["layer"], pool)][train], y, classifier, tried,
                         cv=cv, folds=d.folds, seed=d.seed, cost=cost)
        head, params, auc = f.head, f.params, f.cv_auc
        x = feats[(encoder, params["layer"], pool)][test]
        proba = head.proba(x) if calibrated else head.raw_proba(x)
        return {"params": params, "cv_auc": auc, "proba": proba, "head": head,
                "policy": head.decide(proba) if calibrated else [["Standard_Query", "Complex_Query",
                                                                  "Ambiguous_Query"][i] for i in proba.argmax(1)]}

    one = ("logistic", [{"c": 1.0}])
    variants = {
        "MiniLM logistic, C=1 (the old baseline)": variant("minilm", [0], "mean", one),
        "MiniLM logistic, C by CV (the baseline now)": variant("minilm", [0], "mean", C),
        "MiniLM LDA, shrinkage by CV": variant("minilm", [0], "mean", LDA),
        "Gemma block 18, last position, C=1 (frozen probe as first measured)": variant("gemma", [18], "last", one),
        "Gemma block 18, mean, C by CV": variant("gemma", [18], "mean", C),
        "Gemma block 9, last position, C by CV": variant("gemma", [9], "last", C),
        "Gemma block 9, mean, C=1": variant("gemma", [9], "mean", one),
        "Gemma block 9, mean, C by CV": variant("gemma", [9], "mean", C),
        "Gemma mean+last, block and C by CV": variant("gemma", list(d.layers), "mean+last", C),
        "Gemma mean of blocks 3, 6 and 9 side by side, C by CV": variant("gemma", [0], "mean 3+6+9", C),
        "Gemma mean, block and C by CV, logistic (an older recipe)": variant("gemma", list(d.layers), "mean", C),
        "Gemma mean, LDA, fewest blocks within one SE of the best CV AUC (previous default)": variant(
            "gemma", list(d.layers), "mean", LDA, cost="layer"),
        "Gemma mean, block and shrinkage by best CV AUC, LDA, uncalibrated": variant(
            "gemma", list(d.layers), "mean", LDA, False),
        "Gemma mean, block and shrinkage by best CV AUC, LDA (default recipe)": variant(
            "gemma", list(d.layers), "mean", LDA),
    }
    default = "Gemma mean, block and shrinkage by best CV AUC, LDA (default recipe)"
    baseline = "MiniLM logistic, C by CV (the baseline now)"
    # Both encoders: the mean of the default recipe's and the MiniLM baseline's calibrated probabilities.
    both = (variants[default]["proba"] + variants[baseline]["proba"]) / 2
    variants["Average of the default recipe and MiniLM (C by CV)"] = {
        "params": {"of": [variants[default]["params"], variants[baseline]["params"]]}, "cv_auc": float("nan"),
        "proba": both, "policy": variants[default]["head"].decide(both)}  # the same training labels' priors
    oracle = [p == COMPLEX for p in ev.oracle_policies(test_table)]
    rows = []
    for name, v in variants.items():
        score = p_complex(v["proba"])
        vs_default = ev.paired_bootstrap(test_table, score, p_complex(variants[default]["proba"]),
                                         resamples=args.resamples)
        vs_base = ev.paired_bootstrap(test_table, score, p_complex(variants[baseline]["proba"]), resamples=args.resamples)
        mix = ev.policy_mix(v["policy"])
        rows.append({"variant": name, "params": json.dumps(v["params"]), "cv_auc": round(v["cv_auc"], 3),
                     "apgr": round(ev.apgr_weighted(score, test_table["medium_label"] == "Correct",
                                                    test_table["large_label"] == "Correct"), 3),
                     "vs default": f"{vs_default['diff']:+.3f} [{vs_default['lo']:+.3f}, {vs_default['hi']:+.3f}]",
                     "vs MiniLM (CV)": f"{vs_base['diff']:+.3f} [{vs_base['lo']:+.3f}, {vs_base['hi']:+.3f}]",
                     "ece": round(ev.expected_calibration_error(score, oracle), 3),
                     "mix S/C/A": "/".join(f"{mix[p]:.2f}" for p in mix)})
    frame = pd.DataFrame(rows)
    out = Path(args.out) / args.split
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_ablation.json").write_text(json.dumps({"outcomes": args.outcomes, "split": args.split,
                                                        "rows": rows, "label_mix": ev.policy_mix(
                                                            ev.oracle_policies(test_table))}, indent=1))
    print(frame.to_markdown(index=False))
    print("labels' mix S/C/A: " + "/".join(f"{v:.2f}" for v in ev.policy_mix(ev.oracle_policies(test_table)).values()))
    print(f"wrote {out / 'head_ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
