"""llm-council sessions -> extra routing labels (docs/pipeline.md: "llm-council sessions").

Two file formats under the council folder:
- ``*.jsonl``: llm-council's routing-label export, one object per line with
  query, query_hash, best_model, borda_score, council_agreement, timestamp;
- ``*.json``: a full session (query, stage1_results, stage2_results with
  parsed_ranking, stage3_result, metadata.label_to_model, metadata.aggregate_rankings);
  a file may also hold a list of sessions.

What is recomputed rather than trusted:
- Borda (normalised): a reviewer ranking N responses gives the k-th place
  (N-1-k)/(N-1); a model's score is the mean over the reviewers that ranked it.
  Self-votes (a reviewer ranking its own response) are left out by default, and
  the comparison with the stored ``aggregate_rankings`` uses the same rule as
  llm-council (self-votes included); a difference is reported, never silently used.
- Agreement: the share of the reviewers who ranked anything that put the winner
  first. Unanimous -> 1.0; a split vote -> lower; a clearer win always scores
  higher (llm-council's own ``council_agreement`` falls as the margin grows, so it
  is reported but not used). A JSONL export carries no rankings: its agreement is
  the winner's stored normalised Borda, which is 1.0 only when every reviewer
  ranked the winner first.
- The query hash: llm-council's is sha256(query)[:16]; a stored hash that
  differs is reported. Deduplication uses router_pipeline's normalised hash.

A session becomes a label when its winner's model has a tier (``model_tiers``):
medium -> Standard_Query, large -> Complex_Query. A tie for first place
(deadlock) or an agreement below ``min_agreement`` is dropped or becomes
Ambiguous_Query, as configured; the agreement is kept with the label as provenance.

For a pool of models (``pool_questions``), a full session whose first stage holds the
answers of pool models is also a question with recorded answers: the council's final
(stage 3) answer is its reference, and each pool model's stage-1 answer, under its pool
name, is judged blind against it like any other answer: per-model grades, not only a
policy (a JSONL export holds no answers). What a pool model did not answer is answered
by ``pool_answers`` as for any question.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import pandas as pd

from router_pipeline.llm.models import TIER_OF
from router_pipeline.policies import AMBIGUOUS, COMPLEX, LARGE, MEDIUM, STANDARD
from router_pipeline.text import MAX_QUERY_CHARS, check_query, query_hash

TIER_POLICY = {MEDIUM: STANDARD, LARGE: COMPLEX}
LowAgreement = Literal["drop", "ambiguous"]
LOW_AGREEMENT = get_args(LowAgreement)
LABEL_COLUMNS = ["qid", "query", "query_hash", "policy", "agreement", "winner", "winner_borda",
                 "reviewers", "rationale", "source", "file", "session"]
# As sessions name the models: the id, or OpenRouter's google/<id>.
DEFAULT_TIERS = {**TIER_OF, **{f"google/{m}": t for m, t in TIER_OF.items()}}
EPS = 1e-9


@dataclass(frozen=True)
class CouncilRules:
    model_tiers: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TIERS))  # winner model -> tier
    min_agreement: float = 0.6
    low_agreement: LowAgreement = "drop"
    deadlock: LowAgreement = "ambiguous"
    exclude_self_votes: bool = True
    max_query_chars: int = MAX_QUERY_CHARS  # as for questions: longer queries do not fit the router prompt

    def __post_init__(self):
        for name in ("low_agreement", "deadlock"):
            if getattr(self, name) not in LOW_AGREEMENT:
                raise ValueError(f"{name} must be one of {LOW_AGREEMENT}, got {getattr(self, name)!r}")


@dataclass
class Session:
    """One council outcome, whatever file it came from."""
    query: str
    file: str
    session: str  # line number or session id within the file
    winner: str | None = None
    winner_borda: float | None = None
    agreement: float | None = None
    deadlock: bool = False
    reviewers: int = 0
    borda: dict = field(default_factory=dict)
    answers: dict = field(default_factory=dict)  # model -> its stage-1 answer (full sessions)
    final: str | None = None  # the council's stage-3 answer


@dataclass
class CouncilResult:
    labels: pd.DataFrame
    rejected: list = field(default_factory=list)  # {"file", "session", "reason"}
    disagreements: list = field(default_factory=list)  # stored vs recomputed
    files: int = 0
    sessions: list = field(default_factory=list)  # every session read, labelled or not


class SessionError(ValueError):
    pass


# -- reading ------------------------------------------------------------------
def read_folder(folder: str | Path, rules: CouncilRules = CouncilRules()) -> CouncilResult:
    """Every *.json / *.jsonl file under ``folder`` (recursively, sorted); one bad file
    or line is listed in ``rejected`` and the rest are used."""
    folder = Path(folder)
    result = CouncilResult(pd.DataFrame(columns=LABEL_COLUMNS))
    if not folder.is_dir():
        result.rejected.append({"file": str(folder), "session": "", "reason": "council folder does not exist"})
        return result
    sessions: list[Session] = []
    for path in council_files(folder):
        result.files += 1
        name = str(path.relative_to(folder))
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the JSON
        except (OSError, UnicodeDecodeError) as exc:
            result.rejected.append({"file": name, "session": "", "reason": f"unreadable: {exc}"})
            continue
        reader = _jsonl_sessions if path.suffix == ".jsonl" else _json_sessions
        found = []
        try:
            found.extend(reader(text, name, rules, result))
        except Exception as exc:  # one odd file never costs the others their labels
            result.rejected.append({"file": name, "session": "",
                                    "reason": f"unreadable session file ({type(exc).__name__}: {exc})"})
        sessions.extend(found)
    result.labels = to_labels(sessions, rules, result.rejected)
    result.sessions = sessions
    return result


def council_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))


def _jsonl_sessions(text: str, name: str, rules: CouncilRules, result: CouncilResult):
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            row = _loads(line)
            if not isinstance(row, dict):
                raise SessionError("a line must be a JSON object")
            missing = [k for k in ("query", "best_model", "borda_score") if row.get(k) in (None, "")]
            if missing:
                raise SessionError(f"missing field(s) {', '.join(missing)}")
            query = _query(row["query"], rules.max_query_chars)
            borda = _unit(row["borda_score"], "borda_score")
        except (json.JSONDecodeError, SessionError) as exc:
            result.rejected.append({"file": name, "session": where, "reason": _reason(exc)})
            continue
        stored_hash = row.get("query_hash")
        if stored_hash and stored_hash != llm_council_hash(row["query"]):
            result.disagreements.append({"file": name, "session": where, "field": "query_hash",
                                         "stored": stored_hash, "recomputed": llm_council_hash(row["query"])})
        if "council_agreement" in row:
            result.disagreements.append({"file": name, "session": where, "field": "council_agreement (not used)",
                                         "stored": row["council_agreement"], "recomputed": borda})
        yield Session(query, name, where, winner=str(row["best_model"]), winner_borda=borda, agreement=borda)


def _json_sessions(text: str, name: str, rules: CouncilRules, result: CouncilResult):
    try:
        data = _loads(text)
    except (json.JSONDecodeError, SessionError) as exc:
        result.rejected.append({"file": name, "session": "", "reason": _reason(exc)})
        return
    items = data if isinstance(data, list) else [data]
    for i, item in enumerate(items):
        where = str(item.get("session_id") or item.get("id") or f"#{i}") if isinstance(item, dict) else f"#{i}"
        try:
            session = parse_session(item, name, where, rules, result.disagreements)
        except SessionError as exc:
            result.rejected.append({"file": name, "session": where, "reason": _reason(exc)})
            continue
        except Exception as exc:  # a malformed session costs that session only
            result.rejected.append({"file": name, "session": where,
                                    "reason": f"malformed session ({type(exc).__name__}: {exc})"})
            continue
        yield session


def parse_session(item, name: str, where: str, rules: CouncilRules, disagreements: list) -> Session:
    """A full llm-council session -> its recomputed outcome."""
    if not isinstance(item, dict):
        raise SessionError("a session must be a JSON object")
    query = _query(item.get("query"), rules.max_query_chars)
    meta = item.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("label_to_model"), dict):
        raise SessionError("missing metadata.label_to_model")
    labels = {label: _model_of(v) for label, v in meta["label_to_model"].items()}
    if any(m is None for m in labels.values()):
        raise SessionError("label_to_model entries must be a model name or {model: ...}")
    stage2 = item.get("stage2_results")
    if stage2 is None:
        raise SessionError("missing stage2_results")
    if not isinstance(stage2, list):
        raise SessionError("stage2_results must be a list")
    models = sorted(set(labels.values()))
    if len(models) < 2:
        raise SessionError(f"single-model council ({models[0] if models else 'no model'}): no peer comparison to learn from")
    rankings = [(r.get("model"), _ranking(r, labels)) for r in stage2 if isinstance(r, dict)]
    used = _borda(rankings, rules.exclude_self_votes)
    if not used:
        if not any(r for _, r in rankings):
            raise SessionError("every reviewer abstained (no parsed ranking)")
        raise SessionError("no reviewer ranked at least two answers")
    _compare_stored(meta.get("aggregate_rankings"), _borda(rankings, False), name, where, disagreements)
    ordered = sorted(used.items(), key=lambda kv: (-kv[1], kv[0]))
    winner, top = ordered[0]
    deadlock = len(ordered) > 1 and abs(ordered[1][1] - top) < EPS
    votes = [_agrees(m, r, winner, rules.exclude_self_votes) for m, r in rankings]
    votes = [v for v in votes if v is not None]
    agreement = sum(votes) / len(votes) if votes else 0.0
    answers = {r["model"]: r["response"] for r in item.get("stage1_results") or []
               if isinstance(r, dict) and isinstance(r.get("model"), str) and _said(r.get("response"))}
    final = item.get("stage3_result")
    final = final.get("response") if isinstance(final, dict) and _said(final.get("response")) else None
    return Session(query, name, where, winner=winner, winner_borda=top, agreement=agreement, deadlock=deadlock,
                   reviewers=len(votes), borda=used, answers=answers, final=final)


def _said(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _ranking(review: dict, labels: dict) -> list[str]:
    """The reviewer's ranking as model names, best first; [] when it abstained."""
    parsed = review.get("parsed_ranking")
    order = parsed.get("ranking") if isinstance(parsed, dict) else None
    if not isinstance(order, list):
        return []
    return [labels[x] for x in order if isinstance(x, str) and x in labels]


def _without(ranking: list[str], reviewer) -> list[str]:
    return [m for m in ranking if m != reviewer]


def _ballot(reviewer, ranking: list[str], exclude_self: bool) -> dict[str, float]:
    """One reviewer's normalised Borda points. Without self-votes its own answer is taken
    out and the rest re-normalised; a reviewer then left with a single other answer (a
    two-model council) gives it 1 when it ranked it above its own answer, else 0: a model
    that prefers another's answer to its own is the strongest evidence there is."""
    order = _without(ranking, reviewer) if exclude_self else ranking
    if exclude_self and len(order) == 1 and len(ranking) == 2:
        return {order[0]: 1.0 if ranking[0] == order[0] else 0.0}
    n = len(order)
    if n < 2:
        return {}  # one response ranked alone says nothing
    return {model: (n - 1 - k) / (n - 1) for k, model in enumerate(order)}


def _agrees(reviewer, ranking: list[str], winner: str, exclude_self: bool) -> bool | None:
    """Whether a reviewer's ballot puts the winner first; None when the ballot cannot
    speak about the winner (it abstained, or, without self-votes, it is the winner's own)."""
    if not ranking or (exclude_self and reviewer == winner):
        return None
    ballot = _ballot(reviewer, ranking, exclude_self)
    return ballot[winner] == 1.0 if winner in ballot else None


def _borda(rankings, exclude_self: bool) -> dict[str, float]:
    """Normalised Borda per model: mean of its ballot points over the reviewers that ranked it."""
    scores: dict[str, list[float]] = {}
    for reviewer, ranking in rankings:
        for model, points in _ballot(reviewer, ranking, exclude_self).items():
            scores.setdefault(model, []).append(points)
    return {m: sum(v) / len(v) for m, v in scores.items()}


def _compare_stored(stored, recomputed: dict, name: str, where: str, out: list) -> None:
    if not isinstance(stored, list):
        return
    for entry in stored:
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or "borda_score" not in entry:
            continue
        mine = recomputed.get(entry["model"])
        try:
            theirs = float(entry["borda_score"])
        except (TypeError, ValueError):
            continue
        if mine is None or abs(mine - theirs) > 1e-3:
            out.append({"file": name, "session": where, "field": f"borda_score[{entry['model']}]",
                        "stored": theirs, "recomputed": mine})


def _model_of(value):
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("model"), str):
        return value["model"]
    return None


def _query(value, max_chars: int) -> str:
    try:
        return check_query(value, max_chars)
    except ValueError as exc:
        raise SessionError(str(exc)) from None


def _loads(text: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise SessionError("JSON nested too deeply") from None


def _unit(value, name: str) -> float:
    if isinstance(value, bool):
        raise SessionError(f"{name} is a boolean ({value}), not a number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SessionError(f"{name} is not a number: {value!r}") from None
    if not 0 <= v <= 1:
        raise SessionError(f"{name} must be within [0, 1] (normalised Borda), got {v}")
    return v


def _reason(exc: Exception) -> str:
    return f"malformed JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc)


def llm_council_hash(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


# -- labelling ----------------------------------------------------------------
def to_labels(sessions: list[Session], rules: CouncilRules, rejected: list) -> pd.DataFrame:
    rows = []
    for s in sessions:
        def drop(reason):
            rejected.append({"file": s.file, "session": s.session, "reason": reason})

        tier = rules.model_tiers.get(s.winner)
        if s.deadlock or s.agreement < rules.min_agreement:
            why = "deadlock: tie for first place" if s.deadlock else f"agreement {s.agreement:.2f} < {rules.min_agreement:.2f}"
            if (rules.deadlock if s.deadlock else rules.low_agreement) == "drop":
                drop(why)
                continue
            policy, rationale = AMBIGUOUS, f"Council undecided ({why})."
        elif tier is None:
            drop(f"winner {s.winner!r} has no tier in model_tiers")
            continue
        else:
            policy = TIER_POLICY[tier]
            rationale = f"Council winner {s.winner} ({tier} tier), agreement {s.agreement:.2f}."
        h = query_hash(s.query)
        rows.append({"qid": f"council-{h}", "query": s.query, "query_hash": h, "policy": policy,
                     "agreement": float(s.agreement), "winner": s.winner,
                     "winner_borda": s.winner_borda, "reviewers": s.reviewers, "rationale": rationale,
                     "source": "council", "file": s.file, "session": s.session})
    frame = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    # The same query in several sessions: keep the clearest council.
    return frame.sort_values(["agreement", "file", "session"], ascending=[False, True, True]) \
        .drop_duplicates("query_hash").sort_values(["file", "session"]).reset_index(drop=True)


def drop_test_queries(labels: pd.DataFrame, test_questions: pd.DataFrame) -> tuple[pd.DataFrame, list]:
    """Council labels for queries of the test split never reach training."""
    test_hashes = set(test_questions["query"].map(query_hash))
    hit = labels["query_hash"].isin(test_hashes)
    rejected = [{"file": r.file, "session": r.session, "reason": "query is in the test split"}
                for r in labels[hit].itertuples()]
    return labels[~hit].reset_index(drop=True), rejected


def pool_question_rows(sessions: list[Session], pool_names: dict[str, str],
                       known_qids: set[str]) -> tuple[pd.DataFrame, list]:
    """Full sessions as questions of a pool: ``query``, the council's final answer as
    ``gold_answer`` and ``<pool name>_answer`` for each pool model that answered
    (``pool_names``: a session's model id -> its pool name). A session is left out, with
    its reason, when it has no final answer, no pool model answered, or its query is
    already a question (``known_qids``: the train and test splits; a test query never
    reaches training). The same query in several sessions: the first file's."""
    rows, rejected, names = {}, [], sorted(set(pool_names.values()))
    for s in sessions:
        mine = {pool_names[m]: text for m, text in s.answers.items() if m in pool_names}
        qid = query_hash(s.query)
        why = ("no final (stage 3) answer to judge against" if s.final is None else
               f"no answer from a pool model ({', '.join(names)})" if not mine else
               "query is already a question of the train or test split" if qid in known_qids else None)
        if why is not None:
            rejected.append({"file": s.file, "session": s.session, "reason": why})
        elif qid not in rows:
            rows[qid] = {"qid": qid, "query": s.query, "gold_answer": s.final, "topic": None, "answer_type": None,
                         "source_row": 0, "provenance": f"council:{s.file} {s.session}",
                         **{f"{n}_answer": mine.get(n) for n in names}}
    columns = ["qid", "query", "gold_answer", "topic", "answer_type", "source_row", "provenance"] + \
        [f"{n}_answer" for n in names]
    return pd.DataFrame(list(rows.values()), columns=columns), rejected


def pool_names(models) -> dict[str, str]:
    """How sessions name a pool's models (``PoolModel``s): the pool name, the model id, or
    OpenRouter's ``google/<id>`` -> the pool name."""
    return {alias: m.name for m in models for alias in (m.name, m.model, f"google/{m.model}")}
