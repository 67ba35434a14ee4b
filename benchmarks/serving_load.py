"""Load on the routing server: how much latency does the router add, and what do dynamic
batching and the prefix cache buy?

Starts ``router-pipeline serve`` (a subprocess, as in production) in front of a local
Gemini-protocol server (both tiers, ``--backend-latency-ms`` each), then sends
``--requests`` chat completions with the `openai` client at ``--concurrency``, once per
configuration, side by side in one run:

    batching + prefix cache (the default) | batching only | prefix cache only | neither

and prints, per configuration, throughput, the router's overhead (arrival to decision,
queueing included: the ``routing.router_ms`` each reply carries) p50/p95/p99, the
end-to-end latency, and ``errors N`` on a line of its own.

    python benchmarks/serving_load.py                     # the released router (artifacts/router)
    python benchmarks/serving_load.py --requests 500 --configs default,neither
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

CONFIGS = {
    "batching+prefix": [],
    "batching only": ["--no-prefix-cache"],
    "prefix only": ["--no-batching"],
    "neither": ["--no-batching", "--no-prefix-cache"],
}
SHORT = {"default": "batching+prefix", "batching": "batching only", "prefix": "prefix only", "neither": "neither"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(adapter: str, flags: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = Path(sys.executable).with_name("router-pipeline")
    proc = subprocess.Popen([str(exe), "serve", "--adapter", adapter, "--port", str(port), *flags], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start in 120 s: see {log}")


async def _load(url: str, queries: list[str], concurrency: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="benchmark", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    router_ms, total_ms, errors = [], [], []

    async def one(q: str):
        async with gate:
            t0 = time.perf_counter()
            try:
                reply = await client.chat.completions.create(model="router", messages=[{"role": "user", "content": q}])
                router_ms.append(reply.model_extra["routing"]["router_ms"])
                total_ms.append((time.perf_counter() - t0) * 1000)
            except Exception as exc:  # counted, and the first few shown
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(q) for q in queries))
    wall = time.perf_counter() - t0
    await client.close()
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 1) if xs else None  # noqa: E731
    return {"requests": len(queries), "wall_s": round(wall, 1), "throughput_rps": round(len(total_ms) / wall, 2),
            "router_p50_ms": pct(router_ms, 50), "router_p95_ms": pct(router_ms, 95), "router_p99_ms": pct(router_ms, 99),
            "total_p50_ms": pct(total_ms, 50), "total_p95_ms": pct(total_ms, 95), "errors": len(errors),
            "first_errors": errors[:3]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="router adapter (default: the released router, else the last DPO adapter)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--backend-latency-ms", type=float, default=20.0)
    p.add_argument("--configs", default="default,batching,prefix,neither",
                   help="comma-separated: default (batching+prefix), batching, prefix, neither")
    p.add_argument("--out", default="artifacts/benchmarks/serving_load.json")
    args = p.parse_args(argv)

    from router_pipeline.fake_gemini import FakeGemini
    from router_pipeline.questions import load_questions
    from router_pipeline.serve.cli import default_router_dir

    adapter = args.adapter or default_router_dir()
    if adapter is None:
        print("error: no router: run the main job (released_router) or pass --adapter", file=sys.stderr)
        return 2
    names = [SHORT[c.strip()] for c in args.configs.split(",")]
    questions = list(load_questions(sample_size=0)[0]["query"])
    queries = [questions[i % len(questions)] for i in range(args.requests)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    with FakeGemini(latency_s=args.backend_latency_ms / 1000) as fake:
        env = {**os.environ, "ROUTER_PIPELINE_PROFILE": "gemini", "GEMINI_BASE_URL": fake.base_url,
               "GEMINI_API_KEY": os.environ.get("GEMINI_API_KEY", "benchmark-key")}
        for name in names:
            proc, url = _start(str(adapter), CONFIGS[name], env, out.with_suffix(f".{name.split()[0]}.log"))
            try:
                asyncio.run(_load(url, queries[:min(64, len(queries))], args.concurrency))  # warm-up
                results[name] = asyncio.run(_load(url, queries, args.concurrency))
            finally:
                proc.terminate()
                proc.wait(30)
            r = results[name]
            print(f"[{name}] {r['requests']} requests in {r['wall_s']} s: {r['throughput_rps']} req/s; router overhead "
                  f"p50 {r['router_p50_ms']} / p95 {r['router_p95_ms']} / p99 {r['router_p99_ms']} ms; end to end "
                  f"p50 {r['total_p50_ms']} / p95 {r['total_p95_ms']} ms; errors {r['errors']}", flush=True)
            for e in r["first_errors"]:
                print(f"    {e}")
    out.write_text(json.dumps({"adapter": str(adapter), "concurrency": args.concurrency,
                               "backend_latency_ms": args.backend_latency_ms, "results": results}, indent=2))
    print()
    print("| configuration | req/s | router p50 ms | p95 | p99 | end-to-end p50 ms | p95 | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['throughput_rps']} | {r['router_p50_ms']} | {r['router_p95_ms']} | {r['router_p99_ms']} | "
              f"{r['total_p50_ms']} | {r['total_p95_ms']} | {r['errors']} |")
    print(f"errors {sum(r['errors'] for r in results.values())}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
