"""Query analyses: one sentence about the query ALONE, the router's reasoning.

The analyser (an LLM or the deterministic rules below) never sees the gold answer
or any model answer, so the analysis is leak-free by construction; find_leaks
checks it anyway, and an LLM analysis that leaks is replaced by the rules.
"""

from __future__ import annotations

import re

import pandas as pd

from router_pipeline.llm import RULES, RoleSpec
from router_pipeline.llm.runner import RetryPolicy, RunStats, complete_all
from router_pipeline.llm.types import OK
from router_pipeline.text import normalise

ANALYSIS_PROMPT = """Describe in one sentence what it takes to answer the request below: what kind
of fact it asks for, how specific or obscure that fact is, and any constraint
(a date, a rank, a place) it sets. Do not answer the request and do not guess.

Request: {query}
Analysis:"""
ANALYSIS_COLUMNS = ["qid", "query", "analysis", "analyser"]

_TARGETS = [
    (re.compile(r"^(in )?(what|which) (year|month|day|date|decade|century)\b|^when\b", re.I), "a date"),
    (re.compile(r"^how (many|much|long|old|tall|far|high)\b|\b(what|which) (number|percentage|amount|age)\b", re.I), "a number"),
    (re.compile(r"^who\b|\b(what|which) (person|man|woman|artist|author|scientist|player|president)\b|\bwhat (is|was) the name of the (person|man|woman)\b", re.I), "a person's name"),
    (re.compile(r"^where\b|\b(what|which) (city|country|town|place|state|province|village|county|island)\b", re.I), "a place"),
    (re.compile(r"\b(what|which) (is|was) the (title|name)\b", re.I), "a title or name"),
]
_ENTITY = re.compile(r"(?<![.?!]\s)(?<!^)\b([A-Z][\w'’.&-]*(?:\s+(?:of|de|la|du|von|van|the|and|for|in)?\s*[A-Z][\w'’.&-]*)*)")
_YEAR = re.compile(r"\b(1\d{3}|20\d{2})\b")
_RANK = re.compile(r"\b(first|second|third|fourth|fifth|last|\d+(st|nd|rd|th))\b", re.I)


def analyse_query(query: str) -> str:
    """A deterministic one-sentence analysis built only from the query's own words."""
    text = query.strip()
    target = next((label for pattern, label in _TARGETS if pattern.search(text)), "a specific fact")
    entities = [e for e in _ENTITY.findall(text) if e.split()[0].lower() not in {"what", "which", "who", "when", "where", "how", "in", "i"}]
    years = _YEAR.findall(text)
    ranks = _RANK.findall(text)
    about = f" about {', '.join(entities[:2])}" if entities else ""
    constraints = []
    if years:
        constraints.append(f"the year {years[0]}" if len(years) == 1 else f"the years {', '.join(years[:3])}")
    if ranks:
        constraints.append("an ordinal position")
    constraint = f", constrained by {' and '.join(constraints)}" if constraints else ""
    specifics = len(entities) + len(years) + len(ranks)
    if specifics >= 3 or len(text) > 140:
        depth = "it depends on exact recall of a narrow, long-tail detail"
    elif specifics >= 1:
        depth = "it needs precise recall of a specific documented fact"
    else:
        depth = "it concerns general, widely documented knowledge"
    return f"The request asks for {target}{about}{constraint}; {depth}."


def analysis_request_prompt(query: str) -> str:
    return ANALYSIS_PROMPT.format(query=query)


def _first_sentence(text: str) -> str:
    text = " ".join((text or "").split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m.group(1) if m else text).strip()


def find_leaks(analysis: str, query: str, secrets: dict[str, str | None]) -> list[str]:
    """Names of the secrets (gold answer, model answers) that the analysis reveals: a
    secret counts when it appears in the analysis but not in the query itself."""
    a, q = normalise(analysis), normalise(query)
    leaked = []
    for name, secret in secrets.items():
        s = normalise(secret) if isinstance(secret, str) else ""
        if len(s) < 2 and not s.isdigit():
            continue
        pattern = rf"(?<!\w){re.escape(s)}(?!\w)"
        if re.search(pattern, a) and not re.search(pattern, q):
            leaked.append(name)
    return leaked


def analyse_queries(
    questions: pd.DataFrame,
    *,
    analyser: RoleSpec | None = None,
    client=None,
    cache=None,
    concurrency: int = 8,
    retry: RetryPolicy = RetryPolicy(),
    progress: bool = True,
) -> tuple[pd.DataFrame, RunStats]:
    """One analysis per question (qid, query). Only the query is ever shown."""
    rows = [{"qid": q, "query": text, "analysis": analyse_query(text), "analyser": RULES}
            for q, text in zip(questions["qid"], questions["query"])]
    stats = RunStats()
    if analyser is not None and rows:
        requests = [analyser.request(analysis_request_prompt(r["query"])) for r in rows]
        results, stats = complete_all(client, requests, cache, concurrency=concurrency, retry=retry,
                                      desc=f"analyses ({analyser.model})", progress=progress)
        for row, res in zip(rows, results):
            sentence = _first_sentence(res.text) if res.status == OK else ""
            if sentence:
                row.update(analysis=sentence, analyser=analyser.model)
            else:
                row["analyser"] = f"{RULES} (fallback: {res.error or res.status})"
    return pd.DataFrame(rows, columns=ANALYSIS_COLUMNS), stats


def scrub_leaks(analyses: pd.DataFrame, secrets_by_qid: dict[str, dict[str, str | None]]) -> tuple[pd.DataFrame, int]:
    """Replace any analysis that reveals a secret with the rules analysis; returns the
    number replaced."""
    out = analyses.copy()
    replaced = 0
    for i, row in out.iterrows():
        leaks = find_leaks(row["analysis"], row["query"], secrets_by_qid.get(row["qid"], {}))
        if leaks:
            out.at[i, "analysis"] = analyse_query(row["query"])
            out.at[i, "analyser"] = f"{RULES} (replaced: revealed {', '.join(leaks)})"
            replaced += 1
    return out, replaced


def answer_secrets(questions: pd.DataFrame, answers: pd.DataFrame) -> dict[str, dict]:
    """qid -> {"gold": ..., "medium_answer": ..., "large_answer": ...}: what no analysis may
    reveal. Abstentions are left out (an "I don't know" reveals nothing)."""
    from router_pipeline.labels.judging import is_abstention

    out = {q: {"gold": g} for q, g in zip(questions["qid"], questions["gold_answer"])}
    for row in answers.itertuples(index=False):
        if row.qid in out and row.status in ("ok", "recorded") and not is_abstention(row.answer):
            out[row.qid][f"{row.tier}_answer"] = row.answer
    return out
