"""The models behind the server, with cooldowns: a model that answers 429, 5xx or times
out is skipped for a while and the next target of the caller's profile serves.

A target is (alias, model id) as the caller's mapper resolves it; each model becomes
one client of the pipeline's LLM layer (gemini or local), made once; medium and large
keep their role's settings (prices, token budgets). A call is attempted once per
target (no retry loop on the request path: the next target is the retry).

One tenant cannot take a model from the others: a 5xx or a timeout (which one prompt can
cause) cools the model down for the caller's profile only; only a 429, the provider's
quota shared by every profile, cools it down for all, for its ``Retry-After``. A 4xx
that is the caller's fault (400, 413, 422: the request itself is refused) is the
caller's error, trips nothing and is not retried on another model.

A local model generates on the CPU cores the router needs, so it is bounded
(``ServingConfig``): one answer at a time, at most ``local_queue`` waiting (one more is
told it is busy and the next target serves), a prompt of at most
``local_max_input_tokens`` (a longer one goes to the next target), ``local_timeout_s``
for waiting and generating together (then it failed, as a cloud model's timeout), and it
generates in a worker process of its own (llm/local_worker.py: ``local_threads`` at
niceness ``local_nice``), so that the router keeps the interpreter and the cores.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from router_pipeline.llm.local_worker import LocalWorker
from router_pipeline.llm import RoleSpec
from router_pipeline.llm.models import cost_usd
from router_pipeline.llm.pool import Pool, PoolModel, client_for
from router_pipeline.llm.roles import Roles
from router_pipeline.llm.types import OK, LLMRequest, LLMResult, PromptTooLong, RetryableError
from router_pipeline.serve.config import ServingConfig
from router_pipeline.policies import TIERS

log = logging.getLogger(__name__)


CALLER_ERRORS = {400, 413, 422}  # the provider refuses the request itself: another model would too
RATE_LIMITED = "HTTP 429"  # how a RetryableError of the provider's quota begins (llm/gemini.py)
EVERY_PROFILE = ""  # the cooldown scope of a model rate limited for every profile


class RejectedRequest(RuntimeError):
    """The provider refused the request as invalid (the caller's fault): ``status`` is what
    a caller may read of it."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status


def _caller_fault(exc: Exception) -> str | None:
    """'HTTP 400 INVALID_ARGUMENT' when the provider refused the request itself, else None."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code in CALLER_ERRORS:
        return " ".join(str(p) for p in ("HTTP", code, getattr(exc, "status", None) or "") if p)
    return None


class LocalBusy(RuntimeError):
    """A local model already has ``local_queue`` requests waiting: the next target serves."""


class AllTargetsFailed(RuntimeError):
    def __init__(self, attempts: list[dict]):
        super().__init__("; ".join(f"{a['target']} ({a['model']}): {a['error']}" for a in attempts)
                         or "no target to call")
        self.attempts = attempts


def _public(exc: Exception) -> str:
    """What a caller may see of an upstream failure: its kind, never hosts, paths or reprs
    (the whole error goes to the server's log)."""
    text = str(exc)
    if isinstance(exc, RetryableError):
        if text.startswith("HTTP "):
            return " ".join(text.split()[:3])  # e.g. HTTP 429 RESOURCE_EXHAUSTED
        return "timed out" if "timeout" in text.lower() else "connection failed"
    return f"provider error ({type(exc).__name__})"


@dataclass
class Served:
    result: LLMResult
    target: str
    model: str
    cost_usd: float
    attempts: list[dict] = field(default_factory=list)  # the targets that failed before, with why


@dataclass
class Streamed:
    """An answer being streamed: its first item is already here (so the target is final),
    ``rest`` yields the other text deltas and then the whole LLMResult."""

    target: str
    model: str
    price: tuple[float, float]
    first: str | LLMResult
    rest: object  # async iterator
    attempts: list[dict] = field(default_factory=list)

    async def items(self):
        try:
            yield self.first
            async for item in self.rest:
                yield item
        finally:  # a reader that stops early stops the model (and frees a local one)
            await self.rest.aclose()


class Backends:
    def __init__(self, roles: Roles, config: ServingConfig, *, local_waits_for: threading.Event | None = None,
                 pool: Pool | None = None):
        """``config``: cooldowns and the local models' bounds. ``local_waits_for``: a local
        model runs each forward pass only once this is set (the batcher's ``idle``: routing
        comes first on a shared CPU). ``pool``: a pool router's models, called by their pool
        names with the pool's backends and prices."""
        self.roles, self.config, self.cooldown_s = roles, config, config.cooldown_s
        self.pool = pool
        self._local_waiting = 0
        self.local_waits_for = local_waits_for
        self._clients: dict[tuple[str, str], tuple[RoleSpec, object]] = {}
        self._cooling: dict[tuple[str, str], float] = {}  # (profile or EVERY_PROFILE, model) -> when it may be called
        self._local_lock = asyncio.Lock()  # a local model generates one answer at a time
        self._making = threading.Lock()  # a client is made once, even when two requests ask together

    def _pooled(self, alias: str, model: str) -> PoolModel | None:
        if self.pool is not None and alias in self.pool.names and self.pool[alias].model == model:
            return self.pool[alias]
        return None

    def _key(self, alias: str, model: str) -> tuple[str, str]:
        return (alias if alias in TIERS or self._pooled(alias, model) else "", model)

    def spec_for(self, alias: str, model: str) -> RoleSpec:
        """Who answers for a target: a pool model as the pool says, else the role's (llm.roles)."""
        pooled = self._pooled(alias, model)
        return pooled.role() if pooled else self.roles.spec_for(alias, model)

    def private(self, alias: str, model: str) -> bool:
        """Whether a query sent to this target stays on the operator's machines: a local
        model, or a pool endpoint marked ``private: true``."""
        pooled = self._pooled(alias, model)
        return pooled.keeps_private if pooled else self.spec_for(alias, model).provider == "local"

    def reference_price(self, mapper) -> tuple[float, float]:
        """What savings are counted against: the dearest pool model, else the large role."""
        if self.pool is not None:
            return self.pool.by_price()[-1].role().price
        return self.roles.spec_for("large", mapper.models["large"]).price

    def _client(self, alias: str, model: str):
        key = self._key(alias, model)
        with self._making:
            if key not in self._clients:
                pooled, spec = self._pooled(alias, model), self.spec_for(alias, model)
                make = (functools.partial(client_for, pooled, gemini_base_url=self.roles.gemini_base_url,
                                          timeout_s=self.roles.timeout_s, batch_size=self.roles.local_batch_size)
                        if pooled else functools.partial(self.roles.client_for, spec))
                if spec.provider == "local" and self.config.local_process:
                    client = LocalWorker(make, threads=self.config.local_threads, nice=self.config.local_nice,
                                         name=spec.model)
                else:
                    client = make()
                self._clients[key] = (spec, client)
        return self._clients[key]

    def close(self) -> None:
        """Stop the local models' worker processes (made again if a request needs one)."""
        with self._making:
            workers = [k for k, (_, client) in self._clients.items() if isinstance(client, LocalWorker)]
            for key in workers:
                self._clients.pop(key)[1].close()

    def preload_local(self, targets: list[tuple[str, str]]) -> list[str]:
        """Load now the local models among ``targets`` (alias, model id); returns their ids.
        Loading one (its 262k-token tokenizer is parsed in Python, holding the interpreter)
        stalled every request in flight for about 4 s when the first private query came."""
        local = [(a, m) for a, m in dict.fromkeys(targets) if self.spec_for(a, m).provider == "local"]
        for alias, model in local:
            self._client(alias, model)
        return [m for _, m in local]

    def cooling(self, profile: str = EVERY_PROFILE) -> dict[str, float]:
        """model -> seconds left in its cooldown for ``profile`` (its own and every profile's;
        by default, only those of every profile)."""
        now, out = time.monotonic(), {}
        for (scope, model), until in self._cooling.items():
            if until > now and scope in (EVERY_PROFILE, profile):
                out[model] = max(out.get(model, 0.0), round(until - now, 1))
        return out

    async def _available(self, targets: list[tuple[str, str]], attempts: list[dict], profile: str):
        """(target, model, spec, client) of each target not cooling down for ``profile``, in
        order, each once; the ones cooling down are noted in ``attempts``."""
        cooling = self.cooling(profile)
        for target, model in dict.fromkeys(targets):
            left = cooling.get(model)
            if left is not None:
                attempts.append({"target": target, "model": model, "error": f"cooling down ({left} s left)"})
                continue
            made = self._clients.get(self._key(target, model))
            # A client not made yet is made in a thread: a local model's first use loads its
            # weights (seconds of a stalled event loop, for every caller, if done here).
            yield (target, model, *(made or await asyncio.to_thread(self._client, target, model)))

    def _failed(self, target: str, model: str, spec: RoleSpec, exc: Exception, attempts: list[dict],
                profile: str) -> None:
        if isinstance(exc, (LocalBusy, PromptTooLong)):  # this request's or this moment's: nothing cools down
            attempts.append({"target": target, "model": spec.model, "error": str(exc),
                             **({"too_long": True} if isinstance(exc, PromptTooLong) else {})})
            return
        if (status := _caller_fault(exc)) is not None:
            log.info("%s (%s) refused the request of profile %s: %r", target, spec.model, profile, exc)
            raise RejectedRequest(status) from None
        if isinstance(exc, RetryableError):
            scope = EVERY_PROFILE if str(exc).startswith(RATE_LIMITED) else profile
            self._cooling[(scope, model)] = time.monotonic() + (exc.retry_after or self.cooldown_s)
            log.warning("%s (%s) failed, cooling down for %s: %s", target, spec.model,
                        "every profile" if scope == EVERY_PROFILE else f"profile {profile}", exc)
        else:  # a provider error that retrying the same model would not fix
            log.warning("%s (%s) failed: %r", target, spec.model, exc)
        attempts.append({"target": target, "model": spec.model, "error": _public(exc)})

    async def answer(self, targets: list[tuple[str, str]], prompt: str, system: str | None,
                     max_tokens: int | None, profile: str = EVERY_PROFILE) -> Served:
        """The first of ``targets`` (alias, model id) that answers for ``profile``."""
        attempts: list[dict] = []
        async for target, model, spec, client in self._available(targets, attempts, profile):
            try:
                result = await self._call(client, self._request(client, spec, prompt, system, max_tokens))
            except Exception as exc:
                self._failed(target, model, spec, exc, attempts, profile)
                continue
            if result.status != OK:
                attempts.append({"target": target, "model": spec.model, "error": f"{result.status} reply"})
                continue
            return Served(result, target, spec.model, cost_usd(result.input_tokens, result.output_tokens, spec.price),
                          attempts)
        raise AllTargetsFailed(attempts)

    async def stream(self, targets: list[tuple[str, str]], prompt: str, system: str | None,
                     max_tokens: int | None, profile: str = EVERY_PROFILE) -> "Streamed":
        """The first of ``targets`` that starts answering, as a stream. A target that fails
        before its first text (429, 5xx, timeout, an empty or blocked reply) is skipped as
        in ``answer``: the caller never sees it."""
        attempts: list[dict] = []
        async for target, model, spec, client in self._available(targets, attempts, profile):
            chunks = self._chunks(client, self._request(client, spec, prompt, system, max_tokens))
            try:
                first = await chunks.__anext__()
            except Exception as exc:
                self._failed(target, model, spec, exc, attempts, profile)
                continue
            if isinstance(first, LLMResult) and first.status != OK:  # ended before any text
                await chunks.aclose()
                attempts.append({"target": target, "model": spec.model, "error": f"{first.status} reply"})
                continue
            return Streamed(target, spec.model, spec.price, first, chunks, attempts)
        raise AllTargetsFailed(attempts)

    def _request(self, client, spec: RoleSpec, prompt: str, system: str | None, max_tokens: int | None) -> LLMRequest:
        # The caller's max_tokens, else the role's budget (Pro: 4,096, thinking included); a
        # local model, which generates for one caller at a time, never more than its cap.
        budget = max_tokens or spec.max_output_tokens
        if not hasattr(client, "complete"):
            from router_pipeline.llm.local import chat_request  # torch: only where a local model serves

            return chat_request(prompt, max_output_tokens=min(budget, self.config.local_max_output_tokens),
                                temperature=spec.temperature, system=system)
        return LLMRequest(prompt, max_output_tokens=budget, temperature=spec.temperature, system=system)

    async def _chunks(self, client, request: LLMRequest):
        """Text deltas, then the LLMResult: from Gemini's stream, or from a local model
        generating in a thread (one at a time; stopped when the reader goes away)."""
        if hasattr(client, "stream") and hasattr(client, "complete"):
            async for item in client.stream(request):
                yield item
            return
        loop, queue, cancel, end = asyncio.get_running_loop(), asyncio.Queue(), threading.Event(), object()

        def produce():
            try:
                for item in client.stream(request, cancel, wait_for=self.local_waits_for,
                                          max_input_tokens=self.config.local_max_input_tokens,
                                          nice=self.config.local_nice):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except Exception as exc:  # handed to the reader
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, end)

        limits = self.config
        if self._local_lock.locked() and self._local_waiting >= limits.local_queue:
            raise LocalBusy(f"the local model is busy ({self._local_waiting} requests waiting)")
        deadline = loop.time() + limits.local_timeout_s
        self._local_waiting += 1
        try:
            await asyncio.wait_for(self._local_lock.acquire(), limits.local_timeout_s)
        except asyncio.TimeoutError:
            raise RetryableError(f"local model timeout: no turn within {limits.local_timeout_s:g} s") from None
        finally:
            self._local_waiting -= 1
        try:
            worker = asyncio.ensure_future(asyncio.to_thread(produce))
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        raise RetryableError(f"local model timeout: not done within {limits.local_timeout_s:g} s"
                                             ) from None
                    if item is end:
                        break
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                cancel.set()
                await asyncio.shield(worker)
        finally:
            self._local_lock.release()

    async def _call(self, client, request: LLMRequest) -> LLMResult:
        if hasattr(client, "complete"):
            return await client.complete(request)
        # A local model: the streamed path (the one that yields to routing), read to its end.
        *_, result = [item async for item in self._chunks(client, request)]
        return result


def council_answer(url: str, messages: list[dict], timeout_s: float) -> tuple[str, str, dict]:
    """(content, model, usage) of the llm-council endpoint at ``url`` (OpenAI chat format)
    for the conversation; RuntimeError (logged with the cause) when it gives none."""
    payload = json.dumps({"model": "council", "messages": messages}).encode()
    try:
        req = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            reply = json.loads(resp.read())
        content = reply["choices"][0]["message"]["content"]
        usage = reply.get("usage") or {}
        usage = {"prompt_tokens": int(usage.get("prompt_tokens", 0)),
                 "completion_tokens": int(usage.get("completion_tokens", 0))}
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        log.error("council escalation to %s failed: %s", url, exc)
        raise RuntimeError("the council escalation failed") from None
    return content, reply.get("model") or "llm-council", usage
