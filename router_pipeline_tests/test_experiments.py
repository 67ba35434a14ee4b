"""Experiments and online quality: arms assigned by a stable hash that follows the shares,
intervals that are right at the edges, and, live on 127.0.0.1, an experiment of the pool
router against always-Pro whose feedback grades become accuracy per arm, model and policy
with intervals in /v1/stats, /metrics and `router-pipeline experiment report`."""

import time
from collections import Counter
from dataclasses import replace

import httpx
import openai
import pytest

from router_pipeline.serve.config import DEFAULTS
from router_pipeline.online_quality import difference, wilson
from router_pipeline.serve.experiments import ExperimentError, experiment_from_dict
from router_pipeline.serve.gateway import build_gateway
from router_pipeline.serve.profiles import ProfileError
from router_pipeline.training.stand_in import stand_in_pool_router
from router_pipeline_tests.support import ADMIN_KEY, serving

KEY = "sk-team-test-key-0001"
ARMS = [{"name": "router", "model": "router", "share": 0.7}, {"name": "pro", "model": "pro", "share": 0.3}]


def test_an_arm_is_stable_for_a_key_and_arms_follow_their_shares():
    e = experiment_from_dict({"name": "e1", "key_header": "X-User-Id", "arms": ARMS}, "profile 'team'")
    arms = [e.assign(f"user-{i}").name for i in range(20_000)]
    assert arms == [e.assign(f"user-{i}").name for i in range(20_000)]  # the same key, the same arm
    assert Counter(arms)["router"] / len(arms) == pytest.approx(0.7, abs=0.015)
    other = experiment_from_dict({"name": "e2", "arms": ARMS}, "p")  # another experiment shuffles anew
    assert sum(a != other.assign(f"user-{i}").name for i, a in enumerate(arms)) > 4_000
    for bad, message in (({"name": "e", "arms": ARMS[:1]}, "at least two arms"),
                         ({"name": "e", "arms": [ARMS[0], {**ARMS[1], "share": 0.5}]}, "add up to 1.2, not 1"),
                         ({"name": "e", "arms": [ARMS[0], {**ARMS[1], "name": "router"}]}, "an arm twice"),
                         ({"name": "e", "arms": [ARMS[0], {**ARMS[1], "share": True}]}, "share must be in"),
                         ({"arms": ARMS}, "needs a 'name'")):
        with pytest.raises(ExperimentError, match=message):
            experiment_from_dict(bad, "profile 'team'")


def test_wilson_and_newcombe_intervals():
    assert wilson(0, 10) == (0.0, 0.0, pytest.approx(0.2775, abs=1e-4))  # the textbook values
    p, lo, hi = wilson(81, 263)
    assert (lo, hi) == (pytest.approx(0.2553, abs=1e-3), pytest.approx(0.3662, abs=1e-3))
    d, lo, hi = difference((56, 70), (48, 80))  # Newcombe (1998), example: 0.2 [0.0524, 0.3339]
    assert (d, lo, hi) == (pytest.approx(0.2), pytest.approx(0.0524, abs=1e-3), pytest.approx(0.3339, abs=1e-3))
    assert wilson(0, 0) == (None, None, None)


def test_an_experiment_splits_traffic_and_feedback_becomes_accuracy_per_arm(tmp_path, monkeypatch, capsys,
                                                                             gemini_cloud):
    monkeypatch.setenv("TEST_KEYS_TEAM", KEY)
    router, _, _ = stand_in_pool_router(tmp_path)
    profiles = tmp_path / "profiles.yaml"

    def gateway_with(arms):
        profiles.write_text(f"""
profiles:
  team:
    keys_env: TEST_KEYS_TEAM
    experiment: {{name: router-vs-pro, key_header: X-User-Id, arms: {arms}}}
""")
        return build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / "state",
                             config=replace(DEFAULTS, cooldown_s=0.0))

    with pytest.raises(ProfileError, match="arm 'gpt': model 'gpt-9' does not exist"):
        gateway_with([ARMS[0], {"name": "gpt", "model": "gpt-9", "share": 0.3}])
    gateway = gateway_with(ARMS)
    with serving(gateway) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        seen: dict[str, set] = {}
        for i in range(60):
            user = f"user-{i % 30}"
            reply = client.chat.completions.create(model="router", messages=[
                {"role": "user", "content": f"row {i}"}], extra_headers={"X-User-Id": user})
            routing = reply.model_extra["routing"]
            seen.setdefault(user, set()).add(routing["experiment"]["arm"])
            if routing["experiment"]["arm"] == "pro":
                assert (routing["served_by"], routing["rule"]) == ("pro", "by_name")
            else:
                assert routing["rule"] == "pool_choice"
            # Pro is graded right every time, the router's answers every other time.
            right = routing["experiment"]["arm"] == "pro" or i % 2 == 0
            fed = httpx.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {KEY}"}, json={
                "request_id": routing["request_id"], "grade": "Correct" if right else "Incorrect"})
            assert fed.status_code == 200, fed.text
        named = client.chat.completions.create(model="flash", messages=[{"role": "user", "content": "row 1"}])
        assert "experiment" not in named.model_extra["routing"]  # a model by name is not in the experiment
        headers = {"Authorization": f"Bearer {KEY}"}
        quality = httpx.get(url + "/v1/stats", headers=headers).json()["profiles"]["team"]["quality"]
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert all(len(arms) == 1 for arms in seen.values())  # one user, one arm
    e = quality["experiments"]["router-vs-pro"]
    router_arm, pro_arm = e["arms"]["router"], e["arms"]["pro"]
    assert router_arm["requests"] + pro_arm["requests"] == 60 and router_arm["graded"] == router_arm["requests"]
    assert pro_arm["accuracy"] == 1.0 and pro_arm["accuracy_95"][1] == 1.0 and pro_arm["accuracy_95"][0] < 1.0
    assert router_arm["accuracy_95"][0] < router_arm["accuracy"] < router_arm["accuracy_95"][1]
    assert pro_arm["usd_per_1000"] > router_arm["usd_per_1000"] > 0
    diff = e["differences"]["pro - router"]
    assert diff["accuracy"] == pytest.approx(1.0 - router_arm["accuracy"], abs=1e-4)
    assert diff["accuracy_95"][0] > 0  # Pro is better here beyond its interval
    assert quality["models"]["pro"]["graded"] >= pro_arm["graded"]
    assert 'router_feedback_accuracy{profile="team",facet="arms",name="router-vs-pro/pro",bound="estimate"} 1.0' \
        in metrics
    assert f'router_feedback_graded_total{{profile="team",facet="models",name="pro"}} {quality["models"]["pro"]["graded"]}' \
        in metrics
    from router_pipeline.serve.cli import main

    assert main(["experiment", "report", "--feedback-dir", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert "profile team, experiment router-vs-pro:" in out and "arm pro: " in out and "pro - router accuracy +" in out


def test_shadow_mode_never_changes_the_answer_or_the_charge(tmp_path, monkeypatch, gemini_cloud):
    """A shadow profile answers as a caller asking for its default model by name does: the
    same model, the same answer, the same cost, even while the router fails; the shadow table says what the router would have chosen and spent, and grades
    for both models give the paired accuracy difference."""
    monkeypatch.setenv("TEST_KEYS_TEAM", KEY)
    monkeypatch.setenv("TEST_KEYS_PLAIN", "sk-plain-test-key-0001")
    router, _, _ = stand_in_pool_router(tmp_path)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("""
profiles:
  team: {keys_env: TEST_KEYS_TEAM, shadow: true, mapper: {budget: {ledger: team, period: month}}}
  plain: {keys_env: TEST_KEYS_PLAIN}
""")
    gateway = build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / "state",
                            config=replace(DEFAULTS, cooldown_s=0.0))
    with serving(gateway) as url:
        shadowed = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        plain = openai.OpenAI(base_url=url + "/v1", api_key="sk-plain-test-key-0001", max_retries=0)
        pairs = []
        for i in range(24):
            messages = [{"role": "user", "content": f"row {i}"}]
            if i == 20:  # the router fails: a shadow profile does not notice
                gateway.batcher.router, working = None, gateway.batcher.router
            pairs.append((shadowed.chat.completions.create(model="router", messages=messages),
                          plain.chat.completions.create(model="flash-lite", messages=messages)))
        gateway.batcher.router = working
        for s, p in pairs:
            a, b = s.model_extra["routing"], p.model_extra["routing"]
            assert (s.model, s.choices[0].message.content, a["cost_usd"]) == \
                (p.model, p.choices[0].message.content, b["cost_usd"])
            assert (a["served_by"], a["rule"]) == ("flash-lite", "shadow")
        for s, _ in pairs[:20]:  # grades for the served model and for pro
            rid = s.model_extra["routing"]["request_id"]
            for tier, grade in (("flash-lite", "Incorrect"), ("pro", "Correct")):
                assert httpx.post(url + "/v1/feedback", headers={"Authorization": f"Bearer {KEY}"}, json={
                    "request_id": rid, "grade": grade, "tier": tier}).status_code == 200
        for _ in range(100):  # the shadow rows are written off the request path
            team = httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()[
                "profiles"]["team"]
            if team["quality"].get("shadow", {}).get("requests") == 20:
                break
            time.sleep(0.1)
    assert team["budget"]["spent_usd"] == pytest.approx(sum(p.model_extra["routing"]["cost_usd"] for _, p in pairs))
    shadow = team["quality"]["shadow"]
    assert shadow["requests"] == 20  # the four the router failed on have no shadow decision
    assert shadow["spend_usd"] == pytest.approx(sum(s.model_extra["routing"]["cost_usd"] for s, _ in pairs[:20]))
    chose = shadow["router_models"]
    assert sum(chose.values()) == 20 and chose.get("flash-lite", 0) == shadow["same_model"] < 20
    assert shadow["router_spend_usd"] > shadow["spend_usd"]  # it would have paid for dearer models
    # Where the router chose pro it would have been right, where it kept flash-lite the same.
    assert shadow["graded_both"] == chose.get("flash-lite", 0) + chose.get("pro", 0)
    assert shadow["router_minus_served_accuracy"] == pytest.approx(chose.get("pro", 0) / shadow["graded_both"], abs=1e-4)
