"""Run many LLM requests: persistent cache first, then bounded concurrency with
retries and backoff, a progress bar, and one result per request, always.

Two client shapes exist:
- async clients (Gemini) expose ``async complete(request) -> LLMResult`` and raise
  RetryableError on transient failures;
- batch clients (local transformers) expose ``complete_batch(requests) -> list`` and
  ``batch_size``; they run in-process, so there is nothing to retry.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from router_pipeline.llm.batch import BATCH_DISCOUNT, run_batch
from router_pipeline.llm.cache import ResponseCache, new_owner
from router_pipeline.llm.models import cost_usd
from router_pipeline.llm.types import ERROR, LLMRequest, LLMResult, RetryableError, cache_key

log = logging.getLogger(__name__)
REACH_TIMEOUT_S = 15.0  # name resolution + TCP connect to a model's endpoint, before a run


class EndpointUnreachable(RuntimeError):
    """A model's endpoint cannot be reached at all: the run stops before its first call."""


async def reachable(endpoint: tuple[str, int], timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Raise EndpointUnreachable, naming the host, unless a TCP connection to ``endpoint``
    opens within ``timeout_s`` (name resolution included, which a client's own timeout
    does not cover: without a route it took 9 s per call, and every call was retried)."""
    host, port = endpoint
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except asyncio.TimeoutError:
        raise EndpointUnreachable(f"cannot reach {host}:{port}: no connection within {timeout_s:.0f} s; "
                                  "check the network (or GEMINI_BASE_URL)") from None
    except OSError as exc:
        raise EndpointUnreachable(f"cannot reach {host}:{port}: {exc.strerror or exc}; "
                                  "check the network (or GEMINI_BASE_URL)") from None
    writer.close()


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay_s)
        backoff = self.base_delay_s * 2 ** (attempt - 1)
        return min(backoff, self.max_delay_s) * (0.5 + random.random() / 2)


@dataclass
class RunStats:
    requests: int = 0
    cache_hits: int = 0
    calls: int = 0  # requests actually sent to the model (first attempts)
    retries: int = 0
    possibly_billed_retries: int = 0  # retries after a timeout: the provider may have billed the first try
    waited_for_other_runs: int = 0  # results another run was already paying for, taken from the cache
    errors: int = 0
    batch_calls: int = 0  # of ``calls``, those a Batch API job answered (at batch prices)
    batch_retried_online: int = 0  # requests a batch job failed or left out, then called online
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0  # paid in this run (cache hits cost nothing)
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def complete_all(
    client,
    requests: list[LLMRequest],
    cache: ResponseCache | None,
    *,
    concurrency: int = 8,
    retry: RetryPolicy = RetryPolicy(),
    desc: str = "llm",
    progress: bool = True,
) -> tuple[list[LLMResult], RunStats]:
    """Complete every request; results come back in request order."""
    start = time.perf_counter()
    stats = RunStats(requests=len(requests))
    results: list[LLMResult | None] = [None] * len(requests)
    keys = [cache_key(client.provider, client.model, r) for r in requests]
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            results[i] = hit
            stats.cache_hits += 1
        else:
            todo.append(i)

    bar = tqdm(total=len(requests), initial=stats.cache_hits, desc=desc, disable=not progress, leave=False)

    def settle(i: int, result: LLMResult, batch: bool = False) -> None:
        """Price a paid result (a Batch API one at the batch discount), cache it, count it."""
        result.cost_usd = cost_usd(result.input_tokens, result.output_tokens, client.price) * \
            (BATCH_DISCOUNT if batch else 1.0)
        if cache is not None:
            cache.put(keys[i], result)  # at once: an interrupted run keeps what it paid for
        results[i] = result
        stats.calls += 1
        stats.retries += result.attempts - 1
        stats.possibly_billed_retries += int(result.meta.get("possibly_billed_retries", 0))
        stats.errors += result.status == ERROR
        stats.input_tokens += result.input_tokens
        stats.output_tokens += result.output_tokens
        stats.cost_usd += result.cost_usd
        stats.batch_calls += batch
        bar.update(1)

    try:
        if hasattr(client, "complete_batch"):
            size = max(1, int(getattr(client, "batch_size", 8)))
            for lo in range(0, len(todo), size):
                chunk = todo[lo : lo + size]
                try:
                    batch = client.complete_batch([requests[i] for i in chunk])
                except Exception as exc:  # one bad batch never loses the others
                    log.exception("batch of %d requests failed", len(chunk))
                    batch = [LLMResult.failed(f"{type(exc).__name__}: {exc}") for _ in chunk]
                for i, result in zip(chunk, batch):
                    settle(i, result)
        elif todo:
            def taken_from_other_run(i: int, result: LLMResult) -> None:
                results[i] = result
                stats.cache_hits += 1
                stats.waited_for_other_runs += 1
                bar.update(1)

            asyncio.run(_run_all(client, requests, todo, settle, concurrency, retry, cache, keys,
                                 taken_from_other_run, stats, desc, progress))
    finally:
        bar.close()
    stats.wall_s = time.perf_counter() - start
    return results, stats  # type: ignore[return-value]  # every slot is settled above


CLAIM_POLL_S = 0.5


async def _run_all(client, requests, todo, settle, concurrency, retry, cache, keys, taken, stats,
                   desc, progress) -> None:
    """Batch first when the client asks for it (and a cache holds the job names), then
    online for the rest: what the job failed or left out, or everything."""
    try:
        if getattr(client, "endpoint", None):
            await reachable(client.endpoint)
        if getattr(client, "batch", False) and cache is not None:
            keyed, by_key = {}, {}
            for i in todo:
                keyed[keys[i]] = requests[i]
                by_key.setdefault(keys[i], []).append(i)

            def on_result(key: str, result: LLMResult) -> None:
                for i in by_key[key]:
                    settle(i, result, batch=True)

            settled = await run_batch(client, keyed, cache, on_result=on_result, poll_s=client.batch_poll_s,
                                      progress=progress, desc=desc)
            todo = [i for i in todo if keys[i] not in settled]
            stats.batch_retried_online = len(todo)
        await _run_async(client, requests, todo, settle, concurrency, retry, cache, keys, taken)
    finally:
        closer = getattr(client, "aclose", None)
        if closer is not None:
            await closer()


async def _run_async(client, requests, todo, settle, concurrency, retry: RetryPolicy,
                     cache: ResponseCache | None = None, keys=None, taken=None) -> None:
    gate = asyncio.Semaphore(max(1, concurrency))
    owner = new_owner()

    async def one(i: int) -> None:
        async with gate:
            if cache is None:
                settle(i, await _with_retries(client, requests[i], retry))
                return
            # Never pay for a prompt another run is paying for right now: wait for its result.
            while not cache.claim(keys[i], owner):
                await asyncio.sleep(CLAIM_POLL_S)
            try:
                hit = cache.get(keys[i])  # it may have landed while we waited
                if hit is not None:
                    taken(i, hit)
                else:
                    settle(i, await _with_retries(client, requests[i], retry))
            finally:
                cache.release(keys[i], owner)

    await asyncio.gather(*(one(i) for i in todo))


async def _with_retries(client, request: LLMRequest, retry: RetryPolicy) -> LLMResult:
    attempt, maybe_billed = 0, 0
    while True:
        attempt += 1
        t0 = time.perf_counter()
        try:
            result = await client.complete(request)
        except RetryableError as exc:
            if attempt >= retry.max_attempts:
                failed = LLMResult.failed(f"gave up after {attempt} attempts: {exc}", attempts=attempt)
                failed.meta["possibly_billed_retries"] = maybe_billed
                return failed
            maybe_billed += exc.maybe_billed
            wait = retry.delay(attempt, exc.retry_after)
            log.info("transient failure (%s); retry %d in %.2fs", exc, attempt, wait)
            await asyncio.sleep(wait)
            continue
        except Exception as exc:  # a permanent failure of this item only
            return LLMResult.failed(f"{type(exc).__name__}: {exc}", attempts=attempt)
        result.attempts = attempt
        result.latency_ms = (time.perf_counter() - t0) * 1000
        result.meta["possibly_billed_retries"] = maybe_billed
        return result
