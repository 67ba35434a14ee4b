"""Online or Batch API for a large label run? The same N prompts through a local
Gemini-protocol server (router_pipeline.llm.fake_gemini), once online and once through the
Batch API, each from an empty cache. The batch run meets faults (items the job fails or
leaves out) and is SIGKILLed while its job is pending, then started again. Prints

    online: calls, cost, rows lost
    batch:  jobs submitted, answered in the job, retried online, cost, rows lost,
            duplicate paid calls (a prompt answered twice)

    python benchmarks/batch_labelling.py [--n 1000] [--fault-rate 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from router_pipeline.llm.fake_gemini import FakeGemini, Fault
from router_pipeline.llm import RoleSpec

SPEC = RoleSpec("gemini", "gemini-2.5-pro", max_output_tokens=16)  # a judge-sized call on the large model


def prompts(n: int) -> list[str]:
    return [f"Batch question {i}: what is {i} times three?" for i in range(n)]


def worker(cache_path: str, n: int, batch: bool, out: str) -> None:
    from router_pipeline import settings
    from router_pipeline.llm import make_client
    from router_pipeline.llm.cache import ResponseCache
    from router_pipeline.llm.runner import RetryPolicy, complete_all

    client = make_client(SPEC, gemini_base_url=settings.load().gemini_base_url, timeout_s=5.0, batch=batch,
                         batch_poll_s=0.2)
    results, stats = complete_all(client, [SPEC.request(p) for p in prompts(n)], ResponseCache(cache_path),
                                  concurrency=16, retry=RetryPolicy(max_attempts=4, base_delay_s=0.05), progress=False)
    Path(out).write_text(json.dumps({"stats": stats.as_dict(), "statuses": Counter(r.status for r in results)}))


def run(fake: FakeGemini, work: Path, n: int, batch: bool, kill_when=None) -> dict:
    """The worker in a subprocess (SIGKILLed once when ``kill_when()`` says so, then
    started again); its last run's stats."""
    env = {**os.environ, "GEMINI_BASE_URL": fake.base_url, "GEMINI_API_KEY": "batch-benchmark-not-secret"}
    cache, out = work / f"cache-{batch}.sqlite", work / f"out-{batch}.json"
    cmd = [sys.executable, __file__, "--n", str(n), "--worker", str(cache), str(out), str(int(batch))]
    kills = 0
    while True:
        proc = subprocess.Popen(cmd, env=env)
        while proc.poll() is None:
            if kill_when is not None and not kills and kill_when():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                break
            time.sleep(0.05)
        if proc.returncode == 0:
            return {**json.loads(out.read_text()), "kills": kills, "cache": cache}
        if proc.returncode != -signal.SIGKILL:
            raise SystemExit(f"the worker failed (exit {proc.returncode})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--fault-rate", type=float, default=0.05, help="share of batch items the job fails or leaves out")
    p.add_argument("--worker", nargs=3, metavar=("CACHE", "OUT", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.n, bool(int(args.worker[2])), args.worker[1])
        return 0
    import sqlite3

    texts = prompts(args.n)
    work = Path(tempfile.mkdtemp(prefix="batch-labelling-"))
    answered = Counter()

    def responder(model: str, prompt: str) -> str:
        answered[prompt] += 1
        return str(3 * texts.index(prompt))

    lines = []
    for batch in (False, True):
        answered.clear()
        every = max(1, round(1 / args.fault_rate)) if args.fault_rate else 0
        dropped = tuple(f"question {i}:" for i in range(0, args.n, every * 2)) if every and batch else ()
        with FakeGemini(responder=responder, latency_s=0.02, batch_polls=20, batch_drop=dropped) as fake:
            if every and batch:
                for i in range(every, args.n, every * 2):
                    fake.add_faults(f"question {i}:", Fault(status=500))
            t0 = time.perf_counter()
            kill = (lambda: any(j["polls"] >= 5 for j in fake.batch_jobs.values())) if batch else None
            result = run(fake, work, args.n, batch, kill)
            wall = time.perf_counter() - t0
            with sqlite3.connect(result["cache"]) as db:
                settled = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            stats = result["stats"]
            jobs = len(fake.batch_jobs)
        duplicates = sum(c - 1 for c in answered.values() if c > 1)
        if batch:
            lines.append(f"batch:  {jobs} job(s) submitted, killed {result['kills']}x while pending; "
                         f"{stats['batch_calls']} answered in the job, {stats['batch_retried_online']} retried online; "
                         f"cost ${stats['cost_usd']:.4f}; rows lost {args.n - settled}; "
                         f"duplicate paid calls {duplicates}; {wall:.1f} s")
        else:
            lines.append(f"online: {stats['calls']} calls; cost ${stats['cost_usd']:.4f}; rows lost {args.n - settled}; "
                         f"duplicate paid calls {duplicates}; {wall:.1f} s")
            online_cost = stats["cost_usd"]
    print(f"{args.n} prompts to {SPEC.model}, from an empty cache each time")
    for line in lines:
        print(line)
    print(f"batch cost / online cost: {stats['cost_usd'] / online_cost:.2f}")
    print(f"rows lost {args.n - settled}")
    print(f"duplicate paid calls {duplicates}")
    return 0 if settled == args.n and not duplicates else 1


if __name__ == "__main__":
    sys.exit(main())
