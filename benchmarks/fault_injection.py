"""Nothing paid for is lost: 1,000 Gemini calls with 20% injected faults, killed twice.

A local server speaking the Gemini protocol (router_pipeline.llm.fake_gemini) answers a
worker process that runs the pipeline's LLM runner over N prompts with the persistent
cache. One prompt in five gets a fault: 429 with Retry-After, 500, 503, a reply slower
than the client's timeout, or a blocked prompt. The worker is SIGKILLed after a third
and after two thirds of the prompts are settled, and started again each time. Prints

    rows lost N              prompts with no settled result after the last run (target 0)
    duplicate paid calls N   calls that arrived for a prompt whose result was already
                             cached (target 0)

plus the possibly-billed retries (a retry after a timeout: the server did finish the
first try), the kills and the wall time.

    python benchmarks/fault_injection.py [--n 1000] [--fault-rate 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from router_pipeline.llm.fake_gemini import FakeGemini, Fault
from router_pipeline.llm import RoleSpec
from router_pipeline.llm.types import cache_key

SPEC = RoleSpec("gemini", "gemini-2.5-flash", max_output_tokens=16)
TIMEOUT_S = 1.0


def prompts(n: int) -> list[str]:
    return [f"Fault-injection question {i}: what is {i} plus {i}?" for i in range(n)]


def worker(cache_path: str, n: int, out: str) -> None:
    from router_pipeline import settings
    from router_pipeline.llm import make_client
    from router_pipeline.llm.cache import ResponseCache
    from router_pipeline.llm.runner import RetryPolicy, complete_all

    cache = ResponseCache(cache_path)
    # The local server's address, as the pipeline's roles pass it (settings: GEMINI_BASE_URL).
    client = make_client(SPEC, gemini_base_url=settings.load().gemini_base_url, timeout_s=TIMEOUT_S)
    results, stats = complete_all(client, [SPEC.request(p) for p in prompts(n)], cache, concurrency=16,
                                  retry=RetryPolicy(max_attempts=6, base_delay_s=0.05, max_delay_s=1.0),
                                  progress=False)
    Path(out).write_text(json.dumps({"stats": stats.as_dict(), "statuses": Counter(r.status for r in results)}))


def settled(cache_path: Path) -> int:
    if not cache_path.exists():
        return 0
    with sqlite3.connect(cache_path, timeout=30) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--fault-rate", type=float, default=0.2)
    p.add_argument("--worker", nargs=2, metavar=("CACHE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.n, args.worker[1])
        return 0

    work = Path(tempfile.mkdtemp(prefix="fault-injection-"))
    cache_path = work / "cache.sqlite"
    texts = prompts(args.n)
    keys = {t: cache_key("gemini", SPEC.model, SPEC.request(t)) for t in texts}
    paid, duplicates = Counter(), []
    reader = {}

    def arrived(model: str, prompt: str) -> None:
        # Was this prompt's result already cached when the call came in? Then it is paid twice.
        db = reader.get("db") or sqlite3.connect(cache_path, timeout=30, check_same_thread=False)
        reader["db"] = db
        if db.execute("SELECT 1 FROM sqlite_master WHERE name='responses'").fetchone() and \
                db.execute("SELECT 1 FROM responses WHERE key = ?", (keys[prompt],)).fetchone():
            duplicates.append(prompt)

    def responder(model: str, prompt: str) -> str:
        paid[prompt] += 1
        return f"{2 * texts.index(prompt)}"

    kinds = [Fault(status=429, retry_after=0.05), Fault(status=500), Fault(status=503),
             Fault(delay_s=TIMEOUT_S + 0.5), Fault(blocked=True)]
    faulty = [t for i, t in enumerate(texts) if (i * 7919) % 100 < args.fault_rate * 100]
    t0 = time.perf_counter()
    kills = []
    with FakeGemini(responder=responder, latency_s=0.02, on_request=arrived) as fake:
        for i, t in enumerate(faulty):
            fake.add_faults(t, kinds[i % len(kinds)])
        env = {**os.environ, "GEMINI_BASE_URL": fake.base_url, "GEMINI_API_KEY": "fault-injection-not-secret"}
        out = work / "last_run.json"
        for kill_at in (args.n // 3, 2 * args.n // 3, None):
            proc = subprocess.Popen([sys.executable, __file__, "--n", str(args.n), "--worker", str(cache_path), str(out)],
                                    env=env)
            while proc.poll() is None:
                if kill_at is not None and settled(cache_path) >= kill_at:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills.append(settled(cache_path))
                    break
                time.sleep(0.05)
            if kill_at is None and proc.wait() != 0:
                print(f"error: the last worker run failed (exit {proc.returncode})", file=sys.stderr)
                return 1
        wall = time.perf_counter() - t0
        calls = len(fake.calls)
    last = json.loads(out.read_text())
    lost = args.n - settled(cache_path)
    print(f"prompts {args.n}, faulty {len(faulty)} ({args.fault_rate:.0%}), killed at {kills} settled rows")
    print(f"requests served {calls}, successful calls {sum(paid.values())}, "
          f"possibly-billed retries in the last run {last['stats']['possibly_billed_retries']}")
    print(f"last run: {last['stats']['cache_hits']} from the cache, {last['stats']['calls']} called, "
          f"statuses {last['statuses']}")
    print(f"rows lost {lost}")
    print(f"duplicate paid calls {len(duplicates)}")
    print(f"wall time {wall:.1f} s")
    return 0 if lost == 0 and not duplicates else 1


if __name__ == "__main__":
    sys.exit(main())
