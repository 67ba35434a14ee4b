"""Hostile question sources: every row gets its own verdict, and valid rows always survive."""

import json
import string

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router_pipeline.labels.questions import QuestionSourceError, load_questions

VALID = [{"query": f"Which river flows through town number {i}?", "answer": f"River {i}"} for i in range(3)]


def _jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _load(path, **kw):
    return load_questions("jsonl" if path.suffix == ".jsonl" else "outcomes", path=str(path), **kw)


@pytest.mark.parametrize("bad,reason", [
    (b'{"query": "Which two?", "answer": [1, 2]}', "answer is list, not text"),
    (b'{"query": "Bad byte \xff here?", "answer": "x"}', "line 2 is not UTF-8 text"),
    (b'{"query": "\\ud800 lone?", "answer": "x"}', "not valid Unicode"),
    (b"[" * 100_000, "JSON nested too deeply"),
    (b'{"query": null, "answer": "x"}', "missing query"),
    (b'{"answer": "x"}', "missing query"),
    (b'{"query": "Binary \\u0000 here?", "answer": "x"}', "control characters"),
    (b'{"query": "Huge meta?", "answer": "x", "metadata": "' + b"{'a': " * 5000 + b'"}', None),
])
def test_one_bad_jsonl_line_costs_one_row(tmp_path, bad, reason):
    lines = [json.dumps(VALID[0]).encode(), bad, json.dumps(VALID[1]).encode()]
    frame, rejected = _load(_jsonl(tmp_path / "q.jsonl", lines))
    kept = {r["query"] for r in VALID[:2]}
    if reason is None:  # a row with unusable metadata is kept; the metadata is ignored
        assert kept <= set(frame["query"])
    else:
        assert set(frame["query"]) == kept
        assert [r.row for r in rejected] == [2] and reason in rejected[0].reason, rejected


def test_mixed_label_types_do_not_clash_at_the_parquet_write(tmp_path):
    rows = [{**VALID[0], "topic": 5}, {**VALID[1], "topic": "Art"}, {**VALID[2], "topic": ["x"]}]
    frame, rejected = _load(_jsonl(tmp_path / "q.jsonl", [json.dumps(r).encode() for r in rows]))
    assert not rejected and list(frame["topic"]) == ["5", "Art", None]
    frame.to_parquet(tmp_path / "out.parquet")  # one type per column


def test_bom_and_utf16_files_keep_their_first_row(tmp_path):
    text = "\n".join(json.dumps(r) for r in VALID)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "u16.jsonl").write_bytes(text.encode("utf-16"))
    for name in ("bom.jsonl", "u16.jsonl"):
        frame, rejected = _load(tmp_path / name)
        assert len(frame) == 3 and not rejected


def test_ragged_and_unbalanced_csv_rows_cost_one_row(tmp_path):
    path = tmp_path / "outcomes.csv"
    path.write_text('query,medium_grade,large_grade\n'
                    'Q1?,Correct,Correct\n'
                    'Q2?,Correct\n'  # ragged
                    '"Q3 opens a quote,Correct,Correct\n'  # unbalanced quote would swallow the rest
                    'Q4?,1.0,0.0\n'
                    '"Q5, with a comma?",Incorrect,Correct\n')
    frame, rejected = _load(path)
    assert list(frame["query"]) == ["Q1?", "Q4?", "Q5, with a comma?"]
    assert list(frame["medium_grade"]) == ["Correct", "Correct", "Incorrect"]  # 1.0 / 0.0 are grades
    reasons = {r.row: r.reason for r in rejected}
    assert "2 fields where the header has 3" in reasons[3] and "unbalanced quote" in reasons[4]


@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b"\n\n", "is empty")])
def test_empty_csv_is_a_source_error(tmp_path, content, message):
    path = tmp_path / "outcomes.csv"
    path.write_bytes(content)
    with pytest.raises(QuestionSourceError, match=message):
        _load(path)


def test_corrupt_parquet_is_a_source_error(tmp_path):
    path = tmp_path / "outcomes.parquet"
    path.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(QuestionSourceError, match="not a readable Parquet file"):
        _load(path)


# -- property: whatever junk surrounds them, the valid rows survive ------------------------
junk_line = st.one_of(
    st.binary(max_size=60),
    st.text(alphabet=string.printable + "\x00\ud800é", max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["query", "answer", "topic"]), c,
                                                                     max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(junk_line, max_size=6), where=st.integers(min_value=0, max_value=6))
def test_valid_jsonl_rows_survive_any_junk(tmp_path_factory, junk, where):
    valid = [json.dumps(r).encode() for r in VALID]
    lines = junk[:where] + valid + junk[where:]
    path = _jsonl(tmp_path_factory.mktemp("fuzz") / "q.jsonl", [line.replace(b"\n", b" ") for line in lines])
    frame, rejected = _load(path)
    assert {r["query"] for r in VALID} <= set(frame["query"])
    assert all(r.reason for r in rejected)
    frame.to_parquet(path.with_suffix(".parquet"))


# Junk may hold quotes, but does not open a quoted field: an unbalanced opening quote can
# swallow the next lines when they add up to the header's width (see questions._read_csv).
csv_junk = st.text(alphabet=string.printable.replace("\n", "").replace("\r", "") + '"é', max_size=50).filter(
    lambda t: not t.lstrip().startswith('"') and ',"' not in t)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(csv_junk, max_size=5))
def test_valid_csv_rows_survive_any_junk(tmp_path_factory, junk):
    lines = ["query,answer"] + junk[:2] + [f'"{r["query"]}",{r["answer"]}' for r in VALID] + junk[2:]
    path = tmp_path_factory.mktemp("fuzz") / "q.csv"
    path.write_text("\n".join(lines) + "\n")
    frame, rejected = load_questions("jsonl", path=str(path))
    assert {r["query"] for r in VALID} <= set(frame["query"])
    assert all(r.reason for r in rejected)


def test_quoted_fields_may_span_lines(tmp_path):
    """MMLU questions carry their choices on their own lines, some with commas."""
    path = tmp_path / "outcomes.csv"
    pd.DataFrame([
        {"query": "Which weakens the argument, if true?\nA. one, two\nB. 4\nAnswer:", "medium_grade": "Correct",
         "large_grade": "Correct"},
        {"query": 'She said "hi".\nA. x\nAnswer:', "medium_grade": "Incorrect", "large_grade": "Correct"},
    ]).to_csv(path, index=False)
    frame, rejected = load_questions("outcomes", path=str(path))
    assert not rejected and len(frame) == 2
    assert frame["query"].iloc[0].startswith("Which weakens the argument, if true? A. one, two")


def test_the_shared_mmlu_outcomes_load_whole():
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing_outcomes" / "mmlu_dev_outcomes.csv"
    if not shared.exists():
        pytest.skip("the shared development data is not beside this checkout")
    frame, rejected = load_questions("outcomes", path=str(shared))
    assert len(frame) + len(rejected) == 5235
    # Only the long professional_law rows and repeated questions are refused.
    assert all("over the 4000 limit" in r.reason or "duplicate of row" in r.reason for r in rejected)
    assert sum("over the 4000 limit" in r.reason for r in rejected) == 5
