"""`router-pipeline route`, `answer` and `serve`.

route:  query -> router decision -> policy mapper -> which model, and why.
answer: the same, then the chosen model answers, through the gateway the server uses
        (serve/gateway.py: fallbacks, cooldowns, the budget reserved and charged).
serve:  the OpenAI-compatible routing server (serve/server.py).
export-outcomes: the outcomes rows of the server's feedback as JSONL (the ``outcomes``
        source reads it; needed with a PostgreSQL state database).
Queries come as arguments, or one per line on stdin with ``-``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

from router_pipeline.online_quality import DATABASE_VAR
from router_pipeline.routers.features import PRECISIONS
from router_pipeline.policies import POLICIES
from router_pipeline.serve.config import DEFAULTS
from router_pipeline.routers.prompt import MODES
from router_pipeline.text import MAX_QUERY_CHARS

EXIT_USAGE = 2


def default_router_dir(pool: bool = False) -> Path | None:
    """artifacts/router (the released router), else the SFT adapter (Artifacts.default_router);
    ``pool``: artifacts/pool_router, the released pool router (None when there is none)."""
    from router_pipeline.artifacts import Artifacts

    layout = Artifacts.from_settings()
    if pool:
        return layout.pool_release if layout.pool_release.is_dir() else None
    return layout.default_router()


NO_ROUTER = ("error: no trained router found; materialise released_router (or sft_adapter; released_pool_router "
             "for --pool), or pass --adapter")
POOL_HELP = "the released pool router (artifacts/pool_router): route among every model of its pool"


PRECISION_HELP = ("head routers on Gemma: fast (bf16 weights where the CPU has bf16 units; the release's "
                  "exported encoder) or fp32, the reference")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="router-pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("route", "decide which model should answer"), ("answer", "route, then answer with the chosen model")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("queries", nargs="+", help="queries, or - to read one per line from stdin")
        s.add_argument("--adapter", help="router dir: an adapter or a head router (default: artifacts/router, else artifacts/adapters/sft)")
        s.add_argument("--pool", action="store_true", help=POOL_HELP)
        s.add_argument("--cascade", action="store_true",
                       help="with --pool: run the cascade released with the router even where it is not served by "
                            "default (its evidence did not pick it)")
        s.add_argument("--base-model", help="route with a bare base model (no adapter): latency checks only")
        s.add_argument("--mode", choices=MODES, help="default: the mode the adapter was trained in")
        s.add_argument("--reasoning", action="store_true", help="explained mode: also generate the reasoning")
        s.add_argument("--fallback", default="Complex_Query", choices=list(POLICIES) + ["raise"],
                       help="policy used when the router output does not parse")
        group = s.add_mutually_exclusive_group()
        group.add_argument("--mapper", help="policy mapper config (YAML or JSON)")
        group.add_argument("--preset", choices=("cost_first", "quality_first", "balanced"), default=None,
                           help="mapper strategy preset (default: the calibrated threshold the evaluation scored, "
                                "else balanced)")
        s.add_argument("--json", action="store_true", help="one JSON object per query on stdout")
        s.add_argument("--log", help="append one JSON line per decision to this file")
        s.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision, help=PRECISION_HELP)
        s.add_argument("--max-query-chars", type=int, default=MAX_QUERY_CHARS,
                       help="longer queries are refused, as the pipeline's loaders refuse them")
    s = sub.add_parser("serve", help="the OpenAI-compatible routing server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--adapter", help="router dir: an adapter or a head router (default: artifacts/router, else artifacts/adapters/sft)")
    s.add_argument("--pool", action="store_true", help=POOL_HELP)
    s.add_argument("--profiles", help="caller profiles (YAML/JSON): API keys -> mapper, budget, models; "
                                      "default: no key needed, the calibrated threshold for everyone")
    s.add_argument("--feedback-dir", help="the state database's folder (SQLite: request memory, feedback, outcomes, "
                                          "budgets, counters; default: <artifacts>/feedback)")
    s.add_argument("--log", help="append one JSON line per request to this file")
    s.add_argument("--batch-window-ms", type=float, default=DEFAULTS.window_ms,
                   help="how long a query waits for others to share a pass")
    s.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch)
    s.add_argument("--no-batching", action="store_true", help="one router pass per request")
    s.add_argument("--no-prefix-cache", action="store_true", help="recompute the fixed prompt prefix every pass")
    s.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision, help=PRECISION_HELP)
    s.add_argument("--cooldown-s", type=float, default=DEFAULTS.cooldown_s,
                   help="how long a model that failed (429/5xx/timeout) is skipped")
    s.add_argument("--routing-timeout-s", type=float, default=DEFAULTS.routing_timeout_s,
                   help="how long one router pass may run before the requests waiting on it are answered by their "
                        "profile's default model (router_failed)")
    s.add_argument("--max-output-tokens", type=int, default=DEFAULTS.max_output_tokens,
                   help="the most a request's max_tokens may ask for (more is a 400)")
    s.add_argument("--database", help="state database: a postgresql:// URL shared by several hosts (default: "
                                      f"${DATABASE_VAR}, else SQLite in the feedback folder)")
    s.add_argument("--graceful-shutdown-s", type=float, default=DEFAULTS.graceful_shutdown_s,
                   help="after SIGTERM, how long requests in flight may finish before they are cancelled")
    s.add_argument("--database-timeout-s", type=float, default=DEFAULTS.database_timeout_s,
                   help="how long the state database may take to connect or run a statement before a 503")
    s.add_argument("--accept-new-database", action="store_true",
                   help="start on a new or emptied state database although this feedback folder records another: "
                        "every budget starts again from $0")
    s.add_argument("--open-to-remote", action="store_true",
                   help="without --profiles, answer callers that are not on loopback too (anyone reaching the "
                        "port spends on the models)")
    s = sub.add_parser("export-outcomes", help="write the outcomes rows of the server's feedback as JSONL, and "
                                               "what cascades answered beside it (<out>.cascade.jsonl)")
    s.add_argument("--out", required=True, help="the JSONL file to write (replaced whole)")
    s.add_argument("--feedback-dir", help="the SQLite state database's folder (default: <artifacts>/feedback)")
    s.add_argument("--database", help=f"a postgresql:// state database (default: ${DATABASE_VAR})")
    s = sub.add_parser("experiment", help="the server's experiments: per arm requests, spend and feedback accuracy")
    s.add_argument("action", choices=["report"])
    s.add_argument("--profile", help="only this profile's experiments")
    s.add_argument("--feedback-dir", help="the SQLite state database's folder (default: <artifacts>/feedback)")
    s.add_argument("--database", help=f"a postgresql:// state database (default: ${DATABASE_VAR})")
    return p


def _state(args) -> tuple[Path, str | None]:
    """(feedback folder, PostgreSQL URL or None): the state database these flags name."""
    from router_pipeline.online_quality import state_location

    return state_location(getattr(args, "feedback_dir", None), getattr(args, "database", None))


def experiment_report(args) -> int:
    """The report of the state database, opened read-only: nothing is created or written."""
    from router_pipeline.online_quality import StateUnreadable, read_state, render

    folder, url = _state(args)
    try:
        reading = read_state(folder, url, DEFAULTS.database_timeout_s)
    except StateUnreadable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if reading.figures is None:
        print(f"no experiment has served a request: {reading.missing}")
        return 0
    print(render(reading.figures, args.profile))
    return 0


def export(args) -> int:
    from router_pipeline.serve.feedback import FeedbackStore, cascade_rows, export_outcomes

    folder, url = _state(args)
    store = FeedbackStore(folder, database=url)
    n = export_outcomes(store.db, args.out)
    print(f"{n} outcomes rows from {store.db.name} -> {args.out}")
    cascades = Path(args.out).with_suffix(".cascade.jsonl")  # what cascades answered: the pool's columns, no grades
    n = export_outcomes(store.db, cascades, cascade_rows(store.db))
    print(f"{n} cascade rows (every model's answer, their agreement) -> {cascades}")
    return 0


def _queries(args) -> tuple[list[str], list[str]]:
    """(valid queries, one error line per bad one). Stdin is read as bytes, so a line
    that is not UTF-8 text is reported by number instead of breaking the output."""
    from router_pipeline.text import check_query

    if args.queries == ["-"]:
        raw = [(f"stdin line {i}", line) for i, line in enumerate(sys.stdin.buffer.read().splitlines(), 1) if line.strip()]
    else:
        raw = [(f"query {i}", q.encode("utf-8", "surrogatepass")) for i, q in enumerate(args.queries, 1)]
    good, errors = [], []
    for where, blob in raw:
        try:
            good.append(check_query(blob.decode("utf-8"), args.max_query_chars))
        except UnicodeDecodeError:
            errors.append(f"{where}: not UTF-8 text")
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
    return good, errors


def _profile_models(roles) -> dict[str, str]:
    return {"medium": roles.medium.model, "large": roles.large.model}


def _mapper(args, roles, router):
    """The mapper from --mapper or --preset; by default, the mapping the evaluation scored
    (the calibrated threshold) when the router carries one. Aliases medium/large default
    to the profile's models."""
    from router_pipeline.serve.mapper import DEFAULT_PRESET, PolicyMapper, evaluated_spec, pool_spec

    models = _profile_models(roles)
    if hasattr(router, "lambda_for"):  # a pool router: its pool's models, by their pool names
        pool = router.pool()
        models = {m.name: m.model for m in pool.models}
    if args.mapper:  # an older JSON ledger of the budget is looked for beside the mapper file
        return PolicyMapper.from_file(args.mapper, default_models=models)
    elif args.preset:
        spec = {"preset": args.preset}
    elif hasattr(router, "lambda_for"):
        spec = pool_spec([m.name for m in pool.by_price()])
    elif router.calibration:
        spec = evaluated_spec(router.calibration)
    else:
        spec = {"preset": DEFAULT_PRESET}
    return PolicyMapper.from_dict(spec, default_models=models)


async def _answers(router, mapper, queries: list[str], log_path: str | None, folder: Path, url: str | None,
                   cascade=None) -> list:
    """Each query through the gateway, as the server answers a chat request: the same
    routing, mapping, backends (fallbacks, cooldowns), budget reservation and charging.
    One (decision, answer or the error a caller would get) per query."""
    from router_pipeline.serve.errors import Refused
    from router_pipeline.serve.gateway import build_gateway
    from router_pipeline.serve.profiles import OPEN, Profile, Profiles
    from router_pipeline.serve.schemas import ChatRequest

    pool = router.pool() if hasattr(router, "lambda_for") else None  # a pool router: served by its pool's models
    profile = Profile(OPEN, mapper) if pool is None else \
        Profile(OPEN, mapper, allowed=(*pool.names, "local"), fallbacks=(),  # as load_profiles' open pool profile
                cascade=cascade)
    gateway = build_gateway(None, router=router, profiles=Profiles({OPEN: profile}, open=True), feedback_dir=folder,
                            config=replace(DEFAULTS, database=url, local_process=False),  # nothing to isolate
                            decision_log_path=log_path)
    await gateway.start()
    out = []
    try:  # routed together (the batcher shares passes), then answered one by one
        decided = await asyncio.gather(*(gateway.decide(profile, ChatRequest(messages=[{"role": "user", "content": q}]))
                                         for q in queries))
        for d in decided:
            try:
                out.append((d, await gateway.answer(d)))
            except Refused as exc:  # this query's models all failed: the others still run
                out.append((d, exc))
    finally:
        await gateway.stop()
    return out


def run(args) -> int:
    from router_pipeline import settings
    from router_pipeline.serve import decision_log
    from router_pipeline.llm.roles import roles_for
    from router_pipeline.routers.cascade import released_cascade
    from router_pipeline.routers.lora import LoraRouter
    from router_pipeline.routers.contract import RouterConfig
    from router_pipeline.routers.registry import load_router

    queries, bad = _queries(args)
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    if not queries:
        print("error: no valid query given", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "answer" and args.reasoning:
        print("error: --reasoning is for `route`; `answer` answers as the server does", file=sys.stderr)
        return EXIT_USAGE
    if args.log and Path(args.log).is_dir():
        print(f"error: --log {args.log} is a directory; give a file to append decisions to", file=sys.stderr)
        return EXIT_USAGE
    roles = roles_for(settings.load())
    adapter = args.adapter or (None if args.base_model else default_router_dir(args.pool))
    if adapter is None and not args.base_model:
        print(NO_ROUTER, file=sys.stderr)
        return EXIT_USAGE
    config = RouterConfig(mode=args.mode, fallback=args.fallback, precision=args.precision)
    router = LoraRouter(None, base_model=args.base_model, config=config) if adapter is None else load_router(adapter, config)
    mapper = _mapper(args, roles, router)
    folder, url = _state(args)
    cascade = released_cascade(router) if hasattr(router, "lambda_for") else None
    if cascade is not None and not (cascade.by_default or args.cascade):
        cascade = None  # released beside the router, not served by default: --cascade asks for it
    status = 1 if bad else 0
    if args.command == "answer":
        for d, answered in asyncio.run(_answers(router, mapper, queries, args.log, folder, url, cascade)):
            out = _decision(d.decision, d.mapping)
            if isinstance(answered, Exception):
                out.update(answer=None, answer_status="error", answer_error=answered.message, cost_usd=0.0)
                status = 1
            else:
                r = answered.routing
                out.update(model=answered.model, answer=answered.content, answer_status="ok",
                           input_tokens=answered.usage["prompt_tokens"], output_tokens=answered.usage["completion_tokens"],
                           cost_usd=r.get("cost_usd", 0.0), fallback_from=r.get("fallback_from", []),
                           target=r.get("served_by", out["target"]), **({"cascade": r["cascade"]} if "cascade" in r else {}))
            print(json.dumps(out, ensure_ascii=False) if args.json else _human(out))
        return status
    if mapper.ledger is not None:  # a budget rule reads the spend the server and `answer` record
        from router_pipeline.serve.database import state_database

        mapper.ledger.bind(state_database(folder, url))
    for d in router.route_batch(queries, with_reasoning=args.reasoning):
        mapping = mapper.map(d)
        out = _decision(d, mapping)
        if cascade is not None and mapper.is_pool_rule(mapping.rule):
            # What `answer` and the server run: this step first, the next on disagreement.
            out["cascade"] = {"plan": cascade.plan.describe(), "first": cascade.plan.step_names(1)}
        if args.log:
            decision_log.append(args.log, decision_log.decision_record(d, mapping, latency_ms=d.latency_ms, cost_usd=0.0))
        print(json.dumps(out, ensure_ascii=False) if args.json else _human(out))
    return status


def _decision(d, mapping) -> dict:
    return {"query": d.query, "policy": d.policy, "probabilities": d.probabilities, "parse_ok": d.parse_ok,
            "parse_error": d.parse_error, "fallback_used": d.fallback_used, "model": mapping.model,
            "target": mapping.target, "rule": mapping.rule, "why": mapping.reason, "reasoning": d.reasoning,
            "route_latency_ms": round(d.latency_ms, 2), **({"p_correct": d.p_correct} if d.p_correct else {})}


def _human(out: dict) -> str:
    probs = ", ".join(f"{k} {v:.2f}" for k, v in out["probabilities"].items()) or "n/a"
    lines = [f"query:     {out['query']}",
             f"policy:    {out['policy']}" + ("" if out["parse_ok"] else f"  (fallback: {out['parse_error']})"),
             f"p:         {probs}" if "p_correct" not in out else
             "P(correct): " + ", ".join(f"{k} {v:.2f}" for k, v in out["p_correct"].items()),
             f"model:     {out['target'] if out['model'] is None else out['target'] + ' (' + out['model'] + ')'}  [rule {out['rule']}: {out['why']}]"]
    if out["reasoning"]:
        lines.append(f"reasoning: {out['reasoning']}")
    if "answer" in out:
        lines.append(f"answer:    {out['answer']}" + (f"  ({out.get('answer_error')})" if out.get("answer_error") else ""))
        lines.append(f"cost:      ${out['cost_usd']:.6f}")
    if c := out.get("cascade"):
        lines.append(f"cascade:   {c['plan']}" + (f"  (stopped: {c['stopped']})" if "stopped" in c else
                                                   f"  (first: {'+'.join(c['first'])})"))
        for step in c.get("steps", []):
            lines.append(f"  step {step['step']}: {step['model']} ${step['cost_usd']:.6f}"
                         + ("  [kept]" if step["kept"] else "") + (f"  ({step['failed']})" if "failed" in step else ""))
    return "\n".join(lines) + "\n"


def serve(args) -> int:
    import uvicorn

    from router_pipeline.serve.gateway import build_gateway
    from router_pipeline.serve.server import create_app, uvicorn_options

    adapter = args.adapter or default_router_dir(args.pool)
    if adapter is None:
        print(NO_ROUTER, file=sys.stderr)
        return EXIT_USAGE
    folder, url = _state(args)
    config = replace(DEFAULTS, batching=not args.no_batching, prefix_cache=not args.no_prefix_cache,
                     window_ms=args.batch_window_ms, max_batch=args.max_batch, cooldown_s=args.cooldown_s,
                     routing_timeout_s=args.routing_timeout_s,
                     precision=args.precision, max_output_tokens=args.max_output_tokens,
                     graceful_shutdown_s=args.graceful_shutdown_s, open_to_remote=args.open_to_remote,
                     database_timeout_s=args.database_timeout_s, accept_new_database=args.accept_new_database,
                     database=url)
    state = build_gateway(adapter, profiles_path=args.profiles, config=config, decision_log_path=args.log,
                          feedback_dir=folder)
    from router_pipeline.artifacts import MANIFEST_FILE

    if not (Path(adapter) / MANIFEST_FILE).is_file():
        print(f"warning: {adapter} has no {MANIFEST_FILE} (not a release, or an older one): its files are not "
              "checked", file=sys.stderr)
    if state.profiles.open:
        print("warning: no --profiles: every caller is served without a key; bind to 127.0.0.1 only",
              file=sys.stderr)
    # SIGTERM: stop accepting, give requests in flight graceful_shutdown_s, then cancel them
    # and run the app's shutdown (the feedback database is closed there).
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="info", **uvicorn_options(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    from router_pipeline.serve.mapper import MapperConfigError
    from router_pipeline.serve.profiles import ProfileError
    from router_pipeline.routers.contract import RouterOutputError
    from router_pipeline.serve.database import DatabaseError

    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "export-outcomes":
            return export(args)
        if args.command == "experiment":
            return experiment_report(args)
        return run(args)
    except (MapperConfigError, ProfileError, RouterOutputError, DatabaseError, ValueError, OSError) as exc:
        # User errors (bad files, configs, ledgers, paths) end in one line, never a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
