"""The gemini provider against a local server speaking the Gemini REST protocol."""

import pytest

from router_pipeline.fake_gemini import FakeGemini, Fault
from router_pipeline.llm import RoleSpec, make_client
from router_pipeline.llm.cache import ResponseCache
from router_pipeline.llm.gemini import MissingCredentials
from router_pipeline.llm.runner import RetryPolicy, complete_all

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01)
FLASH = RoleSpec("gemini", "gemini-2.5-flash", max_output_tokens=32)


def run(fake, requests, cache=None, retry=FAST_RETRY, timeout_s=5.0, concurrency=4):
    client = make_client(FLASH, gemini_base_url=fake.base_url, timeout_s=timeout_s)
    return complete_all(client, requests, cache, concurrency=concurrency, retry=retry, progress=False)


def test_usage_metadata_becomes_tokens_and_cost():
    with FakeGemini(responder=lambda m, p: "Ottawa is the capital") as fake:
        results, stats = run(fake, [FLASH.request("What is the capital of Canada?", system="Be brief.")])
    r = results[0]
    assert (r.status, r.text) == ("ok", "Ottawa is the capital")
    assert (r.input_tokens, r.output_tokens) == (8, 4)  # the fake counts words
    assert r.cost_usd == pytest.approx((8 * 0.30 + 4 * 2.50) / 1e6)
    call = fake.calls[0]
    assert call.model == "gemini-2.5-flash" and call.system == "Be brief."
    assert call.config["maxOutputTokens"] == 32 and call.api_key == "test-key-not-secret"
    assert stats.calls == 1 and stats.cost_usd == pytest.approx(r.cost_usd)


def test_retry_after_is_honoured_and_5xx_retried():
    seen = []

    class Recording(RetryPolicy):
        def delay(self, attempt, retry_after):
            seen.append(retry_after)
            return 0.01

    with FakeGemini() as fake:
        fake.add_faults("q1", Fault(status=429, retry_after=0.7), Fault(status=500))
        results, stats = run(fake, [FLASH.request("q1")], retry=Recording(max_attempts=5))
    assert results[0].status == "ok" and results[0].attempts == 3
    assert seen == [0.7, None]  # the server's Retry-After, then plain backoff
    assert stats.retries == 2 and len(fake.calls) == 3


def test_timeouts_are_retried_then_reported():
    with FakeGemini() as fake:
        fake.add_faults("slow", Fault(delay_s=2.0), Fault(delay_s=2.0), Fault(delay_s=2.0))
        fake.add_faults("late", Fault(delay_s=2.0))
        results, stats = run(fake, [FLASH.request("slow"), FLASH.request("late")], timeout_s=0.5)
    slow, late = results
    assert slow.status == "error" and "gave up after 3 attempts" in slow.error
    assert late.status == "ok" and late.attempts == 2
    assert stats.errors == 1


def test_blocked_empty_and_failed_items_never_lose_the_rest(tmp_path):
    cache = ResponseCache(tmp_path / "cache.sqlite")
    with FakeGemini(responder=lambda m, p: f"answer to {p}") as fake:
        fake.add_faults("blocked", Fault(blocked=True))
        fake.add_faults("empty", Fault(empty=True))
        fake.add_faults("down", *[Fault(status=503)] * 3)
        fake.add_faults("bad", Fault(status=400))
        prompts = ["fine 1", "blocked", "empty", "down", "bad", "fine 2"]
        results, stats = run(fake, [FLASH.request(p) for p in prompts], cache=cache)
        assert [r.status for r in results] == ["ok", "blocked", "empty", "error", "error", "ok"]
        assert "400" in results[4].error
        assert results[5].text == "answer to fine 2"
        # Settled outcomes are cached; failures are not, so the next run retries only them.
        n_calls = len(fake.calls)
        again, stats2 = run(fake, [FLASH.request(p) for p in prompts], cache=cache)
    assert stats2.cache_hits == 4 and stats2.calls == 2
    assert len(fake.calls) == n_calls + 2
    assert [r.status for r in again] == ["ok", "blocked", "empty", "ok", "ok", "ok"]


def test_concurrency_limit_overlaps_calls():
    with FakeGemini(latency_s=0.2) as fake:
        results, stats = run(fake, [FLASH.request(f"q{i}") for i in range(20)], concurrency=10)
    assert all(r.status == "ok" for r in results) and stats.calls == 20
    assert 2 <= fake.max_in_flight <= 10  # overlapped, and never more than the limit


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY")
    with pytest.raises(MissingCredentials, match="GEMINI_API_KEY"):
        make_client(FLASH)


def test_cache_key_covers_model_and_settings(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    with FakeGemini() as fake:
        run(fake, [FLASH.request("same")], cache=cache)
        hotter = RoleSpec("gemini", "gemini-2.5-flash", max_output_tokens=32, temperature=0.7)
        client = make_client(hotter, gemini_base_url=fake.base_url)
        _, stats = complete_all(client, [hotter.request("same")], cache, progress=False)
    assert stats.calls == 1 and stats.cache_hits == 0
