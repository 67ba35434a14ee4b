"""Routing among N models: the pool's configuration, outcomes of any number of models,
per-model P(correct) heads, the knob set on validation rows, the frontier, and the
OpenAI-compatible backend against a real local HTTP server."""

import asyncio
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from router_pipeline.evaluation import frontier as fr
from router_pipeline.labels.outcomes import OutcomesError, read_outcomes
from router_pipeline.llm.pool import PoolError, gemini_pool, load_pool, pool_from_dict
from router_pipeline.routers.pool import Knob, decide, knob, lambdas
from router_pipeline.training.pool import _lda, fit_pool, pool_grid
from router_pipeline.training.stand_in import stand_in_pool_router, synthetic

MMLU_PRO = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing_outcomes" / "mmlu_pro_dev_outcomes.csv"


def _model(name="a", **over):
    return {"name": name, "backend": "gemini", "model": "gemini-2.5-flash", "input_usd_per_mtok": 0.3,
            "output_usd_per_mtok": 2.5, **over}


# -- the pool's configuration ------------------------------------------------------
@pytest.mark.parametrize("entry, problem", [
    (_model(backend="bedrock"), r"models\[0\] \(a\): unknown backend 'bedrock'; expected one of gemini, local, openai"),
    ({k: v for k, v in _model().items() if k != "output_usd_per_mtok"}, "'output_usd_per_mtok' is missing"),
    (_model(input_usd_per_mtok=-1), "'input_usd_per_mtok' must be a finite number >= 0"),
    (_model(input_usd_per_mtok=True), "'input_usd_per_mtok' must be a finite number >= 0"),
    (_model(backend="openai"), "the openai backend needs 'base_url'"),
    (_model(name=" a"), "'name' must be a non-empty name"),
    (_model(colour="red"), r"unknown field\(s\) \['colour'\]"),
    ("flash", "must be a mapping"),
])
def test_a_bad_pool_entry_is_refused_naming_the_entry_and_the_field(entry, problem):
    with pytest.raises(PoolError, match=problem):
        pool_from_dict({"models": [entry]})


def test_duplicate_names_and_empty_pools_are_refused(tmp_path):
    with pytest.raises(PoolError, match="duplicate model name 'a'"):
        pool_from_dict([_model("a"), _model("a", model="gemini-2.5-pro")])
    with pytest.raises(PoolError, match="non-empty 'models' list"):
        pool_from_dict({"models": []})
    bad = tmp_path / "pool.yaml"
    bad.write_text("models: [{name: a, backend: gemini}")
    with pytest.raises(PoolError, match=f"{bad}: not valid YAML"):
        load_pool(bad)
    bad.write_text("models:\n  - {name: a, backend: gemini, model: m, input_usd_per_mtok: 1}\n")
    with pytest.raises(PoolError, match=f"{bad}: models\\[0\\] \\(a\\): 'output_usd_per_mtok' is missing"):
        load_pool(bad)


def test_a_pool_file_loads_and_orders_fallbacks_by_price(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("models:\n"
                    "  - {name: pro, backend: gemini, model: gemini-2.5-pro, input_usd_per_mtok: 1.25, output_usd_per_mtok: 10}\n"
                    "  - {name: llama, backend: openai, model: meta-llama/Llama-3.1-8B-Instruct, base_url: http://vllm:8000/v1,\n"
                    "     api_key_env: VLLM_KEY, input_usd_per_mtok: 0.18, output_usd_per_mtok: 0.18}\n"
                    "  - {name: gemma, backend: local, model: gemma3-270m, input_usd_per_mtok: 0, output_usd_per_mtok: 0}\n")
    pool = load_pool(path)
    assert pool.names == ["pro", "llama", "gemma"] and [m.name for m in pool.by_price()] == ["gemma", "llama", "pro"]
    assert pool["pro"].cost(1_000_000, 100_000) == pytest.approx(1.25 + 1.0)
    assert pool_from_dict(pool.to_dict()) == pool
    assert gemini_pool().names == ["flash-lite", "flash", "pro"] and gemini_pool()["pro"].output_usd_per_mtok == 10.0


# -- outcomes of N models ------------------------------------------------------------
def _three(rows=6) -> pd.DataFrame:
    frame = pd.DataFrame({"qid": [f"q{i}" for i in range(rows)], "query": [f"Question number {i}?" for i in range(rows)]})
    for m, cost in (("small", 0.0001), ("mid", 0.0005), ("big", 0.002)):
        frame[f"{m}_grade"] = ["Correct" if (i + len(m)) % 2 else "Incorrect" for i in range(rows)]
        frame[f"{m}_cost_usd"] = cost
    return frame


def test_a_row_missing_a_models_grade_or_cost_is_rejected_with_the_model_named():
    frame = _three()
    frame.loc[1, "mid_grade"] = None
    frame.loc[3, "big_cost_usd"] = float("nan")
    frame.loc[4, "small_grade"] = "Maybe"
    out = read_outcomes(frame)
    assert out.models == ["small", "mid", "big"] and list(out.frame["qid"]) == ["q0", "q2", "q5"]
    assert out.rejected == [(3, "mid: grade None is not one of ('Correct', 'Incorrect', 'IDK')"),
                            (5, "big: cost nan is not a finite number >= 0"),
                            (6, "small: grade 'Maybe' is not one of ('Correct', 'Incorrect', 'IDK')")]
    assert out.correct.shape == (3, 3) and out.cost[:, 2].tolist() == [0.002] * 3
    # The same file read for two of its models keeps the row missing only the third's grade.
    assert "q1" in set(read_outcomes(frame, ["small", "big"]).frame["qid"])
    with pytest.raises(OutcomesError, match=r"no _grade and _cost_usd columns for \['huge'\]"):
        read_outcomes(frame, ["small", "huge"])


@pytest.mark.skipif(not MMLU_PRO.is_file(), reason=f"the MMLU-Pro development outcomes are not at {MMLU_PRO}")
def test_the_six_model_file_is_read_whole():
    out = read_outcomes(MMLU_PRO)
    assert len(out.models) == 6 and len(out.frame) + len(out.rejected) == 4582
    assert out.correct.mean(axis=0)[out.models.index("gemini-1.5-pro")] == pytest.approx(0.711, abs=0.005)


# -- the frontier -----------------------------------------------------------------------
def test_the_frontier_is_the_non_decreasing_upper_hull():
    f = fr.frontier(np.array([1.0, 2.0, 3.0, 4.0, 2.5]), np.array([0.5, 0.55, 0.8, 0.7, 0.9]))
    assert f.cost.tolist() == [1.0, 2.5] and f.accuracy.tolist() == [0.5, 0.9]  # (2, .55) under the chord; 3, 4 dominated
    assert f.accuracy_at(1.75) == pytest.approx(0.7) and f.accuracy_at(4.0) == 0.9 and np.isnan(f.accuracy_at(0.5))
    assert f.cost_at(0.7) == pytest.approx(1.75) and np.isnan(f.cost_at(0.95))
    assert fr.frontier(np.array([1.0, 3.0]), np.array([0.6, 0.6])).aiq(1.0, 3.0) == pytest.approx(0.6)


def test_oracle_and_random_mix_bound_the_single_models():
    rng = np.random.default_rng(0)
    correct = rng.random((400, 3)) < [0.4, 0.6, 0.75]
    cost = np.tile([0.001, 0.003, 0.01], (400, 1))
    oracle, mix = fr.oracle(correct, cost, lambdas(cost.mean(axis=0))), fr.random_mix(correct, cost)
    for m in range(3):
        c, a = cost[:, m].mean(), correct[:, m].mean()
        assert mix.frontier().accuracy_at(c) >= a - 1e-12
        # At the cheapest model's cost every query goes to it: the oracle gains only above it.
        assert oracle.frontier().accuracy_at(c) > a if m else oracle.frontier().accuracy_at(c) == pytest.approx(a)
    assert fr.aiq(oracle, cost) > fr.aiq(mix, cost) > fr.aiq(fr.singles(correct, cost)[0], cost)
    w = fr.resample_weights(400, 50, 0)
    d = fr.interval(lambda x: fr.aiq(oracle, cost, x) - fr.aiq(mix, cost, x), w)
    assert 0 < d["lo"] < d["diff"] < d["hi"]


# -- the heads and the knob -------------------------------------------------------------
def test_closed_form_lda_is_scikit_learns_without_shrinkage():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, correct, _ = synthetic(300)
    coef, intercept = _lda(x, correct, 0.0)
    for m in range(2):
        ref = LinearDiscriminantAnalysis(solver="lsqr").fit(x, correct[:, m])
        assert coef[m] == pytest.approx(ref.coef_[0], rel=1e-6, abs=1e-8)
        assert intercept[m] == pytest.approx(ref.intercept_[0], rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("classifier", ["lda", "logistic", "knn"])
def test_a_pool_router_learns_which_model_is_right_and_beats_a_random_mix(classifier):
    x, correct, cost = synthetic()
    train, test = slice(0, 600), slice(600, None)
    fitted = fit_pool(lambda p: x[train], correct[train], cost[train], ["cheap", "mid", "dear"], classifier,
                      pool_grid(classifier, c_values=(0.1, 1.0)), folds=3)
    p = fitted.head.proba(x[test])
    assert p.shape == (300, 3) and ((0 <= p) & (p <= 1)).all() and fitted.cv_auc > 0.7
    sweep = lambdas(cost.mean(axis=0))
    routed = fr.curve(np.stack([decide(p, fitted.head.costs, lam) for lam in sweep], axis=1), correct[test], cost[test])
    assert fr.aiq(routed, cost[test]) > fr.aiq(fr.random_mix(correct[test], cost[test]), cost[test]) + 0.05


def test_a_budget_knob_never_overspends_on_the_validation_rows_and_quality_reaches_its_share():
    x, correct, cost = synthetic(seed=1)
    fitted = fit_pool(lambda p: x[:500], correct[:500], cost[:500], ["cheap", "mid", "dear"], "lda", pool_grid("lda"),
                      folds=3)
    val = slice(500, 700)
    p_val = fitted.head.proba(x[val])
    for budget in (0.5, 0.8, 1.2, 2.0, 3.5):
        chosen = knob(p_val, correct[val], cost[val], fitted.head.costs, Knob("budget", budget))
        pick = decide(p_val, fitted.head.costs, chosen["lambda"])
        spend = cost[val][np.arange(200), pick].mean() * 1000
        assert spend <= budget + 1e-9 and chosen["usd_per_1000"] == pytest.approx(spend)
    quality = knob(p_val, correct[val], cost[val], fitted.head.costs, Knob("quality", 0.95))
    assert quality["accuracy"] >= 0.95 * correct[val].mean(axis=0).max() - 1e-9
    assert quality["validation_rows"] == 200
    assert knob(p_val, correct[val], cost[val], fitted.head.costs, Knob("lambda", 0.0))["lambda"] == 0.0
    with pytest.raises(ValueError, match="unknown knob"):
        Knob("cheapest", 1.0)


# -- the OpenAI-compatible backend -------------------------------------------------------
@pytest.fixture
def openai_server():
    from router_pipeline.llm.fake_openai import FakeOpenAI

    with FakeOpenAI() as fake:
        yield fake


def test_the_openai_backend_speaks_the_protocol_to_a_local_server(openai_server, monkeypatch):
    from router_pipeline.llm.fake_openai import Fault
    from router_pipeline.llm.openai_compat import OpenAIClient
    from router_pipeline.llm.types import LLMRequest, RetryableError

    from router_pipeline.llm.pool import client_for

    monkeypatch.setenv("TEST_VLLM_KEY", "sk-local-123")
    url = openai_server.base_url
    pool = pool_from_dict([{"name": "llama", "backend": "openai", "model": "meta-llama/Llama-3.1-8B-Instruct",
                            "base_url": url, "api_key_env": "TEST_VLLM_KEY", "input_usd_per_mtok": 0.18,
                            "output_usd_per_mtok": 0.18}])
    client = client_for(pool["llama"])
    assert isinstance(client, OpenAIClient) and client.price == (0.18, 0.18)
    request = LLMRequest("Capital of France?", max_output_tokens=12, system="Answer briefly.", stop=("\n",))

    async def run():
        whole = await client.complete(request)
        streamed = [item async for item in client.stream(request)]
        openai_server.add_faults(Fault(status=429, retry_after=7))
        with pytest.raises(RetryableError) as limited:
            await client.complete(request)
        openai_server.add_faults(Fault(status=400))
        with pytest.raises(Exception) as refused:
            await client.complete(request)
        await client.aclose()
        return whole, streamed, limited.value, refused.value

    whole, streamed, limited, refused = asyncio.run(run())
    assert (whole.text, whole.status, whole.input_tokens, whole.output_tokens) == ("Paris", "ok", 9, 2)
    assert streamed[:2] == [" Pa", "ris "] and streamed[-1].text == "Paris"  # deltas as sent, the answer stripped
    assert streamed[-1].output_tokens == 2
    assert limited.retry_after == 7.0 and not isinstance(refused, RetryableError)
    first = openai_server.calls[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-local-123"
    assert first["model"] == "meta-llama/Llama-3.1-8B-Instruct" and first["max_tokens"] == 12
    assert first["messages"] == [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": "Capital of France?"}] and first["stop"] == ["\n"]


def test_a_saved_pool_router_routes_as_it_was_fitted(tmp_path):
    import json as json_

    from router_pipeline.artifacts import CALIBRATION_FILE
    from router_pipeline.routers.pool import PoolRouter, save_pool_router

    x, correct, cost = synthetic(300)
    fitted = fit_pool(lambda p: x, correct, cost, ["cheap", "mid", "dear"], "lda", pool_grid("lda"), folds=3)
    path = save_pool_router(tmp_path / "pool", {"encoder": "minilm"}, fitted.head, params=fitted.params)
    (path / CALIBRATION_FILE).write_text(json_.dumps({"knob": "lambda", "lambda": 50.0}))

    class Rows:  # an encoder that maps "row i" to the i-th feature row (anything else: row 0)
        def encode(self, queries):
            return x[[int(q.split()[1]) if q.startswith("row ") else 0 for q in queries]]

    router = PoolRouter(path, encoder=Rows())
    queries = [f"row {i}" for i in range(20)]
    p, picked = router.choose(queries)
    assert p == pytest.approx(fitted.head.proba(x[:20]))
    assert picked == [["cheap", "mid", "dear"][i] for i in decide(p, fitted.head.costs, 50.0)] and router.lam == 50.0
    assert router.choose(queries, lam=float("inf"))[1] == ["cheap"] * 20


def test_the_server_answers_from_the_model_the_pool_router_chose_counts_and_takes_feedback_per_model(
        tmp_path, monkeypatch):
    """The openai client against a served pool router: the answering model is the one
    P(correct) - lambda * cost picks (lambda from the model name: 'router', a budget, a
    lambda); fallbacks go down the pool; /v1/stats counts per pool model; feedback names a
    pool model, and a name outside the pool is a 400."""
    import httpx
    import openai

    from router_pipeline.llm.fake_gemini import Fault, FakeGemini
    from router_pipeline.llm.models import FLASH_LITE, PRO
    from router_pipeline.serve.gateway import build_gateway
    from router_pipeline_tests.support import serving

    router, fitted, x = stand_in_pool_router(tmp_path)
    names = router.models
    with FakeGemini() as fake:
        monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "gemini")
        monkeypatch.setenv("GEMINI_BASE_URL", fake.base_url)
        monkeypatch.setenv("GEMINI_API_KEY", "test-key-not-secret")
        gateway = build_gateway(None, router=router, feedback_dir=tmp_path / "state")
        with serving(gateway) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            ask = lambda q, model="router": client.chat.completions.create(  # noqa: E731
                model=model, messages=[{"role": "user", "content": q}])
            expected = [names[i] for i in decide(fitted.head.proba(x[:12]), fitted.head.costs, 0.0)]
            replies = [ask(f"row {i}") for i in range(12)]
            served = [r.model_extra["routing"]["served_by"] for r in replies]
            assert served == expected and len(set(served)) > 1  # lambda 0: the model most likely right
            assert [c.model for c in fake.calls] == [router.pool()[n].model for n in expected]
            # The cheapest budget there is: every query to the cheapest model.
            cheap = ask("row 3", model="router-budget-0")
            assert cheap.model_extra["routing"]["served_by"] == "flash-lite" and cheap.model == FLASH_LITE
            assert ask("row 3", model="router-lambda-0").model_extra["routing"]["served_by"] == expected[3]
            with pytest.raises(openai.NotFoundError, match="router-budget-"):
                ask("row 3", model="router-budget-1e9")
            # Pro fails (a 500): the request goes down the pool by price, to flash.
            dear = next(i for i, n in enumerate(expected) if n == "pro")
            fake.add_model_faults(PRO, Fault(status=500))
            fallen = ask(f"row {dear}").model_extra["routing"]
            assert fallen["served_by"] == "flash" and fallen["fallback_from"][0]["target"] == "pro"
            stats = httpx.get(url + "/v1/stats").json()["profiles"]["default"]["models"]
            counted = pd.Series(expected + ["flash-lite", expected[3], "flash"]).value_counts().to_dict()
            assert stats == counted
            rid = replies[0].model_extra["routing"]["request_id"]
            ok = httpx.post(url + "/v1/feedback", json={"request_id": rid, "grade": "Correct"})
            assert ok.status_code == 200 and ok.json()["grades"] == {expected[0]: "Correct"}
            other = next(n for n in names if n != expected[0])
            named = httpx.post(url + "/v1/feedback", json={"request_id": rid, "model": other, "grade": "Incorrect"})
            assert named.status_code == 200 and named.json()["grades"][other] == "Incorrect"
            outside = httpx.post(url + "/v1/feedback", json={"request_id": rid, "model": "gpt-9", "grade": "Correct"})
            assert outside.status_code == 400 and "gpt-9" in outside.json()["error"]["message"]


@pytest.mark.skipif(not MMLU_PRO.is_file(), reason=f"the MMLU-Pro development outcomes are not at {MMLU_PRO}")
def test_the_ensemble_router_is_its_members_mean_log_odds_and_its_release_checks_every_member(tmp_path):
    """gemma_minilm_lda on real recorded outcomes and the real encoders: saved with its
    members, loaded as one router whose P is the mean log-odds of the members' (each
    loaded alone), released with a manifest that covers the members' files."""
    from router_pipeline.artifacts import CALIBRATION_FILE, EVALUATION_FILE
    from router_pipeline.evaluation.release import install_release
    from router_pipeline.labels.outcomes import Outcomes
    from router_pipeline.routers.manifest import ReleaseIntegrityError
    from router_pipeline.routers.pool import MEMBERS_DIR, PoolRouter, ensemble
    from router_pipeline.routers.registry import load_router
    from router_pipeline.training.heads import HeadConfig
    from router_pipeline.training.pool import PoolSpec, train_pool_routers

    models = ["llama-3.1-8b-instruct", "gemini-1.5-flash", "gemini-1.5-pro"]
    whole = read_outcomes(pd.read_csv(MMLU_PRO, dtype={"qid": str}), models)
    frame = whole.frame.sample(n=120, random_state=1).reset_index(drop=True)
    part = lambda rows: Outcomes(frame.iloc[rows].reset_index(drop=True), models, [])  # noqa: E731
    train, validation = part(slice(0, 90)), part(slice(90, 120))
    names = ("gemma_minilm_lda", "gemma_lda", "minilm_lda")
    spec = PoolSpec(candidates=names, knob="quality", knob_value=0.95)
    results = train_pool_routers(train, validation, spec, HeadConfig(layers=(6,), shrinkages=(0.9,), folds=3),
                                 gemini_pool().to_dict(), {n: tmp_path / n for n in names}, log=lambda _: None)
    by_name = {r.name: r for r in results}
    assert set(by_name) == set(names) and by_name["gemma_minilm_lda"].params == {
        "gemma_lda": by_name["gemma_lda"].params, "minilm_lda": by_name["minilm_lda"].params}
    assert sorted(p.name for p in (tmp_path / "gemma_minilm_lda" / MEMBERS_DIR).iterdir()) == ["gemma_lda", "minilm_lda"]

    queries = list(validation.frame["query"][:12])
    both = PoolRouter(tmp_path / "gemma_minilm_lda")
    assert both.models == models and len(both.parts) == 2
    (gemma, _), (minilm, _) = both.parts
    alone = {n: PoolRouter(tmp_path / n, encoder=enc) for n, enc in (("gemma_lda", gemma), ("minilm_lda", minilm))}
    p = both.proba(queries)
    assert p == pytest.approx(ensemble([alone["gemma_lda"].proba(queries), alone["minilm_lda"].proba(queries)]))
    assert not np.allclose(p, alone["gemma_lda"].proba(queries))  # the MiniLM member moves it
    calibration = json.loads((tmp_path / "gemma_minilm_lda" / CALIBRATION_FILE).read_text())
    assert calibration["knob"] == "quality" and calibration["validation_rows"] == 30

    evaluation = tmp_path / EVALUATION_FILE
    evaluation.write_text(json.dumps({"AIQ": 0.7}))
    released = install_release(tmp_path / "gemma_minilm_lda", [evaluation], tmp_path / "release", tmp_path / "staging")
    assert released["export_sha256"]  # the Gemma member's encoder, exported for the fast path
    fast = load_router(tmp_path / "release")  # the manifest checked, the Gemma member on its bf16 export
    assert isinstance(fast, PoolRouter) and np.abs(fast.proba(queries) - p).max() < 0.05
    head = tmp_path / "release" / MEMBERS_DIR / "minilm_lda" / "pool_head.npz"
    head.write_bytes(head.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ReleaseIntegrityError, match="members/minilm_lda/pool_head.npz"):
        load_router(tmp_path / "release")


def test_a_models_own_budget_caps_it_and_the_next_choice_answers(tmp_path, monkeypatch):
    """``budget.models: {pro: cap}``: requests the pool router sends to pro are answered by
    pro until its own spend of the month reaches the cap, then by the router's next choice
    (rule model_budget) and no fallback reaches pro; the profile's spend and pro's are each
    what was charged; with every candidate capped the answer costs nothing."""
    import openai

    from router_pipeline.llm.fake_gemini import FakeGemini
    from router_pipeline.serve.database import state_database
    from router_pipeline.serve.gateway import build_gateway
    from router_pipeline_tests.support import serving

    router, fitted, x = stand_in_pool_router(tmp_path)
    names = router.models
    choice = [names[i] for i in decide(fitted.head.proba(x[:60]), fitted.head.costs, 0.0)]
    to_pro = [i for i, n in enumerate(choice) if n == "pro"][:4]
    assert len(to_pro) == 4
    monkeypatch.setenv("TEST_KEY_TEAM", "team-key-0123456789")
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  team:\n    keys_env: TEST_KEY_TEAM\n"
                        "    mapper: {budget: {ledger: team, period: month, models: {pro: 1.0e-6, flash: 1.0e-6}}}\n")
    with FakeGemini() as fake:
        monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "gemini")
        monkeypatch.setenv("GEMINI_BASE_URL", fake.base_url)
        monkeypatch.setenv("GEMINI_API_KEY", "test-key-not-secret")
        gateway = build_gateway(None, router=router, profiles_path=profiles, feedback_dir=tmp_path / "state")
        with serving(gateway) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="team-key-0123456789", max_retries=0)
            routing = [client.chat.completions.create(model="router", messages=[
                {"role": "user", "content": f"row {i}"}]).model_extra["routing"] for i in to_pro]
            first, then = routing[0], routing[1:]
            assert (first["served_by"], first["rule"]) == ("pro", "pool_choice")  # under its cap: pro answers
            assert all(r["rule"] == "model_budget" and r["served_by"] != "pro" for r in then), then
            assert "pro spent $" in then[0]["reason"] and "of its $0.00" in then[0]["reason"]
            # flash is capped too: it answers once at most (its first answer passes its cap).
            assert [r["served_by"] for r in then].count("flash") <= 1
    db = state_database(tmp_path / "state")
    spent = dict(db.execute("SELECT ledger, usd FROM spend"))
    charged = lambda model: sum(r["cost_usd"] for r in routing if r["served_by"] == model)  # noqa: E731
    assert spent["team/pro"] == pytest.approx(charged("pro")) and spent["team/pro"] > 1.0e-6
    assert spent.get("team/flash", 0.0) == pytest.approx(charged("flash"))
    assert spent["team"] == pytest.approx(sum(r["cost_usd"] for r in routing))
    assert db.execute("SELECT COUNT(*) FROM reservations") == [(0,)]
    assert [c.model for c in fake.calls].count(router.pool()["pro"].model) == 1

    # Every candidate capped (a cap of 0): answered "I don't know", nothing called or spent.
    from router_pipeline.routers.pool import ranked
    from router_pipeline.serve.mapper import PolicyMapper, pool_spec

    mapper = PolicyMapper.from_dict({**pool_spec(names), "budget": {"ledger": "zero", "period": "day", "models": {
        n: 0.0 for n in names}}}, default_models={n: router.pool()[n].model for n in names}, base_dir=tmp_path)
    mapper.ledger.bind(db)
    decision = router.route("row 0")
    assert decision.ranked[0] == decision.model and len(decision.ranked) == 3
    assert list(decision.ranked) == [names[i] for i in ranked(np.array([decision.p_correct[n] for n in names]),
                                                               router.costs, router.lam)]
    mapping = mapper.map(decision)
    assert mapping.abstain and mapping.rule == "model_budget" and "no model is left" in mapping.reason
