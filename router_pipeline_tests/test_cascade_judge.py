"""The cascade's paid comparator: agreement classes of a row's answers given a pairwise
``same`` (routers/cascade.py ``classes``), the judge that decides whether two free-text
answers are the same answer (labels/judging.py ``SameAnswerJudge``) through the Gemini
client against the local fake, its calls and cost counted and a re-run free (the response
cache), and ``pool_cascade`` with ``comparator: judge`` through Dagster."""

import json
import re
from dataclasses import replace

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from router_pipeline.evaluation.cascade import choose_comparator, judged_answers
from router_pipeline.labels.judging import SameAnswerJudge, parse_same_output
from router_pipeline.llm import RoleSpec, make_client
from router_pipeline.llm.cache import ResponseCache
from router_pipeline.llm.fake_gemini import FakeGemini
from router_pipeline.llm.runner import RetryPolicy
from router_pipeline.routers.cascade import Answers, FixedCascade, canonical, classes, make_plan
from router_pipeline.text import normalise
from router_pipeline_tests.support import write_asset

JUDGE = RoleSpec("gemini", "gemini-2.5-pro", max_output_tokens=16)
RETRY = RetryPolicy(max_attempts=2, base_delay_s=0.01)
MODELS = ["flash-lite", "flash", "pro"]  # the offline pool's names


def never(a, b):
    raise AssertionError(f"asked about {a!r} and {b!r}")


def test_classes_of_letters_and_normalised_text_need_no_judge_and_an_abstention_agrees_with_nothing():
    assert classes(["A", "a ", "B", None, "I don't know"], never, "letter") == ["A", "A", "B", "", ""]
    row = ["The Eiffel Tower.", "eiffel tower", "", "Eiffel tower!", "I don't know"]
    with pytest.raises(AssertionError):  # a pair that does not match once normalised is put to ``same``
        classes(row + ["Paris"], never)
    assert classes(row, never) == ["eiffel tower", "eiffel tower", "", "eiffel tower", ""]
    # With a ``same`` that never agrees, the labels are canonical's: today's normalised match.
    row = ["Paris", "Lyon", "idk", "paris"]
    assert classes(row, lambda a, b: False) == [canonical(a) for a in row] == ["paris", "lyon", "", "paris"]


def test_a_judge_merges_differently_worded_answers_asked_against_each_class_first_member_only():
    asked = []

    def judge(a, b):
        asked.append((a, b))
        return {a, b} in ({"Paris", "The city of Paris"}, {"The city of Paris", "Lyon"})

    row = ["Paris", "The city of Paris", "the city of paris", "Lyon", "I don't know", None, "PARIS"]
    assert classes(row, judge) == ["paris", "paris", "paris", "lyon", "", "", "paris"]
    # Normalised-equal answers are not asked about, nor abstentions; Lyon meets Paris (the class's first
    # member), never "The city of Paris", which the stub would have called the same.
    assert asked == [("Paris", "The city of Paris"), ("Paris", "Lyon")]
    # Class labels are what Answers.canon holds: the fixed cascade stops on the judge's agreement unchanged.
    plan = make_plan([["flash-lite", "flash"], "pro"], MODELS)
    policy = FixedCascade(plan, np.array([1.0, 2.0, 10.0]), "text")
    labels = np.array([classes(["Paris", "The city of Paris", None], judge),
                       classes(["Paris", "Lyon", None], judge)], dtype=object)
    codes = policy.decide(1, np.zeros((2, 3)), Answers(labels, np.ones((2, 3))), np.zeros(1))[:, 0]
    assert codes.tolist() == [0, -1]  # agreed: stop with flash-lite; disagreed: go on to pro


def _same_responder(model, prompt):
    """The fake judge: the same answer when one holds the other once normalised."""
    a = re.search(r"First answer: (.*)\n", prompt).group(1)
    b = re.search(r"Second answer: (.*)\n", prompt).group(1)
    if "unreadable" in prompt:
        return "Well, they might be."
    na, nb = normalise(a), normalise(b)
    return "SAME" if na in nb or nb in na else "DIFFERENT"


QUESTIONS = ["Capital of France?", "Moon landing year?", "Who wrote the Requiem?", "Pick one", "Capital of France?",
             "An unreadable one?"]
RAW = np.array([["Paris", "The city of Paris", "Lyon"],  # 2 pairs: Paris ~ the city of Paris, Paris vs Lyon
                ["1969", "in 1969", "1969"],  # 1 pair
                ["Mozart", "I don't know", "Salieri"],  # 1 pair; the abstention is never asked about
                ["B", "b", None],  # normalised-equal: no call
                ["The city of Paris", None, "Paris"],  # the first row's pair again: decided, not paid twice
                ["yes", "no", None]], dtype=object)  # an unreadable verdict: they disagree, counted


def test_the_judge_compares_free_text_through_the_gemini_client_counted_paid_and_free_when_run_again(tmp_path):
    with FakeGemini(responder=_same_responder) as fake:
        def judge(cache):
            return SameAnswerJudge(JUDGE, make_client(JUDGE, gemini_base_url=fake.base_url), cache, retry=RETRY)

        first = judge(ResponseCache(tmp_path / "cache.sqlite"))
        answers = judged_answers(QUESTIONS, RAW, first)
        assert answers.canon.tolist() == [["paris", "paris", "lyon"], ["1969", "1969", "1969"],
                                          ["mozart", "", "salieri"], ["b", "b", ""], ["city of paris", "", "city of paris"],
                                          ["yes", "no", ""]]
        assert answers.length[2].tolist() == [6.0, 0.0, 7.0]
        calls = list(fake.calls)
        assert first.stats.calls == len(calls) == len(first.verdicts) == 5 and first.stats.cache_hits == 0
        assert first.stats.cost_usd > 0 and first.unreadable == 1
        for call in calls:  # blind: the question and two answers, constrained to the two verdicts
            assert call.prompt.count("First answer:") == call.prompt.count("Second answer:") == 1
            assert not re.search(r"gemini|flash|\bpro\b|model", call.prompt.lower()), call.prompt
            assert call.config["responseMimeType"] == "text/x.enum"
            assert call.config["responseSchema"]["enum"] == ["SAME", "DIFFERENT"]

        again = judge(ResponseCache(tmp_path / "cache.sqlite"))  # a re-run, through the same cache
        assert judged_answers(QUESTIONS, RAW, again).canon.tolist() == answers.canon.tolist()
        assert len(fake.calls) == len(calls)  # nothing paid twice (an unreadable verdict is a paid answer too)
        assert (again.stats.calls, again.stats.cost_usd, again.stats.cache_hits, again.unreadable) == (0, 0.0, 5, 1)
    assert parse_same_output("same.") is True and parse_same_output(" DIFFERENT ") is False
    assert parse_same_output("not the same") is None


def test_choosing_the_comparator():
    letters = [pd.DataFrame({"flash_answer": ["A", "c"], "pro_answer": ["B", None]})]
    text = [pd.DataFrame({"flash_answer": ["Paris"], "pro_answer": ["B"]})]
    assert choose_comparator("judge", letters, ["flash", "pro"])[:2] == ("letter", False)
    assert "no judge needed" in choose_comparator("judge", letters, ["flash", "pro"])[2]
    assert choose_comparator("text", letters, ["flash", "pro"])[:2] == ("letter", False)
    assert choose_comparator("judge", text, ["flash", "pro"])[:2] == ("text", True)
    assert choose_comparator("auto", text, ["flash", "pro"])[:2] == ("text", False)
    with pytest.raises(ValueError, match="unknown comparator 'llm'; expected one of auto, text, judge"):
        choose_comparator("llm", text, ["flash", "pro"])


def _outcomes() -> pd.DataFrame:
    """14 free-text rows (8 train, 3 validation, 3 test): too few for a learned cascade, a
    fixed one is released. flash-lite and flash word Paris differently on the training rows."""
    rows = []
    for i in range(14):
        split = "train" if i < 8 else "validation" if i < 11 else "test"
        answers = (["Paris", "The city of Paris", "Paris"] if i % 2 else ["Lyon", "Marseille", "Paris"])
        rows.append({"qid": f"q{i}", "query": f"Which city is meant by clue {i}?", "split": split,
                     **{f"{m}_answer": a for m, a in zip(MODELS, answers)},
                     **{f"{m}_grade": "Correct" if a.endswith("Paris") else "Incorrect"
                        for m, a in zip(MODELS, answers)},
                     **{f"{m}_cost_usd": c for m, c in zip(MODELS, (0.0001, 0.001, 0.01))}})
    return pd.DataFrame(rows)


def _materialise(defs, resources, artifacts, monkeypatch, comparator, llm=None):
    from router_pipeline.defs import cascade
    from router_pipeline.defs.resources import ModelPool
    from router_pipeline.llm.pool import offline_pool

    frame = _outcomes()
    monkeypatch.setattr(cascade, "query_only_p", lambda path, queries: (
        np.full((len(queries), 3), 0.6), np.array([0.0001, 0.001, 0.01]), {"knob": "quality", "knob_value": 0.95}))
    io = resources["io_manager"]
    write_asset(io, "pool_outcomes", frame)
    write_asset(io, "pool_routers", pd.DataFrame({"candidate": ["minilm_lda"], "path": [str(artifacts / "p")]}))
    write_asset(io, "pool_evaluation", pd.DataFrame({"qid": frame["qid"], "candidate": "minilm_lda"}))
    return dg.materialize(list(defs.assets), instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
                          resources={**resources, "pool": ModelPool.of(offline_pool()), **({"llm": llm} if llm else {})},
                          selection=["pool_cascade"], run_config={"ops": {"pool_cascade": {"config": {
                              "comparator": comparator, "bootstrap_resamples": 50}}}})


def _failure(result) -> str:
    return "\n".join(str(e.event_specific_data.error.message) for e in result.all_events if e.is_step_failure)


def test_pool_cascade_with_the_judge_reports_its_calls_and_cost_and_a_rerun_pays_nothing(
        defs, resources, artifacts, monkeypatch):
    from router_pipeline.defs.resources import LLMRoles
    from router_pipeline.llm.roles import offline_roles

    result = _materialise(defs, resources, artifacts, monkeypatch, "llm")
    assert not result.success and "unknown comparator 'llm'; expected one of auto, text, judge" in _failure(result)
    result = _materialise(defs, resources, artifacts, monkeypatch, "judge")  # the offline profile: no judge role
    assert not result.success and "comparator 'judge' needs an LLM judge role" in _failure(result)

    with FakeGemini(responder=_same_responder) as fake:
        llm = LLMRoles.of(replace(offline_roles(), judge=JUDGE, gemini_base_url=fake.base_url, max_attempts=2,
                                  backoff_base_s=0.01))
        metas = []
        for _ in range(2):
            result = _materialise(defs, resources, artifacts, monkeypatch, "judge", llm)
            assert result.success, _failure(result)
            metas.append(result.asset_materializations_for_node("pool_cascade")[0].metadata)
        # Every row its own question: a call for Paris vs the city of Paris on each of the 7 odd rows, 3 on each
        # even row (Marseille vs Lyon, Paris vs Lyon, Paris vs Marseille), on every split; pro's "Paris" matches.
        first, second = metas
        assert first["comparator"].value == "judge" and first["served_comparator"].value == "text"
        assert first["judge_model"].value == "gemini:gemini-2.5-pro"
        calls = first["judge_calls"].value
        assert calls == len(fake.calls) == first["judge_pairs"].value == 7 + 7 * 3 and first["judge_unreadable_or_failed"].value == 0
        assert first["comparator_cost_usd"].value > 0
        assert (second["judge_calls"].value, second["comparator_cost_usd"].value) == (0, 0.0)
        assert second["judge_cache_hits"].value == calls and len(fake.calls) == calls  # nothing paid twice
    pairs = {r.data["models"]: r.data for r in first["agreement_on_training_rows"].value.records}
    assert pairs["flash-lite + flash"]["agree"] == 0.5 and pairs["flash-lite + flash"]["agree_by_normalised_text"] == 0
    assert pairs["flash-lite + pro"]["agree"] == pairs["flash-lite + pro"]["agree_by_normalised_text"] == 0.5
    released = json.loads((artifacts / "pool_cascade" / "cascade.json").read_text())
    assert released["comparator"] == "text" and released["about"]["fitted_with_comparator"] == "judge"


def test_pool_cascade_compares_by_normalised_text_by_default_at_no_cost(defs, resources, artifacts, monkeypatch):
    result = _materialise(defs, resources, artifacts, monkeypatch, "auto")
    assert result.success, _failure(result)
    meta = result.asset_materializations_for_node("pool_cascade")[0].metadata
    assert (meta["comparator"].value, meta["judge_calls"].value, meta["comparator_cost_usd"].value) == ("text", 0, 0.0)
    pairs = {r.data["models"]: r.data for r in meta["agreement_on_training_rows"].value.records}
    assert pairs["flash-lite + flash"]["agree"] == 0 and "agree_by_normalised_text" not in pairs["flash-lite + flash"]

