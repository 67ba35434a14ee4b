"""The request path, without HTTP: a conversation and a caller's profile in; the decision,
the answer (whole, or as a stream of text), its cost and what happened (fallbacks,
escalation, budget) out. The routing server (serve/server.py) is a FastAPI layer over it
and ``router-pipeline answer`` calls it too, so both route, map, answer and charge the
same way.

A request goes: ``decide`` (its profile's mapper, or a ``router-<threshold>`` one; the
conversation routed through the batcher; the mapper's rules applied in a worker thread,
since they may read the ledger) -> ``answer`` or ``stream`` (the backends with fallbacks
and cooldowns, the council for escalations, or the profile's cascade; every model call
held on the request's ``Bill``, serve/cascade.py: an upper bound of its cost reserved in
the budget and the model's own cap in the same locked step as their checks) -> ``settle``
(the bill paid in place of its holds, stats, request memory for feedback, the decision
log).

Settling never loses a paid answer: whatever the state database does, the answer goes
back with what could not be recorded said in ``routing``, and the spend (and the answer
of an ``Idempotency-Key``) it could not write goes to the local journal, replayed into the
database before the next budgeted request (serve/journal.py). A request without a budget
and without an ``Idempotency-Key`` never waits on the state database beyond
``ServingConfig.record_wait_s``: its stats and request memory are then written in the
background (``routing.recording_deferred``), and the journal's replay runs in the
background for it. State-database calls run in threads of their own (``_in_db``), so a
locked or frozen database cannot take the threads the router and the models use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from router_pipeline import settings
from router_pipeline.llm.models import cost_usd
from router_pipeline.llm.pool import Pool
from router_pipeline.llm.types import ERROR, LLMResult
from router_pipeline.routers.cascade import released_cascade
from router_pipeline.routers.contract import PROBE_QUERY, RouteDecision, Router, RouterConfig
from router_pipeline.routers.prompt import conversation_text
from router_pipeline.serve import decision_log
from router_pipeline.serve.backends import (AllTargetsFailed, Backends, RejectedRequest, Served, Streamed,
                                            council_answer)
from router_pipeline.serve.batcher import RouteBatcher
from router_pipeline.serve.cascade import Bill, Call, Hold, Run as CascadeRun, Unaffordable, run as run_cascade
from router_pipeline.serve.config import DEFAULTS, ServingConfig
from router_pipeline.serve.database import DatabaseError
from router_pipeline.serve.experiments import Arm, record_served, record_shadow
from router_pipeline.serve.errors import (Conflict, Forbidden, InvalidRequest, NotFound, Refused, Unavailable,
                                         UpstreamFailed)
from router_pipeline.policies import TIERS
from router_pipeline.serve.feedback import (FeedbackConflict, FeedbackError, FeedbackStore, ServedRequest, UnknownRequest,
                                            record_cascade)
from router_pipeline.serve.identity import StateIdentity
from router_pipeline.serve.idempotency import IdempotencyStore, InProgress, KeyReused, check_key, fingerprint
from router_pipeline.serve.journal import JournalError, SpendJournal
from router_pipeline.serve.live import ADMIN_KEY_VAR, LiveConfig, active as active_changes, admin_keys
from router_pipeline.serve.ledger import LedgerError, replay_spend
from router_pipeline.serve.mapper import ABSTAIN_ANSWER, Mapping, PolicyMapper, Rule
from router_pipeline.serve.profiles import Profile, ProfileError, Profiles
from router_pipeline.serve.schemas import ChatRequest, Conversation
from router_pipeline.serve.stats import Stats
from router_pipeline.text import check_query

log = logging.getLogger(__name__)
ROUTER_MODEL = "router"
THRESHOLD_NAME = re.compile(re.escape(ROUTER_MODEL) + r"-((?:0|1)(?:\.\d{1,8})?|\.\d{1,8})")  # router-<threshold>
# A pool router's knob: router-budget-<USD per 1,000 queries>, router-quality-<share of the
# best model's accuracy>, router-lambda-<lambda>; plain decimals only.
KNOB_NAME = re.compile(re.escape(ROUTER_MODEL) + r"-(budget|quality|lambda)-(\d{1,9}(?:\.\d{1,8})?)")


def threshold_model(threshold: float) -> str:
    """The model name that routes at ``threshold`` (what THRESHOLD_NAME reads back)."""
    return f"{ROUTER_MODEL}-{threshold:.4f}".rstrip("0").rstrip(".")


@dataclass
class Decided:
    """A request routed and mapped."""

    t0: float
    profile: Profile
    body: Conversation
    mapper: PolicyMapper
    threshold: float | None  # a pool router's: None (its lambda is ``lam``)
    text: str  # what the router read
    prompt: str  # what the answering model reads
    system: str | None
    decision: RouteDecision
    mapping: Mapping
    router_ms: float
    claim: dict | None = None  # profile, key, fingerprint of the Idempotency-Key this request claimed
    lam: float | None = None  # a pool router's lambda for this request (from the model name)
    scan: str = ""  # every message's text, system messages included: what privacy rules read
    router_failed: str | None = None  # why the router gave no decision (the default model answers)
    named: str | None = None  # the model alias the caller asked for by name (no routing)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # the request id's own part
    arm: Arm | None = None  # the experiment's arm this request was assigned to
    cost_usd: float = 0.0  # what its answer cost (set when settled)
    escalated: bool = False
    shadow: asyncio.Future | None = None  # shadow mode: the router's decision and mapping, made beside the request
    cascade: object = None  # the profile's cascade, when the router's choice is to be escalated on answers
    bill: Bill | None = None  # its money: a hold per model call, settled once (reserve; serve/cascade.py)
    run: CascadeRun | None = None  # what the cascade called and answered
    finish: object = None  # a streamed answer's settlement: run once, however the reading ends (``_read``)

    def map(self, **kwargs) -> Mapping:
        """The mapper's mapping of this request (privacy rules read the whole conversation)."""
        return self.mapper.map(self.decision, text=self.scan, router_failed=self.router_failed, named=self.named,
                               shadow=self.shadow is not None, **kwargs)

    @property
    def asked(self) -> int | None:
        """The caller's output budget (max_completion_tokens, else max_tokens)."""
        tokens = self.body.output_tokens if isinstance(self.body, ChatRequest) else None
        return tokens and tokens[1]


@dataclass
class Answered:
    content: str | None
    model: str
    usage: dict  # prompt_tokens, completion_tokens, total_tokens
    routing: dict  # what happened: the decision, the rule, the model, fallbacks, cost


@dataclass
class Gateway:
    router: Router  # any kind (routers.registry.load_router)
    batcher: RouteBatcher
    profiles: Profiles
    backends: Backends
    feedback: FeedbackStore
    stats: Stats
    calibration: dict
    config: ServingConfig = DEFAULTS
    decision_log_path: Path | None = None
    journal: SpendJournal | None = None  # what settling could not write to the state database
    idempotency: IdempotencyStore | None = None
    identity: StateIdentity | None = None  # established when a profile keeps a budget
    pool: Pool | None = None  # a pool router's models (names, backends, prices); None: two tiers
    default_models: dict = field(default_factory=dict)  # alias -> model id, for mappers that name none
    live: LiveConfig | None = None  # the profiles file and the admin API's changes over it (serve/live.py)
    released_cascade: object = None  # the pool router's released cascade: pool profiles' default
    # The state database's threads ("request": requests' own calls; "recording": what may be left behind).
    _pools: dict = field(default_factory=dict, init=False, repr=False)
    _background: set = field(default_factory=set, init=False, repr=False)  # deferred recordings, replays
    _replaying: asyncio.Task | None = field(default=None, init=False, repr=False)  # the background replay
    _overdue: int = field(default=0, init=False, repr=False)  # recordings whose request stopped waiting
    _router_failures: list = field(default_factory=list, init=False, repr=False)  # the last calls' failures, in a row
    _configuring: asyncio.Lock | None = field(default=None, init=False, repr=False)  # one change at a time
    _watch: asyncio.Task | None = field(default=None, init=False, repr=False)
    _adopted: asyncio.Event | None = field(default=None, init=False, repr=False)  # wakes the watch

    async def start(self) -> None:
        await self.batcher.start()
        if self.live is not None:
            self._adopted = asyncio.Event()
            self._watch = asyncio.get_running_loop().create_task(self._watch_config())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.batcher.stop()
        await self._drain()
        for pool in self._pools.values():
            pool.shutdown(wait=False)
        self._pools.clear()
        self.feedback.close()
        await asyncio.to_thread(self.backends.close)

    async def _drain(self) -> None:
        """The background writes finish (for at most the database's timeout and the graceful
        shutdown); what is still waiting then is dropped, and logged."""
        if not self._background:
            return
        _, left = await asyncio.wait(set(self._background),
                                     timeout=self.config.database_timeout_s + self.config.graceful_shutdown_s)
        if left:
            log.error("stopping: %d background writes to the state database did not finish (deferred stats and "
                      "request memory, a journal replay) and are dropped; the journal keeps its entries", len(left))
            for task in left:
                task.cancel()

    async def _in_db(self, fn, *args, pool: str = "request", **kwargs):
        """``fn(*args, **kwargs)`` in a thread kept for the state database (``pool``: "request",
        what a request waits for; "recording", writes it may leave behind): a database that
        holds its threads (a held lock, a frozen server) never holds the router's or the
        models' thread work, nor requests' own calls behind a backlog of deferred writes."""
        executor = self._pools.get(pool)
        if executor is None:
            threads = self.config.database_threads if pool == "request" else self.config.recording_threads
            executor = self._pools[pool] = ThreadPoolExecutor(threads, thread_name_prefix=f"state-db-{pool}")
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))

    def _spawn(self, coro) -> asyncio.Task:
        """A background task, kept until it ends (``stop`` waits for it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def ready(self) -> dict[str, str]:
        """What cannot serve now (component -> why), empty when the router answers a probe
        through the batcher and the state database answers a read: readiness, for /health."""
        failing = {}
        if len(self._router_failures) >= self.config.router_unhealthy_after:  # requests go to default models
            failing["router"] = (f"failed its last {len(self._router_failures)} calls (last: "
                                 f"{self._router_failures[-1]}); requests are answered by their profile's default model")
        try:
            await asyncio.wait_for(self.batcher.route(PROBE_QUERY), self.config.readiness_timeout_s)
        except Exception as exc:  # whatever it is, the router cannot route
            log.error("readiness: the router failed its probe: %r", exc)
            failing.setdefault("router", "timed out" if isinstance(exc, asyncio.TimeoutError) else "failed its probe")
        try:
            await self._in_db(self.feedback.db.execute, "SELECT 1 FROM requests LIMIT 1")
            if self.identity is not None:
                await self._in_db(self.identity.check)
        except DatabaseError as exc:
            log.error("readiness: %s", exc)
            failing["state_database"] = "unavailable" if exc.transient else "broken or replaced"
        return failing

    # -- deciding ---------------------------------------------------------------
    async def decide(self, profile: Profile, body: Conversation, claim: dict | None = None,
                     headers=None) -> Decided:
        """``claim``: the Idempotency-Key this request holds (``claim``), answered when settled.
        ``headers``: the request's (an experiment may assign arms by one of them)."""
        t0 = time.perf_counter()
        key = uuid.uuid4().hex
        asked, arm = _asked(profile, body, key, headers or {})
        tokens = body.output_tokens if isinstance(body, ChatRequest) else None
        if tokens is not None and tokens[1] > self.config.max_output_tokens:  # before any routing work
            raise InvalidRequest(f"{tokens[0]}: at most {self.config.max_output_tokens} on this server",
                                 "invalid_field", param=tokens[0])
        named = self._named(profile, asked)
        mapper, threshold, lam = (profile.mapper, None, None) if named else self._mapper(profile, asked)
        text, prompt, system, scan = self._conversation(body)
        if mapper.ledger is not None and self.identity is not None:  # never a budget counted again from $0
            await self._in_db(self.identity.check)
        if mapper.ledger is not None:  # spend is recorded for this profile: an unreadable ledger stops it
            await self._replay(strict=True)  # journaled spend goes in before a budget is read
            await self._in_db(mapper.ledger.spent)
        else:  # nothing to count it against: the replay goes on in the background, unwaited for
            self._replay_soon()
        shadow = None
        if profile.shadow and named is None and lam is None and threshold is None:
            shadow = self._spawn(self._shadow(profile, mapper, text, scan))
            decision, failed = RouteDecision(text, "shadow", {}, True, "shadow"), None
        elif named is None:
            decision, failed = await self._route(profile, text)
        else:  # a model asked for by name: no routing
            decision, failed = RouteDecision(text, "by_name", {}, True, "by_name"), None
        if lam is not None and failed is None:  # the pool router's choice at the lambda the model name asks for
            decision = self.router.at(decision, lam)
        d = Decided(t0, profile, body, mapper, threshold, text, prompt, system, decision, None, 0.0, claim=claim,
                    lam=lam, scan=scan, router_failed=failed, named=named, key=key, arm=arm, shadow=shadow)
        d.mapping = await self._mapped(mapper, d.map)
        if profile.cascade is not None and d.decision.p_correct and mapper.is_pool_rule(d.mapping.rule):
            d.cascade = profile.cascade  # the router's own choice: escalated on what the models answer
        d.router_ms = (time.perf_counter() - t0) * 1000
        return d

    async def _shadow(self, profile: Profile, mapper: PolicyMapper, text: str, scan: str) -> Mapping | None:
        """Shadow mode: what the router would have chosen for a request its profile's
        default model answers (None when the router failed)."""
        try:
            decision, failed = await self._route(replace(profile, router_failure="default_model"), text)
            if failed is not None:
                return None
            return await self._mapped(mapper, mapper.map, decision, text=scan)
        except Exception as exc:  # never the request's concern
            log.error("shadow decision for profile %s: %r", profile.name, exc)
            return None

    async def _mapped(self, mapper: PolicyMapper, fn, *args, **kwargs) -> Mapping:
        """``fn`` (a mapping) off the event loop: rules may read the ledger (the state
        database's threads); without one they read nothing."""
        if mapper.ledger is not None:
            return await self._in_db(fn, *args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _record_shadow(self, d: Decided, request_id: str, usage: dict, served: str | None,
                             cost: float) -> None:
        """Once both are known: what the router would have chosen for this request and what
        the same tokens would have cost on it, beside what was served."""
        mapping = await d.shadow
        if mapping is None:
            return
        would = 0.0
        if mapping.model is not None:
            price = self.backends.spec_for(mapping.target, mapping.model).price
            would = cost_usd(usage["prompt_tokens"], usage["completion_tokens"], price)
        await self._in_db(record_shadow, self.feedback.db, request_id, d.profile.name, mapping.target,
                          mapping.policy, would, served, cost, pool="recording")
        if self.decision_log_path is not None:
            with contextlib.suppress(OSError):
                decision_log.append(self.decision_log_path, {
                    "request_id": request_id, "profile": d.profile.name, "shadow": True, "model": mapping.target,
                    "rule": mapping.rule, "reason": mapping.reason, "would_cost_usd": round(would, 8),
                    "served_by": served})

    async def _route(self, profile: Profile, text: str) -> tuple[RouteDecision, str | None]:
        """(the router's decision, None), or (an empty decision, why) when the router raised
        or a pass ran over ``routing_timeout_s``: routing never stops the request (the
        profile's default model answers), unless the profile fails closed (503). Waiting in
        a queue that moves is not a failure: under load on 2 cores a timeout on the wait
        itself sent more than 5% of requests to the default model."""
        limit = self.config.routing_timeout_s
        route = asyncio.ensure_future(self.batcher.route(text))
        try:
            while not (await asyncio.wait({route}, timeout=limit))[0]:
                if self.batcher.stalled(limit):
                    raise asyncio.TimeoutError
            decision = route.result()
            self._router_failures.clear()  # a router that recovers is used again
            return decision, None
        except asyncio.TimeoutError:
            why = f"a router pass ran over {limit:g} s"
        except Exception as exc:  # whatever the router raised: the request goes on without it
            log.error("the router failed on a request of profile %s: %r", profile.name, exc)
            why = f"it raised {type(exc).__name__}"
        finally:
            route.cancel()  # a caller that stopped waiting costs no pass
        self._router_failures = [*self._router_failures[-(self.config.router_unhealthy_after - 1):], why]
        if profile.router_failure == "refuse":
            raise Unavailable(f"the router failed ({why}) and profile {profile.name!r} refuses to answer without it",
                              "router_unavailable", retry_after_s=1)
        return RouteDecision(text, "router_failed", {}, False, "router_failed", parse_error=why, fallback_used=True), why

    def _named(self, profile: Profile, model: str | None) -> str | None:
        """The alias of the model the caller asked for by name (an alias of the profile's
        mapper, a pool model's name, or a model id), None for the router's names; a model
        the profile may not use is refused (403) naming it."""
        models = profile.mapper.models
        usable = [a for a, _ in servable(profile, profile.mapper, list(models))]
        by_id = [a for a, m in models.items() if m == model]  # several aliases may name one model id
        alias = model if model in models else next((a for a in by_id if a in usable), by_id[0] if by_id else None)
        if alias is None and self.pool is not None and model in self.pool.names:
            alias = model
        if alias is None:
            return None
        if alias not in usable:
            raise Forbidden(f"model {model!r} is not allowed for profile {profile.name!r}: it may use "
                            f"{', '.join(usable)} by name, or 'router'", "model_not_allowed", param="model")
        return alias

    def _mapper(self, profile: Profile, model: str | None) -> tuple[PolicyMapper, float | None, float | None]:
        """(mapper, threshold, a pool router's lambda) for the model name asked for."""
        if model in (None, ROUTER_MODEL):
            return profile.mapper, None, None
        if self.pool is not None:
            return profile.mapper, None, self._lambda(model)
        # Written as a plain decimal only: "router-1e-400", "router- 0.5" and "router-nan" name nothing.
        threshold = float(m.group(1)) if (m := THRESHOLD_NAME.fullmatch(model)) else -1.0
        if not 0.0 <= threshold <= 1.0:
            shown = model if len(model) <= 64 else model[:64] + "..."
            raise NotFound(f"model {shown!r} does not exist: use 'router' (the calibrated threshold) or "
                           f"'router-<threshold>' with a threshold in [0, 1], e.g. 'router-0.35'",
                           "model_not_found", param="model")
        mappers = profile.threshold_mappers
        if threshold in mappers:
            mappers.move_to_end(threshold)
        else:
            mappers[threshold] = _threshold_mapper(profile.mapper, threshold)
            while len(mappers) > self.config.threshold_mappers:
                mappers.popitem(last=False)
        return mappers[threshold], threshold, None

    def _lambda(self, model: str) -> float:
        from router_pipeline.routers.pool import Knob

        m = KNOB_NAME.fullmatch(model)
        try:
            if m is None:
                raise ValueError("not a knob name")
            return self.router.lambda_for(Knob(m.group(1), float(m.group(2))))
        except ValueError:
            shown = model if len(model) <= 64 else model[:64] + "..."
            raise NotFound(f"model {shown!r} does not exist: use 'router' (the released knob), "
                           "'router-budget-<USD per 1,000 queries>' (e.g. router-budget-0.30), "
                           "'router-quality-<share of the best model's accuracy, at most 1>' (e.g. "
                           "router-quality-0.95) or 'router-lambda-<lambda>'", "model_not_found",
                           param="model") from None

    def _conversation(self, body: Conversation) -> tuple[str, str, str | None, str]:
        """(routing text, prompt for the answering model, system text, every message's text)."""
        messages = body.plain_messages()
        try:
            conversation = conversation_text(messages)
            text = check_query(conversation, self.config.max_conversation_chars)
        except ValueError as exc:
            raise InvalidRequest(f"messages: {exc}", "invalid_messages", param="messages") from None
        system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer")
                           and m["content"]) or None
        return text, conversation, system, "\n".join(m["content"] for m in messages if m["content"])

    async def _replay(self, strict: bool, pool: str = "request") -> None:
        """Write the journal's entries into the state database; ``strict``: a database
        that still fails is an error (budgets must count them), else they wait."""
        if self.journal is None or not self.journal.pending():
            return
        try:
            if self.identity is not None:  # never into a database that replaced the budgets' one
                await self._in_db(self.identity.check, pool=pool)
            await self._in_db(self.journal.replay, self.feedback.db, _apply_journaled, pool=pool)
        except DatabaseError as exc:
            if strict:
                raise
            log.warning("spend journal: its entries wait (%s)", exc)

    def _replay_soon(self) -> None:
        """The journal's replay in the background, one at a time, for a caller that reads no
        budget and does not wait for it (the next budgeted request replays what is left)."""
        if self.journal is None or not self.journal.pending() or (self._replaying and not self._replaying.done()):
            return

        async def replay():
            try:
                await self._replay(strict=False, pool="recording")
            except Exception as exc:  # nobody waits for it: said in the log, the entries stay
                log.error("spend journal: the background replay failed, its entries wait: %r", exc)

        self._replaying = self._spawn(replay())

    async def claim(self, profile: Profile, body: Conversation, key: str | None) -> tuple[Answered | None, dict | None]:
        """With an ``Idempotency-Key``: (the answer recorded for it, None) for a retry, whose
        answer is given again and nothing paid, else (None, the claim) once this request
        holds the key (hand it to ``decide``). Without a key: (None, None)."""
        if key is None or self.idempotency is None:
            return None, None
        if (why := check_key(key)) is not None:
            raise InvalidRequest(f"Idempotency-Key {why}", "invalid_idempotency_key", param="Idempotency-Key")
        claim = {"profile": profile.name, "key": key, "fingerprint": fingerprint(body), "owner": uuid.uuid4().hex}
        await self._replay(strict=False)  # an answer journaled earlier may be this key's
        journaled = self.journal and await self._in_db(self.journal.find_answer, profile.name, key)
        if journaled and journaled["fingerprint"] == claim["fingerprint"]:  # the database still fails
            return _replayed(journaled["answer"]), None
        try:
            recorded = await self._in_db(self.idempotency.claim, profile.name, key, claim["fingerprint"],
                                         claim["owner"])
        except DatabaseError:  # its commit may have landed all the same: dropped once the database is back
            await self._journal_release(claim)
            raise
        except KeyReused as exc:
            raise Conflict(str(exc), "idempotency_key_reused", param="Idempotency-Key") from None
        except InProgress as exc:
            raise Conflict(str(exc), "idempotency_in_progress", param="Idempotency-Key",
                           retry_after_s=self.config.idempotency_retry_after_s) from None
        return (_replayed(recorded), None) if recorded is not None else (None, claim)

    async def unclaim(self, claim: dict | None) -> None:
        """The request failed before it was paid: a retry with its key may try again (when
        the database fails now, once the journal is replayed: until then the key is in flight)."""
        if claim is None:
            return
        try:
            await self._in_db(self.idempotency.release, claim)
        except DatabaseError:
            await self._journal_release(claim)

    async def _journal_release(self, claim: dict) -> None:
        """Drop ``claim`` when the journal is next replayed (the database fails now)."""
        try:
            if self.journal is not None:
                await self._in_db(self.journal.append, {"release": claim})
        except JournalError as exc:  # the claim then expires after RESERVATION_TTL_S
            log.error("%s; the claim of an Idempotency-Key of profile %s stays until it expires", exc,
                      claim["profile"])

    def routing(self, d: Decided, prefix: str) -> dict:
        return {"request_id": f"{prefix}-{d.key}", "policy": d.decision.policy,
                "probabilities": {k: round(v, 4) for k, v in d.decision.probabilities.items()},
                "p_complex": round(d.decision.p_complex, 4), "rule": d.mapping.rule, "reason": d.mapping.reason,
                "target": d.mapping.target, "threshold": d.threshold, "parse_ok": d.decision.parse_ok,
                "router_ms": round(d.router_ms, 2), "config_version": d.profile.version,
                **({"private": {"rule": d.mapping.privacy_rule, "models": list(d.mapping.allowed)}}
                   if d.mapping.privacy_rule else {}),
                **({"router_failed": d.router_failed} if d.router_failed is not None else {}),
                **({"experiment": {"name": d.profile.experiment.name, "arm": d.arm.name}} if d.arm else {}),
                **({"p_correct": d.decision.p_correct, "lambda": self.router.lam if d.lam is None else d.lam}
                   if d.decision.p_correct else {}),
                **({"ignored_parameters": ignored} if (ignored := getattr(d.body, "ignored", None)) else {})}

    async def route(self, d: Decided) -> dict:
        """The decision only (the caller calls the model): remembered for feedback, counted."""
        routing = self.routing(d, "route")
        if d.cascade is not None:  # the caller runs it: the plan, and what to call first
            routing["cascade"] = {"plan": d.cascade.plan.describe(), "comparator": d.cascade.comparator,
                                  "first": d.cascade.plan.step_names(1)}
        await self._remember(d, routing["request_id"], d.mapping.target)
        await asyncio.to_thread(self.stats.record, d.profile.name, policy=d.decision.policy,
                                model=self._counted(d.mapping.target, d.mapping.model),
                                router_ms=d.router_ms, total_ms=d.router_ms, router_failed=d.router_failed is not None,
                                privacy_rule=d.mapping.privacy_rule)
        return {"model": d.mapping.model, **routing}

    def _counted(self, target: str | None, model: str | None) -> str | None:
        """What stats count a request under: a pool model's name (two may share a model id),
        else the model id."""
        return target if self.pool is not None and target in self.pool.names else model

    # -- answering --------------------------------------------------------------
    def _targets(self, d: Decided) -> list[tuple[str, str]]:
        """The mapped model, then its fallbacks; a private query's only among its rule's models."""
        if self.pool is not None and d.mapping.target in self.pool.names:  # down the pool by price, then up
            fallbacks = self.pool.fallbacks(d.mapping.target)
        else:
            fallbacks = d.profile.fallbacks
        if d.mapping.allowed is not None:  # then the rule's other models, never one outside it
            fallbacks = [a for a in [*fallbacks, *d.mapping.allowed] if a in d.mapping.allowed]
        return servable(d.profile, d.mapper, [d.mapping.target, *fallbacks])

    async def answer(self, d: Decided) -> Answered:
        """The whole answer: an abstention, the council's, a cascade's, or the first target's
        that answers."""
        if d.cascade is not None and (answered := await self._cascade(d)) is not None:
            return answered
        await self.reserve(d)
        held = d.bill.holds[0] if d.bill.holds else None  # the mapped model's (or the council's)
        routing = self.routing(d, "chatcmpl")
        usage, tier, fallback_from = {"prompt_tokens": 0, "completion_tokens": 0}, None, []
        try:
            if d.mapping.abstain:
                content, model = ABSTAIN_ANSWER, "abstain"
            elif d.mapping.escalate:
                try:
                    content, model, usage = await asyncio.to_thread(council_answer, d.mapper.escalation_url,
                                                                    d.body.plain_messages(),
                                                                    self.config.escalation_timeout_s)
                    held.cost = cost_usd(usage["prompt_tokens"], usage["completion_tokens"], self._council_price(d))
                    routing["escalated"] = True
                except RuntimeError as exc:  # the council failed: the strongest model answers, charged as itself
                    routing["escalation_failed"] = str(exc)
                    served, _ = await self._call(d, self._strongest(d), self.backends.answer, held)
                    content, model, tier = served.result.text, served.model, served.target
                    usage = {"prompt_tokens": served.result.input_tokens,
                             "completion_tokens": served.result.output_tokens}
                    fallback_from = served.attempts
            else:
                served, _ = await self._call(d, self._targets(d), self.backends.answer, held)
                content, model, tier = served.result.text, served.model, served.target
                usage = {"prompt_tokens": served.result.input_tokens, "completion_tokens": served.result.output_tokens}
                fallback_from = served.attempts
        except Exception as exc:
            await self.abandon(d)
            raise await self._upstream_failed(d, exc) from None
        routing.update(model=model, served_by=tier or d.mapping.target, fallback=bool(fallback_from),
                       fallback_from=fallback_from)
        usage = await self._settle(d, routing, model, tier, usage, content)
        return Answered(content, model, usage, routing)

    async def stream(self, d: Decided):
        """(routing, items): the answer as the model sends it. ``items`` yields text deltas,
        then the usage block once the cost is charged. A fallback before the first text is
        invisible; a caller that leaves mid-answer stops the model (a local one at the next
        token) and is charged what was generated (4 characters a token). An abstention and
        the council's answer come whole, a cascade's as it streams when its model is the
        last called (a jump; a last step of one model that nothing before can agree with),
        else whole once known: the earlier steps' answers are never sent."""
        if d.cascade is not None and (streamed := await self._cascade(d, stream=True)) is not None:
            return streamed
        await self.reserve(d)
        if d.mapping.abstain or d.mapping.escalate:
            answered = await self.answer(d)
            return answered.routing, whole(answered)
        routing = self.routing(d, "chatcmpl")
        try:
            streamed, hold = await self._call(d, self._targets(d), self.backends.stream,
                                              d.bill.holds[0] if d.bill.holds else None)
        except Exception as exc:
            await self.abandon(d)
            raise await self._upstream_failed(d, exc) from None
        routing.update(model=streamed.model, served_by=streamed.target, fallback=bool(streamed.attempts),
                       fallback_from=streamed.attempts)

        async def settle(text: str, result: LLMResult) -> dict:
            usage = {"prompt_tokens": result.input_tokens, "completion_tokens": result.output_tokens}
            return await self._settle(d, routing, streamed.model, streamed.target, usage, text)

        return routing, self._read(d, routing, streamed, hold, settle)

    def _read(self, d: Decided, routing: dict, streamed: Streamed, hold: Hold, settle):
        """``streamed``'s text deltas as they come, then the usage block: once read (or cut
        short: the caller left, the stream broke; what was generated is charged), its cost
        goes to ``hold`` and ``settle(text, result)`` settles the request, shielded from
        the caller going away. ``d.finish`` does the same once for a caller that left
        before the first chunk was read (``finish``): the steps it paid for are charged."""
        sent, chunks, done = [], streamed.items(), []

        async def finish(result: LLMResult | None = None) -> dict | None:
            if done:
                return None
            done.append(True)
            await chunks.aclose()
            if result is None:
                result = LLMResult("".join(sent) or None, ERROR, len(d.prompt) // 4, len("".join(sent)) // 4)
                routing["stream_interrupted"] = True
            hold.cost = cost_usd(result.input_tokens, result.output_tokens, streamed.price)
            return await asyncio.shield(settle("".join(sent), result))

        async def items():
            result = None
            try:
                async for item in chunks:
                    if isinstance(item, str):
                        sent.append(item)
                        yield item
                    else:
                        result = item
            finally:
                usage = await finish(result)
            yield usage

        d.finish = finish
        return items()

    async def finish(self, d: Decided) -> None:
        """A streamed request's settlement, when its reading never began (the caller left
        first): a no-op once ``items`` has settled it."""
        if d.finish is not None:
            await d.finish()

    async def _call(self, d: Decided, targets: list[tuple[str, str]], send, hold: Hold | None):
        """``send`` (the backends' ``answer`` or ``stream``) to the first of ``targets`` that
        answers, each under a hold of its own upper-bound cost on ``d.bill`` (``hold``: the
        first one's, made already): a failed target's hold is dropped before the next one's
        is made, and a target the budget or its own cap cannot cover is not called (as a
        capped fallback never is). (What ``send`` returned, its hold); AllTargetsFailed with
        every attempt when none answers."""
        attempts: list[dict] = []
        for alias, model in targets:
            if hold is not None and hold.model != alias:
                await self._money(d, d.bill.failed, hold)
                hold = None
            if hold is None:
                try:
                    hold = await self._money(d, d.bill.admit, alias, self._bound(d, (alias, model)))
                except Unaffordable:
                    continue
            try:
                out = await send([(alias, model)], d.prompt, d.system, d.asked, d.profile.name)
            except Exception as exc:
                await self._money(d, d.bill.failed, hold)
                if not isinstance(exc, AllTargetsFailed):
                    raise
                attempts += exc.attempts
                hold = None
                continue
            out.attempts[:0] = attempts
            if isinstance(out, Served):  # a stream's cost is known once read (``_read``)
                hold.cost = out.cost_usd
            return out, hold
        if hold is not None:  # made for a target that is not among them
            await self._money(d, d.bill.failed, hold)
        raise AllTargetsFailed(attempts)

    async def _cascade(self, d: Decided, stream: bool = False):
        """The cascade: each step's models called together, each call held and paid on
        ``d.bill``, the policy asked after each step; the answer it stops with: Answered,
        or for ``stream`` (routing, items), the final answer streamed when its model is the
        last called. None when the budget cannot cover the first call (nothing was called):
        the request is then mapped as over budget, as without a cascade."""
        await self.reserve(d)
        bill = d.bill

        async def call(model: str, step: int, send=self.backends.answer) -> Call:
            targets = servable(d.profile, d.mapper, [model])
            if not targets:
                return Call(model, step, error="not allowed for this profile")
            try:
                hold = await self._money(d, bill.admit, model, self._bound(d, targets[0]))
            except LedgerError as exc:  # with nothing paid the request goes on as over budget, and meets it again
                raise Unaffordable(f"the budget could not be read ({'database' if exc.database else 'ledger'})") \
                    from None
            try:
                out, hold = await self._call(d, targets, send, hold)
            except RejectedRequest:
                raise
            except Exception as exc:  # the cascade goes on without this model's answer
                return Call(model, step, error=_failure(exc))
            if isinstance(out, Streamed):  # its text and cost come as it is sent (``_read``)
                return Call(model, step, "", streamed=out, hold=hold)
            return Call(model, step, out.result.text, out, hold=hold)

        lam = self.router.lam if d.lam is None else d.lam
        final = functools.partial(call, send=self.backends.stream) if stream else None
        try:
            run = d.run = await run_cascade(d.cascade, d.decision.p_correct, lam, call, final)
        except Exception as exc:  # a call refused as invalid, or the policy failing
            await self.abandon(d)  # calls in flight beside it: nothing to pay for
            if any(h.cost is not None for h in bill.holds):  # paid steps before it: charged all the same
                await self._journal(await self._pay(d, {}), {})
            raise await self._upstream_failed(d, exc) from None
        if run.final is None and not run.calls:
            d.cascade, d.bill, d.run = None, None, None
            d.mapping = await self._mapped(d.mapper, d.map, over_budget=True)
            return None
        routing = self.routing(d, "chatcmpl")
        routing["cascade"] = _cascade_routing(d.cascade, run)
        if run.final is None:  # no model it called answered: what any of them cost is charged, then 503
            await self._journal(await self._pay(d, routing), routing)
            raise Unavailable(f"no model of the cascade {d.cascade.plan.describe()} could answer: "
                              f"{'; '.join(f'{c.model}: {c.error}' for c in run.calls)}", "all_models_failed",
                              retry_after_s=5)
        final = run.final
        if final.streamed is not None:  # the routing goes first; the call's cost and usage once read
            streamed, policy = final.streamed, d.cascade
            routing.update(model=streamed.model, served_by=final.model, fallback=False, fallback_from=[])

            async def settle(text: str, result: LLMResult) -> dict:
                final.text = text
                final.served = Served(result, streamed.target, streamed.model, final.hold.cost, streamed.attempts)
                routing["cascade"] = _cascade_routing(policy, run)
                usage = {"prompt_tokens": result.input_tokens, "completion_tokens": result.output_tokens}
                return await self._settle(d, routing, streamed.model, final.model, usage, text)

            return routing, self._read(d, routing, streamed, final.hold, settle)
        usage = {"prompt_tokens": final.served.result.input_tokens, "completion_tokens": final.served.result.output_tokens}
        routing.update(model=final.served.model, served_by=final.model, fallback=False, fallback_from=[])
        usage = await self._settle(d, routing, final.served.model, final.model, usage, final.text)
        answered = Answered(final.text, final.served.model, usage, routing)
        return (routing, whole(answered)) if stream else answered

    async def _upstream_failed(self, d: Decided, exc: Exception) -> Refused:
        with contextlib.suppress(DatabaseError):  # the caller hears why the models failed, not the counter
            await self._in_db(self.stats.record_error, d.profile.name, d.mapping.privacy_rule)
        if isinstance(exc, RejectedRequest):  # the caller's fault: nothing cooled down, nothing retried
            return InvalidRequest(f"the model refused this request as invalid ({exc.status}); check its "
                                  "messages and parameters", "upstream_invalid_request")
        if isinstance(exc, AllTargetsFailed):
            if exc.attempts and all(a.get("too_long") for a in exc.attempts):  # retrying cannot help
                return InvalidRequest(f"the conversation is too long for the models that may answer it: {exc}",
                                      "prompt_too_long", param="messages")
            cooling = self.backends.cooling(d.profile.name)
            retry_after_s = int(max(cooling.values(), default=5)) + 1
            if d.mapping.allowed is not None:
                return Unavailable(f"privacy rule {d.mapping.rule!r} keeps this conversation on "
                                   f"{', '.join(d.mapping.allowed)}, and none of them could answer: {exc}",
                                   "private_models_unavailable", retry_after_s=retry_after_s)
            return Unavailable(f"no model could answer: {exc}", "all_models_failed", retry_after_s=retry_after_s)
        log.error("upstream call failed for profile %s: %r", d.profile.name, exc)
        return UpstreamFailed(f"the upstream model call failed ({type(exc).__name__})", "upstream_error")

    # -- charging (serve/cascade.py Bill) -----------------------------------------
    async def reserve(self, d: Decided) -> None:
        """Hold an upper bound of the cost of the mapped model's call (or the council's) in
        the profile's budget and the model's own cap, each check and its reservation one
        locked step; when the budget is used up meanwhile, map again as over budget, when
        the model's cap is, without that model (the mapping may change: read it after
        this). Once per request; a cascade holds each call as it makes it."""
        if d.bill is not None:
            return
        budget_rules = {r.label for r in d.mapper.rules if r.kind == "budget"}
        d.bill = Bill(d.mapper, in_budget=d.mapping.rule not in budget_rules)
        if d.cascade is not None:
            return
        over, capped = False, frozenset()
        while d.mapping.model is not None or d.mapping.escalate:  # a council is paid like a model
            target = None if d.mapping.escalate else (d.mapping.target, d.mapping.model)
            try:
                await self._money(d, d.bill.admit, d.mapping.target, self._bound(d, target))
                return
            except Unaffordable as exc:
                if exc.model is None:  # the budget: its rule answers, paid without a reservation
                    over, d.bill.in_budget = True, False
                else:
                    capped |= {exc.model}
                d.mapping = await self._mapped(d.mapper, d.map, over_budget=over, capped=capped)

    async def _money(self, d: Decided, fn, *args):
        """``fn(*args)``, a method of ``d.bill``: in the state database's threads when the
        profile keeps a ledger (a frozen one holds its own callers only), else here (it
        reads nothing)."""
        return await self._in_db(fn, *args) if d.mapper.ledger is not None else fn(*args)

    def _council_price(self, d: Decided) -> tuple[float, float]:
        """The council's price per million tokens: its configured one, else the dearest
        model's (the council calls at least one model like it: a lower bound)."""
        return d.mapper.escalation_price or self.backends.reference_price(d.mapper)

    def _strongest(self, d: Decided) -> list[tuple[str, str]]:
        """Who answers when the council fails: the dearest model the profile may use, then
        its fallbacks."""
        dearest = self.pool.by_price()[-1].name if self.pool is not None else "large"
        return servable(d.profile, d.mapper, [dearest, *d.profile.fallbacks])

    def _bound(self, d: Decided, target: tuple[str, str] | None) -> float:
        """Above what one call of ``target`` (alias, model id; None: the council) can cost for
        ``d``: prompt tokens at 2 characters each and the whole output budget (the caller's,
        else the model's; the server's for the council)."""
        if target is None:
            out_tokens, price = self.config.max_output_tokens, self._council_price(d)
        else:
            spec = self.backends.spec_for(*target)
            out_tokens, price = spec.max_output_tokens, spec.price
        return cost_usd(len(d.prompt) // 2 + 1, d.asked or out_tokens, price)

    async def abandon(self, d: Decided) -> None:
        """The request ends before its calls were made (the caller left, the models
        failed): nothing is paid for them."""
        if d.bill is not None:
            await self._money(d, d.bill.abandon)

    async def _pay(self, d: Decided, routing: dict) -> dict:
        """``d.bill`` settled: every call charged in place of its reservations. What the
        state database could not take, as journal parts ({"spends": [...]})."""
        spends, error = await self._money(d, d.bill.settle)
        if error is not None:
            routing["budget_error"] = error
        return {"spends": spends} if spends else {}

    async def _journal(self, journal: dict, routing: dict) -> None:
        """What settling could not write to the state database, into the local journal
        (replayed before the next budgeted request), said in ``routing``."""
        if not journal:
            return
        try:
            if self.journal is None:
                raise JournalError("this gateway has no spend journal")
            await self._in_db(self.journal.append, journal)
            routing.update({{"spends": "spend_journaled", "answer": "answer_journaled"}[part]: True
                            for part in journal})
        except JournalError as exc:  # the local disk fails too: said, and logged for an operator
            log.error("%s; not recorded: %s", exc, journal)
            routing["budget_error"] = "the spend of this request could not be recorded"

    async def _settle(self, d: Decided, routing: dict, model: str, tier: str | None, usage: dict,
                      content: str | None) -> dict:
        """What every answered request does once its cost is known: pay its bill, count it,
        remember it for feedback, record the answer of its Idempotency-Key, log the
        decision. The answer is paid for: nothing here stops it from being returned; what
        could not be written is said in ``routing`` and the spend and the recorded answer
        go to the journal. Returns the usage block."""
        cost = d.bill.cost
        routing.update(cost_usd=round(cost, 8))
        d.cost_usd, d.escalated = cost, bool(routing.get("escalated"))
        if d.shadow is not None:  # written when the router has decided, never waited for here
            self._spawn(self._record_shadow(d, routing["request_id"], usage, tier, cost))
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        journal = await self._pay(d, routing)
        large_price = self.backends.reference_price(d.mapper)
        total_ms = (time.perf_counter() - d.t0) * 1000
        count = functools.partial(
            self.stats.record, d.profile.name, policy=d.decision.policy, model=self._counted(tier, model),
            router_ms=d.router_ms, privacy_rule=d.mapping.privacy_rule,
            router_failed=d.router_failed is not None,
            total_ms=total_ms, cost_usd=cost, fell_back=bool(routing.get("fallback")),
            escalated=bool(routing.get("escalated")),
            large_equivalent_usd=cost_usd(usage["prompt_tokens"], usage["completion_tokens"], large_price),
            **({"called": tuple(c["model"] for c in cascade["steps"]),  # pool names
                "cascade_escalated": cascade["escalated"]} if (cascade := routing.get("cascade")) else {}))
        if d.mapper.ledger is None and d.claim is None:  # nothing it records is money or an answer: it never waits long
            await self._record_bounded(d, routing, tier, count)
        else:
            routing.update(await self._record(d, routing["request_id"], tier, count))
        if d.claim is not None:
            record = {**d.claim, "at": time.time(), "answer": {"content": content, "model": model, "usage": usage,
                                                               "routing": dict(routing)}}
            try:
                await self._in_db(self.idempotency.record, record)
            except DatabaseError as exc:
                log.error("idempotency: %s", exc)
                journal["answer"] = record
        await self._journal(journal, routing)
        if self.decision_log_path is not None:
            try:
                decision_log.append(self.decision_log_path, {
                    **decision_log.decision_record(d.decision, d.mapping, latency_ms=total_ms, cost_usd=cost),
                    "request_id": routing["request_id"], "profile": d.profile.name, "served_by": routing["served_by"],
                    "fallback": routing["fallback"], **{k: routing[k] for k in ("private", "router_failed") if k in routing}})
            except OSError as exc:
                log.error("decision log: %s", exc)
        return usage

    async def _record(self, d: Decided, request_id: str, tier: str | None, count, pool: str = "request") -> dict:
        """Remember the request for feedback, then count it (``count``: its ``stats.record``);
        what could not be written, as ``routing``'s flags."""
        failed = {}
        try:
            await self._remember(d, request_id, tier, pool=pool)
        except DatabaseError as exc:  # only its feedback is lost
            log.error("request memory of %s, so feedback for it is unavailable: %s", request_id, exc)
            failed["feedback_unavailable"] = True
        try:
            await self._in_db(count, pool=pool)
        except DatabaseError as exc:
            log.error("stats of %s: %s", request_id, exc)
            failed["stats_unavailable"] = True
        return failed

    async def _record_bounded(self, d: Decided, routing: dict, tier: str | None, count) -> None:
        """``_record`` for a request without a budget or a key: waited for at most
        ``record_wait_s``, and not at all while earlier ones are overdue or a statement
        has held the database longer than that (it is locked or frozen). Past it the
        answer goes back with ``recording_deferred`` and the writes finish in the
        background (what fails then is logged: stats dropped, or no feedback for it)."""
        request_id, wait_s = routing["request_id"], self.config.record_wait_s
        if len(self._background) >= self.config.max_deferred_recordings:
            log.error("%d writes wait for the state database: request %s is not counted and feedback for it is "
                      "unavailable", len(self._background), request_id)
            routing.update(stats_unavailable=True, feedback_unavailable=True)
            return
        task = self._spawn(self._record(d, request_id, tier, count, pool="recording"))
        if self._overdue or self.feedback.db.held_s() > wait_s:
            wait_s = 0.0
        try:
            routing.update(await asyncio.wait_for(asyncio.shield(task), wait_s))
            return
        except asyncio.TimeoutError:
            pass
        routing["recording_deferred"] = True
        self._overdue += 1

        def written(task: asyncio.Task) -> None:
            self._overdue -= 1
            if task.cancelled():
                log.error("request %s: its deferred stats and request memory were dropped (the server stopped); "
                          "feedback for it is unavailable", request_id)
            elif task.exception() is not None:
                log.error("request %s: its deferred stats and request memory failed: %r", request_id,
                          task.exception())

        task.add_done_callback(written)

    async def _remember(self, d: Decided, request_id: str, tier: str | None, pool: str = "request") -> None:
        """The request, for feedback (its tier when medium or large served it), and what it
        was served as (its arm, policy, model and cost: online quality)."""
        def remember():
            self.feedback.remember(ServedRequest(request_id, d.profile.name, d.text,
                                                 tier if tier in self.feedback.tiers else None,
                                                 d.profile.store_queries))
            record_served(self.feedback.db, request_id, d.profile.name,
                          d.profile.experiment.name if d.arm else None, d.arm.name if d.arm else None,
                          d.decision.policy, tier, d.cost_usd, d.escalated)
            if d.run is not None and d.profile.store_queries:  # labels for retraining that no judge was paid for
                record_cascade(self.feedback.db, request_id, d.profile.name, d.text,
                               {c.model: c.text for c in d.run.calls}, {c.model: c.cost for c in d.run.calls},
                               d.run.agreed)
        await self._in_db(remember, pool=pool)

    async def budget(self, profile: Profile) -> dict | None:
        """The profile's budget as /v1/stats shows it: the ledger, its limit, spend,
        reservations in flight and what is left this period, and each per-model cap's;
        None without a budget."""
        m = profile.mapper
        if m.ledger is None:
            return None
        out = {"ledger": m.ledger.name, "period_kind": m.ledger.period,
               **await self._in_db(m.ledger.headroom, m.budget_limit())}
        if m.model_budgets:
            out["models"] = {alias: await self._in_db(m.ledger.part(alias).headroom, cap)
                             for alias, cap in m.model_budgets.items()}
        return out

    # -- live configuration (serve/live.py) -------------------------------------
    def build_profiles(self, spec: dict) -> Profiles:
        """Profiles from the profiles file's contents, checked as the file is: the mappers,
        then every model name an experiment's arm, a knob or a pin asks for, as a caller
        would ask for it."""
        from router_pipeline.serve.profiles import profiles_from_spec

        profiles = profiles_from_spec(spec, self.live.path if self.live else Path("profiles.yaml"),
                                      calibration=self.calibration, default_models=self.default_models,
                                      pool=[m.name for m in self.pool.by_price()] if self.pool else None,
                                      private=self.backends.private, cascade=self.released_cascade)
        self.check_names(profiles)
        return profiles

    def check_names(self, profiles: Profiles) -> None:
        for profile in profiles.profiles.values():
            names = [(f"experiment {profile.experiment.name!r} arm {a.name!r}", a.model)
                     for a in (profile.experiment.arms if profile.experiment else ())]
            names += [("knob", profile.knob)] if profile.knob else []
            names += [(f"pin of user {user!r}", model) for user, model in profile.pins.items()]
            for what, name in names:
                try:
                    self._named(profile, name) or self._mapper(profile, name)
                except Refused as exc:
                    raise ProfileError(f"profile {profile.name!r}: {what}: {exc.message}") from None

    def adopt(self, profiles: Profiles) -> None:
        """``profiles`` serve the next requests: budgets bound to the state database, local
        models they may use loaded, then one assignment (requests in flight keep theirs)."""
        for profile in profiles.profiles.values():
            if profile.mapper.ledger is not None:
                if self.identity is None:  # refused when it is not the database the budgets were kept in
                    self.identity = StateIdentity(self.feedback.db, self.feedback.folder, self.config.identity_check_s)
                    self.identity.establish(self.config.accept_new_database)
                profile.mapper.ledger.bind(self.feedback.db)
        if loaded := self.backends.preload_local([t for p in profiles.profiles.values() for t in reachable(p)]):
            log.info("local models loaded: %s", ", ".join(loaded))
        self.profiles = profiles

    async def configure(self, action: str, *args) -> Profiles | None:
        """``LiveConfig.<action>(*args)`` (change, revoke, reload, current: the profiles to
        serve, or None) in the state database's threads, one at a time, then adopted."""
        if self.live is None:
            raise Conflict("live configuration needs a profiles file: start the server with --profiles",
                           "no_profiles_file")
        self._configuring = self._configuring or asyncio.Lock()
        async with self._configuring:
            try:
                profiles = await self._in_db(getattr(self.live, action), *args)
            except ProfileError as exc:
                raise InvalidRequest(str(exc), "invalid_configuration") from None
            if profiles is not None:
                await self._in_db(self.adopt, profiles)
                if self._adopted is not None:
                    self._adopted.set()  # the watch reads the new expiry
            return profiles

    async def _watch_config(self) -> None:
        """Build the profiles again when a change expires (on time) and when the database
        holds changes this process has not applied (another replica's)."""
        while True:
            now, expires = time.time(), self.profiles.expires_at
            wait_s = max(0.0, min(self.config.config_refresh_s, (expires or now + 1e9) - now))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._adopted.wait(), wait_s)
                self._adopted.clear()
                continue
            try:
                stored = await self._in_db(active_changes, self.live.db, time.time())
                if [c.id for c in stored] != [c.id for c in self.profiles.changes]:
                    await self.configure("current")
            except (DatabaseError, Refused) as exc:  # the current configuration serves on; tried again
                log.error("live configuration: could not be refreshed: %s", exc)
            except Exception as exc:  # never the end of the watch
                log.error("live configuration: refresh failed: %r", exc)

    def config_view(self) -> dict:
        """What /v1/admin/config shows: each profile's live fields and the changes in force."""
        return {"version": self.profiles.version, "file": str(self.live.path) if self.live else None,
                "expires_at": self.profiles.expires_at,
                "profiles": {p.name: {"knob": p.knob, "pins": p.pins, "allowed": list(p.allowed),
                                      "fallbacks": list(p.fallbacks), "shadow": p.shadow,
                                      "router_failure": p.router_failure, "store_queries": p.store_queries,
                                      "experiment": p.experiment.name if p.experiment else None,
                                      "rules": [r.label for r in p.mapper.rules]}
                             for p in self.profiles.profiles.values()},
                "changes": [c.view() for c in self.profiles.changes]}

    # -- feedback ---------------------------------------------------------------
    async def give_feedback(self, profile: Profile, request_id: str, **grades) -> dict:
        try:
            return await asyncio.to_thread(self.feedback.add, request_id, profile=profile.name, **grades)
        except UnknownRequest:
            raise NotFound("no such request served to this profile", "unknown_request", param="request_id") from None
        except FeedbackConflict as exc:
            raise Conflict(str(exc), "feedback_conflict") from None
        except FeedbackError as exc:
            raise InvalidRequest(str(exc), "invalid_feedback") from None


def _asked(profile: Profile, body: Conversation, key: str, headers) -> tuple[str | None, Arm | None]:
    """(the model name a request is served as, its experiment arm): for 'router', a pinned
    user's model, else its arm's, else the profile's knob; else the name it asked for."""
    asked, arm = body.model, None
    if asked not in (None, ROUTER_MODEL):  # a caller that names a model is in no experiment
        return asked, None
    user = (body.model_extra or {}).get("user")  # OpenAI's end-user id
    if isinstance(user, str) and user in profile.pins:
        return profile.pins[user], None
    if (e := profile.experiment) is not None:
        arm = e.assign(headers.get(e.key_header) or key if e.key_header else key)
        asked = arm.model
    if asked in (None, ROUTER_MODEL) and profile.knob is not None:
        asked = profile.knob
    return asked, arm


async def whole(answered: Answered):
    """An answer known whole, as stream items: its text, then its usage block."""
    yield answered.content
    yield answered.usage


def _cascade_routing(policy, run: CascadeRun) -> dict:
    """``routing.cascade``: the plan, why it stopped, each call (a call still streamed: its
    cost not known yet, None) and every call's usage."""
    return {"plan": policy.plan.describe(), "stopped": run.stopped, "escalated": any(c.step > 1 for c in run.calls),
            "steps": [{"step": c.step, "model": c.model,
                       "cost_usd": None if c.served is None and c.streamed is not None else round(c.cost, 8),
                       "kept": c is run.final, **({"failed": c.error} if c.error else {})} for c in run.calls],
            # The reply's usage is the answer's own (as from one model); the charge counts every call.
            "usage": {k: sum(getattr(c.served.result, t) for c in run.calls if c.served) for k, t in
                      (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens"))}}


def _failure(exc: Exception) -> str:
    """Why a model gave no answer, as a caller may read it (never hosts or reprs)."""
    if isinstance(exc, AllTargetsFailed):
        return "; ".join(a.get("error", "failed") for a in exc.attempts) or "cooling down"
    return f"failed ({type(exc).__name__})"


def _apply_journaled(db, entry: dict) -> None:
    """A journal entry written into the state database (inside the replay's transaction)."""
    # Every charge of the request (the profile's budget, the models' own); "spend" and
    # "model_spend": one each, as journals written before cascades hold them.
    for spend in [*entry.get("spends", []), *(entry[k] for k in ("spend", "model_spend") if entry.get(k))]:
        replay_spend(db, spend)
    if answer := entry.get("answer"):
        IdempotencyStore.write(db, answer)
    if release := entry.get("release"):
        IdempotencyStore.forget(db, release["profile"], release["key"], release.get("owner"))


def _replayed(answer: dict) -> Answered:
    """A recorded answer, given again (nothing is called or charged)."""
    return Answered(answer["content"], answer["model"], answer["usage"], {**answer["routing"], "idempotent_replay": True})


def _threshold_mapper(mapper: PolicyMapper, threshold: float) -> PolicyMapper:
    """The profile's mapper with its threshold set (inserted before the first policy rule
    when it has none): privacy, budget and other rules stay as they are."""
    rule = Rule("threshold", "large", name=f"threshold_{threshold:g}", at_least=threshold)
    rules = [replace(r, at_least=threshold, name=rule.name) if r.kind == "threshold" else r for r in mapper.rules]
    if not any(r.kind == "threshold" for r in rules):
        first_policy = next((i for i, r in enumerate(rules) if r.kind == "policy"), len(rules))
        rules.insert(first_policy, rule)
    return PolicyMapper(rules, mapper.models, mapper.fallback, mapper.ledger, mapper.escalation_url,
                        mapper.model_budgets, mapper.private, mapper.escalation_price)


def servable(profile: Profile, mapper: PolicyMapper, aliases: list[str]) -> list[tuple[str, str]]:
    """(alias, model id) of ``aliases`` that may answer for the profile, in order, each once."""
    return [(a, mapper.models[a]) for a in dict.fromkeys(aliases) if a in profile.allowed and a in mapper.models]


def reachable(profile: Profile) -> list[tuple[str, str]]:
    """Every model the profile's requests may be answered by: its rules' and mapper's
    targets and its fallbacks."""
    m = profile.mapper
    return servable(profile, m, [t for r in m.rules for t in (r.target, *r.map.values(),
                                                              *(m.allowed_by(r) if r.kind == "privacy" else ()))]
                    + [m.fallback, *profile.fallbacks])


def build_gateway(adapter: str | Path | None, *, profiles_path: str | Path | None = None,
                  feedback_dir: str | Path, config: ServingConfig = DEFAULTS,
                  decision_log_path: str | Path | None = None, router: Router | None = None,
                  profiles: Profiles | None = None) -> Gateway:
    """Everything a request needs, loaded once: the router, the profiles, the backends."""
    from router_pipeline.llm.roles import roles_for
    from router_pipeline.routers.registry import load_router
    from router_pipeline.serve.profiles import load_profiles

    roles = roles_for(settings.load())
    if config.upstream_timeout_s is not None:
        roles = replace(roles, timeout_s=config.upstream_timeout_s)
    router = router or load_router(adapter, RouterConfig(batch_size=config.max_batch, prefix_cache=config.prefix_cache,
                                                         precision=config.precision))
    pool = router.pool() if hasattr(router, "lambda_for") else None  # a pool router knows its pool
    if pool is None:
        models, names = {tier: roles.spec(tier).model for tier in TIERS}, None
    else:
        models, names = {m.name: m.model for m in pool.models}, [m.name for m in pool.by_price()]
    batcher = RouteBatcher(router, window_ms=config.window_ms, max_batch=config.max_batch if config.batching else 1)
    backends = Backends(roles, config, local_waits_for=batcher.idle, pool=pool)
    released = released_cascade(router) if pool is not None else None
    profiles = profiles or load_profiles(profiles_path, calibration=router.calibration, default_models=models,
                                         pool=names, private=backends.private, cascade=released)
    feedback = FeedbackStore(feedback_dir, database=config.database, timeout_s=config.database_timeout_s,
                             tiers=tuple(names) if names else TIERS)
    identity = None
    for profile in profiles.profiles.values():  # budgets in the state database: replicas sharing it share them
        if profile.mapper.ledger is not None:
            if identity is None:  # refused when it is not the database the budgets were kept in
                identity = StateIdentity(feedback.db, feedback_dir, config.identity_check_s)
                identity.establish(config.accept_new_database)
            profile.mapper.ledger.bind(feedback.db)
    if loaded := backends.preload_local([t for p in profiles.profiles.values() for t in reachable(p)]):
        log.info("local models loaded before serving: %s", ", ".join(loaded))
    gateway = Gateway(
        router=router, batcher=batcher, profiles=profiles, backends=backends,
        feedback=feedback, stats=Stats(feedback.db), calibration=router.calibration,
        config=config, decision_log_path=Path(decision_log_path) if decision_log_path else None,
        journal=SpendJournal(feedback_dir), idempotency=IdempotencyStore(feedback.db, config.idempotency_window_s),
        identity=identity, pool=pool, default_models=models, released_cascade=released)
    gateway.check_names(profiles)
    callers = {d: p.name for p in profiles.profiles.values() for d in p.key_digests}
    if shared := [callers[d] for d in admin_keys() if d in callers]:
        raise ProfileError(f"{ADMIN_KEY_VAR} holds a key of profile(s) {', '.join(shared)}: an admin key must not "
                           "be a caller's")
    if profiles.path is not None:  # the changes made through the admin API, kept in the state database
        gateway.live = LiveConfig(profiles.path, feedback.db, gateway.build_profiles, profiles.spec)
        if (current := gateway.live.current()).version:
            gateway.adopt(current)
    return gateway
