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
import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from router_pipeline.llm.pricing import cost_usd
from router_pipeline.router_format import conversation_text
from router_pipeline.serve import decision_log
from router_pipeline.serve.backends import AllTargetsFailed, Backends
from router_pipeline.serve.batcher import RouteBatcher
from router_pipeline.serve.feedback import FeedbackError, FeedbackStore, ServedRequest, UnknownRequest
from router_pipeline.serve.ledger import LedgerError
from router_pipeline.serve.mapper import ABSTAIN_ANSWER, PolicyMapper, Rule
from router_pipeline.serve.profiles import Profile, Profiles
from router_pipeline.serve.stats import Stats
from router_pipeline.text import check_query

ROUTER_MODEL = "router"
MAX_BODY_BYTES = 1_000_000
TIERS = ("medium", "large")


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type_, headers or {}


@dataclass
class ServerState:
    router: object  # routing.Router or heads.HeadRouter (routing.load_router)
    batcher: RouteBatcher
    profiles: Profiles
    backends: Backends
    feedback: FeedbackStore
    stats: Stats
    calibration: dict
    max_query_chars: int = 32_000  # a whole conversation; the router reads its head and tail
    decision_log_path: Path | None = None
    escalation_timeout_s: float = 120.0


@dataclass
class _Decided:
    """A request authenticated, parsed, routed and mapped."""

    t0: float
    profile: Profile
    body: dict
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


async def _body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes, over the {MAX_BODY_BYTES} limit", "body_too_large")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    return body


def _conversation(state: ServerState, body: dict) -> tuple[str, str, str | None]:
    """(routing text, prompt for the answering model, system text) from ``messages``
    (or a plain ``query``)."""
    messages = body.get("messages")
    if messages is None and isinstance(body.get("query"), str):
        messages = [{"role": "user", "content": body["query"]}]
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", "invalid_messages")
    try:
        conversation = conversation_text(messages)
        text = check_query(conversation, state.max_query_chars)
    except ValueError as exc:
        raise APIError(400, f"messages: {exc}", "invalid_messages") from None
    system = "\n".join(m["content"] for m in messages if m.get("role") in ("system", "developer")
                       and isinstance(m.get("content"), str)) or None
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


def _mapper(profile: Profile, model: str | None, cache: dict) -> tuple[PolicyMapper, float | None]:
    if model in (None, ROUTER_MODEL):
        return profile.mapper, None
    if isinstance(model, str) and model.startswith(ROUTER_MODEL + "-"):
        try:
            threshold = float(model[len(ROUTER_MODEL) + 1:])
        except ValueError:
            threshold = -1.0
        if 0.0 <= threshold <= 1.0:
            key = (profile.name, threshold)
            if key not in cache:
                cache[key] = _threshold_mapper(profile.mapper, threshold)
            return cache[key], threshold
    raise APIError(404, f"model {model!r} does not exist: use 'router' (the calibrated threshold) or "
                        f"'router-<threshold>' with a threshold in [0, 1], e.g. 'router-0.35'", "model_not_found")


def _routing_info(decision, mapping, threshold, router_ms) -> dict:
    return {"policy": decision.policy, "probabilities": {k: round(v, 4) for k, v in decision.probabilities.items()},
            "p_complex": round(decision.p_large, 4), "rule": mapping.rule, "reason": mapping.reason,
            "target": mapping.target, "threshold": threshold, "parse_ok": decision.parse_ok,
            "router_ms": round(router_ms, 2)}


def _header(routing: dict) -> str:
    # Header values must be Latin-1; the reason may quote a query, so it stays in the body.
    return f"policy={routing['policy']}; model={routing.get('model') or routing['target']}; rule={routing['rule']}"


# -- the app --------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()

    app = FastAPI(title="router_pipeline routing server", lifespan=lifespan)
    app.state.router_state = state
    mappers: dict = {}

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse({"error": {"message": exc.message, "type": exc.type, "code": exc.code}},
                            status_code=exc.status, headers=exc.headers)

    @app.exception_handler(LedgerError)
    async def ledger_error(request: Request, exc: LedgerError):
        # Money state that cannot be read stops spending (fail closed), with the file named.
        return JSONResponse({"error": {"message": str(exc), "type": "server_error", "code": "budget_ledger_unreadable"}},
                            status_code=503)

    async def decide(request: Request) -> _Decided:
        t0 = time.perf_counter()
        profile = _profile(state, request)
        body = await _body(request)
        mapper, threshold = _mapper(profile, body.get("model"), mappers)
        text, prompt, system = _conversation(state, body)
        decision = await state.batcher.route(text)
        return _Decided(t0, profile, body, mapper, threshold, text, prompt, system, decision, mapper.map(decision),
                        (time.perf_counter() - t0) * 1000)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        d = await decide(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        routing = {"request_id": request_id, **_routing_info(d.decision, d.mapping, d.threshold, d.router_ms)}
        max_tokens = d.body.get("max_completion_tokens") or d.body.get("max_tokens")
        usage, cost, tier, fallback_from = {"prompt_tokens": 0, "completion_tokens": 0}, 0.0, None, []
        try:
            if d.mapping.abstain:
                content, model = ABSTAIN_ANSWER, "abstain"
            elif d.mapping.escalate:
                content, model, usage = await _escalate(state, d.mapper.escalation_url, d.body)
                routing["escalated"] = True
            else:
                targets = [(t, d.mapper.models[t]) for t in [d.mapping.target, *d.profile.fallbacks]
                           if t in d.profile.allowed and t in d.mapper.models]
                served = await state.backends.answer(targets, d.prompt, d.system,
                                                     max_tokens if isinstance(max_tokens, int) else None)
                content, model, cost, tier = served.result.text, served.model, served.cost_usd, served.target
                usage = {"prompt_tokens": served.result.input_tokens, "completion_tokens": served.result.output_tokens}
                fallback_from = served.attempts
        except AllTargetsFailed as exc:
            state.stats.record_error(d.profile.name)
            raise APIError(503, f"no model could answer: {exc}", "all_models_failed", "server_error",
                           {"Retry-After": str(int(max(state.backends.cooling().values(), default=5)) + 1)}) from None
        except Exception as exc:
            state.stats.record_error(d.profile.name)
            raise APIError(502, f"{type(exc).__name__}: {exc}", "upstream_error", "server_error") from None
        routing.update(model=model, served_by=tier or d.mapping.target, cost_usd=round(cost, 8),
                       fallback=bool(fallback_from), fallback_from=fallback_from)
        try:
            d.mapper.record_spend(cost)
        except LedgerError as exc:
            # The answer is paid for: return it; the next request meets the unreadable ledger (503).
            routing["budget_error"] = str(exc)
        large_price = state.backends.roles.spec_for("large", d.mapper.models["large"]).price
        total_ms = (time.perf_counter() - d.t0) * 1000
        state.stats.record(d.profile.name, policy=d.decision.policy, model=model, router_ms=d.router_ms,
                           total_ms=total_ms, cost_usd=cost, fell_back=bool(fallback_from), escalated=bool(routing.get("escalated")),
                           large_equivalent_usd=cost_usd(usage["prompt_tokens"], usage["completion_tokens"], large_price))
        state.feedback.remember(ServedRequest(request_id, d.profile.name, d.text, tier if tier in TIERS else None,
                                              d.profile.store_queries))
        if state.decision_log_path is not None:
            decision_log.append(state.decision_log_path, {
                **decision_log.decision_record(d.decision, d.mapping, latency_ms=total_ms, cost_usd=cost),
                "request_id": request_id, "profile": d.profile.name, "served_by": routing["served_by"],
                "fallback": routing["fallback"]})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        headers = {"X-Router-Route": _header(routing), "X-Request-Id": request_id}
        created = int(time.time())
        if d.body.get("stream"):
            return StreamingResponse(_sse(request_id, created, model, content, routing, usage,
                                          d.body.get("stream_options") or {}),
                                     media_type="text/event-stream", headers=headers)
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": usage, "routing": routing}, headers=headers)

    @app.post("/v1/route")
    async def route(request: Request):
        d = await decide(request)
        request_id = f"route-{uuid.uuid4().hex}"
        tier = d.mapping.target if d.mapping.target in TIERS else None
        state.feedback.remember(ServedRequest(request_id, d.profile.name, d.text, tier, d.profile.store_queries))
        state.stats.record(d.profile.name, policy=d.decision.policy, model=d.mapping.model, router_ms=d.router_ms,
                           total_ms=d.router_ms)
        return JSONResponse({"request_id": request_id, "model": d.mapping.model,
                             **_routing_info(d.decision, d.mapping, d.threshold, d.router_ms)})

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        profile = _profile(state, request)
        body = await _body(request)
        try:
            return state.feedback.add(str(body.get("request_id")), grade=body.get("grade"), tier=body.get("tier"),
                                      preferred_tier=body.get("preferred_tier"), profile=profile.name)
        except UnknownRequest:
            raise APIError(404, f"no request {body.get('request_id')!r} served to this profile by this server "
                                "(requests are remembered while it runs)", "unknown_request") from None
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
        return {"status": "ok", "router": r.adapter_dir, "mode": r.mode, "device": r.device,
                "threshold": state.calibration.get("threshold"), "cooling_down": state.backends.cooling()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.stats.prometheus(), media_type="text/plain; version=0.0.4")

    return app


async def _sse(request_id, created, model, content, routing, usage, options):
    def chunk(delta, finish=None, **extra):
        return "data: " + json.dumps({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "choices": [{"index": 0, "delta": delta,
                                                                   "finish_reason": finish}], **extra}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""}, routing=routing)
    # The LLM layer returns whole answers: the text is streamed once the model has answered.
    words = content.split(" ")
    for i in range(0, len(words), 8):
        yield chunk({"content": (" " if i else "") + " ".join(words[i:i + 8])})
        await asyncio.sleep(0)
    yield chunk({}, "stop")
    if options.get("include_usage"):
        yield "data: " + json.dumps({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                     "model": model, "choices": [], "usage": usage}) + "\n\n"
    yield "data: [DONE]\n\n"


async def _escalate(state: ServerState, url: str, body: dict) -> tuple[str, str, dict]:
    """The conversation to the llm-council endpoint (OpenAI chat format); its answer is returned."""
    payload = json.dumps({"model": "council", "messages": body.get("messages") or
                          [{"role": "user", "content": body.get("query", "")}]}).encode()

    def post():
        req = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=state.escalation_timeout_s) as resp:
            return json.loads(resp.read())

    try:
        reply = await asyncio.to_thread(post)
        content = reply["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(f"council escalation to {url} failed: {exc}") from None
    usage = reply.get("usage") or {}
    return content, reply.get("model") or "llm-council", {"prompt_tokens": int(usage.get("prompt_tokens", 0)),
                                                          "completion_tokens": int(usage.get("completion_tokens", 0))}


def build_state(adapter: str | Path, *, profiles_path: str | Path | None, feedback_dir: str | Path,
                batching: bool = True, prefix_cache: bool = True, window_ms: float = 5.0, max_batch: int = 32,
                cooldown_s: float = 30.0, decision_log_path: str | Path | None = None, router=None,
                precision: str = "fast") -> ServerState:
    """Everything the server needs, loaded once: the router, the profiles, the backends."""
    from router_pipeline import settings
    from router_pipeline.llm.roles import roles_for
    from router_pipeline.routing import RouterConfig, load_router
    from router_pipeline.serve.profiles import load_profiles

    roles = roles_for(settings.load())
    router = router or load_router(adapter, RouterConfig(batch_size=max_batch, prefix_cache=prefix_cache,
                                                         precision=precision))
    models = {"medium": roles.medium.model, "large": roles.large.model}
    profiles = load_profiles(profiles_path, calibration=router.calibration, default_models=models)
    return ServerState(
        router=router, batcher=RouteBatcher(router, window_ms=window_ms, max_batch=max_batch if batching else 1),
        profiles=profiles, backends=Backends(roles, cooldown_s=cooldown_s),
        feedback=FeedbackStore(feedback_dir), stats=Stats(), calibration=router.calibration,
        decision_log_path=Path(decision_log_path) if decision_log_path else None)


__all__ = ["create_app", "build_state", "ServerState"]
