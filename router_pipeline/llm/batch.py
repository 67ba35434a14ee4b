"""The Gemini Batch API for large label runs: half the online price, results within a day.

``run_batch`` takes requests that are not cached yet and:

1. resumes this model's jobs that an earlier run left pending (their names are in the
   cache database), instead of submitting them a second time;
2. submits one job for the rest (inlined requests, each tagged with its cache key),
   and records its name before polling;
3. polls every ``poll_s`` with a progress bar until every job has ended;
4. caches each result at once at batch prices, matched back to its request by key
   (the order of a job's output is not relied on).

What a job failed, or left out of its output, is returned as missing: the runner calls
it online (``runner.complete_all``).
"""

from __future__ import annotations

import asyncio
import time

from tqdm.auto import tqdm

from router_pipeline.llm.pricing import cost_usd
from router_pipeline.llm.types import CACHEABLE, LLMRequest, LLMResult

BATCH_DISCOUNT = 0.5  # Gemini's batch price: half the online price


async def run_batch(client, keyed: dict[str, LLMRequest], cache, *, poll_s: float, progress: bool = True,
                    desc: str = "llm") -> dict[str, LLMResult]:
    """{key: result} for the keys a batch job settled (ok, empty or blocked), cached."""
    jobs = {name: [k for k in keys if k in keyed] for name, keys in cache.open_batches(client.model)}
    jobs = {name: keys for name, keys in jobs.items() if keys}
    covered = {k for keys in jobs.values() for k in keys}
    fresh = [k for k in keyed if k not in covered]
    if fresh:
        name = await client.batch_create([(k, keyed[k]) for k in fresh])
        cache.record_batch(name, client.model, fresh)
        jobs[name] = fresh
    settled: dict[str, LLMResult] = {}
    bar = tqdm(total=sum(len(k) for k in jobs.values()), desc=f"{desc} (batch: {len(jobs)} job(s))",
               disable=not progress, leave=False)
    start = time.monotonic()
    try:
        while jobs:
            states = {}
            for name in list(jobs):
                state, results = await client.batch_get(name)
                states[name] = state
                if results is None:
                    continue
                for key, result in results.items():
                    if key in keyed and result.status in CACHEABLE:
                        result.cost_usd = cost_usd(result.input_tokens, result.output_tokens, client.price) * BATCH_DISCOUNT
                        result.meta["batch_job"] = name
                        cache.put(key, result)  # at once: a run killed now keeps what the job paid for
                        settled[key] = result
                cache.finish_batch(name)
                bar.update(len(jobs.pop(name)))
            if jobs:
                bar.set_postfix_str(f"{', '.join(sorted(set(states.values())))}; {time.monotonic() - start:.0f} s")
                await asyncio.sleep(poll_s)
    finally:
        bar.close()
    return settled
