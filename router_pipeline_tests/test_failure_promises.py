"""What the server promises when something fails, live on 127.0.0.1 with the `openai`
client: a private query never leaves its rule's models (the cloud stand-in records every
call it gets), a router that raises or hangs never stops a request, a local model is
bounded, and a budget's headroom can be read."""

import asyncio
import concurrent.futures
import time
from dataclasses import replace

import httpx
import openai
import pytest

from router_pipeline.llm.fake_gemini import FakeGemini, Fault
from router_pipeline.llm.fake_openai import FakeOpenAI
from router_pipeline.llm.pool import pool_from_dict
from router_pipeline.serve.config import DEFAULTS
from router_pipeline.serve.gateway import build_gateway
from router_pipeline.training.stand_in import stand_in_pool_router
from router_pipeline_tests.support import serving

KEY, STRICT_KEY = "sk-team-test-key-0001", "sk-strict-test-key-0001"
PII = "jane.doe@example.org"


def _pool(onprem_url: str):
    """An on-premises model (an OpenAI-compatible endpoint marked private), then Flash and
    Pro on Gemini's protocol: cheapest first."""
    return pool_from_dict([
        {"name": "onprem", "backend": "openai", "model": "llama-onprem", "base_url": onprem_url, "private": True,
         "input_usd_per_mtok": 0.05, "output_usd_per_mtok": 0.05},
        {"name": "flash", "backend": "gemini", "model": "gemini-2.5-flash", "input_usd_per_mtok": 0.3,
         "output_usd_per_mtok": 2.5},
        {"name": "pro", "backend": "gemini", "model": "gemini-2.5-pro", "input_usd_per_mtok": 1.25,
         "output_usd_per_mtok": 10.0}])


@pytest.fixture
def stand_ins(monkeypatch):
    """(the private endpoint, the cloud): every call each one gets is recorded."""
    with FakeOpenAI() as onprem, FakeGemini() as cloud:
        monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "gemini")
        monkeypatch.setenv("GEMINI_BASE_URL", cloud.base_url)
        monkeypatch.setenv("TEST_KEYS_TEAM", KEY)
        monkeypatch.setenv("TEST_KEYS_STRICT", STRICT_KEY)
        monkeypatch.setenv("ROUTER_ADMIN_KEY", "sk-admin-test-key-0001")
        yield onprem, cloud


def _gateway(tmp_path, onprem, profiles_yaml: str, **config):
    router, fitted, x = stand_in_pool_router(tmp_path, _pool(onprem.base_url))
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(profiles_yaml)
    return build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / "state",
                         config=replace(DEFAULTS, **{"cooldown_s": 0.0, "upstream_timeout_s": 1.0, **config}))


PRIVATE_PROFILES = """
profiles:
  team:
    keys_env: TEST_KEYS_TEAM
    mapper: {rules: [{kind: privacy, name: pii, models: [onprem]}]}   # then the pool router's choice
"""


def _conversations():
    """The private text in the question, in a system message, and in an earlier turn."""
    return {"user": [{"role": "user", "content": f"Write to {PII} about row 7"}],
            "system": [{"role": "system", "content": f"The customer is {PII}."},
                       {"role": "user", "content": "What should I answer them? row 7"}],
            "earlier turn": [{"role": "user", "content": f"My address is {PII}."},
                             {"role": "assistant", "content": "Noted."},
                             {"role": "user", "content": "Now summarise row 7"}]}


def test_a_private_query_never_reaches_a_cloud_model_whatever_its_private_model_does(tmp_path, stand_ins):
    onprem, cloud = stand_ins
    gateway = _gateway(tmp_path, onprem, PRIVATE_PROFILES)
    # Private by default: the endpoint marked private in the pool file, and the offline local model.
    assert gateway.profiles.profiles["team"].mapper.private == {"onprem", "local"}
    with serving(gateway) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        plain = client.chat.completions.create(model="router", messages=[{"role": "user", "content": "row 7"}])
        assert "private" not in plain.model_extra["routing"]
        cloud_before = len(cloud.calls)
        for where, messages in _conversations().items():
            ok = client.chat.completions.create(model="router", messages=messages)
            assert ok.model == "llama-onprem" and ok.choices[0].message.content == "Paris", where
            assert ok.model_extra["routing"]["private"] == {"rule": "pii", "models": ["onprem"]}
            assert "rule pii" in ok.model_extra["routing"]["reason"]
            for fault in (Fault(status=500), Fault(delay_s=2.0), Fault(empty=True)):  # fails, times out, says nothing
                for stream in (False, True):
                    onprem.add_faults(fault)
                    with pytest.raises(openai.APIStatusError) as refused:
                        reply = client.chat.completions.create(model="router", messages=messages, stream=stream)
                        list(reply) if stream else None
                    error = refused.value
                    assert error.status_code == 503 and error.body["code"] == "private_models_unavailable", \
                        (where, fault, stream, error.body)
                    assert "'pii'" in error.body["message"] and error.response.headers["Retry-After"]
        # The cloud answered the plain query and nothing after it: no private text ever reached it.
        assert cloud_before >= 1 and len(cloud.calls) == cloud_before
        assert not any(PII in c.prompt or PII in (c.system or "") for c in cloud.calls)
        metrics = httpx.get(url + "/metrics", headers={"Authorization": "Bearer sk-admin-test-key-0001"}).text
        assert 'router_privacy_rule_activations_total{profile="team",rule="pii"} 21' in metrics


def test_a_privacy_rule_naming_a_cloud_model_keeps_fallbacks_and_budget_caps_among_its_models(tmp_path,
                                                                                              stand_ins):
    """A rule that allows onprem and pro (say, under a data-processing agreement): when
    onprem fails, pro answers and Flash never does; when both fail, a 503; with onprem's
    own budget used up, pro answers (rule model_budget)."""
    onprem, cloud = stand_ins
    rule = "{kind: privacy, name: contract, models: [onprem, pro], target: onprem}"
    gateway = _gateway(tmp_path, onprem, f"""
profiles:
  team: {{keys_env: TEST_KEYS_TEAM, mapper: {{rules: [{rule}]}}}}
  strict:
    keys_env: TEST_KEYS_STRICT
    mapper: {{budget: {{ledger: strict, period: month, models: {{onprem: 0.0}}}}, rules: [{rule}]}}
""")
    messages = _conversations()["system"]
    with serving(gateway) as url:
        team = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        onprem.add_faults(Fault(status=500))
        fell = team.chat.completions.create(model="router", messages=messages).model_extra["routing"]
        assert (fell["served_by"], fell["fallback_from"][0]["target"]) == ("pro", "onprem")
        assert fell["private"] == {"rule": "contract", "models": ["onprem", "pro"]}
        onprem.add_faults(Fault(status=500))
        cloud.add_model_faults("gemini-2.5-pro", Fault(status=500))
        with pytest.raises(openai.APIStatusError, match="privacy rule 'contract' keeps this conversation on onprem, pro"):
            team.chat.completions.create(model="router", messages=messages)
        strict = openai.OpenAI(base_url=url + "/v1", api_key=STRICT_KEY, max_retries=0)
        capped = strict.chat.completions.create(model="router", messages=messages).model_extra["routing"]
        assert (capped["rule"], capped["served_by"]) == ("model_budget", "pro")
    assert [c.model for c in cloud.calls] == ["gemini-2.5-pro"] * 3  # never Flash


def test_a_local_model_is_bounded_and_a_private_query_too_long_for_it_is_a_400(tmp_path, monkeypatch,
                                                                               tiny_model_dir, gemini_cloud):
    """Two tiers with the local backend as the privacy rule's model: a prompt over
    local_max_input_tokens is refused by it (400, the cloud never called); one that takes
    longer than local_timeout_s is a 503 naming the rule."""
    cloud = gemini_cloud
    monkeypatch.setenv("TEST_KEYS_TEAM", KEY)
    router, _, _ = stand_in_pool_router(tmp_path)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(f"""
profiles:
  team:
    keys_env: TEST_KEYS_TEAM
    mapper: {{models: {{local: "{tiny_model_dir}"}}, rules: [{{kind: privacy, target: local}}]}}
""")
    for limits, status, code in (({"local_max_input_tokens": 8}, 400, "prompt_too_long"),
                                 ({"local_timeout_s": 0.001}, 503, "private_models_unavailable")):
        gateway = build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / code,
                                config=replace(DEFAULTS, cooldown_s=0.0, **limits))
        with serving(gateway) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model="router", messages=[
                    {"role": "user", "content": f"Please tell {PII} everything about the sea and the sky."}])
        assert (refused.value.status_code, refused.value.body["code"]) == (status, code), refused.value.body
    assert cloud.calls == []


def test_a_busy_local_model_refuses_more_waiters_than_its_queue(tiny_model_dir):
    from router_pipeline.llm.roles import offline_roles
    from router_pipeline.serve.backends import AllTargetsFailed, Backends

    backends = Backends(offline_roles(), replace(DEFAULTS, local_queue=1))
    target = [("local", tiny_model_dir)]

    async def run():
        await backends._local_lock.acquire()  # another answer is being generated
        first = asyncio.ensure_future(backends.answer(target, "Hello", None, 4))
        await asyncio.sleep(0.2)  # it waits its turn: the queue is full
        with pytest.raises(AllTargetsFailed, match="busy"):
            await backends.answer(target, "Hello", None, 4)
        backends._local_lock.release()
        return await first

    try:  # the tiny random model may say nothing: what matters is that it was not refused as busy
        served = asyncio.run(run())
        assert served.target == "local"
    except AllTargetsFailed as exc:
        assert "busy" not in str(exc) and "reply" in str(exc)
    finally:
        backends.close()  # its worker process


class _Flaky:
    """The router, until ``mode`` says to raise or to hang on every pass."""

    def __init__(self, router):
        self.router, self.mode = router, None

    def route_batch(self, queries):
        if self.mode == "raise":
            raise RuntimeError("the router's model failed")
        if self.mode == "hang":
            time.sleep(1.5)
        return self.router.route_batch(queries)


def test_a_router_that_raises_or_hangs_never_stops_a_request(tmp_path, stand_ins):
    onprem, cloud = stand_ins
    gateway = _gateway(tmp_path, onprem, """
profiles:
  team: {keys_env: TEST_KEYS_TEAM}
  strict: {keys_env: TEST_KEYS_STRICT, router_failure: refuse}
""", routing_timeout_s=0.3, router_unhealthy_after=3, upstream_timeout_s=30.0)  # a loaded CI box is slow
    flaky = gateway.batcher.router = _Flaky(gateway.router)
    with serving(gateway) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        ask = lambda i: client.chat.completions.create(  # noqa: E731
            model="router", messages=[{"role": "user", "content": f"row {i}"}])
        routed = ask(3).model_extra["routing"]
        assert "router_failed" not in routed and routed["rule"] == "pool_choice"
        for mode, why in (("raise", "it raised RuntimeError"), ("hang", "a router pass ran over 0.3 s")):
            flaky.mode = mode
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(ask, range(16)))
            for reply in replies:  # every one answered by the profile's default model (the cheapest)
                routing = reply.model_extra["routing"]
                assert (routing["router_failed"], routing["rule"], routing["served_by"]) == \
                    (why, "router_failed", "onprem"), routing
            health = httpx.get(url + "/health")
            assert health.status_code == 503 and "failed its last 3 calls" in health.json()["failing"]["router"]
            strict = openai.OpenAI(base_url=url + "/v1", api_key=STRICT_KEY, max_retries=0)
            with pytest.raises(openai.APIStatusError) as refused:
                strict.chat.completions.create(model="router", messages=[{"role": "user", "content": "row 1"}])
            assert (refused.value.status_code, refused.value.body["code"]) == (503, "router_unavailable")
            flaky.mode = None
            time.sleep(1.6 if mode == "hang" else 0)  # the hung pass ends
            assert "router_failed" not in ask(5).model_extra["routing"]  # recovered, without a restart
            assert httpx.get(url + "/health").status_code == 200
        stats = httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()["profiles"]["team"]
        assert stats["router_failures"] == 32 and stats["errors"] == 0


def test_stats_show_each_budgets_limit_spend_and_what_is_left(tmp_path, stand_ins):
    onprem, cloud = stand_ins
    gateway = _gateway(tmp_path, onprem, """
profiles:
  team:
    keys_env: TEST_KEYS_TEAM
    mapper:
      budget: {ledger: team, period: day, models: {pro: 0.5}}
      rules: [{kind: budget, limit_usd: 2.0, target: onprem}]
""")
    with serving(gateway) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        answered = [client.chat.completions.create(model="router", messages=[
            {"role": "user", "content": f"row {i}"}]).model_extra["routing"] for i in range(6)]
        budget = httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()[
            "profiles"]["team"]["budget"]
    spent = sum(r["cost_usd"] for r in answered)
    on_pro = sum(r["cost_usd"] for r in answered if r["served_by"] == "pro")
    assert spent > 0 and (budget["ledger"], budget["period_kind"], budget["limit_usd"]) == ("team", "day", 2.0)
    assert budget["spent_usd"] == pytest.approx(spent) and budget["reserved_usd"] == 0
    assert budget["left_usd"] == pytest.approx(2.0 - spent)
    pro = budget["models"]["pro"]
    assert (pro["limit_usd"], pro["spent_usd"], pro["left_usd"]) == (0.5, pytest.approx(on_pro),
                                                                     pytest.approx(0.5 - on_pro))


def test_the_council_is_reached_only_through_its_endpoint_and_a_long_conversation_is_a_400(tmp_path, stand_ins):
    """What the docs say: an escalation goes to the mapper's council endpoint (there is no
    callback); a conversation over max_conversation_chars is refused, naming the limit."""
    from router_pipeline.serve.mapper import MapperConfigError, PolicyMapper

    with pytest.raises(MapperConfigError, match="no escalation"):
        PolicyMapper.from_dict({"rules": [{"kind": "low_confidence", "below": 0.9, "target": "escalate"}]})
    onprem, _ = stand_ins
    gateway = _gateway(tmp_path, onprem, PRIVATE_PROFILES, max_conversation_chars=100)
    with serving(gateway) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError, match="over the 100 limit"):
            client.chat.completions.create(model="router", messages=[{"role": "user", "content": "row 1 " * 40}])


def test_the_batcher_skips_a_query_whose_caller_stopped_waiting():
    from router_pipeline.serve.batcher import RouteBatcher

    seen = []

    class Slow:
        def route_batch(self, queries):
            seen.append(list(queries))
            time.sleep(0.3)
            return queries

    async def run():
        batcher = RouteBatcher(Slow(), window_ms=0, max_batch=8)
        await batcher.start()
        first = asyncio.ensure_future(batcher.route("a"))
        await asyncio.sleep(0.05)  # "a" is in its pass
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.route("gone"), 0.1)
        kept = await batcher.route("kept")
        await first
        await batcher.stop()
        return kept

    assert asyncio.run(run()) == "kept" and seen == [["a"], ["kept"]]
