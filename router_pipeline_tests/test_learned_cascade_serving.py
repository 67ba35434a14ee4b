"""A learned cascade released with the pool router is served: its heads saved beside the
router, loaded by the gateway, and run there (call the cheap step, read whether the two
answers agree, accept or jump to the dear model), each call listed and charged."""

import numpy as np
import openai
import pytest

from router_pipeline.routers.cascade import (
    LearnedCascade,
    logit,
    make_plan,
    next_action,
    read_answers,
    save_cascade,
)
from router_pipeline.routers.pool import lambdas
from router_pipeline.serve.config import DEFAULTS
from router_pipeline.serve.gateway import build_gateway
from router_pipeline.training.cascade import fit_cascade
from router_pipeline.training.stand_in import stand_in_pool_router
from router_pipeline_tests.support import serving
from router_pipeline_tests.test_cascade_serving import KEY, letters


def _learned(router) -> LearnedCascade:
    """Fitted on 300 recorded rows where flash-lite and flash agree on even rows (flash
    then right 95% of the time, pro 30%) and disagree on odd ones (flash right 20%, pro
    90%): what is worth paying for depends on the answers, not on the query."""
    rng = np.random.default_rng(0)
    rows = np.arange(300)
    even = rows % 2 == 0
    raw = np.array([["B", "B", "D"] if e else ["A", "C", "D"] for e in even], dtype=object)
    right = np.where(even[:, None], [0.9, 0.95, 0.3], [0.1, 0.2, 0.9])
    correct = rng.random((300, 3)) < right
    cost = np.tile(router.costs, (300, 1))
    q = logit(router.proba([f"row {i}" for i in rows]))
    plan = make_plan([["flash-lite", "flash"], "pro"], router.models)
    policy, _ = fit_cascade(plan, q, read_answers(raw, "letter"), correct, cost, lambdas(router.costs), folds=3)
    return policy


def test_the_server_runs_a_released_learned_cascade_as_its_policy_decides(
        tmp_path, monkeypatch, gemini_cloud):
    monkeypatch.setenv("TEST_KEYS_TEAM", KEY)
    gemini_cloud.responder = letters  # even rows: the cheap two say B; odd: A and C; pro says D
    router, _, _ = stand_in_pool_router(tmp_path)
    policy = _learned(router)
    files = save_cascade(policy, router.path, default=True)
    assert [f.name for f in files] == ["cascade.json", "cascade_heads.npz"]
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  team:\n    keys_env: TEST_KEYS_TEAM\n")  # no cascade key: the released one
    gateway = build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / "state",
                            config=DEFAULTS)
    assert isinstance(gateway.released_cascade, LearnedCascade)
    # lambda 25: pro's expected cost (0.004 per call) weighs 0.1 of accuracy (at lambda 0 any chance that pro is
    # right where flash is not is worth its call).
    rows = range(12)
    with serving(gateway) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        replies = [client.chat.completions.create(model="router-lambda-25",
                                                  messages=[{"role": "user", "content": f"row {i}"}])
                   for i in rows]
    outcomes = set()
    for i, reply in zip(rows, replies):
        c = reply.model_extra["routing"]["cascade"]
        # What the server called is what the policy decides, step by step, on the answers it got.
        p = dict(zip(router.models, router.proba([f"row {i}"])[0]))
        answers, expected = {}, []
        while (act := next_action(policy, p, answers, 25.0)).kind == "call":
            expected += [(act.step, m) for m in policy.plan.step_names(act.step)]
            answers.update({m: letters(m, f"row {i}") for m in policy.plan.step_names(act.step)})
        if act.model not in answers:
            expected.append((len(policy.plan.steps) + 1, act.model))
        assert sorted((s["step"], s["model"]) for s in c["steps"]) == sorted(expected), i
        assert [s["model"] for s in c["steps"] if s["kept"]] == [act.model]
        assert reply.choices[0].message.content == letters(act.model, f"row {i}")
        assert sum(s["cost_usd"] for s in c["steps"]) == pytest.approx(
            reply.model_extra["routing"]["cost_usd"], abs=1e-8)
        outcomes.add(("agreed" if c["stopped"] == "agreement" else "escalated" if c["escalated"] else "jumped"))
    # Both kinds happen: the cheap pair's agreement accepted (no pro), and pro paid for on their disagreement.
    assert {"agreed", "escalated"} <= outcomes
