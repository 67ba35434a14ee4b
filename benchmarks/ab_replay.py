"""An A/B experiment replayed through the routing server: the pool router against always-Pro
on recorded MMLU-Pro outcomes, with the grades sent back as feedback, and the online
figures checked against the offline ones.

1. The outcomes file (MMLU-Pro, six models, beside the repository) is split as the pipeline
   splits questions: 20% test by a seeded hash of the question (labels/split.py), and a
   10% validation slice of the training rows (training/examples.py's rule).
2. The pool router is trained on the training rows as the pool pipeline trains it
   (training/pool.py train_pool_routers: the mean log-odds of LDA on a Gemma 3 270M block
   and LDA on MiniLM, hyper-parameters by 5-fold CV, Platt-calibrated), its knob (quality
   0.95 by default, the pipeline's) set on the validation slice, and saved under
   artifacts/benchmarks/ab_replay/router. The features are pool_quality.py's cache when it
   holds this file's queries (else encoded once, about 12 minutes on 2 cores, and kept).
3. An OpenAI-protocol stand-in (llm/fake_openai.py's FakeOpenAI, with a responder) plays
   the six models: it finds the question in the prompt and answers with that model's
   recorded letter, its usage the recorded tokens, so the server's charge (tokens x the
   pool's prices, which are solved from the file's tokens and costs) is the recorded cost.
4. ``router-pipeline serve --adapter <router> --profiles <profiles>`` runs on 127.0.0.1 with
   one profile whose experiment splits requests for ``router`` 50/50 between the router and
   Pro by a hash of the question's id (the experiment's key header). The held-out test rows
   are sent (a few at a time); after each answer the recorded grade of the model that
   answered goes to /v1/feedback.
5. Per arm: requests, spend per 1,000 requests and accuracy with 95% intervals from the
   server's /v1/stats, the difference; beside them the offline figures of the same router
   and knob (pool_quality.py's scoring: the router's choice on each row from the training
   features, the recorded grade and cost of that model) on the rows each arm received and
   on all replayed rows, and whether each lies inside the online interval.

    python benchmarks/ab_replay.py                  # every test row (about 900)
    python benchmarks/ab_replay.py --rows 40        # a smoke run
    python benchmarks/ab_replay.py --minilm-only    # MiniLM LDA alone (no Gemma: faster on a bare CPU)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTCOMES = ROOT.parent / "shared" / "data" / "routing_outcomes" / "mmlu_pro_dev_outcomes.csv"
POOL_QUALITY_CACHE = ROOT / "artifacts" / "benchmarks" / "pool_quality"  # pool_quality.py's features
KEY_ENV, KEY = "AB_REPLAY_KEYS", "ab-replay-benchmark-key-0001"  # the replay profile's key (not a secret)
KEY_HEADER = "X-Replay-Key"  # the experiment's key: the question's id, so a question always gets one arm
EXPERIMENT = "router-vs-pro"
NO_LETTER = "(no answer letter)"  # what a model whose recorded answer is blank says: an empty reply is a failure
Z95 = 1.959964


# -- the upstream stand-in -------------------------------------------------------------------
def recorded_responder(answers: dict[str, dict[str, tuple[str, int, int]]], misses: list[str]):
    """FakeOpenAI's responder: per call, the recorded answer and tokens of the model called
    (its model id: the file's model name) for the question in the prompt. ``answers``:
    query -> model -> (answer, input tokens, output tokens); a call it cannot answer is
    added to ``misses``."""

    def respond(model: str, body: dict) -> tuple[str, dict]:
        prompt = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        row = answers.get(prompt.strip())
        if row is None:  # not the question alone: the question it holds
            row = next((v for q, v in answers.items() if q in prompt), None)
        if row is None or model not in row:
            misses.append(f"{model}: {prompt[:60]!r}")
            return "unknown question", {"prompt_tokens": 0, "completion_tokens": 0}
        text, tokens_in, tokens_out = row[model]
        return text, {"prompt_tokens": tokens_in, "completion_tokens": tokens_out}

    return respond


def solved_prices(frame: pd.DataFrame, models: list[str]) -> dict[str, tuple[float, float]]:
    """USD per million input and output tokens per model: the least-squares solution of
    cost = input tokens x p_in + output tokens x p_out over the file's rows (exact for a
    file whose costs were made that way)."""
    prices = {}
    for m in models:
        a = frame[[f"{m}_input_tokens", f"{m}_output_tokens"]].to_numpy(float)
        (p_in, p_out), *_ = np.linalg.lstsq(a, frame[f"{m}_cost_usd"].to_numpy(float) * 1e6, rcond=None)
        prices[m] = (round(float(p_in), 6), round(float(p_out), 6))
    return prices


# -- features and training -------------------------------------------------------------------
def features(queries: list[str], minilm_only: bool, out: Path) -> tuple[dict, str]:
    """Every row's features (training/heads.py encode's), and where they came from:
    pool_quality.py's cache when it holds these queries, else encoded once and kept in
    ``out`` (MiniLM alone with ``minilm_only``)."""
    import hashlib

    from router_pipeline.training.heads import HeadConfig, encode, encode_cached

    config = HeadConfig()
    if _cached(queries, config, POOL_QUALITY_CACHE):
        return encode_cached(queries, config, POOL_QUALITY_CACHE)[0], "pool_quality.py's cache"
    t0 = time.perf_counter()
    if not minilm_only:
        feats, _ = encode_cached(queries, config, out)
        return feats, f"not in pool_quality.py's cache: encoded in {time.perf_counter() - t0:.0f} s, kept in {out}"
    path = out / f"minilm-{hashlib.sha256(json.dumps(queries).encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {"minilm": z["minilm"]}, f"kept from an earlier run ({path})"
    feats, _ = encode(queries, HeadConfig(heads=("minilm_lda",)), progress=True)
    np.savez(path, minilm=feats["minilm"])
    return feats, f"encoded in {time.perf_counter() - t0:.0f} s, kept in {path}"


def _cached(queries: list[str], config, folder: Path) -> bool:
    import hashlib

    key = hashlib.sha256(json.dumps([queries, config.base_model, list(config.layers), config.pooling]).encode())
    return (folder / f"features-{key.hexdigest()[:16]}.npz").is_file()


def train(outcomes, train_rows: np.ndarray, val_rows: np.ndarray, feats: dict, pool, candidate: str, knob: str,
          knob_value: float, dest: Path):
    """The pool router as the pipeline trains it (train_pool_routers), its features looked
    up in ``feats`` instead of encoded again."""
    from dataclasses import replace

    import router_pipeline.training.heads as heads
    from router_pipeline.training.heads import HeadConfig
    from router_pipeline.training.pool import PoolSpec, train_pool_routers

    index = {q: i for i, q in enumerate(outcomes.frame["query"])}

    def looked_up(queries, config, progress=False):
        rows = [index[q] for q in queries]
        out = {}
        if "gemma" in config.heads:
            out["gemma"] = {layer: feats["gemma"][layer][rows] for layer in config.layers}
        if "minilm_lda" in config.heads:
            out["minilm"] = feats["minilm"][rows]
        return out, {}

    part = lambda rows: replace(outcomes, frame=outcomes.frame.iloc[rows].reset_index(drop=True),  # noqa: E731
                                rejected=[])
    real, heads.encode = heads.encode, looked_up
    try:
        (result,) = train_pool_routers(part(train_rows), part(val_rows), PoolSpec((candidate,), knob, knob_value),
                                       HeadConfig(), pool.to_dict(), {candidate: dest}, log=lambda s: None)
    finally:
        heads.encode = real
    return result


def offline_p(folder: Path, feats: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(P(correct) per row and model, the models' costs, lambda) of the saved router on the
    training features of ``rows``: what PoolRouter.proba gives, read from the folder."""
    from router_pipeline.artifacts import CALIBRATION_FILE, ROUTER_FILE
    from router_pipeline.routers.pool import MEMBERS_DIR, POOL_HEAD_FILE, PoolHead, ensemble

    meta = json.loads((folder / ROUTER_FILE).read_text())
    parts = [folder / MEMBERS_DIR / m for m in meta["members"]] if "members" in meta else [folder]
    probs = []
    for part in parts:
        m = json.loads((part / ROUTER_FILE).read_text())
        head = PoolHead.load(part / POOL_HEAD_FILE, m["models"], m["classifier"], m.get("k", 15))
        x = feats["gemma"][m["encoder"]["layer"]] if m["encoder"]["encoder"] == "gemma" else feats["minilm"]
        probs.append(head.proba(x[rows]))
    lam = json.loads((folder / CALIBRATION_FILE).read_text())["lambda"]
    return ensemble(probs), head.costs, math.inf if lam is None else float(lam)


# -- the server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(router: Path, profiles: Path, state: Path, log: Path, env: dict,
                 timeout_s: float) -> tuple[subprocess.Popen, str]:
    """``router-pipeline serve`` on 127.0.0.1, once /health answers 200; SystemExit naming
    the log when it exits or does not get ready in ``timeout_s``."""
    port = _free_port()
    exe = Path(sys.executable).with_name("router-pipeline")
    # A router pass over a few MMLU-Pro questions on Gemma on 2 shared cores can take more
    # than the default routing timeout (0.5 s), which would answer with the default model.
    cmd = [str(exe), "serve", "--adapter", str(router), "--profiles", str(profiles), "--feedback-dir", str(state),
           "--host", "127.0.0.1", "--port", str(port), "--routing-timeout-s", "60"]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode} before it was ready; its "
                             f"log {log} ends:\n{_tail(log)}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return proc, url
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"error: the server was not ready within {timeout_s:.0f} s; its log {log} ends:\n{_tail(log)}")


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the replay -------------------------------------------------------------------------------
async def replay(url: str, test: pd.DataFrame, grades: dict[str, dict[str, str]], concurrency: int) -> list[dict]:
    """Every test row as a chat request for ``router`` (its qid as the experiment's key),
    then the recorded grade of the model that answered as feedback. One dict per row."""
    import httpx
    from tqdm.auto import tqdm

    auth = {"Authorization": f"Bearer {KEY}"}
    gate = asyncio.Semaphore(concurrency)
    out: list[dict] = []
    bar = tqdm(total=len(test), desc="replay", unit="req", file=sys.stderr, mininterval=2.0)

    async def one(client: httpx.AsyncClient, qid: str, query: str) -> None:
        async with gate:
            row = {"qid": qid}
            try:
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/chat/completions", headers={**auth, KEY_HEADER: qid},
                                      json={"model": "router", "messages": [{"role": "user", "content": query}]})
                row["ms"] = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    row["error"] = f"chat HTTP {r.status_code}: {r.text[:200]}"
                    return
                body = r.json()
                routing = body["routing"]
                served = routing.get("served_by")
                row.update(arm=routing.get("experiment", {}).get("arm"), served_by=served,
                           cost_usd=routing.get("cost_usd", 0.0), content=body["choices"][0]["message"]["content"],
                           fallback=bool(routing.get("fallback")), router_failed=routing.get("router_failed"),
                           p_correct=routing.get("p_correct"), request_id=routing["request_id"])
                grade = grades[qid].get(served)
                if grade is None:
                    row["error"] = f"served by {served!r}, not a model of the file"
                    return
                for attempt in range(40):  # a request whose recording was deferred is not known for a moment
                    f = await client.post(f"{url}/v1/feedback", headers=auth, json={
                        "request_id": routing["request_id"], "grade": grade, "tier": served})
                    if f.status_code != 404:
                        break
                    await asyncio.sleep(0.25)
                row["feedback"], row["feedback_retries"] = f.status_code, attempt
                if f.status_code != 200:
                    row["error"] = f"feedback HTTP {f.status_code}: {f.text[:200]}"
            except Exception as exc:  # counted and shown; the replay goes on
                row["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                out.append(row)
                bar.update()

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(one(client, q, text) for q, text in zip(test["qid"], test["query"])))
    bar.close()
    return out


def stats(url: str) -> dict:
    req = urllib.request.Request(f"{url}/v1/stats", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


# -- figures ----------------------------------------------------------------------------------
def mean_interval(values: np.ndarray, scale: float = 1.0) -> tuple[float, float, float]:
    """(mean, lo, hi) x ``scale``: the normal 95% interval of a mean."""
    v = np.asarray(values, float) * scale
    if len(v) < 2:
        return float(v.mean()) if len(v) else math.nan, math.nan, math.nan
    half = Z95 * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def _inside(x: float, lo: float, hi: float) -> str:
    return "inside" if lo - 1e-9 <= x <= hi + 1e-9 else "OUTSIDE"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outcomes", nargs="?", default=str(DEFAULT_OUTCOMES))
    p.add_argument("--rows", type=int, default=0, help="replay a seeded sample of this many test rows (default: all)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--pro", default="gemini-1.5-pro", help="the always-one-model arm's model (a model of the file)")
    p.add_argument("--share", type=float, default=0.5, help="the router arm's share of the traffic")
    p.add_argument("--knob", choices=("quality", "budget", "lambda"), default=None,
                   help="how the router's lambda is set on the validation rows (default: the pipeline's, PoolSpec)")
    p.add_argument("--knob-value", type=float, default=None)
    p.add_argument("--minilm-only", action="store_true",
                   help="the router's MiniLM LDA member alone (no Gemma: for a CPU where Gemma is too slow)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42, help="the split's seed (labels/split.py's default)")
    p.add_argument("--start-timeout-s", type=float, default=300)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "benchmarks" / "ab_replay"))
    args = p.parse_args(argv)

    from router_pipeline.labels.outcomes import read_outcomes
    from router_pipeline.labels.split import TEST, assign_split, validation_mask
    from router_pipeline.llm.fake_openai import FakeOpenAI
    from router_pipeline.llm.pool import pool_from_dict
    from router_pipeline.policies import CORRECT
    from router_pipeline.routers.pool import decide
    from router_pipeline.online_quality import difference
    from router_pipeline.training.examples import ExampleSpec
    from router_pipeline.training.pool import PoolSpec

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    outcomes = read_outcomes(args.outcomes)
    frame, models = outcomes.frame, outcomes.models
    if args.pro not in models:
        print(f"error: --pro {args.pro!r} is not a model of {args.outcomes} ({models})", file=sys.stderr)
        return 2
    missing = [f"{m}_{c}" for m in models for c in ("answer", "input_tokens", "output_tokens")
               if f"{m}_{c}" not in frame]
    if missing:
        print(f"error: the stand-in answers with each model's recorded answer and tokens; {args.outcomes} has no "
              f"{missing[:3]}", file=sys.stderr)
        return 2
    knob = args.knob or PoolSpec.knob
    knob_value = args.knob_value if args.knob_value is not None else PoolSpec.knob_value
    candidate = "minilm_lda" if args.minilm_only else "gemma_minilm_lda"

    # The split: test by question (labels/split.py), validation inside the training rows.
    side = assign_split(frame, args.test_fraction, args.seed, "question").to_numpy()
    test_rows = np.flatnonzero(side == TEST)
    rest = np.flatnonzero(side != TEST)
    val = validation_mask(frame["qid"].iloc[rest], ExampleSpec.validation_fraction, args.seed).to_numpy()
    train_rows, val_rows = rest[~val], rest[val]
    replayed = test_rows
    if args.rows:
        replayed = np.sort(np.random.default_rng(0).choice(test_rows, min(args.rows, len(test_rows)), replace=False))
    print(f"{args.outcomes}: {len(frame)} rows ({len(outcomes.rejected)} rejected); train {len(train_rows)}, "
          f"validation {len(val_rows)} (the knob), test {len(test_rows)}, replayed {len(replayed)}", flush=True)

    feats, where = features(list(frame["query"]), args.minilm_only, out)
    print(f"features: {where}", flush=True)
    prices = solved_prices(frame, models)
    print("prices per million tokens (solved from the file's tokens and costs): "
          + "; ".join(f"{m} {a:g}/{b:g}" for m, (a, b) in prices.items()), flush=True)

    answers = {r["query"]: {m: (r[f"{m}_answer"] if isinstance(r[f"{m}_answer"], str) and r[f"{m}_answer"].strip()
                                else NO_LETTER, int(r[f"{m}_input_tokens"]), int(r[f"{m}_output_tokens"]))
                            for m in models} for _, r in frame.iloc[replayed].iterrows()}
    query_of = {str(r["qid"]): r["query"] for _, r in frame.iloc[replayed].iterrows()}
    grades = {str(r["qid"]): {m: r[f"{m}_grade"] for m in models} for _, r in frame.iloc[replayed].iterrows()}
    recorded_cost = {str(r["qid"]): {m: float(r[f"{m}_cost_usd"]) for m in models}
                     for _, r in frame.iloc[replayed].iterrows()}
    misses: list[str] = []
    fake = FakeOpenAI(responder=recorded_responder(answers, misses))
    proc = None
    with fake:
        pool = pool_from_dict([{"name": m, "backend": "openai", "model": m, "base_url": fake.base_url,
                                "input_usd_per_mtok": prices[m][0], "output_usd_per_mtok": prices[m][1],
                                "max_output_tokens": 16} for m in models])
        t0 = time.perf_counter()
        router_dir = out / "router"
        result = train(outcomes, train_rows, val_rows, feats, pool, candidate, knob, knob_value, router_dir)
        cal = result.calibration
        recipe = ("MiniLM LDA alone (--minilm-only: not the released recipe, whose Gemma member is left out)"
                  if args.minilm_only else "mean log-odds of Gemma 3 270M LDA and MiniLM LDA (the released recipe)")
        print(f"router: {recipe}, {result.params} (CV AUC {result.cv_auc:.3f}); knob {knob} {knob_value} -> lambda "
              f"{cal['lambda'] if cal['lambda'] is not None else 'inf'} on {cal['validation_rows']} validation rows "
              f"(accuracy {cal['validation_accuracy']:.3f} at ${cal['validation_usd_per_1000']:.3f}/1000); trained in "
              f"{time.perf_counter() - t0:.0f} s -> {router_dir}", flush=True)

        profiles = out / "profiles.yaml"
        profiles.write_text(json.dumps({"profiles": {"replay": {"keys_env": KEY_ENV, "experiment": {
            "name": EXPERIMENT, "key_header": KEY_HEADER,
            "arms": [{"name": "router", "model": "router", "share": args.share},
                     {"name": "pro", "model": args.pro, "share": round(1 - args.share, 12)}]}}}}, indent=1))
        state = out / "state"
        shutil.rmtree(state, ignore_errors=True)  # a fresh state database: the figures are this run's only
        env = {**os.environ, KEY_ENV: KEY}
        try:
            t0 = time.perf_counter()
            proc, url = start_server(router_dir, profiles, state, out / "server.log", env, args.start_timeout_s)
            print(f"server ready in {time.perf_counter() - t0:.0f} s at {url} (log {out / 'server.log'})", flush=True)
            t0 = time.perf_counter()
            rows = asyncio.run(replay(url, frame.iloc[replayed], grades, args.concurrency))
            replay_s = time.perf_counter() - t0
            quality = stats(url)["profiles"]["replay"]["quality"]
        finally:
            stop_server(proc)

    # -- what happened online ---------------------------------------------------------------------
    errors = [r for r in rows if "error" in r]
    ok = [r for r in rows if "error" not in r]
    print(f"replayed {len(rows)} requests in {replay_s:.0f} s at concurrency {args.concurrency} "
          f"({len(rows) / replay_s:.1f} req/s, median {np.median([r['ms'] for r in ok]) if ok else 0:.0f} ms); "
          f"errors {len(errors)}; fallbacks {sum(r['fallback'] for r in ok)}; router failed "
          f"{sum(bool(r['router_failed']) for r in ok)}; feedback retried after a 404 (request memory deferred) "
          f"{sum(r['feedback_retries'] > 0 for r in ok)}; stand-in misses {len(misses)}", flush=True)
    for r in errors[:5]:
        print(f"    {r['qid']}: {r['error']}")
    for miss in misses[:5]:
        print(f"    stand-in did not know: {miss}")
    arms = quality["experiments"][EXPERIMENT]["arms"]
    wrong_answer = [r for r in ok if r["content"] != answers[query_of[r["qid"]]][r["served_by"]][0]]
    charge = np.array([r["cost_usd"] - recorded_cost[r["qid"]][r["served_by"]] for r in ok])
    print(f"the server's charge minus the recorded cost of the model that answered: max |diff| "
          f"${np.abs(charge).max() if len(charge) else 0:.2g} per request (the server rounds to 1e-8), total "
          f"${charge.sum():+.2g}; replies that were not the answering model's recorded answer {len(wrong_answer)}",
          flush=True)

    # -- offline: the same router and knob on the same rows -----------------------------------------
    p_all, costs, lam = offline_p(router_dir, feats, replayed)
    chosen = decide(p_all, costs, lam)
    correct = np.stack([(frame[f"{m}_grade"].iloc[replayed] == CORRECT).to_numpy() for m in models], axis=1)
    cost = np.stack([frame[f"{m}_cost_usd"].iloc[replayed].to_numpy(float) for m in models], axis=1)
    n = np.arange(len(replayed))
    router_right, router_cost = correct[n, chosen], cost[n, chosen]
    pro_i = models.index(args.pro)
    pos = {str(q): i for i, q in enumerate(frame["qid"].iloc[replayed])}
    arm_of = np.array([next((r["arm"] for r in ok if r["qid"] == q), None) for q in frame["qid"].iloc[replayed]])
    agree = [(models[chosen[pos[r["qid"]]]] == r["served_by"]) for r in ok if r["arm"] == "router"]
    print(f"the server served the offline router's choice on {sum(agree)} of {len(agree)} router-arm requests "
          f"(lambda {lam:g}); the router arm's models: "
          + ", ".join(f"{m} {v}" for m, v in pd.Series([r["served_by"] for r in ok if r["arm"] == "router"])
                      .value_counts().items()), flush=True)

    online = {}
    for arm in ("router", "pro"):
        f = arms.get(arm)
        if f is None or not f["graded"]:
            print(f"error: arm {arm} has no graded requests: no figures", file=sys.stderr)
            return 1
        spend = np.array([r["cost_usd"] for r in ok if r["arm"] == arm])
        online[arm] = {"requests": f["requests"], "graded": f["graded"], "accuracy": f["accuracy"],
                       "accuracy_95": f["accuracy_95"], "usd_per_1000": f["usd_per_1000"],
                       "usd_per_1000_95": mean_interval(spend, 1000)[1:],
                       "correct": int(round(f["accuracy"] * f["graded"]))}
    checks = []

    def compare(label: str, rows_mask: np.ndarray, right: np.ndarray, spent: np.ndarray, arm: str) -> None:
        acc, usd = float(right[rows_mask].mean()), float(spent[rows_mask].mean() * 1000)
        o = online[arm]
        a_in, c_in = _inside(acc, *o["accuracy_95"]), _inside(usd, *o["usd_per_1000_95"])
        checks.extend([a_in, c_in])
        print(f"  {label} ({int(rows_mask.sum())} rows): accuracy {acc:.3f} ({a_in} arm {arm}'s online "
              f"[{o['accuracy_95'][0]:.3f}, {o['accuracy_95'][1]:.3f}]), ${usd:.3f} per 1000 ({c_in} "
              f"[{o['usd_per_1000_95'][0]:.3f}, {o['usd_per_1000_95'][1]:.3f}])")

    all_rows = np.ones(len(replayed), bool)
    pro_right, pro_cost = correct[:, pro_i], cost[:, pro_i]
    print("offline (pool_quality.py's scoring: the router's choice on each row from the training features, the "
          "recorded grade and cost of that model), beside the online intervals:")
    compare("router on the router arm's rows", arm_of == "router", router_right, router_cost, "router")
    compare("router on the pro arm's rows", arm_of == "pro", router_right, router_cost, "router")
    compare("router on all replayed rows", all_rows, router_right, router_cost, "router")
    compare(f"{args.pro} on the pro arm's rows", arm_of == "pro", pro_right, pro_cost, "pro")
    compare(f"{args.pro} on all replayed rows", all_rows, pro_right, pro_cost, "pro")
    d, lo, hi = difference((online["router"]["correct"], online["router"]["graded"]),
                           (online["pro"]["correct"], online["pro"]["graded"]))
    offline_d = float(router_right.mean() - pro_right.mean())
    checks.append(_inside(offline_d, lo, hi))
    print(f"  router - {args.pro} on all replayed rows (paired): accuracy {offline_d:+.3f} ({checks[-1]} the online "
          f"difference's [{lo:+.3f}, {hi:+.3f}])")
    inside = sum(c == "inside" for c in checks)
    print(f"offline figures inside the online 95% intervals: {inside} of {len(checks)} (on the router arm's own "
          "rows offline and online are the same figures when the server serves the offline choice; the other rows "
          "are another sample, whose figure lies outside the interval about 1 time in 6 by chance alone)")
    server_d = quality["experiments"][EXPERIMENT]["differences"].get("pro - router", {}).get("accuracy")
    if server_d is not None and abs(-server_d - d) > 1e-3:
        print(f"warning: the server's pro - router difference {server_d} is not minus ours {d:+.4f}")

    report = {"outcomes": args.outcomes, "candidate": candidate, "knob": [knob, knob_value], "lambda": lam,
              "params": result.params, "cv_auc": result.cv_auc, "calibration": cal, "prices": prices,
              "rows": {"train": len(train_rows), "validation": len(val_rows), "test": len(test_rows),
                       "replayed": len(replayed)},
              "online": online, "server_quality": quality, "difference": [d, lo, hi],
              "offline": {"router_accuracy": float(router_right.mean()),
                          "router_usd_per_1000": float(router_cost.mean() * 1000),
                          "pro_accuracy": float(pro_right.mean()), "pro_usd_per_1000": float(pro_cost.mean() * 1000),
                          "router_minus_pro": offline_d},
              "agreement": [sum(agree), len(agree)], "errors": [r["error"] for r in errors],
              "checks_inside": [inside, len(checks)], "seconds": time.perf_counter() - t_start}
    (out / "ab_replay.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out / 'ab_replay.json'} ({time.perf_counter() - t_start:.0f} s in all)")
    print("online (the server's /v1/stats): " + "; ".join(
        f"arm {arm} {o['requests']} requests, {o['graded']} graded" for arm, o in online.items()))
    for arm in ("router", "pro"):
        o = online[arm]
        print(f"arm {arm}: accuracy {o['accuracy']:.3f} [{o['accuracy_95'][0]:.3f}, {o['accuracy_95'][1]:.3f}], "
              f"${o['usd_per_1000']:.3f} per 1000")
    print(f"router - pro accuracy {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
