"""Cascades served on 127.0.0.1, the models on Gemini's protocol (a local stand-in): the
cheap step is asked first and the dear model only when its answers disagree; the routing
info lists every call; the charge is the sum of the calls; only the final answer reaches
the caller, streamed or not; a model failing mid-cascade is skipped; a step the budget
cannot cover is not called; a retry after the state database failed between two steps
pays neither again."""

import contextlib
import json
import re
import time
from dataclasses import replace

import httpx
import openai
import pytest

from router_pipeline.routers.cascade import PlanError, fixed_from_dict
from router_pipeline.serve.config import DEFAULTS
from router_pipeline.serve.gateway import build_gateway
from router_pipeline.serve.profiles import ProfileError
from router_pipeline.training.stand_in import stand_in_pool_router
from router_pipeline_tests.support import ADMIN_KEY, serving
from router_pipeline_tests.test_server import _spend, _write_locked

KEY = "sk-team-test-key-0001"
PLAN = "{plan: [[flash-lite, flash], pro], comparator: letter}"
BUDGET = ("    mapper: {{budget: {{ledger: {ledger}, period: month}},\n"
          "             rules: [{{kind: budget, limit_usd: {limit}, target: flash-lite}}]}}")


def letters(model: str, prompt: str) -> str:
    """Row i: the cheap two agree on B when i is even; else flash-lite says A, flash C; Pro says D."""
    i = int(m.group(1)) if (m := re.search(r"row (\d+)", prompt)) else 0
    if "pro" in model:
        return "D"
    return "B" if i % 2 == 0 else ("A" if "lite" in model else "C")


@pytest.fixture
def cascade_server(tmp_path, monkeypatch, gemini_cloud):
    monkeypatch.setenv("TEST_KEYS_TEAM", KEY)
    gemini_cloud.responder = letters
    router, _, _ = stand_in_pool_router(tmp_path)
    profiles = tmp_path / "profiles.yaml"

    def start(extra: str = "", **config):
        profiles.write_text(f"""
profiles:
  team:
    keys_env: TEST_KEYS_TEAM
    cascade: {PLAN}
{extra}""")
        return build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / "state",
                             config=replace(DEFAULTS, cooldown_s=0.0, **config))

    return start, gemini_cloud, tmp_path / "state"


def _ask(url, i, **kw):
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    return c.chat.completions.create(model="router", messages=[{"role": "user", "content": f"row {i}"}], **kw)


def test_the_cheap_step_first_the_dear_model_on_disagreement_and_the_charge_is_every_call(cascade_server):
    start, cloud, folder = cascade_server
    with serving(start(BUDGET.format(ledger="team", limit=100) + "\n    store_queries: true")) as url:
        replies = [_ask(url, i) for i in range(8)]
        calls = len(cloud.calls)
        stats = httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()["profiles"]["team"]
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        chunks = list(_ask(url, 1, stream=True))
        route = httpx.post(url + "/v1/route", headers={"Authorization": f"Bearer {KEY}"},
                           json={"query": "row 1"}).json()
    for i, reply in enumerate(replies):
        c = reply.model_extra["routing"]["cascade"]
        called = [(s["step"], s["model"]) for s in c["steps"]]
        if i % 2 == 0:  # agreement: accepted, Pro never called
            assert sorted(called) == [(1, "flash"), (1, "flash-lite")] and c["stopped"] == "agreement"
            assert reply.choices[0].message.content == "B" and not c["escalated"]
        else:
            assert sorted(called) == [(1, "flash"), (1, "flash-lite"), (2, "pro")] and c["escalated"]
            assert reply.choices[0].message.content == "D" and reply.model_extra["routing"]["served_by"] == "pro"
        assert [s["kept"] for s in c["steps"]].count(True) == 1
        # The charge is the sum of every call's cost, each priced as the model's own.
        assert reply.model_extra["routing"]["cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in c["steps"]),
                                                                          abs=1e-8)
    assert calls == 4 * 2 + 4 * 3
    assert stats["calls"] == {"flash-lite": 8, "flash": 8, "pro": 4}
    assert stats["cascade"] == {"requests": 8, "escalated": 4, "escalated_share": 0.5}
    assert stats["spend_usd"] == pytest.approx(sum(r.model_extra["routing"]["cost_usd"] for r in replies), abs=1e-7)
    assert stats["budget"]["spent_usd"] == pytest.approx(stats["spend_usd"], abs=1e-7)
    assert 'router_model_calls_total{profile="team",model="pro"} 4' in metrics
    # Streamed: only the final answer reaches the caller (the cheap models' A and C never do).
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "D"
    assert route["cascade"] == {"plan": "flash-lite+flash -> pro", "comparator": "letter",
                                "first": ["flash-lite", "flash"]}

    # The cascade labels its own traffic (the profile stores queries): every model's answer and what they agreed on,
    # exported in the pool outcomes' columns beside the graded rows.
    from router_pipeline.serve import cli

    out = folder / "export" / "outcomes.jsonl"
    assert cli.main(["export-outcomes", "--feedback-dir", str(folder), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.with_suffix(".cascade.jsonl").read_text().splitlines()]
    assert len(rows) == 9  # the 8 replies and the streamed one (/v1/route calls no model)
    by_query = {r["query"]: r for r in rows}
    assert by_query["row 0"]["agreed"] == "B" and {k for k in by_query["row 0"] if k.endswith("_answer")} == {
        "flash-lite_answer", "flash_answer"}
    assert by_query["row 1"]["agreed"] is None and by_query["row 1"]["pro_answer"] == "D"
    assert by_query["row 1"]["pro_cost_usd"] > 0


def test_a_model_failing_mid_cascade_is_skipped_and_a_step_the_budget_cannot_cover_is_not_called(cascade_server):
    from router_pipeline.llm.fake_gemini import Fault

    start, cloud, folder = cascade_server
    with serving(start()) as url:
        flash = next(m for m in {c.model for c in cloud.calls} | {"gemini-2.5-flash"} if m.endswith("flash"))
        cloud.add_model_faults(flash, Fault(status=500))
        c = _ask(url, 2).model_extra["routing"]["cascade"]  # would agree, but flash fails: Pro decides
    failed = [s for s in c["steps"] if "failed" in s]
    assert [(s["model"], s["cost_usd"]) for s in failed] == [("flash", 0.0)] and "500" in failed[0]["failed"]
    assert [s["model"] for s in c["steps"] if s["kept"]] == ["pro"]
    # A budget that covers one call: the rest of the step is not called, the answer so far is returned.
    with serving(start(BUDGET.format(ledger="tiny", limit="0.0000001"))) as url:
        reply = _ask(url, 1)
    c = reply.model_extra["routing"]["cascade"]
    assert len(c["steps"]) == 1 and "not called" in c["stopped"] and "used up" in c["stopped"]
    spent, reservations = _spend(folder, "tiny")
    assert spent == pytest.approx(c["steps"][0]["cost_usd"]) and reservations == 0


def test_a_retry_after_the_state_database_fails_between_two_steps_pays_neither_again(cascade_server):
    start, cloud, folder = cascade_server
    lock = contextlib.ExitStack()
    with serving(start(BUDGET.format(ledger="team", limit=100),
                       database_timeout_s=0.3)) as url:
        # The database fails once the first step has answered: the second step cannot be reserved.
        cloud.on_request = lambda model, prompt: "lite" in model and lock.enter_context(_write_locked(folder))
        first = _ask(url, 3, extra_headers={"Idempotency-Key": "order-1"})
        cloud.on_request = None
        calls = len(cloud.calls)
        routing = first.model_extra["routing"]
        assert len(routing["cascade"]["steps"]) == 2 and "budget could not be read" in routing["cascade"]["stopped"]
        assert routing["spend_journaled"] and routing["answer_journaled"]
        again = _ask(url, 3, extra_headers={"Idempotency-Key": "order-1"})  # the journal answers
        lock.close()
        after = _ask(url, 3, extra_headers={"Idempotency-Key": "order-1"})  # the database, once replayed
    assert again.choices[0].message.content == after.choices[0].message.content == first.choices[0].message.content
    assert len(cloud.calls) == calls  # neither step called again
    spent, reservations = _spend(folder, "team")
    assert spent == pytest.approx(routing["cost_usd"]) and reservations == 0


def test_plans_and_cascade_settings_are_checked(cascade_server, monkeypatch):
    models = ["flash-lite", "flash", "pro"]
    for raw, message in (({"plan": [["flash-lite", "gpt-9"]]}, "unknown model 'gpt-9'"),
                         ({"plan": [[], "pro"]}, "step 1 is empty"),
                         ({"plan": ["flash", ["pro", "flash"]]}, "already called at step 1"),
                         ({"plan": []}, "at least one step"),
                         ({"plan": ["pro"], "comparator": "judge"}, "comparator must be one of"),
                         ({"plan": ["pro"], "kind": "learned"}, "cannot be served")):
        with pytest.raises(PlanError, match=message):
            fixed_from_dict(raw, models, [0.0] * 3)
    start, _, _ = cascade_server
    monkeypatch.setenv("TEST_KEYS_TEAM2", "sk-other-test-key-0001")
    with pytest.raises(ProfileError, match="profile 'other': cascade: step 2: unknown model 'o3'"):
        start("  other: {keys_env: TEST_KEYS_TEAM2, cascade: {plan: [flash, o3]}}")


def test_a_reservation_failing_beside_a_paid_call_never_makes_a_retry_pay_that_call_again(cascade_server, monkeypatch):
    """The two models of a step reserve together; when one reservation fails (the database)
    while the other's lands and its model answers, the request returns that answer, not a
    503 inviting a retry that would pay it again."""
    from router_pipeline.serve import cascade as served_cascade
    from router_pipeline.serve.ledger import LedgerError

    start, cloud, folder = cascade_server
    admit = served_cascade.Bill.admit

    def flaky(self, model, estimate):
        if model == "flash":
            raise LedgerError("budget ledger team: the state database failed", "team", database=True)
        time.sleep(0.2)  # lands after the other has failed
        return admit(self, model, estimate)

    monkeypatch.setattr(served_cascade.Bill, "admit", flaky)
    with serving(start(BUDGET.format(ledger="team", limit=100))) as url:
        first = _ask(url, 1, extra_headers={"Idempotency-Key": "order-2"})
        again = _ask(url, 1, extra_headers={"Idempotency-Key": "order-2"})
    c = first.model_extra["routing"]["cascade"]
    assert [s["model"] for s in c["steps"]] == ["flash-lite"] and "budget could not be read" in c["stopped"]
    assert again.choices[0].message.content == first.choices[0].message.content == "A"
    assert [call.model for call in cloud.calls] == ["gemini-2.5-flash-lite"]  # paid once
    spent, reservations = _spend(folder, "team")
    assert spent == pytest.approx(c["steps"][0]["cost_usd"]) and reservations == 0


def test_a_jumps_answer_streams_as_it_comes_and_no_earlier_step_is_sent(cascade_server, monkeypatch):
    """When the policy stops with a model not called yet (a jump, a learned cascade's move,
    forced here), that model's answer streams from the upstream word by word; the first
    step's answers are never sent; the charge is the sum of every call, the streamed one
    included. A plan of one model streams the same way (its answer is returned whatever
    it says)."""
    from router_pipeline.llm.models import cost_usd
    from router_pipeline.routers.cascade import Action
    from router_pipeline.serve import cascade as served_cascade

    start, cloud, folder = cascade_server
    cloud.responder = lambda model, prompt: ("D, as the dearest model says" if "pro" in model else
                                             "A from the lite one" if "lite" in model else "C from the flash one")
    decide = served_cascade.next_action
    monkeypatch.setattr(served_cascade, "next_action", lambda policy, p, answers, lam: (
        Action("stop", model="pro") if answers else decide(policy, p, answers, lam)))
    monkeypatch.setenv("TEST_KEYS_SOLO", "sk-solo-test-key-0001")
    gateway = start(BUDGET.format(ledger="team", limit=100) +
                    "\n  solo: {keys_env: TEST_KEYS_SOLO, cascade: {plan: [pro]}}")
    with serving(gateway) as url:
        chunks = list(_ask(url, 1, stream=True, stream_options={"include_usage": True}))
        solo = openai.OpenAI(base_url=url + "/v1", api_key="sk-solo-test-key-0001", max_retries=0)
        alone = list(solo.chat.completions.create(model="router", messages=[{"role": "user", "content": "row 2"}],
                                                  stream=True))
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(texts) == "D, as the dearest model says" and len(texts) == 6  # a chunk a word
    assert not any(s in t for t in texts for s in ("lite", "flash", "A ", "C "))
    routing = chunks[0].model_extra["routing"]  # sent first: the streamed call's cost is not known yet
    c = routing["cascade"]
    assert [(s["step"], s["model"], s["kept"]) for s in c["steps"]] == [
        (1, "flash-lite", False), (1, "flash", False), (3, "pro", True)] and c["stopped"] == "escalated"
    assert c["steps"][2]["cost_usd"] is None and routing["served_by"] == "pro"
    charge = next(ch.model_extra["routing"]["cost_usd"] for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    usage = chunks[-1].usage  # the answer's own: pro's
    pro = gateway.backends.spec_for("pro", gateway.pool["pro"].model).price
    assert charge == pytest.approx(c["steps"][0]["cost_usd"] + c["steps"][1]["cost_usd"] +
                                   cost_usd(usage.prompt_tokens, usage.completion_tokens, pro), abs=1e-8)
    spent, reservations = _spend(folder, "team")
    assert spent == pytest.approx(charge) and reservations == 0
    solo_texts = [ch.choices[0].delta.content for ch in alone if ch.choices and ch.choices[0].delta.content]
    assert "".join(solo_texts) == "D, as the dearest model says" and len(solo_texts) == 6
    assert alone[0].model_extra["routing"]["cascade"]["stopped"] == "the policy accepted it"
    assert [call.model for call in cloud.calls].count("gemini-2.5-pro") == 2


def test_a_fallback_drops_the_failed_models_hold_and_pays_under_its_own(cascade_server):
    """One model's answer goes through the same bill as a cascade's calls: when the model
    asked for fails, its hold (in the budget and in its own cap) is dropped and the
    fallback holds its own; the budget and the fallback's cap are charged what it cost,
    the failed model's cap nothing, and no reservation is left."""
    from router_pipeline.llm.fake_gemini import Fault

    start, cloud, folder = cascade_server
    capped = ("    mapper: {budget: {ledger: team, period: month, models: {pro: 1.0, flash: 1.0}},\n"
              "             rules: [{kind: budget, limit_usd: 100, target: flash-lite}]}")
    with serving(start(capped)) as url:
        cloud.add_model_faults("gemini-2.5-pro", Fault(status=500))
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        reply = c.chat.completions.create(model="pro", messages=[{"role": "user", "content": "row 4"}])
    routing = reply.model_extra["routing"]
    assert (routing["served_by"], routing["fallback_from"][0]["target"]) == ("flash", "pro") and routing["cost_usd"] > 0
    assert _spend(folder, "team") == (pytest.approx(routing["cost_usd"]), 0)
    assert _spend(folder, "team/flash") == (pytest.approx(routing["cost_usd"]), 0)
    assert _spend(folder, "team/pro") == (0, 0)


def test_a_stream_whose_caller_left_before_its_first_chunk_is_settled_all_the_same():
    """A cascade's steps are paid before its final answer streams; a caller gone by then
    never starts the response's body, whose own settlement would never run: the response
    settles the request however it ends (``Gateway.finish``, a no-op once the body has)."""
    import asyncio

    from router_pipeline.serve.server import _Settled

    started, settled = [], []

    async def body():
        started.append(True)
        yield "data: {}\n\n"

    async def finish():
        settled.append(True)

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the caller left")

    response = _Settled(body(), finish, media_type="text/event-stream")
    with pytest.raises(Exception):  # noqa: B017 - Starlette's own ClientDisconnect or the OSError, by version
        asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert started == [] and settled == [True]
