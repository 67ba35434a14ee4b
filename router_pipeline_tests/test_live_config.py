"""Live configuration on 127.0.0.1: the admin API changes a profile while requests run
(each request on one configuration, none failing), refuses a bad change with the error
the profiles file would give, audits every attempt under the admin key's name, keeps
changes over a restart, lets overrides expire on time, pins a user to a model, and
SIGHUP reads the file again."""

import asyncio
import os
import signal
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest

from router_pipeline.serve.config import DEFAULTS
from router_pipeline.serve.gateway import build_gateway
from router_pipeline.serve.profiles import ProfileError
from router_pipeline.training.stand_in import stand_in_pool_router
from router_pipeline_tests.support import serving

KEY = "sk-team-test-key-0001"
OPS, CI = "sk-admin-ops-key-0001", "sk-admin-ci-key-0002"
PROFILES = """
profiles:
  team:
    keys_env: TEST_KEYS_TEAM
"""


@pytest.fixture
def team(tmp_path, monkeypatch, gemini_cloud):
    """(profiles file, a function that builds a gateway on it and the same state folder)."""
    monkeypatch.setenv("TEST_KEYS_TEAM", KEY)
    monkeypatch.setenv("ROUTER_ADMIN_KEY", f"ops={OPS},ci={CI}")
    router, _, _ = stand_in_pool_router(tmp_path)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(PROFILES)

    def gateway(**config):
        return build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / "state",
                             config=replace(DEFAULTS, cooldown_s=0.0, **config))

    return profiles, gateway


def _admin(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_a_change_under_load_is_atomic_refused_when_bad_audited_and_kept_over_a_restart(team):
    profiles, gateway = team
    with serving(gateway()) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        seen, failures, stop = [], [], threading.Event()

        def load(worker: int):
            i = 0
            while not stop.is_set() or i < 3:
                try:
                    r = client.chat.completions.create(model="router", messages=[
                        {"role": "user", "content": f"row {(worker * 50 + i) % 300}"}]).model_extra["routing"]
                    seen.append((r["config_version"], r["rule"], r["served_by"]))
                except Exception as exc:  # any failed request fails the test
                    failures.append(repr(exc))
                i += 1

        workers = [threading.Thread(target=load, args=(w,)) for w in range(6)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        changed = httpx.post(url + "/v1/admin/profiles/team", headers=_admin(OPS), json={"set": {"knob": "pro"}})
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join()
        assert changed.status_code == 200, changed.text
        version = changed.json()["version"]
        assert failures == []
        before = {(rule, served) for v, rule, served in seen if v == 0}
        after = {(rule, served) for v, rule, served in seen if v == version}
        assert {v for v, _, _ in seen} == {0, version} and before and after  # both, and nothing else
        assert all(rule == "pool_choice" for rule, _ in before)  # the router chose under the file's configuration
        assert after == {("by_name", "pro")}  # every request under the change: the knob's model

        # A caller's key never reaches the admin API; no key is not an admin.
        assert httpx.get(url + "/v1/admin/config", headers=_admin(KEY)).status_code == 403
        assert httpx.get(url + "/v1/admin/config").status_code == 401
        assert httpx.post(url + "/v1/admin/profiles/team", headers=_admin(KEY),
                          json={"set": {"knob": "flash"}}).json()["error"]["code"] == "caller_key_refused"

        # A bad change is refused with the error the file gives, and changes nothing.
        bad = httpx.post(url + "/v1/admin/profiles/team", headers=_admin(CI), json={"set": {"allowed": ["gpt-9"]}})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_configuration"
        good_file = profiles.read_text()
        profiles.write_text(good_file + "    allowed: [gpt-9]\n")
        from_file = httpx.post(url + "/v1/admin/reload", headers=_admin(CI))
        profiles.write_text(good_file)
        assert from_file.status_code == 400
        assert bad.json()["error"]["message"] == from_file.json()["error"]["message"]
        assert "allowed names ['gpt-9'], not model aliases" in bad.json()["error"]["message"]
        for refused in ({"set": {"keys_env": "OTHER"}}, {"set": {"knob": "gpt-9"}}, {"set": {"pins": ["x"]}},
                        {"set": {"knob": "pro"}, "ttl_s": -1}):
            r = httpx.post(url + "/v1/admin/profiles/team", headers=_admin(CI), json=refused)
            assert r.status_code == 400, (refused, r.text)
        assert httpx.post(url + "/v1/admin/profiles/nobody", headers=_admin(CI),
                          json={"set": {"knob": "pro"}}).status_code == 400
        config = httpx.get(url + "/v1/admin/config", headers=_admin(CI)).json()
        assert config["version"] == version and config["profiles"]["team"]["knob"] == "pro"
        audit = httpx.get(url + "/v1/admin/audit", headers=_admin(OPS)).json()["audit"]
    applied = [a for a in audit if a["action"] == "change" and a["outcome"] == "applied"]
    assert [(a["admin"], a["profile"], a["detail"]["set"]) for a in applied] == [("ops", "team", {"knob": "pro"})]
    refused = [a for a in audit if a["outcome"] == "refused"]
    assert len(refused) == 7 and {a["admin"] for a in refused} == {"ci"}
    assert any("gpt-9" in a["detail"]["error"] for a in refused)

    restarted = gateway()  # the change is in the state database, not in the process
    assert restarted.profiles.version == version and restarted.profiles.profiles["team"].knob == "pro"


def test_an_override_expires_on_time_a_pin_sends_a_user_to_a_model_and_a_change_can_be_revoked(team):
    _, gateway = team
    with serving(gateway(config_refresh_s=60.0)) as url:  # expiry does not wait for a refresh
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)

        def served(user=None) -> tuple[int, str]:
            extra = {"user": user} if user else {}
            r = client.chat.completions.create(model="router", messages=[{"role": "user", "content": "row 3"}],
                                               **extra).model_extra["routing"]
            return r["config_version"], r["served_by"]

        first = served()[1]
        other = next(m for m in ("flash-lite", "pro") if m != first)
        pinned = httpx.post(url + "/v1/admin/profiles/team", headers=_admin(OPS),
                            json={"set": {"pins": {"user-7": other}}}).json()["version"]
        t0 = time.monotonic()
        override = httpx.post(url + "/v1/admin/profiles/team", headers=_admin(OPS),
                              json={"set": {"knob": "flash"}, "ttl_s": 1.5})
        assert override.status_code == 200, override.text
        assert served() == (override.json()["version"], "flash")  # the override
        assert served("user-7") == (override.json()["version"], other)  # a pin comes before the knob
        while time.monotonic() - t0 < 1.4:
            assert served()[1] == "flash"
            time.sleep(0.1)
        time.sleep(0.4)
        assert served() == (pinned, first)  # expired by itself, the pin still in force
        assert httpx.delete(url + f"/v1/admin/changes/{pinned}", headers=_admin(OPS)).status_code == 200
        assert served("user-7") == (0, first)
        assert httpx.delete(url + f"/v1/admin/changes/{pinned}", headers=_admin(OPS)).status_code == 404


def test_sighup_reads_the_profiles_file_again_and_keeps_the_configuration_when_it_is_refused(team):
    from router_pipeline.serve.server import create_app

    profiles, gateway = team
    g = gateway()

    async def run():
        app = create_app(g)
        async with app.router.lifespan_context(app):
            profiles.write_text(PROFILES + "    knob: pro\n")
            os.kill(os.getpid(), signal.SIGHUP)
            await _until(lambda: g.profiles.profiles["team"].knob == "pro")
            profiles.write_text(PROFILES + "    knob: gpt-9\n")  # refused: the last good one stays
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert g.profiles.profiles["team"].knob == "pro"

    asyncio.run(run())
    from router_pipeline.serve.live import history

    assert [(a["admin"], a["outcome"]) for a in reversed(history(g.feedback.db)) if a["action"] == "reload"] == [
        ("SIGHUP", "applied"), ("SIGHUP", "refused")]


def test_an_admin_key_that_is_a_callers_key_is_refused_at_start(team, monkeypatch):
    _, gateway = team
    monkeypatch.setenv("ROUTER_ADMIN_KEY", f"ops={KEY}")
    with pytest.raises(ProfileError, match="holds a key of profile\\(s\\) team"):
        gateway()


async def _until(condition, timeout_s: float = 5.0) -> None:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout_s
        await asyncio.sleep(0.05)
