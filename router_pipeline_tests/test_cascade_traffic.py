"""The cascade labels its own traffic: what the routing server's cascades answered
(serve/feedback.record_cascade, exported by ``router-pipeline export-outcomes`` to
``<out>.cascade.jsonl``) read by the ``cascade`` question source, graded by agreement
with no judge call, and on to the pool's answers, judgments and outcomes."""

import json
import sqlite3

import dagster as dg
import pandas as pd
import pytest

from router_pipeline.labels.questions import QuestionSourceError, SourceSpec, load_questions, load_sources
from router_pipeline.policies import CORRECT, IDK, INCORRECT
from router_pipeline.serve.feedback import FeedbackStore, record_cascade

POOL = ("flash-lite", "flash", "pro")
COST = {"flash-lite": 0.0001, "flash": 0.0004, "pro": 0.004}
# (request id, query, answers (None: the call gave no answer), agreed), as the gateway records them.
SERVED = [
    ("r0", "Which planet is known as the red planet? A) Venus B) Mars", {"flash-lite": "B", "flash": "b"}, "B"),
    ("r1", "Who wrote Faust? A) Goethe B) Schiller C) Marlowe", {"flash-lite": "A", "flash": "C", "pro": "C"}, "C"),
    ("r2", "What is the airspeed of a laden swallow?", {"flash-lite": "A", "flash": "C", "pro": "D"}, None),
    ("r3", "What is the capital of France?", {"flash-lite": "I don't know", "flash": None, "pro": "Paris."}, None),
    ("r4", "Which city hosts the Louvre?", {"flash-lite": "I don't know", "flash": "Paris", "pro": "paris"}, "Paris"),
]


def _served(folder):
    """A state database holding the cascades' rows of SERVED (r3: flash failed, the rest disagreed)."""
    store = FeedbackStore(folder)
    for rid, query, answers, agreed in SERVED:
        record_cascade(store.db, rid, "team", query, answers, {m: COST[m] if a else 0.0 for m, a in answers.items()},
                       agreed)
    store.close()
    return folder / "requests.sqlite"


def _exported(tmp_path):
    """The file `router-pipeline export-outcomes` writes beside the outcomes rows."""
    from router_pipeline.serve import cli

    _served(tmp_path / "feedback")
    out = tmp_path / "export" / "outcomes.jsonl"
    assert cli.main(["export-outcomes", "--feedback-dir", str(tmp_path / "feedback"), "--out", str(out)]) == 0
    return out.with_suffix(".cascade.jsonl")


def _grades(frame) -> dict:
    return {q: {m: frame.set_index("query").loc[q, f"{m}_grade"] for m in POOL} for q in frame["query"]}


EXPECTED = {  # agreement's grades: the agreed answer's models Correct, the others Incorrect, an abstention IDK
    SERVED[0][1]: {"flash-lite": CORRECT, "flash": CORRECT, "pro": None},  # pro not called: no outcome
    SERVED[1][1]: {"flash-lite": INCORRECT, "flash": CORRECT, "pro": CORRECT},
    SERVED[2][1]: {"flash-lite": None, "flash": None, "pro": None},  # no agreement: nobody graded
    SERVED[3][1]: {"flash-lite": None, "flash": None, "pro": None},
    SERVED[4][1]: {"flash-lite": IDK, "flash": CORRECT, "pro": CORRECT},  # "paris" is the agreed "Paris"
}


@pytest.mark.parametrize("where", ["export", "database"])
def test_cascade_rows_are_graded_by_agreement_from_the_export_or_the_state_database(tmp_path, where):
    path = _exported(tmp_path) if where == "export" else _served(tmp_path / "feedback")
    merged = load_sources([SourceSpec("cascade", str(path))])
    frame = merged.frame
    assert merged.rejected == [] and len(frame) == len(SERVED)
    assert _grades(frame) == EXPECTED
    by_query = frame.set_index("query")
    # Every answer a model gave is recorded with its cost (never paid again); a model not called, or whose call
    # gave no answer (flash on r3), has none.
    assert by_query.loc[SERVED[1][1], "pro_answer"] == "C" and by_query.loc[SERVED[1][1], "pro_cost_usd"] == COST["pro"]
    assert pd.isna(by_query.loc[SERVED[0][1], "pro_answer"]) and pd.isna(by_query.loc[SERVED[0][1], "pro_cost_usd"])
    assert pd.isna(by_query.loc[SERVED[3][1], "flash_answer"]) and pd.isna(by_query.loc[SERVED[3][1], "flash_cost_usd"])
    assert by_query.loc[SERVED[2][1], "flash_answer"] == "C" and frame["gold_answer"].isna().all()
    assert frame["provenance"].unique().tolist() == [f"cascade:{path.name}"]
    (counts,) = merged.cascade
    assert {k: counts[k] for k in ("rows_read", "graded_by_agreement", "left_ungraded", "rejected")} == {
        "rows_read": 5, "graded_by_agreement": 3, "left_ungraded": 2, "rejected": 0}
    assert counts["grades_by_model"] == {"flash-lite": {CORRECT: 1, INCORRECT: 1, IDK: 1}, "flash": {CORRECT: 3},
                                         "pro": {CORRECT: 2}}


def test_a_malformed_cascade_row_is_reported_with_its_file_and_line_and_the_others_are_kept(tmp_path):
    path = _exported(tmp_path)
    good = path.read_text().splitlines()
    bad = [
        '{"query": "Broken?", "flash_answer": "A",',  # line 6: not JSON
        json.dumps({"query": "Agreed by whom?", "flash-lite_answer": "A", "flash_answer": "B", "agreed": "Z"}),
        json.dumps({"query": "What does it cost?", "flash-lite_answer": "A", "flash_answer": "A",
                    "flash_cost_usd": "cheap", "agreed": "A"}),
        json.dumps({"query": "A traffic row?", "flash_answer": "A", "flash_cost_usd": 0.001}),  # no agreed field
        json.dumps({"query": "Numbers?", "flash-lite_answer": 4, "flash_answer": "4", "agreed": "4"}),
    ]
    path.write_text("\n".join(good[:2] + bad + good[2:]) + "\n")
    frame, rejected = load_questions("cascade", path=str(path))
    assert _grades(frame) == EXPECTED  # every good row, before and after the bad ones
    reasons = {r.row: r.reason for r in rejected}
    assert sorted(reasons) == [3, 4, 5, 6, 7]
    assert reasons[3].startswith("outcomes.cascade.jsonl: broken JSON")
    assert reasons[4].startswith("outcomes.cascade.jsonl line 4: agreed answer 'Z' is the answer of 0 of its models")
    assert reasons[5] == "flash_cost_usd is 'cheap', not a number"
    assert reasons[6].startswith("outcomes.cascade.jsonl line 6: no 'agreed' field: not a cascade row")
    assert reasons[7] == "outcomes.cascade.jsonl line 7: flash-lite_answer is int, not text"
    counts = load_sources([SourceSpec("cascade", str(path))]).cascade[0]
    assert (counts["rows_read"], counts["graded_by_agreement"], counts["left_ungraded"], counts["rejected"]) == (
        10, 3, 2, 5)

    # A cell of the state database that is not a JSON object: that row alone, named by its table row and request.
    db = _served(tmp_path / "other")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE cascade_outcomes SET answers = 'not json' WHERE request_id = 'r2'")
    frame, rejected = load_questions("cascade", path=str(db))
    assert len(frame) == 4 and [(r.row, r.reason) for r in rejected] == [
        (3, "requests.sqlite cascade_outcomes row 3: request r2: its answers are not a JSON object")]
    # A file of anything else is refused whole, saying what the source reads.
    (tmp_path / "o.csv").write_text("query\nq?\n")
    with pytest.raises(QuestionSourceError, match="export-outcomes"):
        load_questions("cascade", path=str(tmp_path / "o.csv"))
    (tmp_path / "t.jsonl").write_text(json.dumps({"query": "q?", "flash_answer": "A"}) + "\n")
    with pytest.raises(QuestionSourceError, match="no valid question"):  # a traffic row only: no cascade row
        load_questions("cascade", path=str(tmp_path / "t.jsonl"))


def test_the_questions_asset_reports_the_cascade_counts(tmp_path):
    from router_pipeline.defs.data import questions_

    path = _exported(tmp_path)
    path.write_text(path.read_text() + "not json\n")
    result = dg.materialize([questions_], run_config={"ops": {"questions": {"config": {
        "sources": [{"source": "cascade", "path": str(path)}], "sample_size": 0}}}})
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert (meta["rows"].value, meta["rejected_rows"].value) == (5, 1)
    assert {k: meta[f"cascade_{k}"].value for k in ("rows_read", "graded_by_agreement", "left_ungraded", "rejected")} \
        == {"rows_read": 6, "graded_by_agreement": 3, "left_ungraded": 2, "rejected": 1}
    assert [r.data for r in meta["cascade_sources"].value.records] == [{
        "source": "cascade:outcomes.cascade.jsonl", "rows_read": 6, "graded_by_agreement": 3, "left_ungraded": 2,
        "rejected": 1}]
    assert meta["cascade_grades_by_model"].value["pro"] == {CORRECT: 2}


def test_agreement_grades_reach_the_pool_outcomes_without_a_judge_call(tmp_path):
    """pool_answers records the cascade's answers (no call); a model the cascade did not call is
    answered like any traffic query. pool_judgments takes agreement's grades as recorded: no judge
    call; without a judge the other answers stay ungraded, and pool_routers' reading of the outcomes
    leaves those rows out, each with its reason. With a judge, only the ungraded answers are judged."""
    from router_pipeline.labels.answering import generate_answers
    from router_pipeline.labels.judging import judge_answers
    from router_pipeline.labels.outcomes import outcomes_table, read_outcomes
    from router_pipeline.llm import RoleSpec, make_client
    from router_pipeline.llm.fake_gemini import FakeGemini
    from router_pipeline.llm.runner import RetryPolicy

    frame, _ = load_questions("cascade", path=str(_exported(tmp_path)))
    questions = frame.assign(split="train")
    roles = {m: RoleSpec("gemini", f"gemini-2.5-{m}") for m in POOL}
    rubric = json.dumps({"grade": "CORRECT", "reason": "plausible"})
    with FakeGemini(responder=lambda model, prompt: rubric if "Answer to grade" in prompt else "B") as fake:
        clients = {m: make_client(s, gemini_base_url=fake.base_url) for m, s in roles.items()}
        retry = RetryPolicy(max_attempts=1)
        answers, stats = generate_answers(questions, roles, clients, None, retry=retry, progress=False)
        # Only what the cascade did not answer is called: pro on r0, flash on r3.
        assert sorted((c.model for c in fake.calls)) == ["gemini-2.5-flash", "gemini-2.5-pro"]
        assert (answers["status"] == "recorded").sum() == 3 * len(SERVED) - 2
        judged, judge_stats = judge_answers(answers, questions, judge=None)
        assert judge_stats.calls == 0
        labels = judged.assign(query=judged["qid"].map(dict(zip(questions["qid"], questions["query"]))))
        recorded = labels[labels["judge"] == "recorded"]
        assert {(q, t): lab for q, t, lab in zip(recorded["query"], recorded["tier"], recorded["label"])} == {
            (q, m): g for q, grades in EXPECTED.items() for m, g in grades.items() if g is not None}
        assert labels.loc[labels["judge"] != "recorded", "label"].isna().all()  # no reference, no judge: ungraded

        table = outcomes_table(questions, answers, judged, list(POOL))
        outcomes = read_outcomes(table.drop(columns=["split"]), list(POOL))
        assert set(outcomes.frame["query"]) == {SERVED[1][1], SERVED[4][1]}  # every model graded by agreement
        reasons = sorted(reason for _, reason in outcomes.rejected)
        assert len(reasons) == 3 and all("grade None is not one of" in r for r in reasons)
        assert [r.split(":")[0] for r in reasons] == ["flash-lite", "flash-lite", "pro"]  # r2 and r3; r0: pro

        # A judge configured: it grades the answers agreement left ungraded (against the rubric), and only those.
        judge = RoleSpec("gemini", "gemini-2.5-pro", max_output_tokens=64)
        judged, judge_stats = judge_answers(answers, questions, judge=judge, client=make_client(
            judge, gemini_base_url=fake.base_url), retry=retry, progress=False)
    ungraded = sum(g is None for grades in EXPECTED.values() for g in grades.values())
    assert judge_stats.calls == ungraded == 7 and judged["label"].notna().all()
    assert (judged["judge"] == "recorded").sum() == 3 * len(SERVED) - ungraded
