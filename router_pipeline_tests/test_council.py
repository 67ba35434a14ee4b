"""llm-council session files -> routing labels, on files written here."""

import json

import dagster as dg
import pandas as pd
import pytest

from router_pipeline.labels import council
from router_pipeline.policies import AMBIGUOUS, COMPLEX, STANDARD
from router_pipeline.text import query_hash

FLASH, PRO, OTHER = "gemini-2.5-flash", "gemini-2.5-pro", "openai/gpt-4o"


def session(query, rankings, models=(FLASH, PRO, OTHER), shape="dict", stored=None, reviewers=None):
    """A full llm-council session: ``rankings`` is one list of models (best first) per
    reviewer (None = the reviewer abstained); reviewers default to the models in order."""
    labels = [f"Response {chr(65 + i)}" for i in range(len(models))]
    label_of = dict(zip(models, labels))
    l2m = {lab: ({"model": m, "display_index": i} if shape == "dict" else m) for i, (lab, m) in enumerate(zip(labels, models))}
    stage2 = []
    for reviewer, ranking in zip(reviewers or models, rankings):
        parsed = None if ranking is None else {"ranking": [label_of[m] for m in ranking], "scores": {}}
        stage2.append({"model": reviewer, "ranking": "FINAL RANKING: ...", "parsed_ranking": parsed})
    return {"query": query, "stage1_results": [{"model": m, "response": "..."} for m in models],
            "stage2_results": stage2, "stage3_result": {"model": PRO, "response": "..."},
            "metadata": {"label_to_model": l2m, "aggregate_rankings": stored or []}}


def write(folder, name, obj):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def labels_by_query(result):
    return {r["query"]: r for r in result.labels.to_dict("records")}


def test_clear_win_by_the_large_model_is_complex_with_dict_shape(tmp_path):
    # Every reviewer, once its own response is left out, puts PRO first.
    write(tmp_path, "a.json", session("Who designed the Abasto market?",
                                      [[PRO, FLASH, OTHER], [OTHER, PRO, FLASH], [PRO, OTHER, FLASH]],
                                      reviewers=[FLASH, OTHER, "judge"]))
    result = council.read_folder(tmp_path)
    (row,) = result.labels.to_dict("records")
    assert row["policy"] == COMPLEX and row["winner"] == PRO and row["source"] == "council"
    assert row["agreement"] == 1.0  # OTHER's self-vote does not count
    assert row["reviewers"] == 3 and row["file"] == "a.json" and row["query_hash"] == query_hash(row["query"])
    assert row["qid"] == f"council-{row['query_hash']}"


def test_string_shape_and_medium_winner_is_standard(tmp_path):
    write(tmp_path, "b.json", session("What is the capital of France?",
                                      [[PRO, FLASH, OTHER], [FLASH, OTHER, PRO], [FLASH, PRO, OTHER]], shape="str"))
    (row,) = council.read_folder(tmp_path).labels.to_dict("records")
    # Without self-votes: FLASH's reviewer ranks [PRO, OTHER], PRO's [FLASH, OTHER], OTHER's [FLASH, PRO].
    assert row["winner"] == FLASH and row["policy"] == STANDARD
    # FLASH's own ballot cannot vote for FLASH, so it is not counted against it: both others agree.
    assert row["agreement"] == 1.0 and row["reviewers"] == 2
    assert row["winner_borda"] == pytest.approx(1.0)  # FLASH first in both ballots that include it


def test_self_votes_are_left_out_by_default(tmp_path):
    # PRO votes itself first; the two others prefer FLASH.
    s = session("Which river did the fleet anchor on?", [[FLASH, PRO, OTHER], [PRO, FLASH, OTHER], [FLASH, PRO, OTHER]],
                reviewers=[OTHER, PRO, OTHER])
    write(tmp_path, "c.json", s)
    assert council.read_folder(tmp_path).labels["winner"].tolist() == [FLASH]
    with_self = council.read_folder(tmp_path, council.CouncilRules(exclude_self_votes=False, min_agreement=0.0))
    assert with_self.labels["agreement"].iloc[0] == pytest.approx(2 / 3)  # PRO's self-vote now counts against


def test_tie_is_a_deadlock_ambiguous_or_dropped(tmp_path):
    s = session("Is this a tie?", [[PRO, FLASH], [FLASH, PRO]], models=(FLASH, PRO), reviewers=[OTHER, "judge-x"])
    write(tmp_path, "tie.json", s)
    (row,) = council.read_folder(tmp_path).labels.to_dict("records")
    assert row["policy"] == AMBIGUOUS and "deadlock" in row["rationale"]
    dropped = council.read_folder(tmp_path, council.CouncilRules(deadlock="drop"))
    assert dropped.labels.empty and "deadlock" in dropped.rejected[0]["reason"]


def test_low_agreement_dropped_or_ambiguous(tmp_path):
    s = session("Split vote?", [[PRO, FLASH, OTHER], [FLASH, PRO, OTHER], [PRO, OTHER, FLASH]],
                reviewers=["r1", "r2", "r3"])
    write(tmp_path, "split.json", s)
    default = council.read_folder(tmp_path, council.CouncilRules(min_agreement=0.7))
    assert default.labels.empty and "agreement 0.67 < 0.70" in default.rejected[0]["reason"]
    amb = council.read_folder(tmp_path, council.CouncilRules(min_agreement=0.7, low_agreement="ambiguous"))
    assert amb.labels["policy"].tolist() == [AMBIGUOUS]


def test_single_model_council_and_abstaining_reviewers(tmp_path):
    write(tmp_path, "solo.json", session("Alone?", [[PRO]], models=(PRO,)))
    write(tmp_path, "abstain.json", session("Some abstain?", [None, [PRO, FLASH, OTHER], None],
                                            reviewers=["r1", "r2", "r3"]))
    write(tmp_path, "all_abstain.json", session("All abstain?", [None, None, None], reviewers=["r1", "r2", "r3"]))
    result = council.read_folder(tmp_path)
    reasons = {r["file"]: r["reason"] for r in result.rejected}
    assert "single-model council" in reasons["solo.json"]
    assert "every reviewer abstained" in reasons["all_abstain.json"]
    (row,) = result.labels.to_dict("records")
    assert row["query"] == "Some abstain?" and row["reviewers"] == 1 and row["policy"] == COMPLEX


def test_stored_aggregates_are_recomputed_and_disagreements_reported(tmp_path):
    stored = [{"model": PRO, "borda_score": 0.9, "average_position": 1.3, "vote_count": 3, "rank": 1},
              {"model": FLASH, "borda_score": 0.25, "average_position": 2.5, "vote_count": 3, "rank": 2}]
    rankings = [[PRO, FLASH, OTHER], [PRO, OTHER, FLASH], [PRO, FLASH, OTHER]]
    write(tmp_path, "s.json", session("Recompute me?", rankings, stored=stored, reviewers=["r1", "r2", "r3"]))
    result = council.read_folder(tmp_path)
    fields = {d["field"]: d for d in result.disagreements}
    assert fields["borda_score[gemini-2.5-pro]"]["recomputed"] == 1.0  # stored 0.9 is wrong
    assert fields["borda_score[gemini-2.5-flash]"]["recomputed"] == pytest.approx(1 / 3)  # (.5 + 0 + .5) / 3, not .25
    assert "borda_score[openai/gpt-4o]" not in fields  # not stored: nothing to compare
    assert len(result.labels) == 1


def test_jsonl_export_lines_one_bad_line_loses_nothing(tmp_path):
    good = {"query": "Who wrote Hamlet?", "query_hash": council.llm_council_hash("Who wrote Hamlet?"),
            "best_model": FLASH, "borda_score": 0.95, "council_agreement": 0.2, "timestamp": "2026-11-01T10:00:00"}
    wrong_hash = {**good, "query": "Who painted Guernica?", "query_hash": "0000000000000000", "best_model": PRO}
    lines = [json.dumps(good), "{not json", json.dumps({"query": "No model?", "borda_score": 0.9}),
             json.dumps({**good, "query": "Bad score", "borda_score": 7}), "", json.dumps(wrong_hash)]
    write(tmp_path, "export.jsonl", "\n".join(lines))
    result = council.read_folder(tmp_path)
    by_q = labels_by_query(result)
    assert by_q["Who wrote Hamlet?"]["policy"] == STANDARD and by_q["Who painted Guernica?"]["policy"] == COMPLEX
    assert by_q["Who wrote Hamlet?"]["agreement"] == 0.95  # the stored borda, not llm-council's agreement
    reasons = {r["session"]: r["reason"] for r in result.rejected}
    assert "malformed JSON" in reasons["line 2"] and "best_model" in reasons["line 3"]
    assert "within [0, 1]" in reasons["line 4"]
    assert any(d["field"] == "query_hash" and d["session"] == "line 6" for d in result.disagreements)


def test_malformed_files_and_missing_fields_are_listed_with_reasons(tmp_path):
    write(tmp_path, "ok.json", session("Valid one?", [[PRO, FLASH, OTHER]] * 3, reviewers=["r1", "r2", "r3"]))
    write(tmp_path, "broken.json", '{"query": "cut off", "stage2_results": [')
    write(tmp_path, "nometa.json", {"query": "No metadata?", "stage2_results": []})
    write(tmp_path, "noquery.json", {**session("x", [[PRO, FLASH, OTHER]]), "query": ""})
    write(tmp_path, "sub/list.json", [session("In a list?", [[FLASH, PRO, OTHER]] * 3, reviewers=["a", "b", "c"]), 42])
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    write(tmp_path, "notes.txt", "ignored: not a session file")
    result = council.read_folder(tmp_path)
    reasons = {(r["file"], r["session"]): r["reason"] for r in result.rejected}
    assert "malformed JSON" in reasons[("broken.json", "")]
    assert "label_to_model" in reasons[("nometa.json", "#0")]
    assert "empty query" in reasons[("noquery.json", "#0")]
    assert "must be a JSON object" in reasons[("sub/list.json", "#1")]
    assert "unreadable" in reasons[("binary.json", "")]
    assert sorted(result.labels["query"]) == ["In a list?", "Valid one?"] and result.files == 6


def test_unknown_winner_tier_and_huge_query(tmp_path):
    write(tmp_path, "x.json", session("Other wins?", [[OTHER, PRO, FLASH]] * 3, reviewers=["a", "b", "c"]))
    write(tmp_path, "y.json", session("q" * 5000, [[PRO, FLASH, OTHER]] * 3, reviewers=["a", "b", "c"]))
    result = council.read_folder(tmp_path)
    reasons = {r["file"]: r["reason"] for r in result.rejected}
    assert "no tier in model_tiers" in reasons["x.json"] and "5000 characters" in reasons["y.json"]
    tiers = council.CouncilRules(model_tiers={OTHER: "large"})
    assert council.read_folder(tmp_path, tiers).labels["policy"].tolist() == [COMPLEX]


def test_test_split_queries_never_become_labels(tmp_path):
    write(tmp_path, "t.json", [session("Held out question?", [[PRO, FLASH, OTHER]] * 3, reviewers=["a", "b", "c"]),
                               session("Train question?", [[PRO, FLASH, OTHER]] * 3, reviewers=["a", "b", "c"])])
    labels = council.read_folder(tmp_path).labels
    kept, rejected = council.drop_test_queries(labels, pd.DataFrame({"query": ["  held OUT question "]}))
    assert kept["query"].tolist() == ["Train question?"]
    assert rejected[0]["reason"] == "query is in the test split"


def test_council_labels_join_training_examples_with_precedence_and_conflicts(tmp_path, defs, resources):
    from router_pipeline.defs.resources import CouncilInbox

    folder = tmp_path / "council"
    write(folder, "s.json", [session("Who designed the Abasto market?", [[PRO, FLASH, OTHER]] * 3, reviewers=["a", "b", "c"]),
                             session("Held out question?", [[PRO, FLASH, OTHER]] * 3, reviewers=["a", "b", "c"]),
                             session("A brand new council query?", [[FLASH, PRO, OTHER]] * 3, reviewers=["a", "b", "c"])])
    write(folder, "broken.json", "{")
    io = resources["io_manager"]
    frames = {
        "train_questions": pd.DataFrame({"qid": ["q1"], "query": ["Who designed the Abasto market?"], "gold_answer": ["Delpini"]}),
        "test_questions": pd.DataFrame({"qid": ["q2"], "query": ["Held out question?"], "gold_answer": ["x"]}),
        "answers": pd.DataFrame({"qid": ["q1"], "tier": ["medium"], "answer": ["Delpini"], "status": ["ok"]}),
        "oracle_labels": pd.DataFrame({"qid": ["q1"], "query": ["Who designed the Abasto market?"], "medium_label": ["Correct"],
                                       "large_label": ["Correct"], "policy": [STANDARD], "rationale": ["both right"]}),
    }
    for key, frame in frames.items():
        path = io.path_for(dg.AssetKey(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path)

    def run(precedence):
        return dg.materialize(list(defs.assets), selection=["council_labels", "query_analyses", "training_examples"],
                              instance=dg.DagsterInstance.ephemeral(),
                              resources={**resources, "council_inbox": CouncilInbox(folder=str(folder))},
                              run_config={"ops": {"training_examples": {"config": {"precedence": precedence}}}})

    result = run("oracle")
    assert result.success
    meta = {m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()}
    assert meta["council_labels"]["labels"].value == 2 and meta["council_labels"]["rejected_in_test_split"].value == 1
    rejected = {r.data["file"]: r.data["reason"] for r in meta["council_labels"]["rejected_items"].value.records}
    assert "malformed JSON" in rejected["broken.json"]
    assert meta["training_examples"]["oracle_council_conflicts"].value == 1
    examples = pd.read_parquet(io.path_for(dg.AssetKey("training_examples")))
    by_q = dict(zip(examples["query"], zip(examples["policy"], examples["source"])))
    assert by_q["Who designed the Abasto market?"] == (STANDARD, "oracle")
    assert by_q["A brand new council query?"] == (STANDARD, "council") and "Held out question?" not in by_q
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"no_test_queries": True}

    run("council")
    examples = pd.read_parquet(io.path_for(dg.AssetKey("training_examples")))
    assert dict(zip(examples["query"], examples["policy"]))["Who designed the Abasto market?"] == COMPLEX

    # A train row whose query is a test query in other spelling (say, a re-import under
    # a new qid): the check compares the stored examples with the test split and blocks.
    leak = {"qid": "q3", "query": " held OUT question"}
    for key in ("train_questions", "oracle_labels"):
        frame = pd.concat([frames[key], pd.DataFrame([{**frames[key].iloc[0].to_dict(), **leak}])], ignore_index=True)
        frame.to_parquet(io.path_for(dg.AssetKey(key)))
    leaked = dg.materialize(list(defs.assets), selection=["query_analyses", "training_examples"],
                            instance=dg.DagsterInstance.ephemeral(), resources=resources, raise_on_error=False)
    (check,) = leaked.get_asset_check_evaluations()
    assert not check.passed and check.metadata["test_queries_in_training"].value == 1


def test_a_two_model_council_yields_a_label(tmp_path):
    # FLASH ranks PRO's answer above its own; PRO ranks itself first (a self-vote, left out).
    write(tmp_path, "two.json", session("Who signed the 1897 canal contract?", [[PRO, FLASH], [PRO, FLASH]],
                                        models=(FLASH, PRO)))
    (row,) = council.read_folder(tmp_path).labels.to_dict("records")
    assert row["winner"] == PRO and row["policy"] == COMPLEX and row["agreement"] == 1.0 and row["reviewers"] == 1
    # Each model prefers its own answer: no evidence either way, a deadlock.
    write(tmp_path, "two.json", session("Who signed it?", [[FLASH, PRO], [PRO, FLASH]], models=(FLASH, PRO)))
    (row,) = council.read_folder(tmp_path).labels.to_dict("records")
    assert row["policy"] == AMBIGUOUS and "deadlock" in row["rationale"]


@pytest.mark.parametrize("name,content,reason", [
    ("list_model.json", None, None),
    ("deep.json", "[" * 100_000, "nested too deeply"),
    ("bool.jsonl", json.dumps({"query": "Q?", "best_model": PRO, "borda_score": True}), "is a boolean"),
    ("surrogate.jsonl", '{"query": "\\ud800?", "best_model": "x", "borda_score": 0.9}', "not valid Unicode"),
])
def test_one_malformed_file_never_costs_the_others(tmp_path, name, content, reason):
    good = session("Who designed the Abasto market?", [[PRO, FLASH, OTHER], [OTHER, PRO, FLASH], [PRO, OTHER, FLASH]],
                   reviewers=[FLASH, OTHER, "judge"])
    write(tmp_path, "good.json", good)
    if content is None:  # an aggregate_rankings entry whose model is a list (unhashable)
        content = json.dumps({**good, "query": "Another question?", "metadata": {
            **good["metadata"], "aggregate_rankings": [{"model": [PRO], "borda_score": 0.5}]}})
    write(tmp_path, name, content)
    result = council.read_folder(tmp_path)
    assert "Who designed the Abasto market?" in set(result.labels["query"])
    if reason:
        assert any(r["file"] == name and reason in r["reason"] for r in result.rejected), result.rejected
    else:
        assert "Another question?" in set(result.labels["query"])


def test_a_bom_prefixed_file_is_read(tmp_path):
    good = session("Who designed the Abasto market?", [[PRO, FLASH, OTHER], [OTHER, PRO, FLASH], [PRO, OTHER, FLASH]],
                   reviewers=[FLASH, OTHER, "judge"])
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode())
    assert len(council.read_folder(tmp_path).labels) == 1


def test_fuzzed_session_files_never_fail_the_folder(tmp_path):
    """Property: whatever a session file holds, read_folder returns, and the valid file's label survives."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = session("Who designed the Abasto market?", [[PRO, FLASH, OTHER], [OTHER, PRO, FLASH], [PRO, OTHER, FLASH]],
                   reviewers=[FLASH, OTHER, "judge"])
    leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
    value = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                         max_leaves=10)

    def mutate(draw_path, new):
        obj = json.loads(json.dumps(good))
        node = obj
        for key in draw_path[:-1]:
            node = node[key]
        node[draw_path[-1]] = new
        return obj

    paths = st.sampled_from([["query"], ["stage2_results"], ["stage2_results", 0], ["stage2_results", 0, "parsed_ranking"],
                             ["stage2_results", 1, "model"], ["metadata"], ["metadata", "label_to_model"],
                             ["metadata", "label_to_model", "Response A"], ["metadata", "aggregate_rankings"]])

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(path=paths, new=value)
    def check(path, new):
        folder = tmp_path / "fuzz"
        write(folder, "good.json", good)
        write(folder, "bad.json", json.dumps(mutate(path, new)))
        result = council.read_folder(folder)
        assert "Who designed the Abasto market?" in set(result.labels["query"])
        assert all(r["reason"] for r in result.rejected)

    check()


def test_full_sessions_give_a_pools_models_their_answers_judged_against_the_council(tmp_path):
    """A session's stage-1 answers of pool models (by id, OpenRouter id or pool name) are
    recorded answers under their pool names, the final answer their reference; sessions
    without a final answer or a pool model's answer, or about a known question, are left
    out saying why; the same query twice is the first file's."""
    from router_pipeline.llm.pool import pool_from_dict

    pool = pool_from_dict([{"name": "flash", "backend": "gemini", "model": FLASH, "input_usd_per_mtok": 0.3,
                            "output_usd_per_mtok": 2.5},
                           {"name": "pro", "backend": "gemini", "model": PRO, "input_usd_per_mtok": 1.25,
                            "output_usd_per_mtok": 10.0}])
    ranks = [[PRO, FLASH, OTHER], [PRO, OTHER, FLASH], [PRO, FLASH, OTHER]]
    base = session("Who designed the Abasto market?", ranks)
    base["stage1_results"] = [{"model": f"google/{FLASH}", "response": "Delpini"}, {"model": PRO, "response": "José Luis Delpini"},
                              {"model": OTHER, "response": "Gaudí"}]
    base["stage3_result"] = {"model": PRO, "response": "José Luis Delpini"}
    base["metadata"]["label_to_model"] = {"Response A": f"google/{FLASH}", "Response B": PRO, "Response C": OTHER}
    write(tmp_path, "a.json", base)
    write(tmp_path, "b.json", {**base, "stage3_result": {"model": PRO, "response": "someone else"}})  # same query
    write(tmp_path, "c.json", {**session("What is 2+2?", ranks), "stage3_result": {"model": PRO, "response": " "}})
    only_other = session("Which river crosses Lyon?", ranks)
    only_other["stage1_results"] = [{"model": OTHER, "response": "The Rhône"}]
    write(tmp_path, "d.json", only_other)
    known = session("Who wrote Hamlet?", ranks)
    known["stage3_result"]["response"] = "Shakespeare"
    write(tmp_path, "e.json", known)
    sessions = council.read_folder(tmp_path).sessions
    rows, rejected = council.pool_question_rows(sessions, council.pool_names(pool.models), {query_hash("Who wrote Hamlet?")})
    assert rows[["query", "gold_answer", "flash_answer", "pro_answer"]].values.tolist() == [
        ["Who designed the Abasto market?", "José Luis Delpini", "Delpini", "José Luis Delpini"]]
    assert rows["provenance"].tolist() == ["council:a.json #0"] and rows["qid"].tolist() == [
        query_hash("Who designed the Abasto market?")]
    assert {r["file"]: r["reason"] for r in rejected} == {
        "c.json": "no final (stage 3) answer to judge against",
        "d.json": "no answer from a pool model (flash, pro)",
        "e.json": "query is already a question of the train or test split"}
