"""The routing server: an OpenAI-compatible chat endpoint in front of the medium and large
models, plus route / feedback / stats (``router-pipeline serve``; FastAPI + uvicorn).

- ``POST /v1/chat/completions`` (OpenAI wire format, ``stream`` or not): ``model`` is
  ``router`` (the caller's profile mapping: by default the calibrated threshold the
  evaluation scored) or ``router-<threshold>`` (P(Complex_Query) >= threshold -> large).
  The router decides on the whole conversation; the reply says which model answered
  and why in the ``X-Router-Route`` header and a ``routing`` field (OpenAI clients
  keep unknown fields in ``model_extra``).
- ``POST /v1/route``: the decision only, for callers that call models themselves.
- ``POST /v1/feedback``: a grade or a preferred tier for a request id; lands in the
  outcomes file the pipeline's ``outcomes`` source reads (serve/feedback.py).
- ``GET /v1/stats``, ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).

Callers authenticate with ``Authorization: Bearer <key>`` (serve/profiles.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from router_pipeline import settings
from router_pipeline.llm.pricing import cost_usd
from router_pipeline.llm.types import ERROR, LLMResult
from router_pipeline.router_format import conversation_text
from router_pipeline.serve import decision_log
from router_pipeline.serve.backends import AllTargetsFailed, Backends
from router_pipeline.serve.batcher import RouteBatcher
from router_pipeline.serve.config import DEFAULTS, ServingConfig
from router_pipeline.serve.database import DatabaseError
from router_pipeline.serve.feedback import FeedbackConflict, FeedbackError, FeedbackStore, ServedRequest, UnknownRequest
from router_pipeline.serve.ledger import LedgerError
from router_pipeline.serve.mapper import ABSTAIN_ANSWER, PolicyMapper, Rule
from router_pipeline.serve.profiles import Profile, Profiles
from router_pipeline.serve.schemas import ChatRequest, Conversation, FeedbackRequest, RequestError, parse
from router_pipeline.serve.stats import Stats
from router_pipeline.text import check_query

log = logging.getLogger(__name__)
ROUTER_MODEL = "router"
ADMIN_KEY_VAR = "ROUTER_ADMIN_KEY"  # the bearer key /metrics asks for when profiles are configured
TIERS = ("medium", "large")


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error", headers=None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type_, headers or {}
        self.param = param


@dataclass
class ServerState:
    router: object  # routing.Router or heads.HeadRouter (routing.load_router)
    batcher: RouteBatcher
    profiles: Profiles
    backends: Backends
    feedback: FeedbackStore
    stats: Stats
    calibration: dict
    config: ServingConfig = DEFAULTS
    decision_log_path: Path | None = None
    mappers: OrderedDict = field(default_factory=OrderedDict)  # (profile, threshold) -> mapper, LRU


@dataclass
class _Decided:
    """A request authenticated, parsed, routed and mapped."""

    t0: float
    profile: Profile
    body: Conversation
    mapper: PolicyMapper
    threshold: float | None
    text: str  # what the router read
    prompt: str  # what the answering model reads
    system: str | None
    decision: object
    mapping: object
    router_ms: float


# -- request helpers ------------------------------------------------------------
def _key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _profile(state: ServerState, request: Request) -> Profile:
    profile = state.profiles.authenticate(_key(request))
    if profile is None:
        raise APIError(401, "missing or unknown API key (Authorization: Bearer <key>)", "invalid_api_key",
                       "authentication_error")
    return profile


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to be over ``limit``: by its declared
    length before a byte is read, else while it streams in. Never held whole when too big."""
    too_big = APIError(413, f"request body is over the {limit:,}-byte limit", "body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def _parse(state: ServerState, request: Request, schema):
    try:
        return parse(schema, await _read_body(request, state.config.max_body_bytes))
    except RequestError as exc:
        raise APIError(400, str(exc), "invalid_field" if exc.param else "invalid_json", param=exc.param) from None


def _conversation(state: ServerState, body: Conversation) -> tuple[str, str, str | None]:
    """(routing text, prompt for the answering model, system text)."""
    messages = body.plain_messages()
    try:
        conversation = conversation_text(messages)
        text = check_query(conversation, state.config.max_conversation_chars)
    except ValueError as exc:
        raise APIError(400, f"messages: {exc}", "invalid_messages", param="messages") from None
    system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer") and m["content"]) or None
    return text, conversation, system


def _threshold_mapper(mapper: PolicyMapper, threshold: float) -> PolicyMapper:
    """The profile's mapper with its threshold set (inserted before the first policy rule
    when it has none): privacy, budget and other rules stay as they are."""
    rule = Rule("threshold", "large", name=f"threshold_{threshold:g}", at_least=threshold)
    rules = [replace(r, at_least=threshold, name=rule.name) if r.kind == "threshold" else r for r in mapper.rules]
    if not any(r.kind == "threshold" for r in rules):
        first_policy = next((i for i, r in enumerate(rules) if r.kind == "policy"), len(rules))
        rules.insert(first_policy, rule)
    return PolicyMapper(rules, mapper.models, mapper.fallback, mapper.ledger, mapper.escalation, mapper.escalation_url)


def _mapper(profile: Profile, model: str | None, cache: OrderedDict, size: int) -> tuple[PolicyMapper, float | None]:
    if model in (None, ROUTER_MODEL):
        return profile.mapper, None
    threshold = -1.0
    if model.startswith(ROUTER_MODEL + "-") and len(model) <= 32:
        with contextlib.suppress(ValueError):
            threshold = float(model[len(ROUTER_MODEL) + 1:])
    if not 0.0 <= threshold <= 1.0:  # NaN included
        shown = model if len(model) <= 64 else model[:64] + "..."
        raise APIError(404, f"model {shown!r} does not exist: use 'router' (the calibrated threshold) or "
                            f"'router-<threshold>' with a threshold in [0, 1], e.g. 'router-0.35'", "model_not_found",
                       param="model")
    key = (profile.name, threshold)
    if key in cache:
        cache.move_to_end(key)
    else:
        cache[key] = _threshold_mapper(profile.mapper, threshold)
        while len(cache) > size:
            cache.popitem(last=False)
    return cache[key], threshold


def _routing_info(decision, mapping, threshold, router_ms) -> dict:
    return {"policy": decision.policy, "probabilities": {k: round(v, 4) for k, v in decision.probabilities.items()},
            "p_complex": round(decision.p_large, 4), "rule": mapping.rule, "reason": mapping.reason,
            "target": mapping.target, "threshold": threshold, "parse_ok": decision.parse_ok,
            "router_ms": round(router_ms, 2)}


def _header(routing: dict) -> str:
    # Header values must be Latin-1; the reason may quote a query, so it stays in the body.
    return f"policy={routing['policy']}; model={routing.get('model') or routing['target']}; rule={routing['rule']}"


def _admin(state: ServerState, request: Request) -> None:
    """/metrics shows every profile's traffic and spend: with profiles configured, only
    the admin key (ROUTER_ADMIN_KEY) may read it."""
    if state.profiles.open:
        return
    admin = settings.secret(ADMIN_KEY_VAR)
    if admin is None:
        raise APIError(403, f"/metrics needs an admin key: set {ADMIN_KEY_VAR} where the server runs",
                       "admin_key_not_set", "permission_error")
    given = _key(request) or ""
    if not hmac.compare_digest(given.encode(), admin.encode()):
        raise APIError(401, "/metrics needs the admin key (Authorization: Bearer <admin key>)", "invalid_api_key",
                       "authentication_error")


# -- the app --------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()
            state.feedback.close()

    app = FastAPI(title="router_pipeline routing server", lifespan=lifespan)
    app.state.router_state = state
    cfg = state.config

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.type, "param": exc.param,
                                       "code": exc.code}}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(DatabaseError)
    async def database_error(request: Request, exc: DatabaseError):
        log.error("%s", exc)
        return JSONResponse({"error": {"message": "the server's state database is unavailable; try again later",
                                       "type": "server_error", "param": None, "code": "database_unavailable"}},
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(LedgerError)
    async def ledger_error(request: Request, exc: LedgerError):
        # Money state that cannot be read stops spending (fail closed), with the file named.
        log.error("budget ledger: %s", exc)
        return JSONResponse({"error": {"message": f"budget ledger {exc.file or ''} cannot be read: spending is "
                                                  "stopped until an operator restores it", "type": "server_error",
                                       "param": None, "code": "budget_ledger_unreadable"}}, status_code=503)

    async def decide(request: Request, schema) -> _Decided:
        t0 = time.perf_counter()
        profile = _profile(state, request)
        body = await _parse(state, request, schema)
        asked = body.output_tokens if isinstance(body, ChatRequest) else None
        if asked is not None and asked[1] > cfg.max_output_tokens:  # refused before any routing work
            raise APIError(400, f"{asked[0]}: at most {cfg.max_output_tokens} on this server", "invalid_field",
                           param=asked[0])
        mapper, threshold = _mapper(profile, body.model, state.mappers, cfg.threshold_mappers)
        text, prompt, system = _conversation(state, body)
        if mapper.ledger is not None:  # spend is recorded for this profile: an unreadable ledger stops it
            await asyncio.to_thread(mapper.ledger.read)
        decision = await state.batcher.route(text)
        mapping = await asyncio.to_thread(mapper.map, decision)  # rules may read files (the ledger)
        return _Decided(t0, profile, body, mapper, threshold, text, prompt, system, decision, mapping,
                        (time.perf_counter() - t0) * 1000)

    def upstream_failed(d: _Decided, exc: Exception) -> APIError:
        state.stats.record_error(d.profile.name)
        if isinstance(exc, AllTargetsFailed):
            return APIError(503, f"no model could answer: {exc}", "all_models_failed", "server_error",
                            {"Retry-After": str(int(max(state.backends.cooling().values(), default=5)) + 1)})
        log.error("upstream call failed for profile %s: %r", d.profile.name, exc)
        return APIError(502, f"the upstream model call failed ({type(exc).__name__})", "upstream_error", "server_error")

    async def reserve(d: _Decided, asked: int | None) -> str | None:
        """Reserve an upper bound of this request's cost in its profile's budget, in the same
        locked step as the budget check; when the budget is used up meanwhile, map again
        as over budget. The reservation's id (None: no budget, or nothing to reserve)."""
        limit = d.mapper.budget_limit()
        budget_rules = {r.label for r in d.mapper.rules if r.kind == "budget"}
        if limit is None or d.mapping.model is None or d.mapping.rule in budget_rules:
            return None
        spec = state.backends.roles.spec_for(d.mapping.target, d.mapping.model)
        # Prompt tokens at 2 characters each and the whole output budget: above what it can cost.
        estimate = cost_usd(len(d.prompt) // 2 + 1, asked or spec.max_output_tokens, spec.price)
        reservation = await asyncio.to_thread(d.mapper.ledger.admit, limit, estimate)
        if reservation is None:
            d.mapping = await asyncio.to_thread(d.mapper.map, d.decision, over_budget=True)
        return reservation

    async def release(d: _Decided, reservation: str | None) -> None:
        if reservation is not None:
            with contextlib.suppress(LedgerError):  # an unreadable ledger already stops spending
                await asyncio.to_thread(d.mapper.ledger.release, reservation)

    async def settle(d: _Decided, routing: dict, model: str, tier: str | None, usage: dict, cost: float,
                     reservation: str | None = None) -> dict:
        """What every answered request does once its cost is known: charge the ledger,
        count it, remember it for feedback, log the decision. Returns the usage block."""
        routing.update(cost_usd=round(cost, 8))
        try:
            await asyncio.to_thread(d.mapper.record_spend, cost, reservation)
        except LedgerError as exc:
            # The answer is paid for: return it; the next request meets the unreadable ledger (503).
            log.error("budget ledger: %s", exc)
            routing["budget_error"] = f"budget ledger {exc.file or ''} cannot be read: spending stops from the next request"
        large_price = state.backends.roles.spec_for("large", d.mapper.models["large"]).price
        total_ms = (time.perf_counter() - d.t0) * 1000
        state.stats.record(d.profile.name, policy=d.decision.policy, model=model, router_ms=d.router_ms,
                           total_ms=total_ms, cost_usd=cost, fell_back=bool(routing.get("fallback")),
                           escalated=bool(routing.get("escalated")),
                           large_equivalent_usd=cost_usd(usage["prompt_tokens"], usage["completion_tokens"], large_price))
        try:
            await asyncio.to_thread(state.feedback.remember, ServedRequest(
                routing["request_id"], d.profile.name, d.text, tier if tier in TIERS else None, d.profile.store_queries))
        except DatabaseError as exc:  # the answer is paid for: return it; only its feedback is lost
            log.error("request memory: %s", exc)
            routing["feedback_unavailable"] = True
        if state.decision_log_path is not None:
            decision_log.append(state.decision_log_path, {
                **decision_log.decision_record(d.decision, d.mapping, latency_ms=total_ms, cost_usd=cost),
                "request_id": routing["request_id"], "profile": d.profile.name, "served_by": routing["served_by"],
                "fallback": routing["fallback"]})
        return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        d = await decide(request, ChatRequest)
        asked = d.body.output_tokens
        reservation = await reserve(d, asked and asked[1])
        routing = {"request_id": f"chatcmpl-{uuid.uuid4().hex}",
                   **_routing_info(d.decision, d.mapping, d.threshold, d.router_ms)}
        include_usage = bool(d.body.stream_options and d.body.stream_options.include_usage)
        targets = [(t, d.mapper.models[t]) for t in [d.mapping.target, *d.profile.fallbacks]
                   if t in d.profile.allowed and t in d.mapper.models]
        if d.body.stream and not (d.mapping.abstain or d.mapping.escalate):
            try:  # fallbacks before the first text are invisible: the stream starts with the final target
                streamed = await state.backends.stream(targets, d.prompt, d.system, asked and asked[1])
            except Exception as exc:
                await release(d, reservation)
                raise upstream_failed(d, exc) from None
            routing.update(model=streamed.model, served_by=streamed.target, fallback=bool(streamed.attempts),
                           fallback_from=streamed.attempts)
            charge = functools.partial(settle, reservation=reservation)
            return StreamingResponse(_live_sse(d, routing, streamed, include_usage, charge),
                                     media_type="text/event-stream", headers=_headers(routing))
        usage, cost, tier, fallback_from = {"prompt_tokens": 0, "completion_tokens": 0}, 0.0, None, []
        try:
            if d.mapping.abstain:
                content, model = ABSTAIN_ANSWER, "abstain"
            elif d.mapping.escalate:
                content, model, usage = await _escalate(state, d.mapper.escalation_url, d.body.plain_messages())
                routing["escalated"] = True
            else:
                served = await state.backends.answer(targets, d.prompt, d.system, asked and asked[1])
                content, model, cost, tier = served.result.text, served.model, served.cost_usd, served.target
                usage = {"prompt_tokens": served.result.input_tokens, "completion_tokens": served.result.output_tokens}
                fallback_from = served.attempts
        except Exception as exc:
            await release(d, reservation)
            raise upstream_failed(d, exc) from None
        routing.update(model=model, served_by=tier or d.mapping.target, fallback=bool(fallback_from),
                       fallback_from=fallback_from)
        usage = await settle(d, routing, model, tier, usage, cost, reservation)
        created = int(time.time())
        if d.body.stream:  # an abstention or the council's answer: whole already
            return StreamingResponse(_sse(routing["request_id"], created, model, content, routing, usage,
                                          include_usage), media_type="text/event-stream", headers=_headers(routing))
        return JSONResponse({
            "id": routing["request_id"], "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": usage, "routing": routing}, headers=_headers(routing))

    @app.post("/v1/route")
    async def route(request: Request):
        d = await decide(request, Conversation)
        request_id = f"route-{uuid.uuid4().hex}"
        tier = d.mapping.target if d.mapping.target in TIERS else None
        await asyncio.to_thread(state.feedback.remember, ServedRequest(request_id, d.profile.name, d.text, tier,
                                                                       d.profile.store_queries))
        state.stats.record(d.profile.name, policy=d.decision.policy, model=d.mapping.model, router_ms=d.router_ms,
                           total_ms=d.router_ms)
        return JSONResponse({"request_id": request_id, "model": d.mapping.model,
                             **_routing_info(d.decision, d.mapping, d.threshold, d.router_ms)})

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        profile = _profile(state, request)
        body = await _parse(state, request, FeedbackRequest)
        try:
            return await asyncio.to_thread(state.feedback.add, body.request_id, grade=body.grade, tier=body.tier,
                                           preferred_tier=body.preferred_tier, profile=profile.name)
        except UnknownRequest:
            raise APIError(404, "no such request served to this profile", "unknown_request",
                           param="request_id") from None
        except FeedbackConflict as exc:
            raise APIError(409, str(exc), "feedback_conflict") from None
        except FeedbackError as exc:
            raise APIError(400, str(exc), "invalid_feedback") from None

    @app.get("/v1/stats")
    async def stats(request: Request):
        profile = _profile(state, request)
        snapshot = state.stats.snapshot()
        by_profile = snapshot if state.profiles.open else {profile.name: snapshot.get(profile.name, {})}
        return {"profiles": by_profile, "batches": state.batcher.batches, "routed": state.batcher.routed,
                "cooling_down": state.backends.cooling()}

    @app.get("/v1/models")
    async def models(request: Request):
        _profile(state, request)
        names = [ROUTER_MODEL] + ([f"{ROUTER_MODEL}-{state.calibration['threshold']:.4g}"]
                                  if state.calibration.get("threshold") is not None else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "router_pipeline"}
                                           for n in names]}

    @app.get("/health")
    async def health():
        r = state.router
        return {"status": "ok", "router": getattr(r, "mode", None), "precision": getattr(r, "precision", "fp32"),
                "device": r.device, "threshold": state.calibration.get("threshold"),
                "cooling_down": state.backends.cooling()}

    @app.get("/metrics")
    async def metrics(request: Request):
        _admin(state, request)
        return PlainTextResponse(state.stats.prometheus(), media_type="text/plain; version=0.0.4")

    return app


def _headers(routing: dict) -> dict:
    return {"X-Router-Route": _header(routing), "X-Request-Id": routing["request_id"]}


def _chunk(request_id: str, created: int, model: str, delta: dict | None, finish=None, **extra) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return "data: " + json.dumps({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                  "model": model, "choices": choices, **extra}) + "\n\n"


async def _sse(request_id, created, model, content, routing, usage, include_usage: bool):
    """An answer that is already whole (an abstention, the council's), in stream form."""
    yield _chunk(request_id, created, model, {"role": "assistant", "content": ""}, routing=routing)
    yield _chunk(request_id, created, model, {"content": content})
    yield _chunk(request_id, created, model, {}, "stop")
    if include_usage:
        yield _chunk(request_id, created, model, None, usage=usage)
    yield "data: [DONE]\n\n"


async def _live_sse(d, routing: dict, streamed, include_usage: bool, settle):
    """Chunks forwarded as the model sends them; the cost is charged from the final usage.
    A caller that goes away mid-answer stops the model (a local one at the next token)
    and is charged what was generated until then (estimated at 4 characters a token)."""
    request_id, created, model = routing["request_id"], int(time.time()), streamed.model
    yield _chunk(request_id, created, model, {"role": "assistant", "content": ""}, routing=routing)
    sent, result, items = [], None, streamed.items()
    try:
        async for item in items:
            if isinstance(item, str):
                sent.append(item)
                yield _chunk(request_id, created, model, {"content": item})
            else:
                result = item
    finally:
        await items.aclose()
        if result is None:  # cut short (the caller left, or the stream broke): charge what was made
            result = LLMResult("".join(sent) or None, ERROR, len(d.prompt) // 4, len("".join(sent)) // 4)
            routing["stream_interrupted"] = True
        usage = {"prompt_tokens": result.input_tokens, "completion_tokens": result.output_tokens}
        usage = await asyncio.shield(settle(d, routing, model, streamed.target, usage,
                                            cost_usd(usage["prompt_tokens"], usage["completion_tokens"],
                                                     streamed.price)))
    yield _chunk(request_id, created, model, {}, "stop", routing={"cost_usd": routing["cost_usd"]})
    if include_usage:
        yield _chunk(request_id, created, model, None, usage=usage)
    yield "data: [DONE]\n\n"


async def _escalate(state: ServerState, url: str, messages: list[dict]) -> tuple[str, str, dict]:
    """The conversation to the llm-council endpoint (OpenAI chat format); its answer is returned."""
    payload = json.dumps({"model": "council", "messages": messages}).encode()

    def post():
        req = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=state.config.escalation_timeout_s) as resp:
            return json.loads(resp.read())

    try:
        reply = await asyncio.to_thread(post)
        content = reply["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        log.error("council escalation to %s failed: %s", url, exc)
        raise RuntimeError("the council escalation failed") from None
    usage = reply.get("usage") or {}
    return content, reply.get("model") or "llm-council", {"prompt_tokens": int(usage.get("prompt_tokens", 0)),
                                                          "completion_tokens": int(usage.get("completion_tokens", 0))}


def build_state(adapter: str | Path, *, profiles_path: str | Path | None, feedback_dir: str | Path,
                config: ServingConfig = DEFAULTS, decision_log_path: str | Path | None = None,
                router=None) -> ServerState:
    """Everything the server needs, loaded once: the router, the profiles, the backends."""
    from router_pipeline.llm.roles import roles_for
    from router_pipeline.routing import RouterConfig, load_router
    from router_pipeline.serve.profiles import load_profiles

    roles = roles_for(settings.load())
    router = router or load_router(adapter, RouterConfig(batch_size=config.max_batch, prefix_cache=config.prefix_cache,
                                                         precision=config.precision))
    models = {"medium": roles.medium.model, "large": roles.large.model}
    profiles = load_profiles(profiles_path, calibration=router.calibration, default_models=models)
    return ServerState(
        router=router, batcher=RouteBatcher(router, window_ms=config.window_ms,
                                            max_batch=config.max_batch if config.batching else 1),
        profiles=profiles, backends=Backends(roles, cooldown_s=config.cooldown_s,
                                             local_max_output_tokens=config.local_max_output_tokens),
        feedback=FeedbackStore(feedback_dir, database=config.database), stats=Stats(), calibration=router.calibration, config=config,
        decision_log_path=Path(decision_log_path) if decision_log_path else None)


__all__ = ["create_app", "build_state", "ServerState"]
