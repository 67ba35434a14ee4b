"""Medium and large models answer every question of both splits.

One row per (question, tier): the answer text, its status (ok / empty / blocked /
error / recorded), real token counts, cost, and whether it came from the cache.
"""

from __future__ import annotations

import pandas as pd

from router_pipeline.llm import PROMPT_STYLES, RoleSpec
from router_pipeline.llm.models import cost_usd
from router_pipeline.llm.runner import RetryPolicy, RunStats, complete_all
from router_pipeline.text import clean_query

ANSWER_INSTRUCTION = (
    "Answer the question with a short factual answer: a name, number, date or phrase, "
    "nothing else. If you are not sure, answer exactly: I don't know."
)
# Written for this project (not SimpleQA rows). Three of the seven decline: small base
# models then abstain on obscure questions instead of inventing, which is what gives
# the offline tiers different grades.
FEW_SHOT = (
    ("What is the chemical symbol for gold?", "Au"),
    ("Who painted the 1889 portrait of the postman Joseph Roulin's youngest daughter's godmother?", "I don't know"),
    ("In which year did the Berlin Wall fall?", "1989"),
    ("What was the exact attendance at the 1911 Ballyhooly county fair?", "I don't know"),
    ("Who wrote the novel 'Pride and Prejudice'?", "Jane Austen"),
    ("Which engineer designed the third pumping station of the Lower Tisza canal in 1897?", "I don't know"),
    ("What is the capital city of Canada?", "Ottawa"),
)
STOP = ("\n",)
ANSWER_COLUMNS = [
    "qid", "split", "tier", "provider", "model", "answer", "status", "error", "input_tokens",
    "output_tokens", "cost_usd", "cost_known", "cached", "attempts", "latency_ms",
]


def answer_prompt(query: str, style: str = "direct") -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEW_SHOT) if style == "few_shot" else ""
    # One line: a query cannot add its own "Answer: ..." / "Question: ..." turns to the prompt.
    return f"{ANSWER_INSTRUCTION}\n\n{shots}Question: {clean_query(query)}\nAnswer:"


def generate_answers(
    questions: pd.DataFrame,
    roles: dict[str, RoleSpec],
    clients: dict[str, object],
    cache,
    *,
    concurrency: int = 8,
    retry: RetryPolicy = RetryPolicy(),
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, RunStats]]:
    """Answer every question with every tier in ``roles`` (e.g. medium, large).

    ``questions`` needs qid, query, split; recorded answers/grades (outcome sources)
    are taken as they are and never sent to a model.
    """
    rows, stats = [], {}
    for tier, spec in roles.items():
        recorded = _recorded_mask(questions, tier)
        todo = questions[~recorded]
        for _, q in questions[recorded].iterrows():
            rows.append(_recorded_row(q, tier, spec))
        if todo.empty:
            stats[tier] = RunStats()
            continue
        requests = [spec.request(answer_prompt(q, spec.prompt_style), stop=STOP) for q in todo["query"]]
        results, stats[tier] = complete_all(
            clients[tier], requests, cache, concurrency=concurrency, retry=retry,
            desc=f"{tier} answers ({spec.model})", progress=progress,
        )
        for (_, q), res in zip(todo.iterrows(), results):
            rows.append(_row(q, tier, spec.provider, spec.model, res.text, res.status, res))
    frame = pd.DataFrame(rows, columns=ANSWER_COLUMNS)
    return frame.sort_values(["split", "qid", "tier"], kind="stable").reset_index(drop=True), stats


def _recorded_mask(questions: pd.DataFrame, tier: str) -> pd.Series:
    cols = [c for c in (f"{tier}_answer", f"{tier}_grade") if c in questions.columns]
    if not cols:
        return pd.Series(False, index=questions.index)
    return questions[cols].notna().any(axis=1)


def _recorded_row(q, tier: str, spec: RoleSpec | None) -> dict:
    """A recorded outcome: its cost is the recorded USD, else its recorded tokens at the
    role's price, else unknown (0, and counted by the caller as ``cost_unknown``)."""
    row = _row(q, tier, "recorded", spec.model if spec else None, q.get(f"{tier}_answer"), "recorded")
    tokens = [q.get(f"{tier}_input_tokens"), q.get(f"{tier}_output_tokens")]
    tokens = [0 if t is None or pd.isna(t) else int(t) for t in tokens]
    recorded_cost = q.get(f"{tier}_cost_usd")
    has_cost = recorded_cost is not None and not pd.isna(recorded_cost)
    row["input_tokens"], row["output_tokens"] = tokens
    if has_cost:
        row["cost_usd"] = float(recorded_cost)
    elif any(tokens) and spec is not None:
        row["cost_usd"] = cost_usd(tokens[0], tokens[1], spec.price)
    row["cost_known"] = has_cost or (any(tokens) and spec is not None)
    return row


def _row(q, tier, provider, model, answer, status, res=None) -> dict:
    return {
        "qid": q["qid"],
        "split": q["split"],
        "tier": tier,
        "provider": provider,
        "model": model,
        "answer": answer if isinstance(answer, str) else None,
        "status": status,
        "error": res.error if res else None,
        "input_tokens": res.input_tokens if res else 0,
        "output_tokens": res.output_tokens if res else 0,
        "cost_usd": res.cost_usd if res else 0.0,
        "cost_known": res is not None,
        "cached": res.cached if res else False,
        "attempts": res.attempts if res else 0,
        "latency_ms": res.latency_ms if res else 0.0,
    }
