import json

import pandas as pd
import pytest

from router_pipeline.policies import CORRECT, IDK, INCORRECT
from router_pipeline.labels.questions import QuestionSourceError, load_questions, parse_grade
from router_pipeline.labels.split import assign_split, outer_folds, ratio_tolerance, split_questions


def test_bundled_simpleqa_loads_whole():
    frame, rejected = load_questions(sample_size=0)
    assert len(frame) + len(rejected) == 4326
    assert len(frame) > 4300
    assert frame["qid"].is_unique
    assert frame["gold_answer"].notna().all()
    assert set(frame["topic"].dropna()) >= {"Science and technology", "Art"}


def test_sample_is_stable_when_rows_are_added(tmp_path):
    full, _ = load_questions(sample_size=0)
    small = full.iloc[:2000]
    path_small, path_full = tmp_path / "small.jsonl", tmp_path / "full.jsonl"
    for frame, path in ((small, path_small), (full, path_full)):
        frame[["query", "gold_answer"]].to_json(path, orient="records", lines=True)
    a, _ = load_questions("jsonl", path=str(path_small), sample_size=50)
    b, _ = load_questions("jsonl", path=str(path_full), sample_size=50)
    assert len(a) == 50 and len(b) == 50
    # Every question of the larger sample that was already in the small source was sampled there too.
    assert set(b["qid"]) & set(small["qid"]) <= set(a["qid"])


def test_split_is_stable_and_disjoint():
    frame, _ = load_questions(sample_size=0)
    side_full = assign_split(frame)
    train, test = split_questions(frame)
    assert not set(train["qid"]) & set(test["qid"])
    share = len(test) / len(frame)
    assert abs(share - 0.2) <= ratio_tolerance(len(frame), 0.2)
    # Removing rows and adding new ones never moves an existing question.
    subset = frame.iloc[::3]
    extra = pd.DataFrame({"qid": [f"new{i}" for i in range(500)]})
    grown = pd.concat([subset[["qid"]], extra], ignore_index=True)
    side_grown = assign_split(grown)
    assert (side_grown.iloc[: len(subset)].values == side_full.iloc[::3].values).all()
    # Another seed gives another split.
    assert (assign_split(frame, seed=7) != side_full).any()


def test_bad_jsonl_rows_are_named_and_the_rest_kept(tmp_path):
    path = tmp_path / "custom.jsonl"
    lines = [
        json.dumps({"question": "What is the capital of Peru?", "answer": "Lima"}),
        '{"question": "broken", ',
        json.dumps({"question": "   ", "answer": "x"}),
        json.dumps({"question": "Q" * 5000, "answer": "x"}),
        json.dumps({"question": "Who wrote Hamlet?"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"question": "what is the  capital of peru?", "answer": "Lima"}),
        json.dumps({"question": 42, "answer": "x"}),
        json.dumps({"question": "Who painted Guernica?", "answer": "Picasso"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    frame, rejected = load_questions("jsonl", path=str(path))
    assert list(frame["query"]) == ["What is the capital of Peru?", "Who painted Guernica?"]
    reasons = {r.row: r.reason for r in rejected}
    assert "broken JSON" in reasons[2] and "custom.jsonl" in reasons[2]
    assert reasons[3] == "empty query"
    assert "5000 characters" in reasons[4]
    assert reasons[5] == "no gold answer"
    assert "JSON object" in reasons[6]
    assert reasons[7] == "duplicate of row 1"
    assert "not text" in reasons[8]


def test_source_without_valid_rows_fails_clearly(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"question": "", "answer": "x"}) + "\n")
    with pytest.raises(QuestionSourceError, match="no valid question.*row 1: empty query"):
        load_questions("jsonl", path=str(path))
    with pytest.raises(QuestionSourceError, match="not found"):
        load_questions("jsonl", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(QuestionSourceError, match="unknown question source"):
        load_questions("s3")


def test_recorded_outcomes_table(tmp_path):
    path = tmp_path / "outcomes.csv"
    pd.DataFrame([
        {"query": "Q1?", "answer": "A1", "medium_grade": "correct", "large_grade": "True"},
        {"query": "Q2?", "answer": "A2", "medium_answer": "A2", "large_answer": "I don't know"},
        {"query": "Q3?", "answer": "", "medium_grade": "not attempted", "large_grade": "false"},
        {"query": "Q4?", "answer": "A4", "medium_grade": "perhaps", "large_grade": "Correct"},
        {"query": "Q5?", "answer": "", "medium_answer": "A5", "large_grade": "Correct"},
        {"query": "Q6?", "answer": "A6", "large_grade": "Correct"},
    ]).to_csv(path, index=False)
    frame, rejected = load_questions("outcomes", path=str(path))
    assert list(frame["query"]) == ["Q1?", "Q2?", "Q3?"]
    assert list(frame["medium_grade"]) == [CORRECT, None, IDK]
    assert list(frame["large_grade"]) == [CORRECT, None, INCORRECT]
    reasons = {r.row: r.reason for r in rejected}
    assert "unknown grade 'perhaps'" in reasons[5]
    assert "needs a gold answer" in reasons[6]
    assert "neither medium_answer nor medium_grade" in reasons[7]


def test_traffic_rows_need_only_a_query(tmp_path):
    """A team's log: no reference answers; whatever a row logs (an answer, a grade, a
    cost) is kept, what it lacks is left to the pipeline; bad rows are rejected alone."""
    path = tmp_path / "traffic.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"query": "How do I rotate my API keys?"},
        {"query": "Summarise this contract clause.", "large_answer": "It limits liability.", "large_cost_usd": 0.01},
        {"query": "Is 7919 prime?", "medium_answer": "Yes", "medium_grade": "correct"},
        {"query": "", "large_answer": "orphan"},
        {"query": "Translate 'hello'.", "large_cost_usd": "lots"},
    ]) + "\n")
    frame, rejected = load_questions("traffic", path=str(path))
    assert frame["query"].tolist() == ["How do I rotate my API keys?", "Summarise this contract clause.", "Is 7919 prime?"]
    assert frame["gold_answer"].isna().all()
    assert frame["large_answer"].tolist()[1] == "It limits liability." and frame["large_cost_usd"].tolist()[1] == 0.01
    assert frame["medium_grade"].tolist()[2] == CORRECT and frame["large_answer"].isna().tolist() == [True, False, True]
    reasons = {r.row: r.reason for r in rejected}
    assert set(reasons) == {4, 5} and "large_cost_usd is 'lots'" in reasons[5]


def test_a_traffic_log_with_nan_or_implausible_usage_is_rejected_row_by_row(tmp_path):
    """Issue 29, 7: a literal NaN cost is not a blank one, and a billion output tokens is
    no recorded call; each such row is rejected with its reason, the others kept."""
    jsonl = tmp_path / "traffic.jsonl"
    jsonl.write_text("\n".join([
        '{"query": "Kept, with its cost.", "large_cost_usd": 0.02, "large_output_tokens": 900}',
        '{"query": "A NaN cost.", "large_cost_usd": NaN}',
        '{"query": "An infinite count.", "medium_input_tokens": -Infinity}',
        '{"query": "A billion tokens.", "large_output_tokens": 1e9}',
        '{"query": "A thousand dollars.", "medium_cost_usd": 1000}',
    ]) + "\n")
    frame, rejected = load_questions("traffic", path=str(jsonl))
    assert frame["query"].tolist() == ["Kept, with its cost."] and frame["large_output_tokens"].tolist() == [900]
    reasons = {r.row: r.reason for r in rejected}
    assert "NaN is not a JSON number" in reasons[2] and "-Infinity is not a JSON number" in reasons[3]
    assert "large_output_tokens is 1000000000.0: more than any one call" in reasons[4]
    assert "medium_cost_usd is 1000.0: more than any one call (100)" in reasons[5]
    csv_file = tmp_path / "traffic.csv"
    pd.DataFrame([{"query": "Q1?", "large_cost_usd": "0.5"}, {"query": "Q2?", "large_cost_usd": "NaN"}]).to_csv(
        csv_file, index=False)
    frame, rejected = load_questions("traffic", path=str(csv_file))
    assert frame["query"].tolist() == ["Q1?"] and "large_cost_usd is 'NaN'" in rejected[0].reason


def test_the_queries_the_server_stored_are_a_traffic_source(tmp_path):
    """requests.sqlite of the routing server: the stored queries (profiles that allow it)
    become traffic rows; the others are not there as text."""
    from router_pipeline.serve.feedback import FeedbackStore, ServedRequest

    store = FeedbackStore(tmp_path / "feedback")
    store.remember(ServedRequest("r1", "app", "How do I rotate my API keys?", "large", store_query=True))
    store.remember(ServedRequest("r2", "private", "My salary is 90k, is that fair?", "medium", store_query=False))
    store.remember(ServedRequest("r3", "app", "Is 7919 prime?", "medium", store_query=True))
    store.add("r3", grade="Incorrect", profile="app")  # the served tier's grade, from feedback
    store.close()
    frame, rejected = load_questions("traffic", path=str(tmp_path / "feedback" / "requests.sqlite"))
    assert frame["query"].tolist() == ["How do I rotate my API keys?", "Is 7919 prime?"] and not rejected
    assert frame["provenance"].unique().tolist() == ["traffic:requests.sqlite"]
    assert frame["medium_grade"].tolist() == [None, INCORRECT] and frame["large_grade"].isna().all()
    # A pool server's feedback names the graded model: its grade is that model's outcome.
    pool = FeedbackStore(tmp_path / "pool", tiers=("flash-lite", "flash", "pro"))
    pool.remember(ServedRequest("p1", "app", "Who wrote Hamlet?", "flash", store_query=True))
    pool.remember(ServedRequest("p2", "app", "Prove Fermat's last theorem.", "pro", store_query=True))
    pool.add("p1", grade="Correct", profile="app")
    pool.add("p2", grade="IDK", tier="flash-lite", profile="app")
    pool.close()
    frame, _ = load_questions("traffic", path=str(tmp_path / "pool" / "requests.sqlite"))
    assert frame[["flash_grade", "flash-lite_grade"]].values.tolist() == [[CORRECT, None], [None, IDK]]
    (tmp_path / "broken.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(QuestionSourceError, match="not the routing server's state database"):
        load_questions("traffic", path=str(tmp_path / "broken.sqlite"))


def test_several_sources_give_one_row_per_query_with_provenance(tmp_path):
    """Outcomes and traffic overlapping on two queries (one with grades that disagree): each
    query is kept once, from the first source listed; copies and conflicts are counted per
    source; a missing optional source is skipped; adding a source never moves a split."""
    from router_pipeline.labels.questions import SourceSpec, load_sources
    from router_pipeline.labels.split import assign_split

    outcomes = tmp_path / "outcomes.csv"
    pd.DataFrame([{"query": "Who wrote Hamlet?", "medium_grade": "Correct", "large_grade": "Correct"},
                  {"query": "Is 7919 prime?", "medium_grade": "Incorrect", "large_grade": "Correct"},
                  {"query": "Capital of Peru?", "medium_grade": "Correct", "large_grade": "Correct"}]).to_csv(
        outcomes, index=False)
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("\n".join(json.dumps(r) for r in [
        {"query": "who wrote  Hamlet?", "medium_grade": "Correct"},  # the same query, normalised; agrees
        {"query": "Is 7919 prime?", "medium_grade": "Correct"},  # disagrees: a conflict
        {"query": "How do I rotate my API keys?"}]) + "\n")
    specs = [SourceSpec("outcomes", str(outcomes)), SourceSpec("traffic", str(traffic)),
             SourceSpec("outcomes", str(tmp_path / "feedback.jsonl"), required=False)]
    merged = load_sources(specs)
    frame = merged.frame.set_index("query")
    assert len(frame) == 4 and frame["provenance"].to_dict() == {
        "Who wrote Hamlet?": "outcomes:outcomes.csv", "Is 7919 prime?": "outcomes:outcomes.csv",
        "Capital of Peru?": "outcomes:outcomes.csv", "How do I rotate my API keys?": "traffic:traffic.jsonl"}
    assert frame.loc["Is 7919 prime?", "medium_grade"] == INCORRECT  # the first source wins
    stats = merged.per_source.set_index("source")
    assert stats.loc["traffic:traffic.jsonl", ["rows", "kept", "duplicates", "conflicts"]].tolist() == [3, 1, 2, 1]
    assert merged.skipped == ["outcomes:feedback.jsonl"]
    alone = load_sources(specs[:1]).frame
    assert assign_split(alone).tolist() == assign_split(merged.frame).iloc[:3].tolist()
    with pytest.raises(QuestionSourceError, match="not found"):
        load_sources([SourceSpec("traffic", str(tmp_path / "missing.jsonl"))])


@pytest.mark.parametrize("value,label", [(True, CORRECT), (False, INCORRECT), ("IDK", IDK), ("Not_Attempted", IDK), ("", None)])
def test_parse_grade(value, label):
    assert parse_grade(value) == label


def test_recorded_outcomes_carry_their_cost(tmp_path):
    path = tmp_path / "outcomes.csv"
    pd.DataFrame([
        {"query": "Q1?", "medium_grade": "Correct", "large_grade": "Correct", "medium_cost_usd": "0.001",
         "large_input_tokens": 100, "large_output_tokens": 20},
        {"query": "Q2?", "medium_grade": "Correct", "large_grade": "Correct", "medium_cost_usd": "-1"},
        {"query": "Q3?", "medium_grade": "Correct", "large_grade": "Correct", "large_output_tokens": "many"},
    ]).to_csv(path, index=False)
    frame, rejected = load_questions("outcomes", path=str(path))
    assert list(frame["query"]) == ["Q1?"]
    row = frame.iloc[0]
    assert row["medium_cost_usd"] == 0.001 and row["large_input_tokens"] == 100 and pd.isna(row["large_cost_usd"])
    reasons = {r.row: r.reason for r in rejected}
    assert "medium_cost_usd is '-1'" in reasons[3] and "large_output_tokens is 'many', not a number" in reasons[4]


def test_domain_split_holds_out_whole_domains_for_test_and_validation(mmlu_outcomes):
    from router_pipeline.policies import oracle_cell
    from router_pipeline.training.examples import build_training_examples

    questions, rejected = load_questions("outcomes", path=str(mmlu_outcomes), sample_size=0)
    assert questions["topic"].nunique() == 19 and questions["topic"].notna().all()  # the file's domain column
    train, test = split_questions(questions, 0.2, 42, by="domain")
    test_domains = set(test["topic"])
    assert test_domains and test_domains.isdisjoint(train["topic"])
    assert abs(len(test) / len(questions) - 0.2) < questions["topic"].value_counts(normalize=True).max()
    oracle = train.assign(policy=[oracle_cell(m, g).policy for m, g in zip(train["medium_grade"], train["large_grade"])],
                          rationale="r")
    analyses = pd.DataFrame({"qid": train["qid"], "analysis": "It asks a question."})
    examples, _ = build_training_examples(oracle, analyses, validation_fraction=0.1, seed=42,
                                          domains=dict(zip(train["qid"], train["topic"])))
    topic = dict(zip(train["qid"], train["topic"]))
    val_domains = {topic[q] for q in examples.loc[examples["split"] == "validation", "qid"]}
    train_domains = {topic[q] for q in examples.loc[examples["split"] == "train", "qid"]}
    assert val_domains and val_domains.isdisjoint(train_domains) and test_domains.isdisjoint(train_domains | val_domains)
    # The same split again: stable; and by question it mixes domains as before.
    assert set(split_questions(questions, 0.2, 42, by="domain")[1]["qid"]) == set(test["qid"])
    assert set(split_questions(questions, 0.2, 42)[1]["topic"]) > test_domains


def test_cross_fitting_folds_score_every_question_once(mmlu_outcomes):
    """Outer folds for cross-fitting: by question, stable per question; by domain, a
    domain held out in a fold never appears in that fold's training rows."""
    from router_pipeline.labels.split import SplitError

    questions, _ = load_questions("outcomes", path=str(mmlu_outcomes), sample_size=0)
    by_question = outer_folds(questions, 5, 42)
    assert set(by_question) == set(range(5)) and min(pd.Series(by_question).value_counts()) > len(questions) / 10
    assert (outer_folds(questions.iloc[::-1], 5, 42) == by_question[::-1]).all()  # a row's fold is its own
    by_domain = outer_folds(questions, 5, 42, by="domain")
    assert set(by_domain) == set(range(5))
    for fold in range(5):
        held, train = questions["topic"][by_domain == fold], questions["topic"][by_domain != fold]
        assert len(held) and set(held).isdisjoint(train)
    sizes = pd.Series(by_domain).value_counts()
    assert sizes.max() - sizes.min() <= questions["topic"].value_counts().max()
    # Fewer domains than folds (a new user's three-task file): one fold per domain, none empty.
    one_each = outer_folds(questions, 20, 42, by="domain")
    assert set(one_each) == set(range(19)) and pd.Series(one_each).groupby(questions["topic"]).nunique().max() == 1
    with pytest.raises(SplitError, match="at least two domains; found 1"):
        outer_folds(questions.assign(topic="law"), 5, 42, by="domain")


def test_domain_split_needs_a_domain_per_question():
    from router_pipeline.labels.split import SplitError

    frame = pd.DataFrame({"qid": ["a", "b", "c"], "query": ["A?", "B?", "C?"], "topic": ["x", None, "y"]})
    with pytest.raises(SplitError, match="1 questions have no domain"):
        split_questions(frame, 0.2, 42, by="domain")
    with pytest.raises(SplitError, match="at least two domains"):
        split_questions(frame.assign(topic="x"), 0.2, 42, by="domain")


def test_an_outcomes_file_of_a_pools_models_is_read_per_model_and_never_paid_again(tmp_path):
    """Three pool models by their pool names, no medium or large: a row missing one model's
    outcome is rejected, naming the model (every router is scored on the same rows); a
    reference answer's column is not a model; what is kept reaches pool_answers as recorded
    (no call, the recorded cost) and judging as recorded grades."""
    from router_pipeline.labels.answering import generate_answers
    from router_pipeline.labels.judging import judge_answers
    from router_pipeline.llm import RoleSpec

    path = tmp_path / "pool.csv"
    pd.DataFrame([
        {"query": "Q1?", "reference_answer": "A1", "flash-lite_grade": "Incorrect", "flash-lite_cost_usd": 0.0001,
         "flash_grade": "Correct", "flash_cost_usd": 0.0004, "pro_grade": "Correct", "pro_cost_usd": 0.005},
        {"query": "Q2?", "reference_answer": "A2", "flash-lite_grade": "Correct", "flash-lite_cost_usd": 0.0001,
         "flash_grade": "Correct", "flash_cost_usd": 0.0004, "pro_grade": None, "pro_cost_usd": 0.005},
        {"query": "Q3?", "reference_answer": "A3", "flash-lite_grade": "IDK", "flash-lite_cost_usd": 0.0002,
         "flash_grade": "Incorrect", "flash_cost_usd": 0.0003, "pro_grade": "Correct", "pro_cost_usd": 0.006},
    ]).to_csv(path, index=False)
    frame, rejected = load_questions("outcomes", path=str(path))
    assert frame["query"].tolist() == ["Q1?", "Q3?"]
    assert [(r.row, r.reason) for r in rejected] == [(3, "neither pro_answer nor pro_grade is given")]
    assert "reference_grade" not in frame and frame["medium_grade"].isna().all()
    assert frame["pro_cost_usd"].tolist() == [0.005, 0.006] and frame["flash-lite_grade"].tolist() == [INCORRECT, IDK]
    pool = {m: RoleSpec("gemini", f"gemini-{m}") for m in ("flash-lite", "flash", "pro")}
    answers, stats = generate_answers(frame.assign(split="train"), pool, {}, None, progress=False)
    assert (answers["status"] == "recorded").all() and all(s.calls == 0 for s in stats.values())
    assert answers.set_index(["qid", "tier"]).loc[(frame["qid"][1], "flash"), "cost_usd"] == 0.0003
    judged, _ = judge_answers(answers, frame)
    assert sorted(zip(judged["qid"].map(dict(zip(frame["qid"], frame["query"]))), judged["tier"], judged["label"])) == [
        ("Q1?", "flash", CORRECT), ("Q1?", "flash-lite", INCORRECT), ("Q1?", "pro", CORRECT),
        ("Q3?", "flash", INCORRECT), ("Q3?", "flash-lite", IDK), ("Q3?", "pro", CORRECT)]
