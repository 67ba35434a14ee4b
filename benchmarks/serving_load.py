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

    python benchmarks/serving_load.py                     # the released router (artifacts/router)
    python benchmarks/serving_load.py --requests 500 --configs default,w0,w10,b8,b64
    python benchmarks/serving_load.py --adapter artifacts/adapters/sft --configs default,batching,prefix,neither
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


async def _load(url: str, queries: list[str], concurrency: int, hostile: bool = False) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    router_ms, total_ms, errors, failed = [], [], [], []  # failed: answered by the default model

    async def one(q: str):
        async with gate:
            t0 = time.perf_counter()
            try:
                reply = await client.chat.completions.create(model="router", messages=[{"role": "user", "content": q}])
                router_ms.append(reply.model_extra["routing"]["router_ms"])
                failed.append("router_failed" in reply.model_extra["routing"])
                total_ms.append((time.perf_counter() - t0) * 1000)
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
            "router_failed": sum(failed)}


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
    out.write_text(json.dumps({"adapter": str(adapter), "concurrency": args.concurrency,
                               "backend_latency_ms": args.backend_latency_ms, "results": results,
                               "streaming": ttft}, indent=2))
    print()
    print("| configuration | req/s | router p50 ms | p95 | p99 | end-to-end p50 ms | p95 | p99 | max | errors | "
          "router failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['throughput_rps']} | {r['router_p50_ms']} | {r['router_p95_ms']} | {r['router_p99_ms']} | "
              f"{r['total_p50_ms']} | {r['total_p95_ms']} | {r['total_p99_ms']} | {r['total_max_ms']} | {r['errors']} | "
              f"{r['router_failed']} |")
    print(f"errors {sum(r['errors'] for r in results.values())}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
