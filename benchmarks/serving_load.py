"""Load on the routing server: how much latency does the router add, what do the fast
path and batching buy, and can hostile callers hurt the others?

Starts ``router-pipeline serve`` (a subprocess, as in production) in front of a local
Gemini-protocol server (both tiers, ``--backend-latency-ms`` each), then sends
``--requests`` chat completions with the `openai` client at ``--concurrency``, once per
configuration (``--configs``), side by side in one run. The first configuration runs a
second time with hostile clients beside the load (32 KB digit strings, bodies declared
as 100 MB, ``max_tokens: 100000``, queries holding a phone number, which the privacy
rule keeps on the local model: it generates on the router's CPU cores). The load's
profile maps as serving does by default (the router's calibrated threshold), after the
privacy rule every preset starts with. Prints, per run: throughput, the router's overhead
(arrival to decision, queueing included: the ``routing.router_ms`` each reply carries)
p50/p95/p99, the end-to-end latency p50/p95/p99/max, ``errors N``; the well-behaved
clients' p99 with and without the hostile mix; how long SIGTERM takes to stop the
server; and, against a slow backend, a streamed answer's time to first and last token.

Cascades (``--cascade-requests``, 0 to skip): the released pool router (``--pool-adapter``,
default artifacts/pool_router) served by a copy whose pool is Gemini's Flash-Lite, Flash
and Pro, answered by a Gemini-protocol stand-in with a realistic latency per call
(``--cascade-latency-ms``: a median per model, each call's time drawn log-normal with a
spread of ``CALL_SPREAD`` from a hash of the model and prompt). The cheap two agree on a
share of the queries (``--cascade-agree``, by a hash of the prompt) and give different
letters on the rest, which the cascade then takes to Pro. One server, three routes, the
same queries one after the other: the pool router's own choice (one call), Pro asked by
name (one call), and a profile with ``cascade: {plan: [[flash-lite, flash], pro],
comparator: letter}`` (one or two sequential steps). Prints each route's end-to-end
p50 / p95 side by side and the cascade's escalated share as /v1/stats counts it.

    python benchmarks/serving_load.py                     # the released router (artifacts/router)
    python benchmarks/serving_load.py --requests 500 --configs default,w0,w10,b8,b64
    python benchmarks/serving_load.py --adapter artifacts/adapters/sft --configs default,batching,prefix,neither
    python benchmarks/serving_load.py --configs default --no-hostile --cascade-requests 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

CONFIGS = {
    "batching+prefix": [],
    "batching only": ["--no-prefix-cache"],
    "prefix only": ["--no-batching"],
    "neither": ["--no-batching", "--no-prefix-cache"],
    "fp32": ["--precision", "fp32"],
    "window 0 ms": ["--batch-window-ms", "0"],
    "window 2 ms": ["--batch-window-ms", "2"],
    "window 10 ms": ["--batch-window-ms", "10"],
    "max batch 8": ["--max-batch", "8"],
    "max batch 64": ["--max-batch", "64"],
}
SHORT = {"default": "batching+prefix", "batching": "batching only", "prefix": "prefix only", "neither": "neither",
         "fp32": "fp32", "w0": "window 0 ms", "w2": "window 2 ms", "w10": "window 10 ms", "b8": "max batch 8",
         "b64": "max batch 64"}
HOSTILE = ("32 KB digits", "100 MB body", "max_tokens 100000", "private -> local model")
PRIVATE = "Call me back on 555-123-4567 and write a very long essay on everything."
KEY_ENV, KEY = "ROUTER_BENCH_KEYS", "benchmark-load-key-0001"  # the load profile's API key (not a secret)
HOSTILE_PAUSE_S = 0.1  # each hostile client sends up to 10 requests/s: bad requests, not a flood (a proxy's job)
CASCADE_KEYS = {"single": ("ROUTER_BENCH_SINGLE", "benchmark-single-key-0001"),  # the cascade section's profiles
                "cascade": ("ROUTER_BENCH_CASCADE", "benchmark-cascade-key-0001")}
CASCADE_PLAN = {"plan": [["flash-lite", "flash"], "pro"], "comparator": "letter"}
CALL_SPREAD = 0.3  # sigma of log(call time): a call takes its model's median x e^N(0, 0.3) (p95 1.6x the median)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _profiles(adapter: str, out: Path) -> Path:
    """The load's profile: the router's calibrated threshold (else the balanced preset),
    after the privacy rule every preset has, which sends private queries to the local model."""
    from router_pipeline.routers.contract import read_calibration
    from router_pipeline.serve.mapper import evaluated_spec

    calibration = read_calibration(adapter)
    if not calibration:
        print(f"note: {adapter} has no router_calibration.json: the load is mapped by the balanced preset, "
              "not the threshold its evaluation scored", flush=True)
    mapper = ({"fallback": "medium", "rules": [{"kind": "privacy", "target": "local"},
                                               *evaluated_spec(calibration)["rules"]]}
              if calibration else {"preset": "balanced"})
    path = out.with_suffix(".profiles.json")
    path.write_text(json.dumps({"profiles": {"load": {"keys_env": KEY_ENV, "mapper": mapper}}}))
    return path


def _start(adapter: str, profiles: Path, flags: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = Path(sys.executable).with_name("router-pipeline")
    proc = subprocess.Popen([str(exe), "serve", "--adapter", adapter, "--port", str(port), "--profiles",
                             str(profiles), *flags], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start in 120 s: see {log}")


async def _hostile(url: str, kind: str, stop: asyncio.Event, codes: dict) -> None:
    """One hostile client: sends its kind of request again and again until ``stop``."""
    host, port = url.removeprefix("http://").split(":")
    while not stop.is_set():
        if kind == "100 MB body":  # declares 100 MB, sends 1 MB, waits for the answer
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                         f"\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100000000\r\n\r\n".encode()
                         + b"x" * 1_000_000)
            try:
                await writer.drain()
                status = (await asyncio.wait_for(reader.readline(), 30)).split()[1].decode()
            except (OSError, asyncio.TimeoutError, IndexError):
                status = "dropped"
            writer.close()
        else:
            content = {"32 KB digits": "1" * 32_000, "private -> local model": PRIVATE}.get(
                kind, "Write a very long essay on everything.")
            body = {"model": "router", "messages": [{"role": "user", "content": content}]}
            if kind == "max_tokens 100000":
                body["max_tokens"] = 100_000
            status = str(await asyncio.to_thread(_post_status, f"{url}/v1/chat/completions", body))
        codes.setdefault(kind, {}).setdefault(status, 0)
        codes[kind][status] += 1
        await asyncio.sleep(HOSTILE_PAUSE_S)


def _post_status(url: str, body: dict) -> int | str:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except TimeoutError:  # no answer within 60 s: the client gives up
        return "timeout"
    except OSError as exc:  # refused or reset
        return type(exc).__name__


async def _load(url: str, queries: list[str], concurrency: int, hostile: bool = False, key: str = KEY,
                model: str = "router") -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    router_ms, total_ms, errors, failed = [], [], [], []  # failed: answered by the default model
    served, escalated, cost = {}, [], []  # who answered; a cascade's replies: (past its first step?, ms)

    async def one(q: str):
        async with gate:
            t0 = time.perf_counter()
            try:
                reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}])
                routing = reply.model_extra["routing"]
                router_ms.append(routing["router_ms"])
                failed.append("router_failed" in routing)
                total_ms.append((time.perf_counter() - t0) * 1000)
                served[routing.get("served_by")] = served.get(routing.get("served_by"), 0) + 1
                cost.append(routing.get("cost_usd", 0.0))
                if "cascade" in routing:
                    escalated.append((routing["cascade"]["escalated"], total_ms[-1]))
            except Exception as exc:  # counted, and the first few shown
                errors.append(f"{type(exc).__name__}: {exc}")

    stop, codes = asyncio.Event(), {}
    attackers = [asyncio.create_task(_hostile(url, kind, stop, codes)) for kind in HOSTILE] if hostile else []
    t0 = time.perf_counter()
    await asyncio.gather(*(one(q) for q in queries))
    wall = time.perf_counter() - t0
    stop.set()
    await asyncio.gather(*attackers)
    await client.close()
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 1) if xs else None  # noqa: E731
    return {"requests": len(queries), "wall_s": round(wall, 1), "throughput_rps": round(len(total_ms) / wall, 2),
            "router_p50_ms": pct(router_ms, 50), "router_p95_ms": pct(router_ms, 95), "router_p99_ms": pct(router_ms, 99),
            "total_p50_ms": pct(total_ms, 50), "total_p95_ms": pct(total_ms, 95), "total_p99_ms": pct(total_ms, 99),
            "total_max_ms": pct(total_ms, 100), "errors": len(errors), "first_errors": errors[:3], "hostile": codes,
            "router_failed": sum(failed), "served_by": served, "cascaded": len(escalated),
            "escalated": sum(e for e, _ in escalated), "usd_per_1000": round(1000 * sum(cost) / len(cost), 6) if cost
            else None, **({f"{part}_{q}_ms": pct([ms for e, ms in escalated if e == up], q)
                           for part, up in (("one_step", False), ("two_steps", True)) for q in (50, 95)}
                          if escalated else {})}


def _agrees(prompt: str, share: float) -> bool:
    """Whether the cheap two agree on this prompt (a stable hash: the same queries every run)."""
    return zlib.crc32(prompt.encode()) % 1000 < share * 1000


def _letters(share: float):
    """The stand-in's answers: a letter from the prompt's hash; Flash-Lite says the next
    letter where the cheap two are not to agree (Flash and Pro keep the prompt's)."""
    def respond(model: str, prompt: str) -> str:
        letter = zlib.crc32(prompt.encode()) // 1000
        return "ABCD"[(letter + int("lite" in model and not _agrees(prompt, share))) % 4]
    return respond


def _call_time(medians_s: dict[str, float]):
    """How long the stand-in takes for a call: the model's median (its id contains the
    pool name; the longest match wins) x a log-normal factor drawn from a hash of the
    model and prompt."""
    import random

    names = sorted(medians_s, key=len, reverse=True)

    def wait(model: str, prompt: str) -> None:
        name = next((n for n in names if n in model), None)
        if name is not None:
            draw = random.Random(zlib.crc32(f"{model}|{prompt}".encode())).gauss(0.0, 1.0)
            time.sleep(medians_s[name] * float(np.exp(CALL_SPREAD * draw)))
    return wait


def _pool_copy(adapter: Path, out: Path) -> Path:
    """The pool router at ``adapter`` with its pool replaced by Gemini's Flash-Lite, Flash
    and Pro (the stand-in answers them): router.json rewritten, every other file linked
    (no manifest: a copy is not the release)."""
    import shutil

    from router_pipeline.llm.pool import gemini_pool

    meta = json.loads((adapter / "router.json").read_text())
    pool = gemini_pool()
    if meta.get("kind") != "pool" or meta.get("models") != pool.names:
        raise SystemExit(f"error: {adapter} is not a pool router over {pool.names}: pass --pool-adapter "
                         "or --cascade-requests 0")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for entry in adapter.iterdir():
        if entry.name not in ("router.json", "manifest.json"):
            (out / entry.name).symlink_to(entry.resolve())
    (out / "router.json").write_text(json.dumps({**meta, "pool": pool.to_dict()}, indent=1))
    return out


def _stats(url: str, key: str, profile: str) -> dict:
    req = urllib.request.Request(f"{url}/v1/stats", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["profiles"].get(profile, {})


def _cascade_section(args, queries: list[str], out: Path) -> dict:
    """The pool router's choice, Pro by name and the cascade, one server, one stand-in."""
    import tempfile

    from router_pipeline.llm.fake_gemini import FakeGemini
    from router_pipeline.serve.cli import default_router_dir

    adapter = Path(args.pool_adapter) if args.pool_adapter else default_router_dir(pool=True)
    if adapter is None:
        raise SystemExit("error: no pool router: materialise released_pool_router, pass --pool-adapter, "
                         "or --cascade-requests 0")
    medians = {k.strip(): float(v) / 1000 for k, v in (kv.split("=") for kv in args.cascade_latency_ms.split(","))}
    router = _pool_copy(adapter, out.with_suffix(".pool_router"))
    profiles = out.with_suffix(".cascade_profiles.json")
    profiles.write_text(json.dumps({"profiles": {
        "single": {"keys_env": CASCADE_KEYS["single"][0], "cascade": "off"},
        "cascade": {"keys_env": CASCADE_KEYS["cascade"][0], "cascade": CASCADE_PLAN}}}))
    single_key, cascade_key = CASCADE_KEYS["single"][1], CASCADE_KEYS["cascade"][1]
    queries = queries[:args.cascade_requests]
    routes = {"pool router's choice (one call)": (single_key, "router"), "pro by name (one call)": (single_key, "pro"),
              "cascade flash-lite+flash -> pro": (cascade_key, "router")}
    results = {}
    with FakeGemini(responder=_letters(args.cascade_agree), on_request=_call_time(medians)) as fake, \
            tempfile.TemporaryDirectory(prefix="serving-load-cascade-") as state:
        env = {**os.environ, "ROUTER_PIPELINE_PROFILE": "gemini", "GEMINI_BASE_URL": fake.base_url,
               "GEMINI_API_KEY": os.environ.get("GEMINI_API_KEY", "benchmark-key"),
               **{var: key for var, key in CASCADE_KEYS.values()}}
        proc, url = _start(str(router), profiles, ["--feedback-dir", state], env, out.with_suffix(".cascade.log"))
        try:
            for key, model in routes.values():  # warm-up: the router, and a connection to every model
                asyncio.run(_load(url, queries[:min(32, len(queries))], args.concurrency, key=key, model=model))
            time.sleep(0.5)
            before = _stats(url, cascade_key, "cascade").get("cascade", {})
            for name, (key, model) in routes.items():
                results[name] = asyncio.run(_load(url, queries, args.concurrency, key=key, model=model))
                _report(name, results[name])
            time.sleep(0.5)  # the last requests' counters are written
            after = _stats(url, cascade_key, "cascade")
        finally:
            proc.terminate()
            proc.wait(30)
    counted = {k: after["cascade"][k] - before.get(k, 0) for k in ("requests", "escalated")}
    return {"pool_adapter": str(adapter), "latency_ms": {k: v * 1000 for k, v in medians.items()},
            "call_spread_sigma": CALL_SPREAD, "agree_share": args.cascade_agree, "routes": results,
            "stats_cascade": {**counted, "escalated_share": round(counted["escalated"] / counted["requests"], 4)
                              if counted["requests"] else None, "since_start": after["cascade"]},
            "calls": after.get("calls")}


async def _time_to_first_token(url: str) -> dict:
    """A streamed answer: seconds to the first content chunk and to the last."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    await client.chat.completions.create(model="router", messages=[{"role": "user", "content": "Warm up."}])
    t0 = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(model="router", stream=True,
                                                  messages=[{"role": "user", "content": "Tell me a long story."}])
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
    last = time.perf_counter() - t0
    await client.close()
    return {"first_token_s": round(first or last, 3), "last_token_s": round(last, 3)}


def _report(name: str, r: dict) -> None:
    print(f"[{name}] {r['requests']} requests in {r['wall_s']} s: {r['throughput_rps']} req/s; router overhead "
          f"p50 {r['router_p50_ms']} / p95 {r['router_p95_ms']} / p99 {r['router_p99_ms']} ms; end to end "
          f"p50 {r['total_p50_ms']} / p95 {r['total_p95_ms']} / p99 {r['total_p99_ms']} / max {r['total_max_ms']} ms "
          f"(max {r['total_max_ms'] / r['total_p99_ms']:.1f}x p99; target <= 2x); errors {r['errors']}", flush=True)
    for e in r["first_errors"]:
        print(f"    {e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="router adapter (default: the released router, else the last DPO adapter)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--backend-latency-ms", type=float, default=20.0)
    p.add_argument("--configs", default="default,fp32",
                   help="comma-separated: default, fp32 (the reference precision), batching, prefix, neither "
                        "(LoRA routers' prefix cache), w0, w2, w10 (batch window ms), b8, b64 (max batch)")
    p.add_argument("--no-hostile", action="store_true",
                   help="skip the second run of the first configuration with hostile clients beside the load")
    p.add_argument("--stream-backend-s", type=float, default=2.0,
                   help="backend latency for the streamed answer (time to first vs last token)")
    p.add_argument("--cascade-requests", type=int, default=400,
                   help="requests per route of the cascade section (0: skip it)")
    p.add_argument("--pool-adapter", help="the pool router for the cascade section (default: artifacts/pool_router)")
    p.add_argument("--cascade-latency-ms", default="flash-lite=300,flash=500,pro=2000",
                   help="the stand-in's median time per call, per model, in the cascade section")
    p.add_argument("--cascade-agree", type=float, default=0.6,
                   help="share of queries on which Flash-Lite and Flash agree (the rest escalate to Pro)")
    p.add_argument("--out", default="artifacts/benchmarks/serving_load.json")
    args = p.parse_args(argv)

    from router_pipeline.llm.fake_gemini import FakeGemini
    from router_pipeline.labels.questions import load_questions
    from router_pipeline.serve.cli import default_router_dir

    adapter = args.adapter or default_router_dir()
    if adapter is None:
        print("error: no router: run the main job (released_router) or pass --adapter", file=sys.stderr)
        return 2
    names = [SHORT[c.strip()] for c in args.configs.split(",")]
    questions = list(load_questions(sample_size=0)[0]["query"])
    queries = [questions[i % len(questions)] for i in range(args.requests)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    profiles = _profiles(str(adapter), out)
    results = {}
    with FakeGemini(latency_s=args.backend_latency_ms / 1000) as fake:
        env = {**os.environ, "ROUTER_PIPELINE_PROFILE": "gemini", "GEMINI_BASE_URL": fake.base_url,
               "GEMINI_API_KEY": os.environ.get("GEMINI_API_KEY", "benchmark-key"), KEY_ENV: KEY}
        for name in names:
            proc, url = _start(str(adapter), profiles, CONFIGS[name], env, out.with_suffix(f".{name.split()[0]}.log"))
            runs = [(name, False)] + ([(f"{name} + hostile", True)] if name == names[0] and not args.no_hostile else [])
            try:
                asyncio.run(_load(url, queries[:min(64, len(queries))], args.concurrency))  # warm-up
                for label, hostile in runs:
                    results[label] = asyncio.run(_load(url, queries, args.concurrency, hostile))
                    _report(label, results[label])
            finally:
                t0 = time.perf_counter()
                proc.terminate()
                proc.wait(30)
                print(f"    SIGTERM -> exit in {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.no_hostile and f"{names[0]} + hostile" in results:
        calm, rough = results[names[0]], results[f"{names[0]} + hostile"]
        print(f"hostile mix ({', '.join(HOSTILE)}, one client each): well-behaved p50 {calm['total_p50_ms']} -> "
              f"{rough['total_p50_ms']} ms, p99 {calm['total_p99_ms']} -> {rough['total_p99_ms']} ms "
              f"({rough['total_p99_ms'] / calm['total_p99_ms']:.2f}x), router p99 {calm['router_p99_ms']} -> "
              f"{rough['router_p99_ms']} ms ({rough['router_p99_ms'] / calm['router_p99_ms']:.2f}x; target <= 1.5x), "
              f"well-behaved errors {rough['errors']}; hostile answers {rough['hostile']}")
        unanswered = sum(n for codes in rough["hostile"].values() for status, n in codes.items()
                         if not status.isdigit())
        print(f"hostile requests not answered within 60 s {unanswered}")
    story = " ".join(f"word{i}" for i in range(200))  # a long answer, generated over stream_backend_s
    with FakeGemini(latency_s=args.stream_backend_s, responder=lambda model, prompt: story) as slow:
        env = {**os.environ, "ROUTER_PIPELINE_PROFILE": "gemini", "GEMINI_BASE_URL": slow.base_url,
               "GEMINI_API_KEY": os.environ.get("GEMINI_API_KEY", "benchmark-key"), KEY_ENV: KEY}
        proc, url = _start(str(adapter), profiles, [], env, out.with_suffix(".stream.log"))
        try:
            ttft = asyncio.run(_time_to_first_token(url))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"streamed answer, backend {args.stream_backend_s} s: first token {ttft['first_token_s']} s, last token "
          f"{ttft['last_token_s']} s ({ttft['first_token_s'] / ttft['last_token_s']:.0%} of the answer time; "
          f"target < 10%)")
    cascade = _cascade_section(args, questions * (args.cascade_requests // len(questions) + 1), out) \
        if args.cascade_requests > 0 else None
    out.write_text(json.dumps({"adapter": str(adapter), "concurrency": args.concurrency,
                               "backend_latency_ms": args.backend_latency_ms, "results": results,
                               "streaming": ttft, "cascade": cascade}, indent=2))
    print()
    print("| configuration | req/s | router p50 ms | p95 | p99 | end-to-end p50 ms | p95 | p99 | max | errors | "
          "router failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['throughput_rps']} | {r['router_p50_ms']} | {r['router_p95_ms']} | {r['router_p99_ms']} | "
              f"{r['total_p50_ms']} | {r['total_p95_ms']} | {r['total_p99_ms']} | {r['total_max_ms']} | {r['errors']} | "
              f"{r['router_failed']} |")
    print(f"errors {sum(r['errors'] for r in results.values())}")
    if cascade is not None:
        c, lat = cascade["stats_cascade"], cascade["latency_ms"]
        print()
        print(f"cascade section: {args.cascade_requests} requests per route at concurrency {args.concurrency}; "
              f"the stand-in's median call {', '.join(f'{m} {v:g} ms' for m, v in lat.items())} "
              f"(log-normal, sigma {CALL_SPREAD}); the cheap two agree on {args.cascade_agree:.0%} of prompts")
        print("| route | req/s | router p50 ms | end-to-end p50 ms | p95 | p99 | answer kept from | USD per 1,000 | "
              "errors |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in cascade["routes"].items():
            print(f"| {name} | {r['throughput_rps']} | {r['router_p50_ms']} | {r['total_p50_ms']} | "
                  f"{r['total_p95_ms']} | {r['total_p99_ms']} | {r['served_by']} | {r['usd_per_1000']} | "
                  f"{r['errors']} |")
        mine = cascade["routes"]["cascade flash-lite+flash -> pro"]
        print(f"cascade end to end: one step (the cheap two agreed) p50 {mine['one_step_50_ms']} / p95 "
              f"{mine['one_step_95_ms']} ms, two steps (escalated to Pro) p50 {mine['two_steps_50_ms']} / p95 "
              f"{mine['two_steps_95_ms']} ms")
        print(f"cascade escalated share {c['escalated_share']} (/v1/stats: {c['escalated']} of {c['requests']} "
              f"cascaded requests; the replies say {mine['escalated']} of {mine['cascaded']})")
        print(f"errors (cascade section) {sum(r['errors'] for r in cascade['routes'].values())}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
