"""A model asked for by name, live on 127.0.0.1 with the `openai` client: it bypasses the
router where the caller's profile allows that model, is charged to its budget like any
other request, and is refused (403, naming the model) where the profile does not allow
it or a privacy rule keeps the conversation elsewhere."""

from dataclasses import replace

import httpx
import openai
import pytest

from router_pipeline.serve.config import DEFAULTS
from router_pipeline.serve.gateway import build_gateway
from router_pipeline.training.stand_in import stand_in_pool_router
from router_pipeline_tests.support import serving

KEY = "sk-team-test-key-0001"


def test_a_model_by_name_is_charged_inside_the_profile_and_refused_outside_it(tmp_path, monkeypatch, gemini_cloud):
    cloud = gemini_cloud
    monkeypatch.setenv("TEST_KEYS_TEAM", KEY)
    router, _, _ = stand_in_pool_router(tmp_path)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("""
profiles:
  team:
    keys_env: TEST_KEYS_TEAM
    allowed: [flash-lite, flash]
    mapper:
      budget: {ledger: team, period: month}
      rules: [{kind: privacy, name: pii, models: [flash-lite]}]
""")
    gateway = build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / "state",
                            config=replace(DEFAULTS, cooldown_s=0.0))
    with serving(gateway) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        ask = lambda model, text="row 3": client.chat.completions.create(  # noqa: E731
            model=model, messages=[{"role": "user", "content": text}])
        routed_before = gateway.batcher.routed
        replies = [ask("flash"), ask("gemini-2.5-flash")]  # its name in the pool, or its model id
        for reply in replies:
            routing = reply.model_extra["routing"]
            assert (reply.model, routing["served_by"], routing["rule"]) == ("gemini-2.5-flash", "flash", "by_name")
            assert routing["cost_usd"] > 0
        assert gateway.batcher.routed == routed_before  # no router pass was paid for
        assert [c.model for c in cloud.calls] == ["gemini-2.5-flash"] * 2
        for model, status, code in (("pro", 403, "model_not_allowed"), ("gemini-2.5-pro", 403, "model_not_allowed"),
                                    ("gpt-9", 404, "model_not_found")):
            with pytest.raises(openai.APIStatusError) as refused:
                ask(model)
            assert (refused.value.status_code, refused.value.body["code"]) == (status, code), model
            assert repr(model) in refused.value.body["message"]
        with pytest.raises(openai.PermissionDeniedError, match="privacy rule 'pii' keeps this conversation on "
                                                              "flash-lite: 'flash' may not answer it"):
            ask("flash", "Write to jane.doe@example.org about row 3")
        private = ask("flash-lite", "Write to jane.doe@example.org about row 3").model_extra["routing"]
        assert (private["served_by"], private["private"]["rule"]) == ("flash-lite", "pii")
        headers = {"Authorization": f"Bearer {KEY}"}
        listed = [m["id"] for m in httpx.get(url + "/v1/models", headers=headers).json()["data"]]
        assert {"flash-lite", "flash"} <= set(listed) and "pro" not in listed
        budget = httpx.get(url + "/v1/stats", headers=headers).json()["profiles"]["team"]["budget"]
    paid = sum(r.model_extra["routing"]["cost_usd"] for r in replies) + private["cost_usd"]
    assert budget["spent_usd"] == pytest.approx(paid)
    assert len(cloud.calls) == 3  # the refused requests called nothing
