"""Does the router learn? Routing quality on recorded outcomes, through the pipeline's own assets.

Runs the Dagster assets in-process on an outcomes file (``outcomes`` source, every
row): the 80/20 split, labels, datasets, SFT, DPO, then ``router_evaluation`` of the
SFT adapter and of the SFT+DPO adapter on the same test split. Prints one table
(APGR, CPT50, CPT80, policy accuracy, large-call share) for the router after SFT,
after SFT+DPO, at its calibrated threshold, and for random (mean of seeds), MiniLM
k-NN / logistic and the oracle; then each stage's rows, steps, wall time and peak
memory, and routing latency. Writes the table as JSON and the cost-quality plots as PNG.

    python benchmarks/routing_quality.py                      # the MMLU dev outcomes beside the repo
    python benchmarks/routing_quality.py my_outcomes.csv --sft-rows 2000 --dpo-rows 600
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


def latency(adapter: Path, queries: list[str]) -> dict:
    import numpy as np

    from router_pipeline.routing import Router, RouterConfig

    router = Router(adapter, config=RouterConfig(batch_size=1))
    router.route(queries[0])  # warm-up
    times = []
    for q in queries:
        t0 = time.perf_counter()
        router.route(q)
        times.append((time.perf_counter() - t0) * 1000)
    return {"queries": len(queries), "p50_ms": round(float(np.percentile(times, 50)), 1),
            "p95_ms": round(float(np.percentile(times, 95)), 1), "device": router.device}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", nargs="?", default=str(DEFAULT_OUTCOMES), help="outcomes file (CSV/JSONL/Parquet)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "routing_quality"))
    p.add_argument("--sft-rows", type=int, default=1200, help="SFT examples (a seeded sample of the training rows)")
    p.add_argument("--dpo-rows", type=int, default=128, help="DPO pairs (a seeded sample)")
    p.add_argument("--epochs", type=float, default=1.0)
    args = p.parse_args(argv)
    if not Path(args.outcomes).exists():
        print(f"error: outcomes file not found: {args.outcomes}", file=sys.stderr)
        return 2
    out = Path(args.out)
    shutil.rmtree(out / "artifacts", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["ROUTER_PIPELINE_ARTIFACTS"] = str(out / "artifacts")  # a clean pipeline per run

    import pandas as pd

    from router_pipeline.artifacts import SUMMARY_FILE, Artifacts
    from router_pipeline.routing import adapter_meta

    layout = Artifacts(out / "artifacts")

    data_keys = ["questions", "train_questions", "test_questions", "answers", "judgments", "oracle_labels",
                 "council_labels", "query_analyses", "training_examples", "sft_dataset", "dpo_dataset"]
    stages: dict = {}
    t_all = time.perf_counter()
    quiet = {"compute": {"config": {"progress": False}}}
    run_stage("data", data_keys, {"ops": {"questions": {"config": {"source": "outcomes", "path": args.outcomes,
                                                                   "sample_size": 0}}}, "resources": quiet}, stages)
    train_cfg = {"epochs": args.epochs, "save_steps": 10_000}
    run_stage("sft", ["sft_adapter"], {"ops": {"sft_adapter": {"config": {**train_cfg, "max_rows": args.sft_rows}}}}, stages)
    run_stage("dpo", ["dpo_adapter"], {"ops": {"dpo_adapter": {"config": {**train_cfg, "max_rows": args.dpo_rows}}}}, stages)
    summaries = {}
    for adapter in ("sft", "dpo"):
        run_stage(f"evaluate_{adapter}", ["router_evaluation"],
                  {"ops": {"router_evaluation": {"config": {"adapter": adapter}}}, "resources": quiet}, stages,
                  must_succeed=False)
        summaries[adapter] = pd.read_csv(layout.evaluation(adapter) / SUMMARY_FILE).set_index("router")
        shutil.copy2(out / "artifacts" / "plots" / "cost_quality.png", out / f"cost_quality_{adapter}.png")
    for stage in ("sft", "dpo"):
        meta = adapter_meta(layout.adapter(stage))
        stages[stage].update(rows=meta["rows"], steps=meta["result"]["steps"],
                             examples_seen=meta["result"]["examples_seen"], device=meta["result"]["device"],
                             **{k: round(v, 3) for k, v in meta["result"]["metrics"].items()})

    sft, dpo = summaries["sft"], summaries["dpo"]
    served = "router @ calibrated threshold"
    baselines = [n for n in dpo.index if n.startswith(("random", "knn", "logistic", "oracle"))]
    rows = {"router (SFT)": sft.loc["router"], "router (SFT+DPO)": dpo.loc["router"],
            "router (SFT+DPO) @ calibrated": dpo.loc[served], **{n: dpo.loc[n] for n in baselines}}
    table = []
    for name, r in rows.items():
        share = r["large_share"] if name.endswith("calibrated") or not name.startswith("router") else None
        table.append({"router": name, "apgr": r.get("apgr"), "cpt50": r.get("cpt50"), "cpt80": r.get("cpt80"),
                      "policy_accuracy": r.get("policy_accuracy"), "correct": r["correct"], "large_share": share})
    frame = pd.DataFrame(table)
    # The calibrated router ranks by the same score as the router: its curve figures are the router's.
    calibrated = frame["router"] == "router (SFT+DPO) @ calibrated"
    for col in ("apgr", "cpt50", "cpt80", "policy_accuracy"):
        frame.loc[calibrated, col] = float(dpo.loc["router", col])
    frame.loc[frame["router"] == "router (SFT)", "large_share"] = float(sft.loc[served, "large_share"])
    frame.loc[frame["router"] == "router (SFT+DPO)", "large_share"] = float(dpo.loc[served, "large_share"])
    lat = latency(layout.adapter("dpo"), list(pd.read_parquet(out / "artifacts" / "assets" / "test_questions.parquet")["query"][:32]))
    report = {"outcomes": args.outcomes, "table": frame.round(4).to_dict("records"), "stages": stages,
              "latency_batch1": lat, "total_wall_s": round(time.perf_counter() - t_all, 1),
              "train_plus_dpo_wall_s": round(stages["sft"]["wall_s"] + stages["dpo"]["wall_s"], 1)}
    (out / "routing_quality.json").write_text(json.dumps(report, indent=2, default=float))

    print()
    print(frame.to_markdown(index=False, floatfmt=".3f"))
    print()
    for name, s in stages.items():
        print(f"{name:14s} " + ", ".join(f"{k} {v}" for k, v in s.items()))
    print(f"routing latency (batch 1, {lat['device']}): p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms")
    print(f"SFT+DPO wall time {report['train_plus_dpo_wall_s'] / 60:.1f} min (budget 30 min on 2 CPU cores)")
    apgr = dict(zip(frame["router"], frame["apgr"]))
    print(f"router APGR {apgr['router (SFT+DPO)']:.3f}")
    print(f"router SFT APGR {apgr['router (SFT)']:.3f}")
    for kind in ("logistic", "knn"):
        name = next(n for n in apgr if n.startswith(kind))
        print(f"{kind} APGR {apgr[name]:.3f}")
    print(f"wrote {out / 'routing_quality.json'}, {out / 'cost_quality_dpo.png'}, {out / 'cost_quality_sft.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
