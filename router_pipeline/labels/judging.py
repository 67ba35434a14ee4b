"""Blind grading of answers: Correct / Incorrect / IDK.

Each judge call sees one question, its reference answer and ONE answer, never the
model name, the tier or the other answer; calls are issued in a seeded random
order so that position reveals nothing either. Without an LLM judge, a
deterministic SimpleQA-style grader decides.

A question without a reference answer (a team's traffic) is graded against a rubric
instead (``RUBRIC_PROMPT``), still one answer at a time, with Gemini's structured
output: a grade and a one-line reason. The rules grader needs a reference, so without
an LLM judge such answers stay ungraded (the question gets no label, with the reason).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, fields
from difflib import SequenceMatcher

import pandas as pd

from router_pipeline.llm import RULES, RoleSpec
from router_pipeline.llm.runner import RetryPolicy, RunStats, complete_all
from router_pipeline.llm.types import BLOCKED, EMPTY, ERROR, OK
from router_pipeline.policies import CORRECT, IDK, INCORRECT
from router_pipeline.text import normalise, unit_interval

JUDGE_PROMPT = """You grade one answer to a factual question against a reference answer.

Grades:
- CORRECT: the answer commits to what the reference says. Paraphrases, extra context,
  small spelling slips in names, and numbers given to the reference's precision all
  count, as long as nothing in the answer contradicts the reference.
- INCORRECT: the answer commits to something else: another entity, date or number,
  a contradiction, or several candidates at once.
- NOT_ATTEMPTED: the answer declines, says it does not know, or commits to nothing
  concrete.
Grade only what the answer commits to, not how it is phrased.
Reply with exactly one word: CORRECT, INCORRECT or NOT_ATTEMPTED.

Question: {question}
Reference answer: {gold}
Answer to grade: {answer}
Grade:"""
RUBRIC_PROMPT = """You grade one answer to a question. There is no reference answer: grade it
on what you know.

Grades:
- CORRECT: the answer is right and answers what was asked. Paraphrases, extra context
  and small slips that change nothing count as correct.
- INCORRECT: the answer commits to something wrong, contradicts itself, offers several
  candidates at once, or answers another question.
- NOT_ATTEMPTED: the answer declines, says it does not know, or commits to nothing
  concrete.
When you are not sure the answer is right, it is not CORRECT.
Give the grade and a one-line reason.

Question: {question}
Answer to grade: {answer}"""
SAME_ANSWER_PROMPT = """Two answers were given to one question. Decide whether they give the same answer.

Verdicts:
- SAME: both commit to the same thing: the same entity, date, number or choice.
  Paraphrases, extra context, small spelling slips in names, and numbers that agree
  to the precision either gives all count as the same answer.
- DIFFERENT: they commit to different things, or either one commits to several
  candidates at once or to nothing concrete.
Do not decide which answer is right, only whether the two agree.
Reply with exactly one word: SAME or DIFFERENT.

Question: {question}
First answer: {first}
Second answer: {second}
Verdict:"""
VERDICTS = {"CORRECT": CORRECT, "INCORRECT": INCORRECT, "NOT_ATTEMPTED": IDK}
SAME_VERDICTS = {"SAME": True, "DIFFERENT": False}
# Structured output of the rubric judge (a JSON schema, as the request's text).
RUBRIC_SCHEMA = json.dumps({"type": "OBJECT", "properties": {
    "grade": {"type": "STRING", "enum": list(VERDICTS)}, "reason": {"type": "STRING"}},
    "required": ["grade", "reason"], "propertyOrdering": ["grade", "reason"]})
GOLD, RUBRIC = "gold", "rubric"  # what a judgment was graded against
JUDGMENT_COLUMNS = ["qid", "split", "tier", "label", "judge", "reason", "reference", "rubric_label",
                    "judge_input_tokens", "judge_output_tokens", "judge_cost_usd", "judge_cached"]

_ABSTAIN = re.compile(
    r"\b(i\s*(do not|don'?t|cannot|can'?t|am not sure|'m not sure|am unsure)\s*(know|say|answer|determine|recall|tell|be sure)?"
    r"|not sure|unsure|no idea|unknown|no (reliable )?information|unable to (answer|determine|find|verify)"
    r"|cannot (answer|determine|verify)|can'?t (answer|determine|verify)|not (enough|sufficient) information)\b",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_NUMERIC_GOLD = re.compile(r"^(?:about |approximately |around |~)?(-?\d+(?:\.\d+)?)\s*(%|[a-z]{0,12})?\.?$")
_MONTHS = re.compile(r"\b(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\b", re.IGNORECASE)


def judge_prompt(question: str, gold: str, answer: str) -> str:
    return JUDGE_PROMPT.format(question=question, gold=gold, answer=answer)


def rubric_prompt(question: str, answer: str) -> str:
    return RUBRIC_PROMPT.format(question=question, answer=answer)


def same_answer_prompt(question: str, first: str, second: str) -> str:
    return SAME_ANSWER_PROMPT.format(question=question, first=first, second=second)


def parse_same_output(text: str | None) -> bool | None:
    """True / False for a verdict that is exactly SAME or DIFFERENT (case and a final
    period aside), else None: never a keyword found somewhere in the text."""
    return SAME_VERDICTS.get((text or "").strip().rstrip(".").strip().upper())


def parse_rubric_output(text: str | None) -> tuple[str, str] | None:
    """(label, reason) from the rubric judge's JSON, else None (never a guess)."""
    try:
        data = json.loads(text or "")
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("reason", ""), str):
        return None
    label = VERDICTS.get(str(data.get("grade", "")).strip().upper())
    return None if label is None else (label, " ".join(data.get("reason", "").split())[:200])


def parse_judge_output(text: str | None) -> str | None:
    """The label of a verdict that is exactly one of VERDICTS (case and a final period
    aside), else None: "Not correct." or "not correct; INCORRECT" are unreadable, never
    read as a keyword found somewhere in the text."""
    word = (text or "").strip().rstrip(".").strip().upper()
    return VERDICTS.get(word)


def is_abstention(answer: str | None) -> bool:
    return not answer or not str(answer).strip() or _ABSTAIN.search(answer) is not None


def grade_with_rules(answer: str | None, gold: str) -> tuple[str, str]:
    """(label, reason) by normalised match, number precision, dates, fuzzy names and
    abstention detection."""
    if answer is None or not str(answer).strip():
        return IDK, "no answer given"
    a, g = normalise(answer), normalise(gold)
    if not g:
        raise ValueError("cannot grade without a reference answer")
    contains_gold = re.search(rf"(?<!\w){re.escape(g)}(?!\w)", a) is not None
    if _ABSTAIN.search(answer) and not contains_gold:
        return IDK, "the answer declines or says it does not know"
    numeric = _NUMERIC_GOLD.match(gold.strip().lower().replace(",", ""))
    if numeric and not _MONTHS.search(gold):
        target = numeric.group(1)
        decimals = len(target.split(".")[1]) if "." in target else 0
        found = _NUMBER.findall(answer.replace(",", ""))
        if not found:
            return INCORRECT, "the reference is a number and the answer gives none"
        ok = round(float(found[0]), decimals) == round(float(target), decimals)
        return (CORRECT, f"number matches to {decimals} decimals") if ok else (INCORRECT, f"number {found[0]} != {target}")
    if contains_gold:
        return CORRECT, "the answer contains the reference"
    same_date = _same_date(answer, gold)
    if same_date is not None:
        return (CORRECT, "same date") if same_date else (INCORRECT, "a different date")
    if len(g) >= 5 and _fuzzy_contains(a, g) >= 0.85:
        return CORRECT, "matches the reference up to a small spelling slip"
    return INCORRECT, "the answer does not match the reference"


def _fuzzy_contains(answer: str, gold: str) -> float:
    a_tokens, g_tokens = answer.split(), gold.split()
    n = len(g_tokens)
    best = 0.0
    for i in range(max(1, len(a_tokens) - n + 1)):
        window = " ".join(a_tokens[i : i + n])
        best = max(best, SequenceMatcher(None, window, gold).ratio())
    return best


def _same_date(answer: str, gold: str) -> bool | None:
    if not (_MONTHS.search(gold) and re.search(r"\b\d{3,4}\b", gold)):
        return None
    from dateutil import parser

    try:
        g = parser.parse(gold, fuzzy=True)
        a = parser.parse(answer, fuzzy=True)
    except (ValueError, OverflowError):
        return None
    if not re.search(r"\b\d{3,4}\b", answer):
        return None
    return (a.year, a.month, a.day) == (g.year, g.month, g.day)


def judge_answers(
    answers: pd.DataFrame,
    questions: pd.DataFrame,
    *,
    judge: RoleSpec | None = None,
    client=None,
    cache=None,
    seed: int = 0,
    concurrency: int = 8,
    retry: RetryPolicy = RetryPolicy(),
    progress: bool = True,
    rubric_check: int = 0,
) -> tuple[pd.DataFrame, RunStats]:
    """One judgment per answer row. ``questions`` needs qid, query, gold_answer and,
    for recorded outcomes, <tier>_grade. ``rubric_check``: up to this many answers that
    have a reference (a seeded sample) are also graded against the rubric, as if they
    had none; their ``rubric_label`` says how far labels made without references agree
    with the reference-based ones."""
    by_qid = questions.set_index("qid")
    rows: list[dict] = []
    pending: list[tuple[int, str, str | None, str, str]] = []  # (row index, question, gold, answer, graded against)
    for _, ans in answers.iterrows():
        q = by_qid.loc[ans["qid"]]
        gold = q.get("gold_answer")
        gold = gold if isinstance(gold, str) and gold.strip() else None
        row = {"qid": ans["qid"], "split": ans["split"], "tier": ans["tier"], "label": None, "judge": None,
               "reason": None, "reference": GOLD if gold else RUBRIC, "rubric_label": None, "judge_input_tokens": 0,
               "judge_output_tokens": 0, "judge_cost_usd": 0.0, "judge_cached": False}
        recorded_grade = q.get(f"{ans['tier']}_grade")
        if isinstance(recorded_grade, str):
            row.update(label=recorded_grade, judge="recorded", reason="grade recorded with the outcome", reference=None)
        elif ans["status"] == ERROR:
            row.update(judge="skipped", reason=f"answer call failed: {ans['error']}")
        elif ans["status"] in (BLOCKED, EMPTY) or not ans["answer"]:
            row.update(label=IDK, judge=RULES, reason=f"no answer given ({ans['status']})")
        elif judge is None and gold is None:
            row.update(judge="skipped", reason="no reference answer: grading against the rubric needs an LLM judge "
                                               "(the gemini profile)")
        elif judge is None:
            label, reason = grade_with_rules(ans["answer"], gold)
            row.update(label=label, judge=RULES, reason=reason)
        else:
            pending.append((len(rows), q["query"], gold, ans["answer"], False))
        rows.append(row)
    checked = sorted((p for p in pending if p[2] is not None),
                     key=lambda p: unit_interval("rubric-check", seed, f"{rows[p[0]]['qid']}:{rows[p[0]]['tier']}"))
    pending += [(i, qq, None, a, True) for i, qq, _, a, _ in checked[:rubric_check]]  # graded again, by the rubric

    stats = RunStats()
    if pending:
        random.Random(seed).shuffle(pending)  # blind to position as well as to the model
        requests = [judge.request(judge_prompt(qq, gold, a), choices=tuple(VERDICTS)) if gold is not None
                    else judge.request(rubric_prompt(qq, a), schema=RUBRIC_SCHEMA) for _, qq, gold, a, _ in pending]
        results, stats = complete_all(client, requests, cache, concurrency=concurrency, retry=retry,
                                      desc=f"judging ({judge.model})", progress=progress)
        for (i, _, gold, a, check), res in zip(pending, results):
            row = rows[i]
            if res.status != OK:
                verdict = None
            elif gold is None:
                verdict = parse_rubric_output(res.text)
            else:
                label = parse_judge_output(res.text)
                verdict = None if label is None else (label, (res.text or "").strip()[:200])
            row.update(judge_input_tokens=row["judge_input_tokens"] + res.input_tokens,
                       judge_output_tokens=row["judge_output_tokens"] + res.output_tokens,
                       judge_cost_usd=row["judge_cost_usd"] + res.cost_usd)
            if check:  # the second opinion: recorded beside the label, never instead of it
                row.update(rubric_label=verdict and verdict[0])
                continue
            row.update(judge_cached=res.cached, judge=judge.model)
            if verdict is not None:
                row.update(label=verdict[0], reason=verdict[1])
            else:  # an error row, never a guess: no label, so this question gets no oracle label
                problem = res.error or res.status if res.status != OK else f"unreadable judge verdict {res.text!r:.60}"
                row.update(label=None, reason=f"judge: {problem}")
    return pd.DataFrame(rows, columns=JUDGMENT_COLUMNS), stats


@dataclass
class SameAnswerJudge:
    """Whether two free-text answers to a question are the same answer, by the judge role
    (``SAME_ANSWER_PROMPT``): the cascade's paid comparator (``pool_cascade`` with
    ``comparator: judge``). Blind as the grader is: a call sees the question and the two
    answers, never a model's name, the two in a fixed order (sorted), so that a pair is
    one prompt whichever model answered first. Every call goes through ``complete_all``
    (the response cache, retries, prices): a pair already decided, in this run or any
    earlier one through the same cache, is not paid again. ``verdicts``: (question, first,
    second) -> True / False, or None where the call failed or its verdict cannot be read
    (counted in ``unreadable``; a failed call is not cached, so a later run asks again);
    ``stats``: every call of this judge, summed (``cost_usd``: paid here; hits are free)."""

    judge: RoleSpec
    client: object
    cache: object = None
    concurrency: int = 8
    retry: RetryPolicy = RetryPolicy()
    progress: bool = False
    verdicts: dict = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)
    unreadable: int = 0

    @staticmethod
    def pair(question, a, b) -> tuple[str, str, str]:
        """The key of a pair of answers to a question: the same for (a, b) and (b, a)."""
        first, second = sorted((" ".join(str(a).split()), " ".join(str(b).split())))
        return " ".join(str(question).split()), first, second

    def ask(self, pairs) -> None:
        """Decide every pair (``pair`` keys) not yet decided, in one run of calls."""
        todo = list(dict.fromkeys(p for p in pairs if p not in self.verdicts))
        if not todo:
            return
        requests = [self.judge.request(same_answer_prompt(*p), choices=tuple(SAME_VERDICTS)) for p in todo]
        results, stats = complete_all(self.client, requests, self.cache, concurrency=self.concurrency,
                                      retry=self.retry, desc=f"comparing answers ({self.judge.model})",
                                      progress=self.progress)
        for p, res in zip(todo, results):
            self.verdicts[p] = parse_same_output(res.text) if res.status == OK else None
            self.unreadable += self.verdicts[p] is None
        for f in fields(RunStats):
            setattr(self.stats, f.name, getattr(self.stats, f.name) + getattr(stats, f.name))

