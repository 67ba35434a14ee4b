"""The routing server, live on 127.0.0.1, driven by the real `openai` client, with local
Gemini-protocol servers as the medium and large models."""

import concurrent.futures
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from router_pipeline.artifacts import CALIBRATION_FILE
from router_pipeline.fake_gemini import Fault, FakeGemini
from router_pipeline.policies import POLICIES
from router_pipeline.questions import load_questions
from router_pipeline.routing import Router, RouterConfig
from router_pipeline.serve.mapper import evaluated_spec
from router_pipeline.serve.server import build_state
from router_pipeline.training import TrainConfig, train_sft
from router_pipeline.training_data import build_sft_dataset
from router_pipeline_tests.support import serving, training_examples

FLASH, PRO = "gemini-2.5-flash", "gemini-2.5-pro"
KEYS = {"app": "sk-app-test", "frugal": "sk-frugal-test", "private": "sk-private-test", "council": "sk-council-test"}


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    """A tiny fast-mode router (random weights: its decisions are arbitrary but real
    distributions) with a released calibration at threshold 0.5."""
    adapter = Path(train_sft(build_sft_dataset(training_examples(), "fast"),
                             TrainConfig(base_model=tiny_model_dir, mode="fast", batch_size=4, grad_accum=1, max_steps=1),
                             tmp_path_factory.mktemp("server-sft")).adapter_dir)
    calibration = {"threshold": 0.5, "split": "validation"}
    (adapter / CALIBRATION_FILE).write_text(json.dumps({**calibration, "mapping": evaluated_spec(calibration)}))
    return Router(adapter, config=RouterConfig(batch_size=32, prefix_cache=True))


class Council(ThreadingHTTPServer):
    """An llm-council endpoint: OpenAI chat format in and out."""

    def __init__(self):
        self.received = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                outer.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                body = json.dumps({"id": "c1", "object": "chat.completion", "model": "llm-council",
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "The council says 42."},
                                                "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 30, "completion_tokens": 5}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1/chat/completions"


@pytest.fixture
def gemini(monkeypatch):
    with FakeGemini() as fake:
        monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "gemini")
        monkeypatch.setenv("GEMINI_BASE_URL", fake.base_url)
        yield fake


@pytest.fixture
def server(router, gemini, tmp_path, monkeypatch):
    council = Council()
    for name, key in KEYS.items():
        monkeypatch.setenv(f"TEST_KEYS_{name.upper()}", key)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(f"""
profiles:
  app:      {{keys_env: TEST_KEYS_APP, store_queries: true}}
  private:  {{keys_env: TEST_KEYS_PRIVATE}}
  frugal:
    keys_env: TEST_KEYS_FRUGAL
    mapper:
      budget: {{ledger: frugal_budget.json, period: total}}
      fallback: medium
      rules:
        - {{kind: budget, limit_usd: 0.000001, target: medium}}
        - {{kind: threshold, at_least: 0.0, target: large}}
  council:
    keys_env: TEST_KEYS_COUNCIL
    mapper:
      escalation: {{url: "{council.url}"}}
      rules: [{{kind: low_confidence, below: 1.01, target: escalate}}]
""")
    state = build_state(router.adapter_dir, profiles_path=profiles, feedback_dir=tmp_path / "feedback",
                        window_ms=100, router=router, decision_log_path=tmp_path / "requests.jsonl")
    with serving(state) as url:
        yield url, state, council
    council.shutdown()


def client(url, profile="app"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS.get(profile, profile), max_retries=0)


def ask(url, text="Who designed the Abasto market?", model="router", profile="app", **kw):
    return client(url, profile).chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_chat_completion_says_which_model_answered_and_why(server, gemini, router):
    url, _, _ = server
    raw = client(url).chat.completions.with_raw_response.create(
        model="router", messages=[{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Who designed the Abasto market?"}])
    reply = raw.parse()
    routing = reply.model_extra["routing"]
    expected = router.route("Who designed the Abasto market?")
    assert routing["policy"] == expected.policy and routing["policy"] in POLICIES
    assert routing["p_complex"] == pytest.approx(expected.p_large, abs=1e-3)
    # The calibrated threshold (0.5) decides, as the evaluation scored it.
    assert reply.model == (PRO if expected.p_large >= 0.5 else FLASH)
    assert routing["rule"] == ("calibrated_threshold" if expected.p_large >= 0.5 else "below_threshold")
    assert reply.choices[0].message.content.startswith(f"{reply.model} reply")
    assert raw.headers["x-router-route"] == f"policy={routing['policy']}; model={reply.model}; rule={routing['rule']}"
    assert reply.usage.prompt_tokens > 0 and routing["cost_usd"] > 0
    call = gemini.calls[-1]
    assert call.model == reply.model and call.system == "Be brief." and "Abasto" in call.prompt
    # router-<threshold> moves the threshold: 0 sends everything to the large model, 1 nothing.
    assert ask(url, model="router-0").model == PRO and ask(url, model="router-1").model == FLASH
    with pytest.raises(openai.NotFoundError, match="router-<threshold>"):
        ask(url, model="router-7")
    with pytest.raises(openai.NotFoundError):
        ask(url, model="gpt-4o")


def test_streaming_gives_the_same_answer_and_the_routing_first(server):
    url, _, _ = server
    whole = ask(url, "Which river did the 1823 Greek fleet anchor on?", model="router-0")
    chunks = list(ask(url, "Which river did the 1823 Greek fleet anchor on?", model="router-0", stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].model_extra["routing"]["target"] == "large" and chunks[0].model == PRO
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_rate_limited_model_cools_down_and_the_next_target_serves(server, gemini):
    url, state, _ = server
    gemini.add_model_faults(PRO, Fault(status=429, retry_after=60))
    first = ask(url, model="router-0")  # the router says large; large answers 429
    routing = first.model_extra["routing"]
    assert first.model == FLASH and routing["fallback"] and routing["served_by"] == "medium"
    assert routing["fallback_from"][0]["target"] == "large" and "429" in routing["fallback_from"][0]["error"]
    pro_calls = sum(c.model == PRO for c in gemini.calls)
    second = ask(url, "Another question?", model="router-0")  # large is cooling down: not even called
    assert second.model == FLASH and "cooling down" in second.model_extra["routing"]["fallback_from"][0]["error"]
    assert sum(c.model == PRO for c in gemini.calls) == pro_calls
    assert 50 < state.backends.cooling()[PRO] <= 60  # Retry-After sets the cooldown (per model)
    health = json.loads(urllib.request.urlopen(f"{url}/health").read())
    assert PRO in health["cooling_down"]


def test_every_model_failing_is_a_503_with_the_reasons(server, gemini):
    url, _, _ = server
    gemini.add_model_faults(PRO, Fault(status=503))
    gemini.add_model_faults(FLASH, Fault(status=500))
    with pytest.raises(openai.InternalServerError) as err:
        ask(url, model="router-0")
    assert err.value.status_code == 503 and "large" in str(err.value) and "medium" in str(err.value)


def test_unknown_or_missing_keys_get_401(server):
    url, _, _ = server
    with pytest.raises(openai.AuthenticationError):
        ask(url, profile="sk-not-a-key")
    req = urllib.request.Request(f"{url}/v1/route", data=b'{"query": "x"}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 401


def test_a_budget_that_runs_out_moves_the_profile_to_the_medium_model(server, tmp_path):
    url, _, _ = server
    first = ask(url, profile="frugal")
    assert first.model == PRO and first.model_extra["routing"]["rule"] == "threshold"
    ledger = json.loads((tmp_path / "frugal_budget.json").read_text())  # money state is on disk
    assert sum(ledger.values()) == pytest.approx(first.model_extra["routing"]["cost_usd"])
    second = ask(url, "Another question?", profile="frugal")
    assert second.model == FLASH and second.model_extra["routing"]["rule"] == "budget"
    assert "spent $" in second.model_extra["routing"]["reason"]


def test_feedback_becomes_a_row_of_the_outcomes_source(server, tmp_path):
    url, _, _ = server
    query = "Who was the first woman to chair the Bengal Legislative Council?"
    reply = ask(url, query)
    request_id = reply.model_extra["routing"]["request_id"]

    def feedback(body, profile="app"):
        req = urllib.request.Request(f"{url}/v1/feedback", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEYS[profile]}"})
        return json.loads(urllib.request.urlopen(req).read())

    assert feedback({"request_id": request_id, "preferred_tier": "large"})["outcome_row"]
    frame, rejected = load_questions("outcomes", path=str(tmp_path / "feedback" / "outcomes.jsonl"), sample_size=0)
    assert not rejected and frame["query"].tolist() == [query]
    assert (frame["medium_grade"].iloc[0], frame["large_grade"].iloc[0]) == ("Incorrect", "Correct")
    # A profile that may not store queries: the feedback is logged (by hash), no outcomes row.
    private = ask(url, "My private question?", profile="private").model_extra["routing"]["request_id"]
    assert not feedback({"request_id": private, "grade": "Correct"}, profile="private")["outcome_row"]
    log = (tmp_path / "feedback" / "feedback.jsonl").read_text()
    assert "My private question" not in log and len(log.splitlines()) == 2
    # Another profile cannot grade this request; a bad grade is a 400 naming the choices.
    with pytest.raises(urllib.error.HTTPError) as err:
        feedback({"request_id": request_id, "grade": "Correct"}, profile="private")
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        feedback({"request_id": request_id, "grade": "Great"})
    assert err.value.code == 400 and "Correct" in err.value.read().decode()


def test_a_multi_turn_conversation_is_routed_as_a_whole(server, router, monkeypatch):
    url, state, _ = server
    seen = []
    route_batch = router.route_batch
    monkeypatch.setattr(state.batcher.router, "route_batch", lambda qs, **kw: seen.extend(qs) or route_batch(qs, **kw))
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Who won the 1994 World Cup?"},
                {"role": "assistant", "content": "Brazil."},
                {"role": "user", "content": "And who scored in the final of the one after?"}]
    req = urllib.request.Request(f"{url}/v1/route", data=json.dumps({"messages": messages}).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {KEYS['app']}"})
    decision = json.loads(urllib.request.urlopen(req).read())
    # Every user and assistant turn, in order (cleaned as stored queries are); not the system prompt.
    assert seen == ["user: Who won the 1994 World Cup? assistant: Brazil. user: And who scored in the final of the one after?"]
    whole = route_batch(seen)[0]
    assert decision["p_complex"] == pytest.approx(whole.p_large, abs=1e-3)
    assert decision["model"] in (FLASH, PRO) and decision["rule"] and decision["request_id"].startswith("route-")


def test_low_confidence_escalates_to_the_council(server):
    url, _, council = server
    reply = ask(url, "What is the meaning of it all?", profile="council")
    assert reply.choices[0].message.content == "The council says 42." and reply.model == "llm-council"
    assert reply.model_extra["routing"]["escalated"] and reply.model_extra["routing"]["target"] == "escalate"
    assert council.received[0]["messages"][0]["content"] == "What is the meaning of it all?"


def test_bad_requests_get_clear_400s(server):
    url, _, _ = server

    def post(data: bytes):
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=data, method="POST",
                                     headers={"Authorization": f"Bearer {KEYS['app']}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req)
        return err.value.code, json.loads(err.value.read())["error"]["message"]

    assert post(b"{not json")[0] == 400
    assert post(json.dumps({"model": "router", "messages": []}).encode()) == \
        (400, "'messages' must be a non-empty list of {role, content}")
    code, message = post(json.dumps({"model": "router", "messages": [{"role": "user", "content": "a\x00b"}]}).encode())
    assert code == 400 and "binary" in message
    assert post(b"x" * 1_100_000)[0] == 413


def test_concurrent_requests_share_router_passes_and_show_in_stats(server):
    url, state, _ = server
    before = state.batcher.batches
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: ask(url, f"Question number {i}?"), range(8)))
    assert len(replies) == 8 and state.batcher.batches - before < 8  # some requests shared a pass
    stats = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{url}/v1/stats", headers={"Authorization": f"Bearer {KEYS['app']}"})).read())
    app = stats["profiles"]["app"]
    assert set(stats["profiles"]) == {"app"}  # a caller sees its own profile
    assert app["requests"] == 8 and sum(app["models"].values()) == 8 and app["spend_usd"] > 0
    assert app["always_large_usd"] >= app["spend_usd"] and app["router_latency_ms"]["p95"] > 0
    metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
    assert 'router_model_requests_total{profile="app",model=' in metrics and "router_overhead_ms" in metrics
    lines = (Path(state.decision_log_path)).read_text().splitlines()
    assert len(lines) == 8 and "Question number" not in lines[0]  # the log holds hashes, not queries


def test_offline_the_local_tiers_answer(router, gemma_path, tmp_path, monkeypatch):
    """A fresh clone after the main job: no key, no network, the Gemma tiers answer."""
    monkeypatch.delenv("ROUTER_PIPELINE_PROFILE", raising=False)
    state = build_state(router.adapter_dir, profiles_path=None, feedback_dir=tmp_path, router=router)
    with serving(state) as url:
        reply = client(url, "any-key").chat.completions.create(
            model="router", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    assert reply.model == "gemma3-270m" and reply.choices[0].message.content
    assert reply.model_extra["routing"]["served_by"] in ("medium", "large")
