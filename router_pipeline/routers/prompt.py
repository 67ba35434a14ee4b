"""The router's text format: prompt, completion and parser, in one place.

Training data, local inference, Modal and evaluation all import this module; no
other module spells the prompt or the markers.

Completion modes:
- ``fast`` (default): ``[DECISION] <Policy>``. The decision is the first thing the
  completion says, so one forward pass over ``prompt + [DECISION]`` gives the
  distribution over the policies, and training needs logits at two positions only.
- ``explained``: ``[DECISION] <Policy> [REASONING] <analysis> <policy sentence>``: decided
  as fast, and the router can also write why (costs training time on CPU).
- ``reasoning``: ``[REASONING] <analysis> <policy sentence> [DECISION] <Policy>``: the
  chain first; the router must generate before it decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args
from xml.sax.saxutils import escape, unescape

from router_pipeline.policies import POLICIES, POLICY_DESCRIPTIONS, POLICY_SENTENCES

REASONING = "[REASONING]"
DECISION = "[DECISION]"
Mode = Literal["fast", "explained", "reasoning"]
MODES = get_args(Mode)
DEFAULT_MODE = "fast"
DECISION_FIRST = ("fast", "explained")  # modes whose decision is read from one forward pass

# The router sees at most this many characters of a query: the head (where the subject
# is set) and the tail (where the question is asked). Long passages cost CPU training
# time at every step and add little to the decision.
ROUTER_QUERY_HEAD = 900
ROUTER_QUERY_TAIL = 300
ELLIPSIS = " [...] "
# ... and at most this many tokens of it, head and tail in the same 3:1 ratio: 1,200
# characters of prose are about 270 Gemma tokens, but 1,200 digits are 1,200 tokens, and
# a pass over them cost 200 ms against 42 ms for 384 (one caller's query held up the rest).
ROUTER_MAX_TOKENS = 384

INSTRUCTION = "Pick the route for the conversation."
# A query must not carry a marker of the completion format into the prompt.
_MARKERS = re.compile(r"\[(DECISION|REASONING)\]", re.IGNORECASE)


def routes_xml(policies: tuple[str, ...] = POLICIES) -> str:
    lines = ["<routes>"]
    for name in policies:
        lines.append(f'<route name="{name}">{escape(POLICY_DESCRIPTIONS[name])}</route>')
    lines.append("</routes>")
    return "\n".join(lines)


def router_query(query: str) -> str:
    """The query as the router sees it: trimmed, markers neutralised, long ones cut to
    head + tail. Training and serving both go through here."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("router prompt needs a non-empty query string")
    text = _MARKERS.sub(lambda m: f"({m.group(1)})", query.strip())
    if len(text) > ROUTER_QUERY_HEAD + ROUTER_QUERY_TAIL + len(ELLIPSIS):
        text = text[:ROUTER_QUERY_HEAD] + ELLIPSIS + text[-ROUTER_QUERY_TAIL:]
    return text


def cut_tokens(ids: list[int]) -> list[int]:
    """Token ids cut to ROUTER_MAX_TOKENS: the head (with BOS) and the tail."""
    if len(ids) <= ROUTER_MAX_TOKENS:
        return ids
    tail = ROUTER_MAX_TOKENS * ROUTER_QUERY_TAIL // (ROUTER_QUERY_HEAD + ROUTER_QUERY_TAIL)
    return ids[:ROUTER_MAX_TOKENS - tail] + ids[-tail:]


# Every prompt starts with this; it ends at a newline, so that it tokenizes the same
# alone as inside a prompt (a server computes it once: Router's prefix cache).
PROMPT_PREFIX = f"{INSTRUCTION}\n{routes_xml()}\n<conversation>\n"


def prompt_suffix(query: str) -> str:
    """What follows PROMPT_PREFIX for this query. The query is XML-escaped so that it
    cannot close the conversation block or pose as a route."""
    return f"{escape(router_query(query))}\n</conversation>\n"


def build_prompt(query: str) -> str:
    """The router prompt for one query."""
    return PROMPT_PREFIX + prompt_suffix(query)


def conversation_text(messages: list[dict]) -> str:
    """A chat conversation as one router query: every user and assistant turn, in order,
    so that a follow-up ("and in 1997?") is routed with what it refers to. A single user
    turn is its text unchanged (the form the router was trained on). System messages
    are left out: they are the application's fixed instructions, the same for every
    request, and would fill the head of the router's window."""
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise ValueError(f"message {i}: expected an object with role system, developer, user, assistant or tool")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if m["role"] in ("user", "assistant") and isinstance(content, str) and content.strip():
            turns.append((m["role"], content.strip()))
    if not turns:
        raise ValueError("the conversation has no user or assistant text to route on")
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n".join(f"{role}: {text}" for role, text in turns)


_CONVERSATION = re.compile(r"<conversation>\n(.*)\n</conversation>", re.DOTALL)


def query_from_prompt(prompt: str) -> str:
    """Inverse of build_prompt: the query as the router saw it (``router_query``)."""
    found = _CONVERSATION.findall(prompt)
    if len(found) != 1:
        raise ValueError("prompt does not hold exactly one <conversation> block")
    return unescape(found[0])


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown completion mode {mode!r}; expected one of {MODES}")
    return mode


def build_completion(policy: str, analysis: str, mode: str = DEFAULT_MODE) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    check_mode(mode)
    if mode == "fast":
        return f"{DECISION} {policy}"
    reasoning = f"{analysis.strip()} {POLICY_SENTENCES[policy]}".strip()
    if mode == "explained":
        return f"{DECISION} {policy} {REASONING} {reasoning}"
    return f"{REASONING} {reasoning} {DECISION} {policy}"


@dataclass(frozen=True)
class ParsedRoute:
    policy: str | None
    reasoning: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.policy is not None


_WORD_AFTER_DECISION = re.compile(r"\s*([^\s\[]*)")


def parse_completion(generated: str, mode: str = DEFAULT_MODE) -> ParsedRoute:
    """Read the policy from the generated span only (never from the prompt).

    Only an exact policy name right after the first [DECISION] marker is accepted
    (``Standard_Query123`` is not one); anything else is a parse failure with a
    reason, never a guess.
    """
    check_mode(mode)
    text = generated or ""
    reasoning = ""
    if REASONING in text:
        after = text.split(REASONING, 1)[1]
        reasoning = after.split(DECISION, 1)[0].strip()
    if DECISION not in text:
        return ParsedRoute(None, reasoning, f"no {DECISION} marker in the output")
    decisions = [_WORD_AFTER_DECISION.match(chunk).group(1) for chunk in text.split(DECISION)[1:]]
    first = decisions[0]
    if first not in POLICIES:
        return ParsedRoute(None, reasoning, f"{DECISION} is followed by {first!r}, not a policy name")
    if any(d in POLICIES and d != first for d in decisions[1:]):
        return ParsedRoute(None, reasoning, "conflicting decisions in one output")
    return ParsedRoute(first, reasoning)
