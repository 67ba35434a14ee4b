"""The Gemini Batch API for large label runs: half the online price, results within a day.

``run_batch`` takes requests that are not cached yet and:

1. resumes this model's jobs that an earlier run left pending (their names are in the
   cache database), instead of submitting them a second time;
2. submits one job for the rest (inlined requests, each tagged with its cache key),
   and records its name before polling;
3. polls every ``poll_s`` with a progress bar until every job has ended;
4. hands each result to ``on_result`` as soon as its job ends, matched back to its
   request by key (the order of a job's output is not relied on): the runner prices it
   at ``BATCH_DISCOUNT`` and caches it at once, so a run killed then keeps it.

What a job failed, or left out of its output, is returned as missing: the runner calls
it online (``runner.complete_all``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from tqdm.auto import tqdm

from router_pipeline.llm.types import CACHEABLE, LLMRequest, LLMResult

BATCH_DISCOUNT = 0.5  # Gemini's batch price: half the online price
log = logging.getLogger(__name__)


async def run_batch(client, keyed: dict[str, LLMRequest], cache, *, on_result: Callable[[str, LLMResult], None],
                    poll_s: float, progress: bool = True, desc: str = "llm") -> set[str]:
    """The keys a batch job settled (ok, empty or blocked), each handed to ``on_result``."""
    jobs = {name: [k for k in keys if k in keyed] for name, keys in cache.open_batches(client.model)}
    jobs = {name: keys for name, keys in jobs.items() if keys}
    covered = {k for keys in jobs.values() for k in keys}
    fresh = [k for k in keyed if k not in covered]
    if fresh:
        name = await client.batch_create([(k, keyed[k]) for k in fresh])
        cache.record_batch(name, client.model, fresh)
        jobs[name] = fresh
    settled: set[str] = set()
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
                    if key in keyed and result.status not in CACHEABLE:  # called online by the runner
                        log.warning("batch job %s: request %s %s (%s)", name, key[:12], result.status, result.error)
                    elif key in keyed:
                        result.meta["batch_job"] = name
                        on_result(key, result)
                        settled.add(key)
                cache.finish_batch(name)
                bar.update(len(jobs.pop(name)))
            if jobs:
                bar.set_postfix_str(f"{', '.join(sorted(set(states.values())))}; {time.monotonic() - start:.0f} s")
                await asyncio.sleep(poll_s)
    finally:
        bar.close()
    return settled
