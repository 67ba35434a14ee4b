"""The data half of the graph, materialised through Dagster for real."""

import dagster as dg
import pandas as pd
import pytest

from router_pipeline.defs.resources import LLMRoles, ModelRole

DATA_KEYS = ["questions", "train_questions", "test_questions", "answers", "judgments", "oracle_labels",
             "query_analyses", "training_examples", "sft_dataset", "dpo_dataset"]


DATA = dg.AssetSelection.groups("data")  # training has its own tests (test_training_assets_and_modal)


def _meta(result, key):
    (mat,) = [m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey(key)]
    return mat.materialization.metadata


def test_gemini_profile_end_to_end_against_fake_server(fake_gemini, defs, resources):
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
        list(defs.assets), instance=instance, selection=DATA, resources={**resources, "llm": llm},
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
    assert ("training_examples", "no_test_queries") in checks


def test_rematerialising_answers_makes_no_model_call(fake_gemini, sample_questions, defs, resources):
    llm = LLMRoles(medium=ModelRole(provider="gemini", model="gemini-2.5-flash"),
                   large=ModelRole(provider="gemini", model="gemini-2.5-pro"), gemini_base_url=fake_gemini.base_url)
    instance = dg.DagsterInstance.ephemeral()
    run_config = {"ops": {"questions": {"config": {"sample_size": 24, "sample_seed": 3}}}}
    res = {**resources, "llm": llm}
    first = dg.materialize(list(defs.assets), instance=instance, resources=res, run_config=run_config,
                           selection=["questions", "train_questions", "test_questions", "answers"])
    assert _meta(first, "answers")["model_calls"].value == 48
    calls = len(fake_gemini.calls)
    second = dg.materialize(list(defs.assets), instance=instance, resources=res, selection=["answers"])
    assert _meta(second, "answers")["model_calls"].value == 0
    assert _meta(second, "answers")["cache_hits"].value == 48
    assert len(fake_gemini.calls) == calls


def test_offline_default_with_the_real_gemma_270m(gemma_path, defs, resources):
    """The default profile, untouched: Gemma 3 270M from its wheel for both tiers, rules
    judge and analyser. A small sample keeps it to seconds once the model is converted."""
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        list(defs.assets), instance=instance, selection=DATA, resources=resources,
        run_config={"ops": {"questions": {"config": {"sample_size": 10}}}},
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


def test_the_profile_is_chosen_when_the_definitions_are_built(monkeypatch):
    """No module reload: the environment at build time decides."""
    from router_pipeline.definitions import build_defs
    from router_pipeline.settings import SettingsError

    monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "gemini")
    monkeypatch.setenv("ROUTER_LARGE_MODEL", "gemini-3-pro-preview")
    gem = build_defs().resources["llm"].roles().describe()
    assert gem == {"medium": "gemini:gemini-2.5-flash", "large": "gemini:gemini-3-pro-preview",
                   "judge": "gemini:gemini-2.5-pro", "analyser": "gemini:gemini-2.5-flash"}
    monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "nonsense")
    with pytest.raises(Exception) as err:  # dg's loader wraps it; the cause names the variable
        build_defs()
    assert isinstance(err.value.__cause__, SettingsError) and "ROUTER_PIPELINE_PROFILE" in str(err.value.__cause__)
    monkeypatch.delenv("ROUTER_PIPELINE_PROFILE")
    off = build_defs().resources["llm"].roles().describe()
    assert off == {"medium": "local:gemma3-270m", "large": "local:gemma3-270m", "judge": "rules", "analyser": "rules"}


def test_shared_settings_have_one_owner_each(defs):
    """mode, compute and the artifact root are resources (one value per run); choices are
    typed in the schema, so the launchpad lists them and a typo fails before the run."""
    for key in ("sft_dataset", "dpo_dataset", "sft_adapter", "dpo_adapter"):
        assert "router_format" in defs.resolve_assets_def(key).required_resource_keys, key
    for key in ("answers", "sft_adapter", "router_evaluation"):
        assert "compute" in defs.resolve_assets_def(key).required_resource_keys, key
    job = defs.resolve_implicit_global_asset_job_def()
    with pytest.raises(dg.DagsterInvalidConfigError, match="not in enum"):
        job.execute_in_process(run_config={"resources": {"router_format": {"config": {"mode": "quick"}}}})


def test_training_refuses_a_dataset_built_in_another_mode(defs, resources):
    """A dataset left from a run in another format would teach the router a format the
    evaluation and the CLI do not read."""
    from router_pipeline.training_data import build_sft_dataset

    examples = pd.DataFrame({"qid": ["q1"], "query": ["Who wrote Hamlet?"], "policy": ["Standard_Query"],
                             "analysis": ["A literature question."], "split": ["train"], "source": ["oracle"]})
    path = resources["io_manager"].path_for(dg.AssetKey("sft_dataset"))
    path.parent.mkdir(parents=True)
    build_sft_dataset(examples, "reasoning").to_parquet(path)
    result = dg.materialize(list(defs.assets), instance=dg.DagsterInstance.ephemeral(), resources=resources,
                            selection=["sft_adapter"], raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "built in mode ['reasoning'] but router_format.mode is 'fast'" in failure.event_specific_data.error.message
