"""Serving defaults, one owner: the server and the ``serve`` command's flags read them
here (the request bodies' own bounds are declared in serve/schemas.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServingConfig:
    # Routing: concurrent requests share one router pass (serve/batcher.py).
    batching: bool = True
    window_ms: float = 5.0  # how long a query waits for others to share a pass
    max_batch: int = 32
    prefix_cache: bool = True  # LoRA routers: the fixed prompt prefix's KV cache
    precision: str = "fast"  # head routers on Gemma: fast (bf16 weights, the exported encoder) or fp32
    # Routing never stops a request: a router that raises, or whose pass runs longer than this (a full
    # batch of 32 takes about 0.2 s on 2 cores; waiting in a moving queue does not count), hands it to its
    # profile's default model (routing.router_failed), or to a 503 where the profile says
    # router_failure: refuse. /health reports a router that failed this many calls in a row.
    routing_timeout_s: float = 0.5
    router_unhealthy_after: int = 5
    # Limits on what a caller may send.
    max_body_bytes: int = 1_000_000  # enforced while the body is read
    max_header_bytes: int = 32_768  # the request line and headers together (h11); more is refused unread
    # Without profiles (no keys): only loopback callers, with Host a loopback name and JSON bodies (so a web
    # page cannot POST to it), unless the operator opens it (serve --open-to-remote).
    open_to_remote: bool = False
    max_conversation_chars: int = 32_000  # a longer conversation is refused (400); the router reads its head and tail
    max_output_tokens: int = 8_192  # a request's max_tokens; more is a 400
    local_max_output_tokens: int = 512  # what a local tier generates at most, whatever the caller asks
    # A local model generates on the router's CPU cores: bounded so that one caller cannot take them.
    local_max_input_tokens: int = 2_048  # a longer prompt is not given to a local model (the next target, or 400)
    local_timeout_s: float = 30.0  # waiting for the local model and generating, together; then it failed
    local_queue: int = 4  # requests waiting for a local model; one more is told it is busy (next target, or 503)
    local_nice: int = 10  # the local model's generating threads run at this niceness (the router's stay at 0)
    # A local model generates in a worker process of its own with this many threads (llm/local_worker.py):
    # in the server's process its Python generation loop took the interpreter from the router.
    local_process: bool = True
    local_threads: int = 1
    # Upstream models.
    cooldown_s: float = 30.0  # how long a model that failed (429/5xx/timeout) is skipped
    upstream_timeout_s: float | None = None  # a model call's timeout (None: the LLM roles', 120 s; Pro 300 s)
    escalation_timeout_s: float = 120.0
    # Idempotency-Key: a retry with the same key within the window gets the recorded answer.
    idempotency_window_s: float = 86_400.0
    idempotency_retry_after_s: int = 2  # what a retry of a request still in flight is told to wait
    # State: None -> SQLite in the feedback folder; a postgresql:// URL for several hosts
    # (from --database, else ROUTER_DATABASE_URL: it may hold a password).
    database: str | None = None
    # A state database that does not answer within this is an error (503 with Retry-After), not a
    # hung caller: SQLite's busy timeout, PostgreSQL's connect and statement timeouts.
    database_timeout_s: float = 5.0
    # A request without a budget and without an Idempotency-Key waits at most this for its stats and its
    # request memory (for feedback) to be written, and not at all while the database is already known to
    # be slow; past it the answer goes back with routing.recording_deferred and they are written later.
    record_wait_s: float = 0.1
    max_deferred_recordings: int = 10_000  # writes waiting in the background; more are dropped (logged)
    # Threads for the state database, apart from the router's and the models' thread work (a locked or
    # frozen database holds its threads): requests' own reads and writes, and the deferred writes.
    database_threads: int = 4
    recording_threads: int = 2
    # A budget-bearing server refuses a new or emptied state database where its folder records
    # another (serve/identity.py) unless the operator accepts it; a PostgreSQL id is re-read this often.
    accept_new_database: bool = False
    identity_check_s: float = 10.0
    # Process.
    readiness_timeout_s: float = 5.0  # /health: the router's probe must answer within this
    graceful_shutdown_s: float = 5.0  # after SIGTERM, in-flight requests get this long, then are cancelled
    threshold_mappers: int = 256  # router-<threshold> mappers kept per profile (least recently used dropped)
    # Live configuration: how often the state database is read for changes another replica made
    # (a change's expiry is applied on time, not at the next read).
    config_refresh_s: float = 5.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"serving setting {f.name} must be >= 0, got {value}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        for name in ("database_threads", "recording_threads", "router_unhealthy_after", "local_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


DEFAULTS = ServingConfig()
