"""Load and normalise questions from the configured source.

Every source yields the same columns: qid, query, gold_answer, topic (a ``topic`` or
``domain`` column, or the metadata's topic: what a domain split holds out), answer_type,
source_row, and (for recorded outcomes and traffic) ``<model>_answer``, ``<model>_grade``
and the recorded ``<model>_cost_usd`` / ``_input_tokens`` / ``_output_tokens`` of every
model the source records (medium and large always; a pool's models by their pool names,
so that ``pool_answers`` never pays for what the log holds). Bad rows are rejected one
by one with the row and the reason; the rest are kept.

- ``outcomes``: graded (or answered and gold-referenced) rows: every model the source
  records (medium and large when it records none) has an answer or a grade; a row
  missing one is rejected, naming the model, so that no router is scored on a row where
  a model has no outcome.
- ``traffic``: a team's own queries, usually without a reference answer, each with
  whatever its log holds (a tier's answer, grade, cost or tokens); or the routing
  server's state database ``requests.sqlite``, whose stored queries (profiles with
  ``store_queries``) become rows. ``outcomes`` reads its feedback's outcomes rows. What is logged is
  used (an answer in the log is never paid for again); what is missing is generated and
  judged, against the rubric when there is no reference answer.
- ``cascade``: what the routing server's cascades answered (``<out>.cascade.jsonl``, which
  ``router-pipeline export-outcomes`` writes, or the ``cascade_outcomes`` table of its state
  database ``requests.sqlite``), graded by agreement with no judge call: where two or more
  models agreed, a model whose answer is the agreed one is Correct, one that differs
  Incorrect, an abstention IDK; a row with no agreement keeps its answers ungraded (a
  configured judge grades them against the rubric, as it does traffic). A model the
  cascade did not call, or whose call gave no answer, has no outcome in the row.
"""

from __future__ import annotations

import ast
import codecs
import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from router_pipeline.artifacts import CASCADE_QUERY, OUTCOMES_QUERY, TRAFFIC_QUERY
from router_pipeline.policies import CORRECT, IDK, INCORRECT, TIERS
from router_pipeline.routers.cascade import abstains, same_answer
from router_pipeline.settings import SOURCES
from router_pipeline.text import MAX_QUERY_CHARS, check_query, clean_query, normalise, query_hash, unit_interval

# Package data, so an installed wheel has it too.
BUNDLED_SIMPLEQA = Path(__file__).resolve().parents[1] / "data" / "simpleqa" / "simple_qa_test_set.csv.gz"

RECORDED_SOURCES = ("outcomes", "traffic", "cascade")  # sources whose rows carry per-tier answers, grades and costs
CASCADE = "cascade"  # the cascades' own traffic, graded by agreement (cascade_row)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
OPENAI_SIMPLEQA_URL = "https://openaipublic.blob.core.windows.net/simple-evals/simple_qa_test_set.csv"
DEFAULT_HF_DATASET = "basicv8vc/SimpleQA"
COLUMNS = ["qid", "query", "gold_answer", "topic", "answer_type", "source_row"]  # + provenance (the source's name)
OUTCOME_FIELDS = ("answer", "grade")  # a model's recorded outcome: one of them at least
# Optional per model: what the recorded call cost, as USD or as tokens (priced by the role).
USAGE_FIELDS = ("cost_usd", "input_tokens", "output_tokens")
QUERY_ALIASES = ("query", "question", "problem", "prompt")
GOLD_ALIASES = ("gold_answer", "answer", "target")


MAX_METADATA_CHARS = 10_000  # a longer metadata cell is ignored rather than parsed
# Ceilings of a plausible recorded call: no model reads or writes more tokens than the
# largest context window (2M), and no single call costs $100. A log claiming more is a
# unit or parsing error, and would outweigh every honest row in a mean cost.
MAX_RECORDED = {"cost_usd": 100.0, "input_tokens": 2_000_000, "output_tokens": 2_000_000}


class QuestionSourceError(ValueError):
    """The source as a whole cannot be read (missing file, no usable column, no valid row)."""


@dataclass(frozen=True)
class Rejected:
    row: int  # 1-based row number in the source (line number for JSONL)
    reason: str


def load_questions(
    source: str = "bundled",
    *,
    path: str | None = None,
    url: str = OPENAI_SIMPLEQA_URL,
    hf_dataset: str = DEFAULT_HF_DATASET,
    hf_split: str = "test",
    sample_size: int = 0,
    sample_seed: int = 0,
    max_query_chars: int = MAX_QUERY_CHARS,
) -> tuple[pd.DataFrame, list[Rejected]]:
    raw, rejected = read_source(source, path=path, url=url, hf_dataset=hf_dataset, hf_split=hf_split)
    frame, more = normalise_rows(raw, max_query_chars=max_query_chars,
                                 kind=source if source in RECORDED_SOURCES else "questions")
    rejected += more
    if frame.empty:
        reasons = "; ".join(f"row {r.row}: {r.reason}" for r in rejected[:5])
        raise QuestionSourceError(f"no valid question in source {source!r} ({reasons})")
    frame["provenance"] = SourceSpec(source, path).name
    return stable_sample(frame, sample_size, sample_seed), rejected


@dataclass(frozen=True)
class SourceSpec:
    """One source of a multi-source ``questions``; ``required: False`` skips a file that
    does not exist yet (e.g. the server's feedback outcomes before any feedback)."""

    source: str = "bundled"
    path: str | None = None
    required: bool = True

    @property
    def name(self) -> str:
        return f"{self.source}:{Path(self.path).name}" if self.path else self.source


@dataclass
class Merged:
    """Several sources as one set of questions, and what merging them found."""

    frame: pd.DataFrame
    rejected: list[Rejected]
    per_source: pd.DataFrame  # source, rows read, kept, duplicates, conflicts, rejected
    skipped: list[str]  # optional sources whose file does not exist
    # Per cascade source: rows read, graded by agreement, left ungraded, rejected, and the
    # grades by model (before de-duplication against the other sources and sampling).
    cascade: list[dict] = dataclasses.field(default_factory=list)


LABEL_FIELDS = ("gold_answer",)  # with every model's grade: what two copies of a query may disagree on


def load_sources(specs: list[SourceSpec], *, sample_size: int = 0, sample_seed: int = 0,
                 max_query_chars: int = MAX_QUERY_CHARS, url: str = OPENAI_SIMPLEQA_URL, hf_dataset: str = DEFAULT_HF_DATASET,
                 hf_split: str = "test") -> Merged:
    """Every source's questions in one frame, each row with its ``provenance``. A query in
    several sources (the same normalised query, hence the same qid) is kept once, from the
    first source listed: the list's order is the precedence. Copies are counted as
    duplicates, and as conflicts when a reference answer or a grade differs from the kept
    row's. Question ids are query hashes, so the split of a question never changes as
    sources are added."""
    if not specs:
        raise QuestionSourceError("no question source configured")
    frames, rejected, stats, skipped, cascades = [], [], [], [], []
    for spec in specs:
        if spec.path and not spec.required and not Path(spec.path).exists():
            skipped.append(spec.name)
            continue
        frame, bad = load_questions(spec.source, path=spec.path, url=url, hf_dataset=hf_dataset, hf_split=hf_split,
                                    max_query_chars=max_query_chars)
        rejected += [Rejected(r.row, f"{spec.name}: {r.reason}") for r in bad]
        frames.append(frame)
        if spec.source == CASCADE:
            cascades.append({"source": spec.name, **cascade_counts(frame, len(bad))})
        stats.append({"source": spec.name, "rows": len(frame), "rejected": len(bad)})
    if not frames:
        raise QuestionSourceError(f"none of the optional sources exists: {', '.join(skipped)}")
    both = pd.concat(frames, ignore_index=True)
    first = ~both["qid"].duplicated(keep="first")
    kept = both[first].set_index("qid")  # qid -> the row kept
    copies = both[~first]
    clash = pd.Series(False, index=copies.index)
    for field in [*LABEL_FIELDS, *(c for c in both.columns if c.endswith("_grade"))]:
        mine, theirs = copies[field], kept.loc[copies["qid"], field].to_numpy()
        known = mine.notna() & pd.notna(theirs)
        differs = mine.map(_comparable) != pd.Series(theirs, index=copies.index).map(_comparable)
        clash |= known & differs
    frame = both[first].reset_index(drop=True)
    for row in stats:
        mine = copies["provenance"] == row["source"]
        row.update(kept=int((frame["provenance"] == row["source"]).sum()), duplicates=int(mine.sum()),
                   conflicts=int((mine & clash).sum()))
    frame["conflicts"] = frame["qid"].map(copies[clash].groupby("qid").size()).fillna(0).astype(int)
    return Merged(stable_sample(frame, sample_size, sample_seed), rejected,
                  pd.DataFrame(stats, columns=["source", "rows", "kept", "duplicates", "conflicts", "rejected"]),
                  skipped, cascades)


def _comparable(value):
    return normalise(value) if isinstance(value, str) else value


def read_source(source, *, path=None, url=OPENAI_SIMPLEQA_URL, hf_dataset=DEFAULT_HF_DATASET, hf_split="test"):
    """The raw rows of a source as a DataFrame (plus rows that could not even be parsed)."""
    if source not in SOURCES:
        raise QuestionSourceError(f"unknown question source {source!r}; expected one of {SOURCES}")
    if source == "bundled":
        return pd.read_csv(path or BUNDLED_SIMPLEQA, dtype=str, keep_default_na=False), []
    if source == "url":
        return pd.read_csv(url, dtype=str, keep_default_na=False), []
    if source == "hf":
        from datasets import load_dataset

        return load_dataset(hf_dataset, split=hf_split).to_pandas(), []
    if not path:
        raise QuestionSourceError(f"source {source!r} needs a path")
    file = Path(path)
    if not file.exists():
        raise QuestionSourceError(f"{source} file not found: {file}")
    if file.is_dir():
        raise QuestionSourceError(f"{source} path {file} is a directory, not a file")
    if source == CASCADE:
        return _read_cascade(file)
    if file.suffix in JSONL_SUFFIXES:
        return _read_jsonl(file)
    if file.suffix == ".sqlite":
        return _read_state_database(file, source), []
    if file.suffix == ".parquet":
        try:
            return pd.read_parquet(file), []
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise QuestionSourceError(f"{file} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    return _read_csv(file)


def _read_state_database(file: Path, source: str) -> pd.DataFrame:
    """The routing server's state database (its feedback folder's requests.sqlite):
    ``outcomes`` reads the rows its feedback completed; ``traffic`` the queries it stored
    (only profiles that allow storing queries have them as text), each with the grades
    its feedback gave any model."""
    import sqlite3

    sql = {"outcomes": OUTCOMES_QUERY, "traffic": TRAFFIC_QUERY}.get(source)
    if sql is None:
        raise QuestionSourceError(f"{file}: a .sqlite file is the routing server's state database, read by the "
                                  f"outcomes or traffic source, not by {source!r}")
    try:
        with sqlite3.connect(f"file:{file}?mode=ro", uri=True) as db:
            cursor = db.execute(sql)
            names = [c[0] for c in cursor.description]
            frame = pd.DataFrame(cursor.fetchall(), columns=names)
    except sqlite3.DatabaseError as exc:
        raise QuestionSourceError(f"{file} is not the routing server's state database ({exc})") from None
    if "grades" not in frame:
        return frame
    # Feedback's grades, per model (a tier, or a pool model by name): <model>_grade columns,
    # so a graded request is a recorded outcome of that model, never paid for again.
    grades = pd.DataFrame([_grades(cell) for cell in frame.pop("grades")], index=frame.index)
    return frame.join(grades.add_suffix("_grade"))


def _read_cascade(file: Path) -> tuple[pd.DataFrame, list[Rejected]]:
    """The cascades' rows (the export's JSONL, or the state database's cascade_outcomes
    table) as recorded outcomes graded by agreement (``cascade_row``); a malformed row is
    rejected with the file and its line (or table row), and the others are kept."""
    if file.suffix == ".sqlite":
        records, rejected, where = _cascade_table(file), [], f"{file.name} cascade_outcomes row"
    elif file.suffix in JSONL_SUFFIXES:
        (records, rejected), where = _jsonl_objects(file), f"{file.name} line"
    else:
        raise QuestionSourceError(f"{file}: the cascade source reads the JSONL `router-pipeline export-outcomes` "
                                  f"writes (<out>.cascade.jsonl) or the routing server's state database (.sqlite)")
    rows = []
    for rec in records:
        try:
            rows.append({**cascade_row(rec), "__row": rec["__row"]})
        except ValueError as exc:
            rejected.append(Rejected(rec["__row"], f"{where} {rec['__row']}: {exc}"))
    return pd.DataFrame(rows, columns=None if rows else ["query", "__row"]), rejected


def _cascade_table(file: Path) -> list[dict]:
    """The state database's cascade_outcomes rows in the export's columns (a cell that is
    not a JSON object is left for ``cascade_row`` to reject, naming the row)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{file}?mode=ro", uri=True) as db:
            found = db.execute(CASCADE_QUERY).fetchall()
    except sqlite3.DatabaseError as exc:
        raise QuestionSourceError(f"{file} is not a routing server's state database with cascade rows ({exc})") from None
    records = []
    for i, (request_id, query, answers, costs, agreed) in enumerate(found, 1):
        rec = {"query": query, "agreed": agreed, "request_id": request_id, "__row": i}
        for cell, suffix in ((answers, "answer"), (costs, "cost_usd")):
            try:
                value = json.loads(cell) if isinstance(cell, str) else None
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, dict):
                rec["__broken"] = f"request {request_id}: its {suffix.split('_')[0]}s are not a JSON object"
                break
            rec.update({f"{m}_{suffix}": v for m, v in value.items()})
        records.append(rec)
    return records


def cascade_row(rec: dict) -> dict:
    """One cascaded request (query, ``<model>_answer`` and ``<model>_cost_usd`` per model
    called, ``agreed``: the answer two or more of them gave, or None) as a recorded-outcomes
    row: ``<model>_answer``, ``_cost_usd`` and ``_grade`` per model that answered. With an
    agreed answer, a model whose answer is the agreed one (as choice letters, case and
    spaces aside, or as normalised text: either comparator a cascade uses) is Correct, an
    abstention IDK, any other answer Incorrect; without one, no model is graded. A model
    whose call gave no answer (null) has no outcome. ValueError for a malformed row."""
    if "__broken" in rec:
        raise ValueError(rec["__broken"])
    if "agreed" not in rec:
        raise ValueError("no 'agreed' field: not a cascade row (router-pipeline export-outcomes writes those "
                         "to <out>.cascade.jsonl)")
    agreed = rec["agreed"]
    if agreed is not None and (not isinstance(agreed, str) or abstains(agreed)):
        raise ValueError(f"agreed is {agreed!r}: expected the answer the models agreed on, or null")
    answers = {}
    for key, answer in rec.items():
        model = key[:-len("_answer")] if isinstance(key, str) and key.endswith("_answer") else ""
        if not model or key in GOLD_ALIASES:
            continue
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"{key} is {type(answer).__name__}, not text")
        if answer is not None:  # null: the call failed or gave nothing, no outcome of that model
            answers[model] = answer
    if not answers:
        raise ValueError("no model's answer (<model>_answer)")
    row, same = {"query": rec.get("query")}, set()
    if agreed is not None:
        same = {m for m, a in answers.items() if same_answer(a, agreed, "letter") or same_answer(a, agreed, "text")}
        if len(same) < 2:
            raise ValueError(f"agreed answer {agreed[:80]!r} is the answer of {len(same)} of its models "
                             f"({', '.join(answers)}); an agreement is two or more")
    for m, answer in answers.items():
        grade = None if agreed is None else IDK if abstains(answer) else CORRECT if m in same else INCORRECT
        row.update({f"{m}_answer": answer, f"{m}_grade": grade, f"{m}_cost_usd": rec.get(f"{m}_cost_usd")})
    return row


def cascade_counts(frame: pd.DataFrame, rejected: int) -> dict:
    """What a cascade source's rows gave: rows read, graded by agreement (every row with a
    grade: the source's grades are all agreement's), left ungraded, rejected, and the grades
    by model."""
    grades = frame[[c for c in frame.columns if c.endswith("_grade")]]
    graded = int(grades.notna().any(axis=1).sum())
    by_model = {c[:-len("_grade")]: {g: int(n) for g, n in grades[c].value_counts().items()}
                for c in grades.columns if grades[c].notna().any()}
    return {"rows_read": len(frame) + rejected, "graded_by_agreement": graded, "left_ungraded": len(frame) - graded,
            "rejected": rejected, "grades_by_model": by_model}


def _grades(cell) -> dict:
    try:
        grades = json.loads(cell) if isinstance(cell, str) else {}
    except json.JSONDecodeError:
        return {}  # the server writes this column: an unreadable cell is a row without grades
    return {str(m): g for m, g in grades.items() if isinstance(g, str)} if isinstance(grades, dict) else {}


def _physical_lines(file: Path) -> list[tuple[int, str | None]]:
    """(line number, text) for every line of a text file; None for a line that is not
    UTF-8, so that one bad byte costs one line. A UTF-8 BOM is dropped; UTF-16 (by its
    BOM) is decoded whole."""
    blob = file.read_bytes()
    if blob.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return list(enumerate(blob.decode("utf-16").splitlines(), 1))
        except UnicodeDecodeError as exc:
            raise QuestionSourceError(f"{file} starts as UTF-16 but is not valid UTF-16 ({exc.reason})") from None
    blob = blob.removeprefix(codecs.BOM_UTF8)
    lines = []
    for lineno, raw in enumerate(blob.split(b"\n"), 1):
        try:
            lines.append((lineno, raw.decode("utf-8").removesuffix("\r")))
        except UnicodeDecodeError:
            lines.append((lineno, None))
    if lines and lines[-1][1] == "":
        lines.pop()
    return lines


def _not_utf8(file: Path, lineno: int) -> Rejected:
    return Rejected(lineno, f"{file.name}: line {lineno} is not UTF-8 text")


def _read_jsonl(file: Path) -> tuple[pd.DataFrame, list[Rejected]]:
    rows, rejected = _jsonl_objects(file)
    return pd.DataFrame(rows), rejected


def _jsonl_objects(file: Path) -> tuple[list[dict], list[Rejected]]:
    """Every line of a JSONL file that is a JSON object (with its line number as ``__row``),
    and a rejection for every other non-blank line."""
    rows, rejected = [], []
    for lineno, line in _physical_lines(file):
        if line is None:
            rejected.append(_not_utf8(file, lineno))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            rejected.append(Rejected(lineno, f"{file.name}: broken JSON ({exc.msg} at column {exc.colno})"))
            continue
        except ValueError as exc:  # _no_constant's
            rejected.append(Rejected(lineno, f"{file.name}: {exc}"))
            continue
        except RecursionError:
            rejected.append(Rejected(lineno, f"{file.name}: JSON nested too deeply"))
            continue
        if not isinstance(obj, dict):
            rejected.append(Rejected(lineno, f"{file.name}: expected a JSON object, got {type(obj).__name__}"))
            continue
        rows.append({**obj, "__row": lineno})
    return rows, rejected


def _no_constant(name: str):
    """Python's json reads NaN and Infinity; JSON has no such numbers, and a NaN cost
    would otherwise pass as a blank one."""
    raise ValueError(f"{name} is not a JSON number")


def _read_csv(file: Path) -> tuple[pd.DataFrame, list[Rejected]]:
    """CSV read record by record: a ragged row, or one whose unbalanced quote would
    swallow the lines after it, is rejected alone and reading goes on at the next line.
    A quoted field may span lines (MMLU questions do). Limitation: an unbalanced quote
    whose swallowed lines happen to add up to the header's field count reads as one
    (odd) row, and the lines it swallowed are lost with it."""
    lines = _physical_lines(file)
    rejected = [_not_utf8(file, n) for n, text in lines if text is None]
    lines = [(n, text) for n, text in lines if text is not None and text.strip()]
    if not lines:
        raise QuestionSourceError(f"{file} is empty: expected a header line and rows")

    def record(i: int) -> tuple[list[str], int]:
        reader = csv.reader(lines[j][1] + "\n" for j in range(i, len(lines)))
        return next(reader), reader.line_num

    try:
        header, used = record(0)
    except csv.Error as exc:
        raise QuestionSourceError(f"{file}: unreadable CSV header ({exc})") from None
    rows, i = [], used
    while i < len(lines):
        lineno = lines[i][0]
        try:
            fields, used = record(i)
        except csv.Error as exc:
            rejected.append(Rejected(lineno, f"{file.name}: unreadable CSV row ({exc})"))
            i += 1
            continue
        if len(fields) != len(header):
            what = ("an unbalanced quote" if used > 1 else
                    f"{len(fields)} fields where the header has {len(header)}")
            rejected.append(Rejected(lineno, f"{file.name}: row has {what}"))
            i += 1
            continue
        rows.append({**dict(zip(header, fields)), "__row": lineno})
        i += used
    return pd.DataFrame(rows, columns=header + ["__row"]), rejected


def _pick(columns, aliases) -> str | None:
    lowered = {str(c).lower(): c for c in columns}
    return next((lowered[a] for a in aliases if a in lowered), None)


def parse_grade(value) -> str | None:
    """Correct / Incorrect / IDK from a recorded grade (labels or booleans); None if blank."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    if isinstance(value, bool):
        return CORRECT if value else INCORRECT
    text = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    if text == "":
        return None
    table = {
        "correct": CORRECT, "true": CORRECT, "1": CORRECT, "1.0": CORRECT, "yes": CORRECT,
        "incorrect": INCORRECT, "false": INCORRECT, "0": INCORRECT, "0.0": INCORRECT, "no": INCORRECT,
        "wrong": INCORRECT,
        "idk": IDK, "not_attempted": IDK, "abstained": IDK, "i_dont_know": IDK,
    }
    if text not in table:
        raise ValueError(f"unknown grade {value!r} (expected Correct/Incorrect/IDK or a boolean)")
    return table[text]


def _blank(value) -> bool:
    """A missing cell: None, or NaN as pandas reads an empty one."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _amount(value, name: str, ceiling: float) -> float | None:
    """A recorded cost or token count: a finite number in [0, ceiling], or None when blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is {value!r}, not a number") from None
    if math.isnan(number) and not isinstance(value, str):
        return None  # a blank cell read as NaN
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} is {value!r}: expected a finite number >= 0")
    if number > ceiling:
        raise ValueError(f"{name} is {value!r}: more than any one call ({ceiling:g}); check the unit")
    return number


def _meta(value) -> dict:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_METADATA_CHARS:
        return {}
    try:
        parsed = ast.literal_eval(value)  # OpenAI's CSV stores a Python dict literal
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def normalise_rows(raw: pd.DataFrame, *, max_query_chars: int = MAX_QUERY_CHARS, kind: str = "questions"):
    """``kind``: questions (a gold answer each), outcomes or traffic (see the module doc)."""
    qcol = _pick(raw.columns, QUERY_ALIASES)
    if qcol is None:
        raise QuestionSourceError(f"no query column (one of {QUERY_ALIASES}) in columns {list(raw.columns)}")
    gcol = _pick(raw.columns, GOLD_ALIASES)
    models = recorded_models(raw.columns, gcol) if kind in RECORDED_SOURCES else []
    required = (models or list(TIERS)) if kind == "outcomes" else []
    models = list(TIERS) + [m for m in models if m not in TIERS]
    out, rejected, seen = [], [], {}
    for pos, rec in enumerate(raw.to_dict("records")):
        rowno = int(rec.get("__row", pos + 2))  # CSV: header is line 1
        try:
            row = _normalise_row(rec, qcol, gcol, max_query_chars, kind, models, required)
        except ValueError as exc:
            rejected.append(Rejected(rowno, str(exc)))
            continue
        except Exception as exc:  # one odd row never fails the source: it gets its own verdict
            rejected.append(Rejected(rowno, f"unreadable row ({type(exc).__name__}: {exc})"))
            continue
        if row["qid"] in seen:
            rejected.append(Rejected(rowno, f"duplicate of row {seen[row['qid']]}"))
            continue
        seen[row["qid"]] = rowno
        out.append({**row, "source_row": rowno})
    columns = COLUMNS + [f"{m}_{k}" for m in models for k in OUTCOME_FIELDS + USAGE_FIELDS]
    return pd.DataFrame(out, columns=columns), rejected


def recorded_models(columns, gold_column: str | None = None) -> list[str]:
    """The models whose outcomes a source's columns record, in column order: a
    ``<model>_grade`` column, or a ``<model>_answer`` beside that model's cost or tokens
    (or medium's or large's alone), so that a ``reference_answer`` is not a model."""
    names = {c for c in columns if isinstance(c, str) and c != gold_column}
    found = []
    for c in columns:
        for k in OUTCOME_FIELDS:
            model = c[:-len(k) - 1] if c in names and c.endswith(f"_{k}") else ""
            usage = any(f"{model}_{u}" in names for u in USAGE_FIELDS)
            if model and model not in found and (k == "grade" or usage or model in TIERS):
                found.append(model)
    return found


def _text(value, name: str) -> str | None:
    """A text cell (numbers are written as text), None when blank; ValueError otherwise."""
    if _blank(value):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} holds characters that are not valid Unicode") from None
    return clean_query(value) or None


def _normalise_row(rec: dict, qcol: str, gcol: str | None, max_query_chars: int, kind: str,
                   models: list[str], required: list[str]) -> dict:
    raw_query = rec.get(qcol)
    query = check_query(None if _blank(raw_query) else raw_query, max_query_chars)
    gold = _text(rec.get(gcol), "answer") if gcol else None
    meta = _meta(rec.get("metadata"))
    row = {
        "qid": query_hash(query),
        "query": query,
        "gold_answer": gold,
        # Labels only: anything that is not text is dropped, so one row cannot change a column's type.
        "topic": _label(rec.get("topic")) or _label(rec.get("domain")) or _label(meta.get("topic")),
        "answer_type": _label(rec.get("answer_type")) or _label(meta.get("answer_type")),
    }
    if kind not in RECORDED_SOURCES:
        if not gold:
            raise ValueError("no gold answer")
        return row
    for model in models:
        answer = rec.get(f"{model}_answer")
        row[f"{model}_answer"] = answer if isinstance(answer, str) and answer.strip() else None
        row[f"{model}_grade"] = parse_grade(rec.get(f"{model}_grade"))
        if model in required:
            if row[f"{model}_answer"] is None and row[f"{model}_grade"] is None:
                raise ValueError(f"neither {model}_answer nor {model}_grade is given")
            if row[f"{model}_grade"] is None and not gold:
                raise ValueError(f"{model}_answer needs a gold answer to be judged")
        for field in USAGE_FIELDS:
            row[f"{model}_{field}"] = _amount(rec.get(f"{model}_{field}"), f"{model}_{field}",
                                               MAX_RECORDED[field])
    return row


def _label(value) -> str | None:
    try:
        return _text(value, "label")
    except ValueError:
        return None


def stable_sample(frame: pd.DataFrame, size: int, seed: int = 0) -> pd.DataFrame:
    """The ``size`` questions with the smallest seeded hash: adding or removing other
    rows changes the sample only where a new row ranks in."""
    if not size or size >= len(frame):
        return frame.reset_index(drop=True)
    rank = frame["qid"].map(lambda q: unit_interval("sample", seed, q))
    return frame.loc[rank.sort_values(kind="stable").index[:size]].sort_values("source_row").reset_index(drop=True)
