"""Routing latency of the offline Gemma 3 270M router on CPU: fast vs reasoning mode.

For each (mode, batch size) a fresh process routes the same SimpleQA queries and
reports p50/p95 latency per call (one call = one batch), queries per second and the
process's peak RSS. Target (issue 4): fast mode >= 10x faster than reasoning at batch 1.

    python benchmarks/routing_latency.py                 # the released adapter router if there is one
                                                         # (head routers: benchmarks/routing_quality.py)
    python benchmarks/routing_latency.py --queries 48 --adapter artifacts/adapters/dpo
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


def measure(mode: str, batch: int, n: int, adapter: str | None, max_new_tokens: int) -> dict:
    from router_pipeline.artifacts import ADAPTER_CONFIG
    from router_pipeline.serve.cli import default_router_dir
    from router_pipeline.local_models import GEMMA3_270M
    from router_pipeline.questions import load_questions
    from router_pipeline.routing import Router, RouterConfig

    adapter = adapter or default_router_dir()
    if adapter and not (Path(adapter) / ADAPTER_CONFIG).exists():  # a released head router has no modes
        adapter = None
    queries = list(load_questions(sample_size=n, sample_seed=7)[0]["query"])
    cfg = RouterConfig(mode=mode, batch_size=batch, max_new_tokens=max_new_tokens)
    router = Router(adapter, base_model=None if adapter else GEMMA3_270M, config=cfg)
    router.route_batch(queries[:batch])  # warm-up
    times = []
    start = time.perf_counter()
    for lo in range(0, len(queries), batch):
        t0 = time.perf_counter()
        router.route_batch(queries[lo:lo + batch])
        times.append((time.perf_counter() - t0) * 1000)
    wall = time.perf_counter() - start
    return {"mode": mode, "batch": batch, "queries": len(queries), "router": str(adapter or "base model"),
            "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "queries_per_s": len(queries) / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--adapter", default=None)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--one", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.queries, args.adapter, args.max_new_tokens)))
        return
    rows = []
    for mode in ("fast", "reasoning"):
        for batch in (1, 16):
            cmd = [sys.executable, __file__, "--one", mode, str(batch), "--queries", str(args.queries),
                   "--max-new-tokens", str(args.max_new_tokens)] + (["--adapter", args.adapter] if args.adapter else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{mode:9s} batch {batch:2d}: p50 {r['p50_ms']:8.1f} ms  p95 {r['p95_ms']:8.1f} ms  "
                  f"{r['queries_per_s']:7.2f} queries/s  peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
    fast1 = next(r for r in rows if r["mode"] == "fast" and r["batch"] == 1)
    slow1 = next(r for r in rows if r["mode"] == "reasoning" and r["batch"] == 1)
    print(f"router: {fast1['router']}; {fast1['queries']} queries; max_new_tokens {args.max_new_tokens}")
    print(f"fast vs reasoning at batch 1: {slow1['p50_ms'] / fast1['p50_ms']:.1f}x lower p50 latency "
          f"(target >= 10x)")


if __name__ == "__main__":
    main()
