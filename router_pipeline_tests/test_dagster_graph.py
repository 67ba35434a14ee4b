"""The data half of the graph, materialised through Dagster for real."""

import dagster as dg
import pandas as pd
import pytest

from router_pipeline.definitions import defs
from router_pipeline.resources import LLMRoles, ModelRole, ParquetIOManager, offline_roles

DATA_KEYS = ["questions", "train_questions", "test_questions", "answers", "judgments", "oracle_labels",
             "query_analyses", "training_examples", "sft_dataset", "dpo_dataset"]


DATA = dg.AssetSelection.groups("data")  # training has its own tests (test_training_assets_and_modal)


def _assets():
    return list(defs.assets)


def _meta(result, key):
    (mat,) = [m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey(key)]
    return mat.materialization.metadata


def test_gemini_profile_end_to_end_against_fake_server(fake_gemini):
    llm = LLMRoles(
        medium=ModelRole(provider="gemini", model="gemini-2.5-flash"),
        large=ModelRole(provider="gemini", model="gemini-2.5-pro"),
        judge=ModelRole(provider="gemini", model="gemini-2.5-pro"),
        analyser=ModelRole(provider="gemini", model="gemini-2.5-flash"),
        gemini_base_url=fake_gemini.base_url, backoff_base_s=0.01,
    )
    instance = dg.DagsterInstance.ephemeral()
    # The fake knows the 24-question sample of conftest; sample it the same way.
    from router_pipeline.questions import load_questions

    frame, _ = load_questions(sample_size=24, sample_seed=3)
    result = dg.materialize(
        _assets(), instance=instance, selection=DATA,
        resources={"io_manager": ParquetIOManager(), "llm": llm},
        run_config={"ops": {"questions": {"config": {"sample_size": 24, "sample_seed": 3}}}},
    )
    assert result.success
    for key in DATA_KEYS:
        value = defs.load_asset_value(key, instance=instance)
        assert isinstance(value, pd.DataFrame) and len(value) > 0, key
    answers = defs.load_asset_value("answers", instance=instance)
    assert len(answers) == 2 * len(frame)
    meta = _meta(result, "answers")
    assert meta["model_calls"].value == 2 * len(frame) and meta["cost_usd_total"].value > 0
    oracle_meta = _meta(result, "oracle_labels")
    assert isinstance(oracle_meta["matrix_counts"], dg.TableMetadataValue)
    labels = defs.load_asset_value("oracle_labels", instance=instance)
    assert set(labels["policy"]) >= {"Standard_Query", "Complex_Query"}
    judgments = defs.load_asset_value("judgments", instance=instance)
    assert set(judgments["judge"]) == {"gemini-2.5-pro"}
    checks = {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    assert checks and all(checks.values()), checks
    assert ("query_analyses", "analyses_leak_free") in checks



def test_rematerialising_answers_makes_no_model_call(fake_gemini, sample_questions):
    llm = LLMRoles(medium=ModelRole(provider="gemini", model="gemini-2.5-flash"),
                   large=ModelRole(provider="gemini", model="gemini-2.5-pro"), gemini_base_url=fake_gemini.base_url)
    instance = dg.DagsterInstance.ephemeral()
    run_config = {"ops": {"questions": {"config": {"sample_size": 24, "sample_seed": 3}}}}
    res = {"io_manager": ParquetIOManager(), "llm": llm}
    first = dg.materialize(_assets(), instance=instance, resources=res, run_config=run_config,
                           selection=["questions", "train_questions", "test_questions", "answers"])
    assert _meta(first, "answers")["model_calls"].value == 48
    calls = len(fake_gemini.calls)
    second = dg.materialize(_assets(), instance=instance, resources=res, selection=["answers"])
    assert _meta(second, "answers")["model_calls"].value == 0
    assert _meta(second, "answers")["cache_hits"].value == 48
    assert len(fake_gemini.calls) == calls


def test_offline_default_with_the_real_gemma_270m(gemma_path):
    """The default profile, untouched: Gemma 3 270M from its wheel for both tiers, rules
    judge and analyser. A small sample keeps it to seconds once the model is converted."""
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        _assets(), instance=instance, selection=DATA,
        resources={"io_manager": ParquetIOManager(), "llm": offline_roles()},
        run_config={"ops": {"questions": {"config": {"sample_size": 10}},
                            "answers": {"config": {"progress": False}}}},
    )
    assert result.success
    answers = defs.load_asset_value("answers", instance=instance)
    assert len(answers) == 20 and (answers["status"] == "ok").mean() > 0.8
    assert (answers["input_tokens"] > 0).all()
    large = answers[answers["tier"] == "large"]
    medium = answers[answers["tier"] == "medium"]
    # The few-shot large tier reads the longer prompt and costs more, as priced.
    assert large["input_tokens"].mean() > medium["input_tokens"].mean() and large["cost_usd"].sum() > medium["cost_usd"].sum()
    sft = defs.load_asset_value("sft_dataset", instance=instance)
    assert len(sft) > 0 and sft["completion"].str.contains(r"\[DECISION\]").all()


def test_definitions_load_with_both_profiles(monkeypatch):
    import importlib

    import router_pipeline.definitions as definitions

    monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "gemini")
    gem = importlib.reload(definitions)
    assert gem.defs.resources["llm"].describe()["large"] == "gemini:gemini-2.5-pro"
    monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "nonsense")
    with pytest.raises(ValueError, match="ROUTER_PIPELINE_PROFILE"):
        importlib.reload(definitions)
    monkeypatch.delenv("ROUTER_PIPELINE_PROFILE")
    off = importlib.reload(definitions)
    assert off.defs.resources["llm"].describe() == {"medium": "local:gemma3-270m", "large": "local:gemma3-270m",
                                                    "judge": "rules", "analyser": "rules"}
