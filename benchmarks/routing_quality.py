"""Does the router earn its cost? Routing quality on recorded outcomes, through the pipeline's own assets.

Runs the Dagster assets on an outcomes file (``outcomes`` source, every row), each
stage in a fresh process: the split (by question, or ``--split domain``: whole
domains held out for test and validation), labels, the head routers (frozen Gemma
states; MiniLM LDA, logistic and k-NN), optionally SFT (and DPO) of the LM adapter, then
one ``router_evaluation`` of every candidate on the same test rows. Prints, per
router: APGR, validation APGR, CPT50/80, policy accuracy, ECE of P(Complex_Query),
the mix of policies it decides against the labels' mix; the paired-bootstrap 95%
interval of the LM router minus each other router; which candidate the pipeline
releases and why; each stage's wall time and peak memory; routing latency. Writes
everything as JSON (with every router's per-query scores) and the cost-quality plot.

    python benchmarks/routing_quality.py                          # MMLU dev outcomes, split by question
    python benchmarks/routing_quality.py --split domain           # unseen MMLU subjects
    python benchmarks/routing_quality.py --finetune sft+dpo       # add the fine-tuned LM adapters
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTCOMES = ROOT.parent / "shared" / "data" / "routing_outcomes" / "mmlu_dev_outcomes.csv"
LM_ROUTER = "gemma"  # the LM router: a head on frozen Gemma states (the default recipe)
BASELINES = ("minilm_lda", "logistic", "knn")  # every MiniLM head


def _materialise(keys, run_config, done):
    import dagster as dg

    from router_pipeline.definitions import build_defs

    job = build_defs().resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(k) for k in keys})
    done.put(job.execute_in_process(run_config=run_config, raise_on_error=False).success)


def run_stage(name, keys, run_config, stages, must_succeed=True):
    """One stage in a fresh process (spawned), so that its peak memory is its own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    t0 = time.perf_counter()
    child = ctx.Process(target=_materialise, args=(keys, run_config, done))
    child.start()
    peak, proc = 0, psutil.Process(child.pid)
    while child.is_alive():
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    child.join()
    success = done.get() if not done.empty() else False
    stages[name] = {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak / 2**30, 2),
                    "success": success}
    print(f"[{name}] {stages[name]}", flush=True)
    if must_succeed and not success:
        raise SystemExit(f"stage {name} failed: see the Dagster log above")


def latency(router_dir: Path, queries: list[str]) -> dict:
    import numpy as np

    from router_pipeline.routers.contract import RouterConfig
    from router_pipeline.routers.registry import load_router

    router = load_router(router_dir, RouterConfig(batch_size=1))
    router.route(queries[0])  # warm-up
    times = []
    for q in queries:
        t0 = time.perf_counter()
        router.route(q)
        times.append((time.perf_counter() - t0) * 1000)
    return {"queries": len(queries), "p50_ms": round(float(np.percentile(times, 50)), 1),
            "p95_ms": round(float(np.percentile(times, 95)), 1), "device": router.device}


def precision_check(head_dir: Path, test, work: Path) -> dict:
    """The LM router released as the pipeline releases it (its encoder exported), routed
    on the test rows through the fast path and through the fp32 reference: APGR of each
    and how many decisions agree."""
    import numpy as np

    from router_pipeline.evaluation.metrics import apgr_weighted
    from router_pipeline.routers.head import export_head_router
    from router_pipeline.policies import CORRECT
    from router_pipeline.routers.contract import RouterConfig
    from router_pipeline.routers.registry import load_router

    release = work / "release-check"
    shutil.rmtree(release, ignore_errors=True)
    shutil.copytree(head_dir, release)
    export_head_router(release)
    med, large = (test["medium_label"] == CORRECT).to_numpy(), (test["large_label"] == CORRECT).to_numpy()
    runs = {}
    for precision in ("fast", "fp32"):
        router = load_router(release, RouterConfig(precision=precision))
        decisions = router.route_batch(list(test["query"]), batch_size=32)
        runs[precision] = {"apgr": apgr_weighted([d.p_complex for d in decisions], med, large),
                           "policies": [d.policy for d in decisions],
                           "p_complex": np.array([d.p_complex for d in decisions])}
    shutil.rmtree(release, ignore_errors=True)
    return {"fast_apgr": runs["fast"]["apgr"], "fp32_apgr": runs["fp32"]["apgr"],
            "difference": runs["fast"]["apgr"] - runs["fp32"]["apgr"],
            "identical_policies": float(np.mean([a == b for a, b in zip(runs["fast"]["policies"],
                                                                         runs["fp32"]["policies"])])),
            "max_abs_dp": float(np.abs(runs["fast"]["p_complex"] - runs["fp32"]["p_complex"]).max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", nargs="?", default=str(DEFAULT_OUTCOMES), help="outcomes file (CSV/JSONL/Parquet)")
    p.add_argument("--split", choices=("question", "domain"), default="question",
                   help="question: seeded 80/20 by question; domain: whole domains (the file's domain/topic) held out")
    p.add_argument("--finetune", choices=("none", "sft", "sft+dpo"), default="none",
                   help="also train and evaluate the fine-tuned LM adapter(s) as candidates")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "routing_quality"))
    p.add_argument("--sft-rows", type=int, default=1200, help="SFT examples (a seeded sample of the training rows)")
    p.add_argument("--dpo-rows", type=int, default=128, help="DPO pairs (a seeded sample)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--resamples", type=int, default=2000, help="paired-bootstrap resamples")
    args = p.parse_args(argv)
    if not Path(args.outcomes).exists():
        print(f"error: outcomes file not found: {args.outcomes}", file=sys.stderr)
        return 2
    out = Path(args.out) / args.split
    shutil.rmtree(out / "artifacts", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["ROUTER_PIPELINE_ARTIFACTS"] = str(out / "artifacts")  # a clean pipeline per run

    import pandas as pd

    from router_pipeline.artifacts import EVALUATION_FILE, INTERVALS_FILE, SUMMARY_FILE, Artifacts
    from router_pipeline.evaluation.metrics import interval_between, policy_mix
    from router_pipeline.policies import POLICIES
    from router_pipeline.routers.lora import adapter_meta

    layout = Artifacts(out / "artifacts")
    data_keys = ["questions", "train_questions", "test_questions", "answers", "judgments", "oracle_labels",
                 "council_labels", "query_analyses", "training_examples"]
    finetuned = {"none": [], "sft": ["sft"], "sft+dpo": ["sft", "dpo"]}[args.finetune]
    if finetuned:
        data_keys += ["sft_dataset", "dpo_dataset"]
    stages: dict = {}
    t_all = time.perf_counter()
    quiet = {"compute": {"config": {"progress": False}}}
    run_stage("data", data_keys, {"ops": {"questions": {"config": {"source": "outcomes", "path": args.outcomes,
                                                                   "sample_size": 0}},
                                          "split_questions": {"config": {"by": args.split}}},
                                  "resources": quiet}, stages)
    run_stage("head_routers", ["head_routers"], {"resources": quiet}, stages)
    train_cfg = {"epochs": args.epochs, "save_steps": 10_000}
    rows = {"sft": args.sft_rows, "dpo": args.dpo_rows}
    for stage in finetuned:
        run_stage(stage, [f"{stage}_adapter"], {"ops": {f"{stage}_adapter": {"config": {**train_cfg,
                                                                                       "max_rows": rows[stage]}}}},
                  stages)
        meta = adapter_meta(layout.adapter(stage))
        stages[stage].update(rows=meta["rows"], steps=meta["result"]["steps"], device=meta["result"]["device"])
    candidates = [LM_ROUTER, *BASELINES, *finetuned]
    run_stage("evaluate", ["router_evaluation"],
              {"ops": {"router_evaluation": {"config": {"candidates": candidates,
                                                        "bootstrap_resamples": args.resamples}}},
               "resources": quiet}, stages, must_succeed=False)
    summary = pd.read_csv(layout.root / "evaluation" / SUMMARY_FILE).set_index("router")
    intervals = pd.read_csv(layout.root / "evaluation" / INTERVALS_FILE)
    per_query = pd.read_parquet(layout.assets / "router_evaluation.parquet")
    chosen = json.loads((layout.evaluation(per_query["candidate"].iloc[0]) / EVALUATION_FILE).read_text())
    heads = pd.read_parquet(layout.assets / "head_routers.parquet")
    shutil.copy2(layout.plots / "cost_quality.png", out / "cost_quality.png")
    test_queries = list(pd.read_parquet(layout.assets / "test_questions.parquet")["query"][:32])
    lat = {name: latency(layout.candidate(name), test_queries) for name in (LM_ROUTER, "logistic")}
    test = per_query[["query", "medium_label", "large_label"]]
    precision = precision_check(layout.candidate(LM_ROUTER), test, out)

    names = {"gemma": "router (Gemma head)", "minilm_lda": "LDA on MiniLM", "logistic": "logistic (MiniLM)",
             "knn": "k-NN (MiniLM)",
             "sft": "router SFT (LoRA)", "dpo": "router SFT+DPO (LoRA)"}
    table = []
    for name in candidates + ["oracle", next(n for n in summary.index if n.startswith("random"))]:
        r = summary.loc[name]
        table.append({"router": names.get(name, name), "apgr": r.get("apgr"), "val_apgr": r.get("validation_apgr"),
                      "cpt50": r.get("cpt50"), "cpt80": r.get("cpt80"), "policy_acc": r.get("policy_accuracy"),
                      "ece": r.get("ece_p_complex"), "served_large": r.get("served_large_share"),
                      **{f"mix_{p.split('_')[0]}": r.get(f"mix_{p}") for p in POLICIES}})
    frame = pd.DataFrame(table)
    labels = policy_mix(per_query["oracle_policy"])
    best_baseline = max(BASELINES, key=lambda n: summary.loc[n, "apgr"])
    comparisons = {other: interval_between(intervals, LM_ROUTER, other) for other in candidates if other != LM_ROUTER}
    examples = pd.read_parquet(layout.assets / "training_examples.parquet")
    split_info = {"test_rows": len(per_query), "validation_rows": int(chosen["validation_questions"]),
                  "training_rows": int((examples["split"] == "train").sum())}
    train_wall = sum(stages[s]["wall_s"] for s in ["head_routers", *finetuned])
    report = {"outcomes": args.outcomes, "split": args.split, "candidates": candidates, "table": frame.to_dict("records"),
              "label_mix": labels, "intervals": intervals.to_dict("records"),
              "lm_router_vs": comparisons, "best_baseline": best_baseline, "released": chosen,
              "heads": heads.to_dict("records"), "stages": stages, "latency_batch1": lat, "precision": precision,
              **split_info,
              "training_wall_s": round(train_wall, 1), "total_wall_s": round(time.perf_counter() - t_all, 1),
              "per_query": per_query.drop(columns=["query"]).to_dict("records")}
    (out / "routing_quality.json").write_text(json.dumps(report, indent=1, default=float))

    print()
    print(f"outcomes {args.outcomes}, split by {args.split}: {split_info['training_rows']} training, "
          f"{split_info['validation_rows']} validation, {len(per_query)} test rows")
    print(frame.to_markdown(index=False, floatfmt=".3f"))
    print("labels' policy mix (test): " + ", ".join(f"{p} {v:.3f}" for p, v in labels.items()))
    print()
    for name, s in stages.items():
        print(f"{name:14s} " + ", ".join(f"{k} {v}" for k, v in s.items()))
    for h in heads.to_dict("records"):
        print(f"head {h['head']}: {h['params']} (CV AUC {h['cv_auc']:.3f}), encode {h['encode_s']} s, fit {h['fit_s']} s")
    for name, l in lat.items():
        print(f"routing latency {name} (batch 1, {l['device']}): p50 {l['p50_ms']} ms, p95 {l['p95_ms']} ms")
    print(f"router through its exported fast path: APGR {precision['fast_apgr']:.3f}, fp32 reference "
          f"{precision['fp32_apgr']:.3f}, difference {precision['difference']:+.4f} (target |d| <= 0.005); "
          f"identical policies {precision['identical_policies']:.1%}, max |dP(Complex)| {precision['max_abs_dp']:.4f}")
    print(f"training wall time {train_wall / 60:.1f} min (budget 30 min on 2 CPU cores)")
    print(f"chosen for release: {chosen['candidate']} ({chosen.get('why')}); released_router runs only if the "
          "evaluation's blocking checks pass")
    print()
    print(f"router APGR {summary.loc[LM_ROUTER, 'apgr']:.3f}")
    for name in finetuned:
        print(f"router {name.upper()} APGR {summary.loc[name, 'apgr']:.3f}")
    for name in BASELINES:
        print(f"{name} APGR {summary.loc[name, 'apgr']:.3f}")
    for other, c in comparisons.items():
        print(f"router - {other} {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]")
    c = comparisons[best_baseline]
    print(f"router - best baseline {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] (best baseline: {best_baseline})")
    print(f"wrote {out / 'routing_quality.json'}, {out / 'cost_quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
