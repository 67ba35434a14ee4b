"""The gemini provider against a local server speaking the Gemini REST protocol."""

import pytest

from router_pipeline.llm.fake_gemini import FakeGemini, Fault
from router_pipeline.llm import RoleSpec, make_client
from router_pipeline.llm.cache import ResponseCache
from router_pipeline.llm.gemini import MissingCredentials
from router_pipeline.llm.models import cost_usd
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
    # Each retry after a timeout may pay twice (the server finished the first try): counted.
    assert stats.possibly_billed_retries == 3  # slow: 2 retries, late: 1
    assert stats.retries == 3


def test_429_and_5xx_retries_are_not_counted_as_possibly_billed():
    with FakeGemini() as fake:
        fake.add_faults("q1", Fault(status=429, retry_after=0.01), Fault(status=503))
        _, stats = run(fake, [FLASH.request("q1")])
    assert stats.retries == 2 and stats.possibly_billed_retries == 0


def test_pro_models_get_a_longer_default_timeout():
    from router_pipeline.llm.gemini import default_timeout_s

    assert default_timeout_s("gemini-2.5-pro") > default_timeout_s("gemini-2.5-flash") >= 60


def test_two_runs_never_pay_twice_for_the_same_prompt(tmp_path):
    """Two concurrent runs over the same prompts (each with its own cache connection, as two
    Dagster runs have): the in-flight claims make every prompt paid once."""
    import threading

    prompts = [FLASH.request(f"Question number {i}?") for i in range(12)]
    out = {}
    with FakeGemini(latency_s=0.5) as fake:  # long enough that the two runs overlap even on a loaded machine
        def one_run(name):
            cache = ResponseCache(tmp_path / "shared.sqlite")
            try:
                out[name] = run(fake, prompts, cache=cache, concurrency=4)
            finally:
                cache.close()

        threads = [threading.Thread(target=one_run, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert len(fake.calls) == len(prompts)  # each prompt paid once
    assert all(r.status == "ok" for results, _ in out.values() for r in results)
    assert [r.text for r in out["a"][0]] == [r.text for r in out["b"][0]]
    assert out["a"][1].calls + out["b"][1].calls == len(prompts)
    assert out["a"][1].waited_for_other_runs + out["b"][1].waited_for_other_runs > 0


def test_a_claim_left_by_a_killed_run_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = ResponseCache(tmp_path / "c.sqlite")
    assert cache.claim("k", f"{socket.gethostname()}:{dead.pid}:x")
    assert cache.claim("k", "elsewhere:1:y")  # the first owner's process is gone: taken over
    assert not cache.claim("k", f"{socket.gethostname()}:{os.getpid()}:z")  # a live claim elsewhere holds
    cache.release("k", "elsewhere:1:y")
    assert cache.claim("k", f"{socket.gethostname()}:{os.getpid()}:z")


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


def test_many_processes_can_open_a_new_cache_at_once(tmp_path):
    import subprocess
    import sys

    script = f"from router_pipeline.llm.cache import ResponseCache; ResponseCache({str(tmp_path / 'new.sqlite')!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors


def test_an_unreachable_endpoint_stops_the_run_with_one_error_naming_the_host(tmp_path):
    """Nothing listens on the port (and a name that cannot resolve): the run stops before
    its first call with one error naming the host, instead of retrying every prompt."""
    import socket

    from router_pipeline.llm.runner import EndpointUnreachable

    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    requests = [FLASH.request(f"Question {i}?") for i in range(50)]
    for url, host in ((f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"),
                      ("http://no-such-host.invalid:8080", "no-such-host.invalid:8080")):
        client = make_client(FLASH, gemini_base_url=url, timeout_s=1.0)
        with pytest.raises(EndpointUnreachable, match=f"cannot reach {host}"):
            complete_all(client, requests, ResponseCache(tmp_path / "cache.sqlite"), retry=FAST_RETRY, progress=False)


def test_a_batch_job_is_matched_by_key_and_what_it_failed_is_called_online(tmp_path):
    """Through the Batch API: results come back in reverse order, one item failed and one
    left out; every request is settled, the two are called online, batch results cost
    half the online price, and a second run pays nothing."""
    with FakeGemini(responder=lambda m, p: f"answer to {p.split(':')[0]}", batch_drop=("item 3:",)) as fake:
        fake.add_faults("item 5:", Fault(status=500))
        client = make_client(FLASH, gemini_base_url=fake.base_url, timeout_s=5.0, batch=True, batch_poll_s=0.01)
        cache = ResponseCache(tmp_path / "cache.sqlite")
        requests = [FLASH.request(f"item {i}: what is {i} squared?") for i in range(8)]
        results, stats = complete_all(client, requests, cache, retry=FAST_RETRY, progress=False)
        assert [r.text for r in results] == [f"answer to item {i}" for i in range(8)]
        assert len(fake.batch_jobs) == 1 and stats.batch_calls == 6 and stats.batch_retried_online == 2
        online = [c.prompt for c in fake.calls if not c.batch]
        assert sorted(online) == ["item 3: what is 3 squared?", "item 5: what is 5 squared?"]
        full = cost_usd(results[0].input_tokens, results[0].output_tokens, FLASH.price)
        assert results[0].cost_usd == pytest.approx(full / 2) and results[3].cost_usd == pytest.approx(full)
        calls = len(fake.calls)
        again, stats = complete_all(make_client(FLASH, gemini_base_url=fake.base_url, batch=True, batch_poll_s=0.01),
                                    requests, cache, progress=False)
        assert stats.cache_hits == 8 and len(fake.calls) == calls and len(fake.batch_jobs) == 1


def test_a_run_killed_while_its_batch_job_is_pending_resumes_that_job(tmp_path):
    """SIGKILL mid-poll, then a new run: it polls the job the first run submitted (its
    name was stored before polling) and submits nothing twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
from router_pipeline.llm import RoleSpec, make_client
from router_pipeline.llm.cache import ResponseCache
from router_pipeline.llm.runner import complete_all
spec = RoleSpec("gemini", "gemini-2.5-flash", max_output_tokens=32)
client = make_client(spec, gemini_base_url=sys.argv[1], timeout_s=5.0, batch=True, batch_poll_s=0.05)
complete_all(client, [spec.request(f"item {{i}}: what is {{i}} squared?") for i in range(20)],
             ResponseCache({str(tmp_path / "cache.sqlite")!r}), progress=False)
""")
    with FakeGemini(batch_polls=10_000) as fake:  # the job stays pending until the test lets it end
        proc = subprocess.Popen([sys.executable, str(script), fake.base_url],
                                env={**os.environ, "GEMINI_API_KEY": "test-key-not-secret"})
        for _ in range(600):
            if any(job["polls"] >= 3 for job in fake.batch_jobs.values()):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert len(fake.batch_jobs) == 1 and not fake.calls  # submitted, polled, nothing answered yet
        fake.batch_polls = 0  # the job ends at the next poll
        client = make_client(FLASH, gemini_base_url=fake.base_url, timeout_s=5.0, batch=True, batch_poll_s=0.01)
        requests = [FLASH.request(f"item {i}: what is {i} squared?") for i in range(20)]
        results, stats = complete_all(client, requests, ResponseCache(tmp_path / "cache.sqlite"), progress=False)
        assert len(fake.batch_jobs) == 1 and stats.batch_calls == 20 and all(r.status == "ok" for r in results)
        assert len(fake.calls) == 20 and all(c.batch for c in fake.calls)  # each answered once, in the job
