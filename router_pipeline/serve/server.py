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
- ``GET /v1/stats``, ``GET /v1/models``, ``GET /metrics`` (Prometheus); ``GET /health`` (readiness: the
  router answers a probe, the state database a read) and ``GET /livez`` (liveness).

Callers authenticate with ``Authorization: Bearer <key>`` (serve/profiles.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import signal
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from router_pipeline.serve.database import DatabaseError
from router_pipeline.serve.errors import (Conflict, Forbidden, InvalidRequest, NotFound, Refused, Unavailable,
                                         UpstreamFailed)
from router_pipeline.serve.gateway import ROUTER_MODEL, Gateway, servable, threshold_model, whole
from router_pipeline.serve.ledger import LedgerError
from router_pipeline.serve.live import ADMIN_KEY_VAR, admin_keys, admin_name, history
from router_pipeline.serve.profiles import Profile
from router_pipeline.serve.schemas import (AdminChange, ChatRequest, Conversation, FeedbackRequest, RequestError,
                                           parse)

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5  # what a caller is told to wait when the state database fails (it may come back)
STATUS = {InvalidRequest: 400, Forbidden: 403, NotFound: 404, Conflict: 409, UpstreamFailed: 502, Unavailable: 503}  # the gateway's refusals


class APIError(Exception):
    """A refusal of the HTTP layer itself (authentication, body size): a status and
    OpenAI's error object."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param


# -- request helpers ------------------------------------------------------------
def _key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and (host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback)
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name in a Host header, without its port ('[::1]:8000' -> '::1')."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _open_guard(gateway: Gateway, request: Request) -> None:
    """Without profiles anyone who reaches the server spends on its models: only loopback
    callers, naming a loopback Host (a DNS-rebound page names its own), and POSTs in JSON
    (a cross-origin form or text/plain POST needs no preflight), unless opened."""
    if not gateway.profiles.open or gateway.config.open_to_remote:
        return
    host = _host_name(request.headers.get("host") or "")
    if not _loopback(request.client.host if request.client else None) or not _loopback(host):
        raise APIError(403, "without --profiles this server answers only loopback callers at a loopback address; "
                            "configure profiles (API keys) or start it with --open-to-remote", "loopback_only",
                       "permission_error")
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if request.method == "POST" and media != "application/json":
        raise APIError(415, "request bodies must be sent as Content-Type: application/json", "unsupported_media_type")


def _profile(gateway: Gateway, request: Request) -> Profile:
    _open_guard(gateway, request)
    profile = gateway.profiles.authenticate(_key(request))
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


async def _parse(gateway: Gateway, request: Request, schema):
    try:
        return parse(schema, await _read_body(request, gateway.config.max_body_bytes))
    except RequestError as exc:
        raise InvalidRequest(str(exc), exc.code or ("invalid_field" if exc.param else "invalid_json"),
                             param=exc.param) from None


def _admin(gateway: Gateway, request: Request) -> str:
    """The name of the admin key the request gives (ROUTER_ADMIN_KEY): /metrics shows every
    profile's traffic and spend, and the admin API changes their configuration. A caller's
    key is refused, whatever it is. Without profiles: loopback callers only, as 'local'."""
    if gateway.profiles.open:
        _open_guard(gateway, request)
        return "local"
    if not admin_keys():
        raise APIError(403, f"{request.url.path} needs an admin key: set {ADMIN_KEY_VAR} where the server runs",
                       "admin_key_not_set", "permission_error")
    key = _key(request)
    if key and gateway.profiles.authenticate(key) is not None:
        raise APIError(403, f"{request.url.path} does not take a caller's API key: use an admin key "
                            f"({ADMIN_KEY_VAR})", "caller_key_refused", "permission_error")
    name = admin_name(key)
    if name is None:
        raise APIError(401, f"{request.url.path} needs an admin key (Authorization: Bearer <admin key>)",
                       "invalid_api_key", "authentication_error")
    return name


def _headers(routing: dict) -> dict:
    # Header values must be Latin-1; the reason may quote a query, so it stays in the body.
    route = f"policy={routing['policy']}; model={routing.get('model') or routing['target']}; rule={routing['rule']}"
    return {"X-Router-Route": route, "X-Request-Id": routing["request_id"]}


def _chunk(request_id: str, created: int, model: str, delta: dict | None, finish=None, **extra) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return "data: " + json.dumps({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                  "model": model, "choices": choices, **extra}) + "\n\n"


async def _sse(routing: dict, model: str, texts, include_usage: bool):
    """Chunks in OpenAI's stream format: the routing first, then each text as it comes,
    then the cost, the usage (when asked for) and [DONE]. ``texts`` yields strings, then
    the usage block."""
    request_id, created, usage = routing["request_id"], int(time.time()), None
    yield _chunk(request_id, created, model, {"role": "assistant", "content": ""}, routing=routing)
    async for item in texts:
        if isinstance(item, str):
            yield _chunk(request_id, created, model, {"content": item})
        else:
            usage = item
    yield _chunk(request_id, created, model, {}, "stop", routing={"cost_usd": routing.get("cost_usd")})
    if include_usage:
        yield _chunk(request_id, created, model, None, usage=usage)
    yield "data: [DONE]\n\n"


def _error(status: int, message: str, code: str, type_: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal as OpenAI's error object, with the status its kind has."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.code, exc.type, exc.param)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        status = STATUS[type(exc)]
        return _error(status, exc.message, exc.code, "invalid_request_error" if status < 500 else "server_error",
                      exc.param, {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None)

    @app.exception_handler(DatabaseError)
    async def database_error(request: Request, exc: DatabaseError):
        log.error("%s", exc)
        if not exc.transient:  # it answers, wrongly: a retry will not help until an operator looks
            return _error(503, "the server's state database is broken; an operator must restore it",
                          "database_broken", "server_error")
        return _error(503, "the server's state database is unavailable; try again later", "database_unavailable",
                      "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception):
        # A bug: the caller gets OpenAI's error object without internals, the log the traceback.
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(500, "the server failed on this request", "internal_error", "server_error")

    @app.exception_handler(LedgerError)
    async def ledger_error(request: Request, exc: LedgerError):
        # Money state that cannot be read stops spending (fail closed), with the budget named: a
        # database that failed may come back (retry), a ledger that is broken needs an operator.
        log.error("budget ledger: %s", exc)
        if exc.transient:
            return _error(503, f"budget {exc.file or ''}: the state database is unavailable; try again later",
                          "database_unavailable", "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        return _error(503, f"budget ledger {exc.file or ''} cannot be read: spending is stopped until an operator "
                           "restores it", "budget_ledger_unreadable", "server_error")


# -- the endpoints (the gateway is the app's, set by create_app) ------------------
def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


class _Settled(StreamingResponse):
    """A streamed answer whose request is settled however the response ends: a caller that
    left before its first chunk was read never starts the body, whose own settlement
    would then never run (the steps of a cascade were paid for already)."""

    def __init__(self, content, finish, **kwargs):
        super().__init__(content, **kwargs)
        self.finish = finish

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.finish()


async def chat_completions(request: Request):
    gateway = _gateway(request)
    profile = _profile(gateway, request)
    body = await _parse(gateway, request, ChatRequest)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    a, claim = await gateway.claim(profile, body, request.headers.get("idempotency-key"))  # a retry: its answer
    if a is None:
        try:
            d = await gateway.decide(profile, body, claim, request.headers)
            await gateway.reserve(d)  # may map again (budget used up meanwhile): branch after it
            if await request.is_disconnected():  # it left while routed or reserved (a queue, a slow database)
                await gateway.abandon(d)
                raise APIError(499, "the client closed the request before it was answered", "client_closed_request")
            if body.stream:  # as the model sends it (an abstention, the council's answer: whole)
                routing, texts = await gateway.stream(d)
                return _Settled(_sse(routing, routing["model"], texts, include_usage), functools.partial(
                    gateway.finish, d), media_type="text/event-stream", headers=_headers(routing))
            a = await gateway.answer(d)
        except Exception:
            await gateway.unclaim(claim)  # refused before anything was paid: a retry with the key may try again
            raise
    if body.stream:  # a recorded answer: whole
        return StreamingResponse(_sse(a.routing, a.model, whole(a), include_usage),
                                 media_type="text/event-stream", headers=_headers(a.routing))
    return JSONResponse({
        "id": a.routing["request_id"], "object": "chat.completion", "created": int(time.time()), "model": a.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": a.content}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": a.usage, "routing": a.routing}, headers=_headers(a.routing))


async def route(request: Request):
    gateway = _gateway(request)
    d = await gateway.decide(_profile(gateway, request), await _parse(gateway, request, Conversation),
                             headers=request.headers)
    return JSONResponse(await gateway.route(d))


async def feedback(request: Request):
    gateway = _gateway(request)
    profile = _profile(gateway, request)
    body = await _parse(gateway, request, FeedbackRequest)
    if body.tier and body.model and body.tier != body.model:
        raise InvalidRequest("give the graded model as 'tier' or 'model', not two different ones",
                             "invalid_feedback", param="model")
    return await gateway.give_feedback(profile, body.request_id, grade=body.grade, tier=body.tier or body.model,
                                       preferred_tier=body.preferred_tier)


async def stats(request: Request):
    gateway = _gateway(request)
    profile = _profile(gateway, request)
    snapshot = await asyncio.to_thread(gateway.stats.snapshot)  # a database read
    by_profile = snapshot if gateway.profiles.open else {profile.name: snapshot.get(profile.name, {})}
    shown = gateway.profiles.profiles.values() if gateway.profiles.open else [profile]
    for p in shown:
        if (budget := await gateway.budget(p)) is not None:
            by_profile.setdefault(p.name, {})["budget"] = budget
    return {"profiles": by_profile, "batches": gateway.batcher.batches, "routed": gateway.batcher.routed,
            "cooling_down": gateway.backends.cooling(profile.name)}


async def models(request: Request):
    gateway = _gateway(request)
    threshold = gateway.calibration.get("threshold")
    names = [ROUTER_MODEL] + ([threshold_model(threshold)] if threshold is not None else [])
    profile = _profile(gateway, request)
    if gateway.pool is not None:  # the knob's forms (any value may be asked for)
        names += [f"{ROUTER_MODEL}-budget-0.30", f"{ROUTER_MODEL}-quality-0.95", f"{ROUTER_MODEL}-lambda-0"]
    names += [alias for alias, _ in servable(profile, profile.mapper, list(profile.mapper.models))]  # by name
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "router_pipeline"}
                                       for n in names]}


async def health(request: Request):
    """Readiness: 200 when the router answers a probe and the state database a read, else
    503 naming what fails (a load balancer stops sending requests here)."""
    gateway = _gateway(request)
    r = gateway.router
    failing = await gateway.ready()
    return JSONResponse({"status": "unavailable" if failing else "ok", "failing": failing,
                         "router": getattr(r, "mode", None), "precision": getattr(r, "precision", "fp32"),
                         "device": r.device, "threshold": gateway.calibration.get("threshold"),
                         "cooling_down": gateway.backends.cooling()}, status_code=503 if failing else 200)


async def livez(request: Request):
    """Liveness: the process answers (restart it when this fails, not when /health does)."""
    return {"status": "alive"}


async def metrics(request: Request):
    gateway = _gateway(request)
    _admin(gateway, request)
    return PlainTextResponse(await asyncio.to_thread(gateway.stats.prometheus), media_type="text/plain; version=0.0.4")


# -- the admin API (serve/live.py): an admin key, never a caller's ----------------
async def admin_config(request: Request):
    gateway = _gateway(request)
    _admin(gateway, request)
    return gateway.config_view()


async def admin_change(request: Request):
    gateway = _gateway(request)
    admin = _admin(gateway, request)
    body = await _parse(gateway, request, AdminChange)
    profiles = await gateway.configure("change", admin, request.path_params["profile"], body.set, body.ttl_s)
    return {"version": profiles.version, "change": profiles.changes[-1].view(), **gateway.config_view()}


async def admin_revoke(request: Request):
    gateway = _gateway(request)
    admin = _admin(gateway, request)
    try:
        change_id = int(request.path_params["change_id"])
    except ValueError:
        raise NotFound("a change id is a number", "unknown_change") from None
    if await gateway.configure("revoke", admin, change_id) is None:
        raise NotFound(f"no change {change_id} is in force", "unknown_change")
    return gateway.config_view()


async def admin_reload(request: Request):
    gateway = _gateway(request)
    await gateway.configure("reload", _admin(gateway, request))
    return gateway.config_view()


async def admin_audit(request: Request):
    gateway = _gateway(request)
    _admin(gateway, request)
    limit = request.query_params.get("limit", "100")
    if not limit.isdigit() or not 0 < int(limit) <= 10_000:
        raise InvalidRequest("limit: a whole number in [1, 10000]", "invalid_field", param="limit")
    return {"audit": await gateway._in_db(history, gateway.feedback.db, int(limit))}


ROUTES = [("POST", "/v1/chat/completions", chat_completions), ("POST", "/v1/route", route),
          ("POST", "/v1/feedback", feedback), ("GET", "/v1/stats", stats), ("GET", "/v1/models", models),
          ("GET", "/health", health), ("GET", "/livez", livez), ("GET", "/metrics", metrics),
          ("GET", "/v1/admin/config", admin_config), ("POST", "/v1/admin/profiles/{profile}", admin_change),
          ("DELETE", "/v1/admin/changes/{change_id}", admin_revoke), ("POST", "/v1/admin/reload", admin_reload),
          ("GET", "/v1/admin/audit", admin_audit)]


# -- the app --------------------------------------------------------------------
def uvicorn_options(config) -> dict:
    """How uvicorn serves the app: h11, whose parser refuses a request line and headers over
    ``max_header_bytes`` before they are held (httptools parses a 16 MB header), and the
    graceful shutdown."""
    return {"http": "h11", "h11_max_incomplete_event_size": config.max_header_bytes,
            "timeout_graceful_shutdown": config.graceful_shutdown_s}


@contextlib.contextmanager
def serving_in_thread(gateway: Gateway, *, log_level: str = "warning"):
    """The app on a free 127.0.0.1 port, served by uvicorn in a thread: its URL while the
    block runs (tests and benchmarks that drive a live server)."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), host="127.0.0.1", port=port, log_level=log_level,
                                           **uvicorn_options(gateway.config)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def _reload_on_hangup(gateway: Gateway) -> bool:
    """SIGHUP reads the profiles file again (as POST /v1/admin/reload does; a refused file
    is logged and the configuration kept). Only where the loop runs in the main thread."""
    if gateway.live is None or not hasattr(signal, "SIGHUP"):
        return False

    async def reload():
        try:
            await gateway.configure("reload", "SIGHUP")
            log.info("SIGHUP: profiles file %s read again (configuration %d)", gateway.live.path,
                     gateway.profiles.version)
        except Exception as exc:
            log.error("SIGHUP: the profiles file was not applied, the configuration is kept: %s", exc)

    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread (tests serve in a thread)
        return False
    return True


def create_app(gateway: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gateway.start()
        hup = _reload_on_hangup(gateway)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await gateway.stop()

    app = FastAPI(title="router_pipeline routing server", lifespan=lifespan)
    app.state.gateway = gateway
    _add_error_handlers(app)
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method])
    return app


__all__ = ["create_app"]
