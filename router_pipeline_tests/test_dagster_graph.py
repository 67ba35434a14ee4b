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
    from router_pipeline.labels.questions import load_questions

    frame, _ = load_questions(sample_size=24, sample_seed=3)
    result = dg.materialize(
        list(defs.assets), instance=instance, selection=DATA, resources={**resources, "llm": llm},
        run_config={"ops": {"questions": {"config": {"sample_size": 24, "sample_seed": 3}},
                            "judgments": {"config": {"rubric_check": 8}}}},
    )
    assert result.success
    # 8 referenced answers graded against the rubric too: their agreement is reported.
    quality = _meta(result, "label_quality")
    (row,) = quality["sources"].value.records
    assert row.data["source"] == "bundled" and row.data["rubric_vs_gold_n"] == 8
    assert row.data["rubric_vs_gold_agreement"] == 1.0  # this fake judges the same way with and without
    assert row.data["graded_against_gold"] == 48 and "label_mix" in quality
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
    from router_pipeline.training.examples import build_sft_dataset

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


def test_a_traffic_log_without_references_becomes_labels_without_paying_for_logged_answers(defs, resources,
                                                                                             tmp_path):
    """A team's log: queries with the large model's answers and costs, no reference
    answers. The logged answers are used (no large-model answer call), the medium model
    answers the rest, each answer is judged alone against the rubric with structured
    output, and the labels feed the training datasets."""
    import json
    import re

    from router_pipeline.llm.fake_gemini import FakeGemini

    rows = [{"query": f"Which harbour did the {1800 + 7 * i} survey of the Ballyhooly coast start from?",
             "large_answer": "I don't know." if i % 4 == 1 else f"The answer is harbour {i}.", "large_cost_usd": 0.002}
            for i in range(16)]
    log = tmp_path / "traffic.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + json.dumps({"large_answer": "no query"}) + "\n")

    def respond(model, prompt):
        if "There is no reference answer" in prompt:
            answer = prompt.rsplit("Answer to grade: ", 1)[1]
            grade = "NOT_ATTEMPTED" if "don't know" in answer else "CORRECT" if "harbour" in answer else "INCORRECT"
            return json.dumps({"grade": grade, "reason": f"{grade.lower()} on the facts"})
        if "Analysis:" in prompt:
            return "It asks for one precise, little-known fact. Nothing more."
        if "pro" in model:
            return "THE LARGE MODEL WAS CALLED"
        i = (int(re.search(r"the (\d+) survey", prompt).group(1)) - 1800) // 7
        return f"harbour {i}" if i % 3 == 0 else "I don't know" if i % 2 else "Atlantis"

    with FakeGemini(responder=respond) as fake:
        llm = LLMRoles(medium=ModelRole(provider="gemini", model="gemini-2.5-flash"),
                       large=ModelRole(provider="gemini", model="gemini-2.5-pro"),
                       judge=ModelRole(provider="gemini", model="gemini-2.5-pro"),
                       analyser=ModelRole(provider="gemini", model="gemini-2.5-flash"),
                       gemini_base_url=fake.base_url, backoff_base_s=0.01)
        instance = dg.DagsterInstance.ephemeral()
        result = dg.materialize(
            list(defs.assets), instance=instance, selection=DATA, resources={**resources, "llm": llm},
            run_config={"ops": {"questions": {"config": {"source": "traffic", "path": str(log), "sample_size": 0}}}})
        calls = list(fake.calls)
    assert result.success
    assert _meta(result, "questions")["rejected_rows"].value == 1
    questions = defs.load_asset_value("questions", instance=instance)
    assert len(questions) == 16 and questions["gold_answer"].isna().all()
    answers = defs.load_asset_value("answers", instance=instance)
    large = answers[answers["tier"] == "large"]
    assert (large["status"] == "recorded").all() and large["cost_usd"].tolist() == [0.002] * 16
    pro = [c for c in calls if c.model == "gemini-2.5-pro"]
    assert pro and all("There is no reference answer" in c.prompt for c in pro)  # the judge only: 0 answers paid
    assert all(c.config["responseMimeType"] == "application/json" and "responseSchema" in c.config for c in pro)
    assert all(c.prompt.count("Answer to grade:") == 1 for c in pro)  # one answer per call, never both
    judgments = defs.load_asset_value("judgments", instance=instance)
    assert (judgments["reference"] == "rubric").all() and judgments["label"].notna().all()
    assert set(judgments["label"]) == {"Correct", "Incorrect", "IDK"}
    assert judgments["reason"].str.contains("on the facts").all()
    labels = defs.load_asset_value("oracle_labels", instance=instance)  # the train split's
    assert len(labels) == len(defs.load_asset_value("train_questions", instance=instance))
    assert set(labels["policy"]) == {"Standard_Query", "Complex_Query", "Ambiguous_Query"}
    assert len(defs.load_asset_value("sft_dataset", instance=instance)) > 0
    (row,) = _meta(result, "label_quality")["sources"].value.records
    assert row.data["source"] == "traffic:traffic.jsonl" and row.data["graded_against_rubric"] == 32
    assert row.data["rubric_vs_gold_n"] == 0 and row.data["ungraded"] == 0
