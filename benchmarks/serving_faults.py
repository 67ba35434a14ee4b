"""No paid answer lost, none paid twice, no budget overspent: the routing server while its
state database is killed, stopped and frozen (issue 29).

The server (serve/gateway.py behind serve/server.py, in this process on 127.0.0.1) answers
``--requests`` budgeted chat requests per backend, 8 at a time, from a local server
speaking Gemini's protocol (every call it answers is a paid call). Each request carries
an ``Idempotency-Key`` and is retried under it (after a 503, a 409 in flight, or a
dropped connection) until it is answered; the budget (a limit of about 70% of what the
requests would cost; its rule then abstains, paying nothing) is the thing to protect.
Meanwhile the state database fails at random points, 0.3-1.5 s at a time:

- SQLite: another process holds the write lock (what a stuck writer or a backup does);
- PostgreSQL (Debian's server binaries, as the tests start it): killed (``pg_ctl stop -m
  immediate``), stopped (``-m fast``) and frozen (SIGSTOP of every server process), then
  started or thawed again.

A bystander profile without a budget sends requests all along; its p99 latency during the
faults is compared with its p99 under the same budgeted load (another profile, its own
ledger) while the database is healthy, and with an idle server. The router is a constant stub (this
measures the state path, not routing). Prints per backend, ending with:

    paid upstream N                              calls the model server answered
    paid but neither returned nor recorded N     (target 0)
    double payments N                            requests paid more than once (target 0)
    overspend beyond one request N               (target 0)

Cascades (``--cascade-requests``, per backend, under the same database faults): a pool
profile over a stand-in pool router (Flash-Lite, Flash, Pro on the Gemini stand-in) with
``cascade: {plan: [[flash-lite, flash], pro], comparator: letter}`` and a budget of about
70% of what its requests would cost, whose rule then abstains. The cheap two agree on
about 60% of the requests (a hash of the prompt), the rest call Pro too; on one request in
10 a model of the first step answers 500 once (skipped, the cascade goes on without it).
Every call the stand-in answered is a paid call, priced as the pool prices it; the
figures above then count cascaded requests too (a double payment: a model paid twice for
one request), and the ledger's spend must equal the sum of the paid calls:

    spend recorded minus paid, cascades $X       (target 0, within rounding)

The overspend allowed a cascade is one call's reservation (serve/ledger.py admits a call
while spend + reservations are below the limit; a call costs at most what it reserved:
the prompt at 2 characters a token and max_tokens out, at the dearest model's price).

Two more cases (``--promises``), on a pool of an on-premises endpoint marked private (a
local server speaking OpenAI's protocol) and Flash and Pro (the Gemini stand-in, which
records every call it gets), routed by a stand-in pool router:

- privacy: private conversations (an e-mail address in the question, in a system
  message, in an earlier turn), 8 at a time, while the private endpoint in turn answers,
  fails (500), times out and returns empty replies;
- router: requests 8 at a time while the router raises, then hangs, on every pass.

    private queries answered by a model outside their rule N   (target 0)
    router failures answered 5xx N                             (target 0)

    python benchmarks/serving_faults.py [--requests 500] [--cascade-requests 300] [--backends sqlite,postgresql]
                                        [--promises privacy,router]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import json
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np

from router_pipeline.llm.fake_gemini import FakeGemini, Fault
from router_pipeline.llm.fake_openai import FakeOpenAI
from router_pipeline.policies import COMPLEX, POLICIES
from router_pipeline.routers.contract import RouteDecision

KEYS = {"budgeted": "bench-budgeted-key-0001", "control": "bench-control-key-0001",
        "bystander": "bench-bystander-key-0001", "team": "bench-team-key-0001", "cascaded": "bench-cascaded-key-0001"}
PRO = "gemini-2.5-pro"
CONCURRENCY = 8
SHARE_OF_COST = 0.7  # the budget's limit, as a share of what every budgeted request would cost on Pro
CASCADE = {"plan": [["flash-lite", "flash"], "pro"], "comparator": "letter"}
AGREE_SHARE = 0.6  # cascaded requests whose first step agrees (a hash of the prompt); the rest call Pro too
UPSTREAM_FAULT_EVERY = 10  # one cascaded request in 10: a model of its first step answers 500 once
MAX_TOKENS = 16  # what every request asks for (the reservations' output tokens)


class StubRouter:
    """Every query is Complex_Query (the profile's threshold rule sends it to Pro)."""

    mode, calibration, device, precision = "stub", {}, "cpu", "fp32"

    def route(self, query, *, with_reasoning=False):
        return self.route_batch([query])[0]

    def route_batch(self, queries, *, with_reasoning=False, progress=False):
        return [RouteDecision(q, COMPLEX, {p: float(p == COMPLEX) for p in POLICIES}, True, "stub") for q in queries]


# -- the state databases and their faults -------------------------------------------------
class SQLiteFaults:
    name = "sqlite"

    def __init__(self, folder: Path):
        self.file, self.url = folder / "requests.sqlite", None

    def fault(self, seconds: float) -> str:
        holder = sqlite3.connect(self.file, isolation_level=None, timeout=10)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            time.sleep(seconds)
            holder.execute("COMMIT")
        finally:
            holder.close()
        return "write lock held"

    def close(self):
        pass


class PostgresFaults:
    name = "postgresql"

    def __init__(self, folder: Path):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("PostgreSQL's server binaries (Debian's postgresql package) are not installed")
        self.bindir, self.data = Path(bins[-1]).parent, Path(tempfile.mkdtemp(prefix="faults-pg-"))
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_pg:
            shutil.chown(self.data, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._pg("initdb", "-D", str(self.data / "db"), "-A", "trust", "-U", "postgres")
        self.start()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, tool: str, *args: str, check: bool = True):
        return subprocess.run(self.as_pg + [str(self.bindir / tool), *args], check=check, capture_output=True)

    def start(self):
        self._pg("pg_ctl", "-D", str(self.data / "db"), "-l", str(self.data / "log"), "-w", "-o",
                 f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start")

    def _pids(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, ...)."""
        main = int((self.data / "db" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
        return [main, *map(int, children)]

    def fault(self, seconds: float) -> str:
        kind = random.choice(("killed", "stopped", "frozen"))
        if kind == "frozen":
            pids = self._pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            time.sleep(seconds)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        else:
            self._pg("pg_ctl", "-D", str(self.data / "db"), "-m", "immediate" if kind == "killed" else "fast", "stop",
                     check=False)
            time.sleep(seconds)
            self.start()
        return kind

    def close(self):
        self._pg("pg_ctl", "-D", str(self.data / "db"), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.data, ignore_errors=True)


# -- the run ---------------------------------------------------------------------------------
def _post(client: httpx.Client, url: str, profile: str, text: str, key: str | None = None):
    headers = {"Authorization": f"Bearer {KEYS[profile]}", **({"Idempotency-Key": key} if key else {})}
    body = {"model": "router", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
    return client.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def run(backend: str, n: int, seed: int) -> dict:
    from router_pipeline.serve.config import DEFAULTS
    from router_pipeline.serve.server import serving_in_thread
    from router_pipeline.serve.gateway import build_gateway

    random.seed(seed)
    work = Path(tempfile.mkdtemp(prefix="serving-faults-"))
    faults = SQLiteFaults(work / "feedback") if backend == "sqlite" else PostgresFaults(work)
    with FakeGemini(latency_s=0.02) as fake:
        os.environ.update(ROUTER_PIPELINE_PROFILE="gemini", GEMINI_BASE_URL=fake.base_url,
                          GEMINI_API_KEY="serving-faults-not-secret", **{f"ROUTER_BENCH_{p.upper()}": key
                                                                         for p, key in KEYS.items()})
        per_request = _pro_cost(fake, n)
        limit = round(SHARE_OF_COST * n * per_request, 8)
        profiles = work / "profiles.json"
        pro = {"kind": "threshold", "at_least": 0.0, "target": "large"}

        def budgeted(ledger: str) -> dict:
            return {"budget": {"ledger": ledger, "period": "total"},
                    "rules": [{"kind": "budget", "limit_usd": limit, "target": "abstain"}, pro]}
        profiles.write_text(json.dumps({"profiles": {
            "budgeted": {"keys_env": "ROUTER_BENCH_BUDGETED", "mapper": budgeted("bench")},
            "control": {"keys_env": "ROUTER_BENCH_CONTROL", "mapper": budgeted("bench-control")},
            "bystander": {"keys_env": "ROUTER_BENCH_BYSTANDER", "mapper": {"rules": [pro]}}}}))
        config = replace(DEFAULTS, database=faults.url, database_timeout_s=1.0, window_ms=1.0)
        state = build_gateway(None, profiles_path=profiles, feedback_dir=work / "feedback", config=config,
                              router=StubRouter())
        try:
            with serving_in_thread(state, log_level="critical") as url, httpx.Client() as client:
                idle = [_timed(client, url, "bystander", f"bystander baseline {i}") for i in range(100)]
                # The same budgeted load with a healthy database: what the faults are compared with.
                _, control, _, _ = _load(url, "control", n, None)
                fake.calls.clear()
                outcomes, during, fault_log, wall = _load(url, "budgeted", n, faults)
                time.sleep(0.5)
                # The database answers again: one more budgeted request replays the journal into it.
                _until_answered(url, "budgeted", n)
                spend = _spend(state.feedback.db)
                recorded = _recorded(state.feedback.db, "budgeted")
        finally:
            faults.close()
    paid = Counter(c.prompt.split("budgeted request ")[1].split()[0] for c in fake.calls
                   if "budgeted request " in c.prompt)
    returned = {str(i) for i, (status, body) in enumerate(outcomes) if status == 200 and body["model"] == PRO}
    lost = [p for p in paid if p not in returned and p not in recorded]
    over_usd = max(0.0, spend - limit)
    return {"backend": backend, "requests": n, "wall_s": round(wall, 1), "faults": dict(fault_log),
            "limit_usd": limit, "per_request_usd": per_request, "spend_recorded_usd": round(spend, 8),
            "spend_of_paid_usd": round(sum(paid.values()) * per_request, 8),
            "answered": sum(s == 200 for s, _ in outcomes), "returned_paid": len(returned),
            "abstained": sum(s == 200 and b["model"] == "abstain" for s, b in outcomes),
            "attempts": sum(b.get("attempts", 1) for _, b in outcomes),
            "paid": sum(paid.values()), "lost": len(lost), "double": sum(c > 1 for c in paid.values()),
            "overspend_requests": max(0, int(np.ceil(round(over_usd / per_request, 6))) - 1) if per_request else 0,
            "bystander_p99_ms": {"idle": _p99(idle), "same load, no fault": _p99(control),
                                 "during the faults": _p99(during)},
            "bystander_failed": dict(Counter(status for status, _ in during if status != "200")),
            "bystander_requests": len(during),
            "unanswered": dict(Counter(f"{s} {b.get('error', '')[:60]}".strip() for s, b in outcomes if s != 200))}


def _load(url: str, profile: str, n: int, faults, histories: dict | None = None) -> tuple[list, list, Counter, float]:
    """``n`` requests of ``profile``, 8 at a time, each retried until answered, while a
    bystander sends requests one after another and ``faults`` (unless None) strikes the
    database: (the requests' outcomes, the bystander's (status, ms), the faults, seconds).
    ``histories``: request -> what each of its tries was told, filled in when given."""
    stop, fault_log, bystander_log = threading.Event(), Counter(), []

    def inject():
        time.sleep(0.3)
        while faults is not None and not stop.is_set():
            fault_log[faults.fault(random.uniform(0.3, 1.5))] += 1
            stop.wait(random.uniform(0.3, 1.0))

    def bystander():
        j = 0
        while not stop.is_set():
            with httpx.Client() as c:
                bystander_log.append(_timed(c, url, "bystander", f"bystander {profile} {j}"))
            j += 1

    threads = [threading.Thread(target=inject), threading.Thread(target=bystander)]
    for thread in threads:
        thread.start()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        outcomes = list(pool.map(lambda i: _until_answered(
            url, profile, i, None if histories is None else histories.setdefault(i, [])), range(n)))
    wall = time.perf_counter() - t0
    stop.set()
    for thread in threads:
        thread.join()
    return outcomes, bystander_log, fault_log, wall


def _p99(timed: list[tuple[str, float]]) -> float:
    """The p99 latency (ms) of the answered requests."""
    ok = [ms for status, ms in timed if status == "200"]
    return round(float(np.percentile(ok, 99)), 1) if ok else float("nan")


def _text(profile: str, i: int) -> str:
    return f"{profile} request {i} : what is {i} plus {i}?"


def _pro_cost(fake: FakeGemini, n: int) -> float:
    """The most one budgeted request costs on Pro (the fake counts a prompt's words as tokens)."""
    from router_pipeline.llm.models import cost_usd, price_for
    from router_pipeline.routers.prompt import conversation_text

    prompts = [conversation_text([{"role": "user", "content": _text("budgeted", i)}]) for i in range(n + 1)]
    return max(cost_usd(len(p.split()), len(fake.responder(PRO, p).split()), price_for(PRO)) for p in prompts)


def _timed(client: httpx.Client, url: str, profile: str, text: str) -> tuple[str, float]:
    """(the status, or the code of the error, or the transport error; milliseconds)."""
    t0 = time.perf_counter()
    try:
        reply = _post(client, url, profile, text)
        status = "200" if reply.status_code == 200 else f"{reply.status_code} {reply.json()['error']['code']}"
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return status, (time.perf_counter() - t0) * 1000


def _until_answered(url: str, profile: str, i: int, history: list | None = None) -> tuple[int, dict]:
    """A budgeted request, retried under its Idempotency-Key until answered (or 60 tries);
    ``history`` (when given) gets what each try was told."""
    key, text, attempts, last = f"{profile}-{i}", _text(profile, i), 0, ""
    history = [] if history is None else history
    with httpx.Client() as client:
        for attempts in range(1, 61):
            try:
                reply = _post(client, url, profile, text, key)
            except httpx.HTTPError as exc:  # the connection dropped: the same key again
                last = type(exc).__name__
                history.append(last)
                time.sleep(0.2)
                continue
            last = f"{reply.status_code} {reply.text[:200]}"
            with contextlib.suppress(Exception):
                last = f"{reply.status_code} {reply.json()['error']['code']}"
            history.append("200" if reply.status_code == 200 else last)
            if reply.status_code == 200:
                return 200, {**reply.json(), "attempts": attempts}
            if reply.status_code not in (409, 503):
                return reply.status_code, {"error": reply.text[:200], "attempts": attempts}
            time.sleep(min(float(reply.headers.get("retry-after", 1)), 1.0) * random.uniform(0.2, 0.5))
    return 0, {"attempts": attempts, "error": f"last: {last}"}  # what the last try was told (a 409 in flight?)


def _spend(db, ledger: str = "bench") -> float:
    rows = db.execute("SELECT COALESCE(SUM(usd), 0) FROM spend WHERE ledger = ?", (ledger,))
    return float(rows[0][0])


def _recorded(db, profile: str) -> set[str]:
    """The requests whose answer is recorded under their key (paid, and kept)."""
    rows = db.execute("SELECT key FROM idempotency WHERE profile = ? AND response IS NOT NULL", (profile,))
    return {k.removeprefix(f"{profile}-") for (k,) in rows}


# -- cascades under the same faults: every call paid once, charged once ---------------------
def _agrees(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 1000 < AGREE_SHARE * 1000


def _letter(model: str, prompt: str) -> str:
    """Pro and Flash give the prompt's letter; Flash-Lite too when the first step agrees,
    else the next letter."""
    h = zlib.crc32(prompt.encode()) // 1000
    return "ABCD"[(h + int("lite" in model and not _agrees(prompt))) % 4]


def cascade_run(backend: str, n: int, seed: int) -> dict:
    """``n`` budgeted requests of a cascaded pool profile while the state database fails
    (as ``run``), each retried under its Idempotency-Key until answered."""
    from router_pipeline.llm.models import cost_usd
    from router_pipeline.llm.pool import gemini_pool
    from router_pipeline.serve.config import DEFAULTS
    from router_pipeline.serve.gateway import build_gateway
    from router_pipeline.serve.server import serving_in_thread
    from router_pipeline.training.stand_in import stand_in_pool_router

    random.seed(seed)
    work = Path(tempfile.mkdtemp(prefix="serving-faults-cascade-"))
    faults = SQLiteFaults(work / "state") if backend == "sqlite" else PostgresFaults(work)
    pool = gemini_pool()
    by_id = {m.model: m for m in pool.models}
    paid_calls, lock = [], threading.Lock()  # (model id, prompt, answer) of every call the stand-in answered
    histories = {}  # request -> what each of its tries was told

    def respond(model: str, prompt: str) -> str:  # called for the calls answered 200 only: the paid ones
        text = _letter(model, prompt)
        with lock:
            paid_calls.append((model, prompt, text))
        return text

    def call_cost(model: str, prompt: str, text: str) -> float:  # as the fake counts tokens (words)
        return by_id[model].cost(len(prompt.split()), len(text.split()))

    prompts = [_text("cascaded", i) for i in range(n + 1)]
    expected = sum(call_cost(m.model, p, _letter(m.model, p)) for p in prompts[:n] for m in pool.models
                   if m.name != "pro" or not _agrees(p))
    limit = round(SHARE_OF_COST * expected, 8)
    pro = pool["pro"]
    slack = max(cost_usd(len(p) // 2 + 1, MAX_TOKENS, (pro.input_usd_per_mtok, pro.output_usd_per_mtok))
                for p in prompts)  # one call's reservation, the dearest model's (Gateway._cascade's estimate)
    with FakeGemini(latency_s=0.02, responder=respond) as fake:
        for i in range(3, n, UPSTREAM_FAULT_EVERY):
            fake.add_faults(f"cascaded request {i} :", Fault(status=500))
        os.environ.update(ROUTER_PIPELINE_PROFILE="gemini", GEMINI_BASE_URL=fake.base_url,
                          GEMINI_API_KEY="serving-faults-not-secret", **{f"ROUTER_BENCH_{p.upper()}": key
                                                                         for p, key in KEYS.items()})
        router = stand_in_pool_router(work / "router", pool)[0]
        profiles = work / "profiles.json"
        profiles.write_text(json.dumps({"profiles": {
            "cascaded": {"keys_env": "ROUTER_BENCH_CASCADED", "cascade": CASCADE,
                         "mapper": {"budget": {"ledger": "bench-cascade", "period": "total"},
                                    "rules": [{"kind": "budget", "limit_usd": limit, "target": "abstain"}]}},
            "bystander": {"keys_env": "ROUTER_BENCH_BYSTANDER", "cascade": "off"}}}))
        config = replace(DEFAULTS, database=faults.url, database_timeout_s=1.0, window_ms=1.0, cooldown_s=0.0)
        state = build_gateway(None, profiles_path=profiles, feedback_dir=work / "state", config=config, router=router)
        try:
            with serving_in_thread(state, log_level="critical") as url:
                outcomes, during, fault_log, wall = _load(url, "cascaded", n, faults, histories)
                time.sleep(0.5)
                # The database answers again: one more request replays the journal into it.
                outcomes.append(_until_answered(url, "cascaded", n))
                spend = _spend(state.feedback.db, "bench-cascade")
                recorded = _recorded(state.feedback.db, "cascaded")
                held = state.feedback.db.execute("SELECT COUNT(*), COALESCE(SUM(usd), 0) FROM reservations "
                                                 "WHERE ledger = 'bench-cascade'")[0]
                upstream_failed = len(fake.calls) - len(paid_calls)
        finally:
            faults.close()
    shutil.rmtree(work, ignore_errors=True)
    ours = [(p.split("cascaded request ")[1].split()[0], m, call_cost(m, p, t)) for m, p, t in paid_calls
            if "cascaded request " in p]
    paid_usd = sum(c for *_, c in ours)
    per_model = Counter((i, m) for i, m, _ in ours)
    requests_paid = {i for i, _, _ in ours}
    answered = {str(i): b for i, (s, b) in enumerate(outcomes) if s == 200}
    returned = {i for i, b in answered.items() if "cascade" in b["routing"]}
    lost = [i for i in requests_paid if i not in returned and i not in recorded]
    cascades = [b["routing"]["cascade"] for i, b in answered.items() if i in returned]
    beyond = spend - limit - slack
    mean_call = paid_usd / len(ours) if ours else 0.0
    doubles = sorted({i for (i, _), k in per_model.items() if k > 1}, key=int)
    double_details = [{"request": i, "paid twice": sorted(m for (j, m), k in per_model.items() if j == i and k > 1),
                       "tries": histories.get(int(i), []),
                       "answer": answered[i]["routing"].get("cascade") if i in answered else None}
                      for i in doubles]
    return {"backend": backend, "requests": n, "wall_s": round(wall, 1), "faults": dict(fault_log),
            "double_details": double_details,
            "limit_usd": limit, "slack_usd": round(slack, 8), "spend_recorded_usd": round(spend, 8),
            "spend_of_paid_usd": round(paid_usd, 8), "spend_difference_usd": round(spend - paid_usd, 10),
            "answered": len(answered), "cascaded": len(returned),
            "escalated": sum(c["escalated"] for c in cascades),
            "stopped": dict(Counter(c["stopped"].split(":")[0] for c in cascades)),
            "abstained": sum(b["model"] == "abstain" for b in answered.values()),
            "attempts": sum(b.get("attempts", 1) for _, b in outcomes),
            "paid": len(ours), "paid_by_model": dict(Counter(by_id[m].name for _, m, _ in ours)),
            "upstream_failed": upstream_failed, "requests_paid": len(requests_paid), "lost": len(lost),
            "double": len(doubles),
            "overspend_usd": round(max(0.0, spend - limit), 10),
            "reservations_left": int(held[0]), "reserved_left_usd": round(float(held[1]), 8),
            "overspend_calls": max(0, int(np.ceil(round(beyond / mean_call, 6)))) if mean_call else 0,
            "bystander_p99_ms": _p99(during), "bystander_failed": dict(Counter(s for s, _ in during if s != "200")),
            "unanswered": dict(Counter(f"{s} {b.get('error', '')[:60]}".strip() for s, b in outcomes if s != 200))}


# -- the failure promises: a private query stays private, a failing router still answers -
PII = "jane.doe@example.org"
CONVERSATIONS = (  # the private text in the question, in a system message, in an earlier turn
    lambda i: [{"role": "user", "content": f"Write to {PII} about row {i}"}],
    lambda i: [{"role": "system", "content": f"The customer is {PII}."},
               {"role": "user", "content": f"What should I answer them? row {i}"}],
    lambda i: [{"role": "user", "content": f"My address is {PII}."}, {"role": "assistant", "content": "Noted."},
               {"role": "user", "content": f"Now summarise row {i}"}])
ONPREM_FAULTS = (None, Fault(status=500), Fault(delay_s=2.0), Fault(empty=True))  # answers, fails, hangs, says nothing
ROUTING_TIMEOUT_S = 0.3


class FailingRouter:
    """The stand-in pool router, until ``mode`` makes every pass raise or hang."""

    def __init__(self, router):
        self.router, self.mode = router, None

    def __getattr__(self, name):  # the pool router's knob, pool and calibration
        return getattr(self.router, name)

    def route_batch(self, queries, **kw):
        if self.mode == "raise":
            raise RuntimeError("the router's model failed")
        if self.mode == "hang":
            time.sleep(2.0)
        return self.router.route_batch(queries, **kw)


@contextlib.contextmanager
def _pool_server(work: Path, profiles: dict, **config):
    """(url, the private endpoint, the cloud, the router) of a server over the stand-in pool."""
    from router_pipeline.llm.pool import pool_from_dict
    from router_pipeline.training.stand_in import stand_in_pool_router
    from router_pipeline.serve.config import DEFAULTS
    from router_pipeline.serve.gateway import build_gateway
    from router_pipeline.serve.server import serving_in_thread

    with FakeOpenAI() as onprem, FakeGemini(latency_s=0.02) as cloud:
        os.environ.update(ROUTER_PIPELINE_PROFILE="gemini", GEMINI_BASE_URL=cloud.base_url,
                          GEMINI_API_KEY="serving-faults-not-secret", ROUTER_BENCH_TEAM=KEYS["team"])
        pool = pool_from_dict([
            {"name": "onprem", "backend": "openai", "model": "llama-onprem", "base_url": onprem.base_url,
             "private": True, "input_usd_per_mtok": 0.05, "output_usd_per_mtok": 0.05},
            {"name": "flash", "backend": "gemini", "model": "gemini-2.5-flash", "input_usd_per_mtok": 0.3,
             "output_usd_per_mtok": 2.5},
            {"name": "pro", "backend": "gemini", "model": "gemini-2.5-pro", "input_usd_per_mtok": 1.25,
             "output_usd_per_mtok": 10.0}])
        router = FailingRouter(stand_in_pool_router(work, pool)[0])
        (work / "profiles.json").write_text(json.dumps({"profiles": profiles}))
        gateway = build_gateway(None, router=router, profiles_path=work / "profiles.json",
                                feedback_dir=work / "state",
                                config=replace(DEFAULTS, cooldown_s=0.0, upstream_timeout_s=1.0, **config))
        gateway.batcher.router = router
        with serving_in_thread(gateway, log_level="critical") as url:
            yield url, onprem, cloud, router


def _chat(client: httpx.Client, url: str, messages: list[dict]) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", json={"model": "router", "messages": messages, "max_tokens": 16},
                    headers={"Authorization": f"Bearer {KEYS['team']}"}, timeout=60)
    return r.status_code, r.json(), (time.perf_counter() - t0) * 1000


def privacy_case(n: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="serving-privacy-"))
    profiles = {"team": {"keys_env": "ROUTER_BENCH_TEAM",
                         "mapper": {"rules": [{"kind": "privacy", "name": "pii", "models": ["onprem"]}]}}}
    with _pool_server(work, profiles) as (url, onprem, cloud, _), httpx.Client() as client:
        def one(i: int):
            if fault := ONPREM_FAULTS[i % len(ONPREM_FAULTS)]:
                onprem.add_faults(fault)
            return _chat(client, url, CONVERSATIONS[i % len(CONVERSATIONS)](i))

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            replies = list(pool.map(one, range(n)))
        cloud_calls = list(cloud.calls)
    shutil.rmtree(work, ignore_errors=True)
    answered_outside = sum(s == 200 and body["routing"]["served_by"] != "onprem" for s, body, _ in replies)
    return {"requests": n, "outcomes": dict(Counter(s if s == 200 else f"{s} {body['error']['code']}"
                                                    for s, body, _ in replies)),
            "cloud_calls": len(cloud_calls), "cloud_calls_with_private_text": sum(
                PII in c.prompt or PII in (c.system or "") for c in cloud_calls),
            "outside": answered_outside + len(cloud_calls)}


def router_case(n: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="serving-router-"))
    profiles = {"team": {"keys_env": "ROUTER_BENCH_TEAM"}}
    with _pool_server(work, profiles, routing_timeout_s=ROUTING_TIMEOUT_S) as (url, _, _, router), \
            httpx.Client() as client:
        runs = {}
        for mode in (None, "raise", "hang"):
            router.mode = mode
            with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
                runs[mode or "healthy"] = list(pool.map(
                    lambda i: _chat(client, url, [{"role": "user", "content": f"row {i}"}]), range(n)))
            router.mode = None
            time.sleep(2.1)  # a hung pass ends
    shutil.rmtree(work, ignore_errors=True)
    out = {"requests": n, "routing_timeout_ms": ROUTING_TIMEOUT_S * 1000}
    for mode, replies in runs.items():
        out[mode] = {"outcomes": dict(Counter(s if s == 200 else f"{s} {body['error']['code']}"
                                              for s, body, _ in replies)),
                     "served_by_default": sum(s == 200 and body["routing"].get("rule") == "router_failed"
                                              for s, body, _ in replies),
                     "p50_ms": round(float(np.percentile([ms for *_, ms in replies], 50))),
                     "p99_ms": round(float(np.percentile([ms for *_, ms in replies], 99)))}
    out["5xx"] = sum(s >= 500 for mode in ("raise", "hang") for s, _, _ in runs[mode])
    return out


def main(argv=None) -> int:
    logging.getLogger("router_pipeline").setLevel(logging.CRITICAL)  # each fault logs per request: counted here
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--cascade-requests", type=int, default=300,
                   help="budgeted requests of a cascaded pool profile per backend, under the same faults (0: none)")
    p.add_argument("--seed", type=int, default=29)
    p.add_argument("--promises", default="privacy,router", help="the failure-promise cases to run ('' for none)")
    p.add_argument("--promise-requests", type=int, default=200, help="requests per failure-promise case and mode")
    args = p.parse_args(argv)
    totals = Counter()
    for backend in filter(None, args.backends.split(",")):
        r = run(backend, args.requests, args.seed)
        p99 = r["bystander_p99_ms"]
        idle, control, during = p99["idle"], p99["same load, no fault"], p99["during the faults"]
        print(f"== {backend}: {r['requests']} budgeted requests, 8 at a time, in {r['wall_s']} s; database faults "
              f"{r['faults']}")
        print(f"   answered {r['answered']} ({r['returned_paid']} by Pro, {r['abstained']} abstained once over "
              f"budget) after {r['attempts']} attempts")
        print(f"   spend recorded ${r['spend_recorded_usd']:.8f} of ${r['spend_of_paid_usd']:.8f} paid; "
              f"limit ${r['limit_usd']:.8f}, one request ${r['per_request_usd']:.8f}")
        print(f"   bystander (no budget) p99 {during} ms during the faults over {r['bystander_requests']} requests "
              f"(failed: {r['bystander_failed']}): {during / control:.2f}x the same load with a healthy database "
              f"({control} ms), {during / idle:.2f}x an idle server ({idle} ms)")
        if r["unanswered"]:
            print(f"   budgeted requests not answered after 60 tries: {r['unanswered']}")
        totals.update(paid=r["paid"], lost=r["lost"], double=r["double"], over=r["overspend_requests"])
        print(f"   paid {r['paid']}, lost {r['lost']}, double {r['double']}, overspend {r['overspend_requests']}")
        if args.cascade_requests > 0:
            c = cascade_run(backend, args.cascade_requests, args.seed)
            print(f"== {backend}, cascades: {c['requests']} budgeted requests of a profile with cascade "
                  f"flash-lite+flash -> pro, 8 at a time, in {c['wall_s']} s; database faults {c['faults']}; "
                  f"upstream 500s {c['upstream_failed']}")
            print(f"   answered {c['answered']} ({c['cascaded']} by the cascade, {c['escalated']} of them escalated "
                  f"to Pro, stopped: {c['stopped']}; {c['abstained']} abstained once over budget) after "
                  f"{c['attempts']} attempts")
            print(f"   paid calls {c['paid']} {c['paid_by_model']} for {c['requests_paid']} requests; spend recorded "
                  f"${c['spend_recorded_usd']:.8f} of ${c['spend_of_paid_usd']:.8f} paid (recorded minus paid "
                  f"${c['spend_difference_usd']:.10f}); limit ${c['limit_usd']:.8f}, over it by "
                  f"${c['overspend_usd']:.8f}, one call's reservation ${c['slack_usd']:.8f}; reservations left once "
                  f"every request ended {c['reservations_left']} (${c['reserved_left_usd']:.8f})")
            print(f"   bystander (no budget, no cascade) p99 {c['bystander_p99_ms']} ms during the faults "
                  f"(failed: {c['bystander_failed']})")
            if c["unanswered"]:
                print(f"   cascaded requests not answered after 60 tries: {c['unanswered']}")
            for d in c["double_details"]:
                print(f"   paid twice: request {d['request']}, {', '.join(d['paid twice'])}; its tries were told "
                      f"{d['tries']}; the answer's calls "
                      f"{[(s['step'], s['model'], s.get('failed')) for s in (d['answer'] or {}).get('steps', [])]}")
            totals.update(paid=c["paid"], cascade_paid=c["paid"], lost=c["lost"], double=c["double"],
                          over=c["overspend_calls"])
            diff = totals.get("cascade_diff", 0.0) + abs(c["spend_difference_usd"])
            totals["cascade_diff"] = diff
            print(f"   paid calls {c['paid']}, lost {c['lost']}, double {c['double']}, overspend beyond one call's "
                  f"reservation {c['overspend_calls']}")
    if args.backends:
        print(f"paid upstream {totals['paid']}" + (f" ({totals['cascade_paid']} of them calls of cascaded requests)"
                                                   if args.cascade_requests > 0 else ""))
        print(f"paid but neither returned nor recorded {totals['lost']}")
        print(f"double payments {totals['double']}")
        print(f"overspend beyond one request {totals['over']}"
              + (" (a cascade: beyond one call's reservation)" if args.cascade_requests > 0 else ""))
        if args.cascade_requests > 0:
            print(f"spend recorded minus paid, cascades ${totals['cascade_diff']:.8f}")
    promises = set(filter(None, args.promises.split(",")))
    if "privacy" in promises:
        r = privacy_case(args.promise_requests)
        print(f"== privacy: {r['requests']} private conversations, 8 at a time, while the private endpoint in turn "
              f"answers, fails, times out and says nothing: {r['outcomes']}; cloud calls {r['cloud_calls']} "
              f"({r['cloud_calls_with_private_text']} holding the private text)")
        print(f"private queries answered by a model outside their rule {r['outside']}")
    if "router" in promises:
        r = router_case(args.promise_requests)
        for mode in ("healthy", "raise", "hang"):
            m = r[mode]
            print(f"== router {mode}: {r['requests']} requests, 8 at a time: {m['outcomes']}, "
                  f"{m['served_by_default']} by the default model (router_failed); p50 {m['p50_ms']} ms, "
                  f"p99 {m['p99_ms']} ms (a pass may run {r['routing_timeout_ms']:g} ms)")
        print(f"router failures answered 5xx {r['5xx']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
