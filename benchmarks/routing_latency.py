"""Routing latency on CPU: the fast path against the fp32 reference, in one run.

For each precision a fresh process loads the router (default: the released one) and
routes the same queries: one at a time (p50/p95 per decision), then in batches of 8
and 32 (decisions per second). The parent compares the two processes' decisions:
share of identical policies, max and mean |difference| of P(Complex_Query).
Targets (issue 18): fast p50 at batch 1 <= 50 ms on 2 cores; >= 99% identical policies.

    python benchmarks/routing_latency.py                       # the released router
    python benchmarks/routing_latency.py --router artifacts/heads/gemma --queries 512

Only head routers on Gemma have a fast path; a LoRA adapter routes in fp32 both times.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fast")
BATCHES = (8, 32)


def measure(router_dir: str, precision: str, n: int) -> dict:
    from router_pipeline.labels.questions import load_questions
    from router_pipeline.routers.contract import RouterConfig
    from router_pipeline.routers.registry import load_router

    queries = list(load_questions(sample_size=n, sample_seed=7)[0]["query"])
    t0 = time.perf_counter()
    router = load_router(router_dir, RouterConfig(precision=precision, batch_size=max(BATCHES)))
    load_s = time.perf_counter() - t0
    router.route_batch(queries[:8])  # warm-up
    times, decisions = [], []
    for q in queries:
        t0 = time.perf_counter()
        decisions += router.route_batch([q])
        times.append((time.perf_counter() - t0) * 1000)
    throughput = {}
    for batch in BATCHES:
        t0 = time.perf_counter()
        for lo in range(0, len(queries), batch):
            router.route_batch(queries[lo:lo + batch])
        throughput[batch] = len(queries) / (time.perf_counter() - t0)
    return {"precision": getattr(router, "precision", "fp32"), "queries": len(queries), "load_s": load_s,
            "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "per_s": throughput, "policies": [d.policy for d in decisions],
            "p_complex": [d.p_complex for d in decisions],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def agreement(ref: dict, fast: dict) -> dict:
    same = np.mean([a == b for a, b in zip(ref["policies"], fast["policies"])])
    diff = np.abs(np.asarray(ref["p_complex"], float) - np.asarray(fast["p_complex"], float))
    return {"identical_policies": float(same), "max_abs_dp": float(np.nanmax(diff)),
            "mean_abs_dp": float(np.nanmean(diff))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", help="a router folder (default: the released router)")
    p.add_argument("--queries", type=int, default=256, help="SimpleQA queries (a seeded sample)")
    p.add_argument("--out", help="write every figure as JSON here")
    p.add_argument("--one", metavar="PRECISION", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.router is None:
        from router_pipeline.artifacts import Artifacts

        found = Artifacts.from_settings().default_router()
        if found is None:
            sys.exit("no released router: run the main job first, or pass --router")
        args.router = str(found)
    if args.one:
        print(json.dumps(measure(args.router, args.one, args.queries)))
        return
    rows = {}
    for precision in PRECISIONS:
        cmd = [sys.executable, __file__, "--one", precision, "--router", args.router, "--queries", str(args.queries)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = rows[precision] = json.loads(out.strip().splitlines()[-1])
        print(f"{precision:5s} ({r['precision']}): batch 1 p50 {r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  "
              + "  ".join(f"batch {b} {r['per_s'][str(b)]:6.1f}/s" for b in BATCHES)
              + f"  load {r['load_s']:.1f} s  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    agree = agreement(rows["fp32"], rows["fast"])
    print(f"router {args.router}; {rows['fast']['queries']} queries; 1 process each, same queries")
    print(f"fast vs fp32: identical policies {agree['identical_policies']:.1%} (target >= 99%), "
          f"|P(Complex) difference| max {agree['max_abs_dp']:.4f} mean {agree['mean_abs_dp']:.5f}")
    print(f"fast p50 at batch 1 {rows['fast']['p50_ms']:.1f} ms (target <= 50 ms); "
          f"{rows['fp32']['p50_ms'] / rows['fast']['p50_ms']:.1f}x fp32's")
    if args.out:
        Path(args.out).write_text(json.dumps({"router": args.router, "runs": rows, "agreement": agree}, indent=2))


if __name__ == "__main__":
    main()
