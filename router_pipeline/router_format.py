"""The router's text format: prompt, completion and parser, in one place.

Training data, local inference, Modal and evaluation all import this module; no
other module spells the prompt or the markers.

Two completion modes:
- ``reasoning``: ``[REASONING] <analysis> <policy sentence> [DECISION] <Policy>``
- ``fast``: ``[DECISION] <Policy> [REASONING] <analysis> <policy sentence>``, so the
  policy distribution is read from a single forward pass at the decision point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.sax.saxutils import escape, unescape

from router_pipeline.policies import POLICIES, POLICY_DESCRIPTIONS, POLICY_SENTENCES

REASONING = "[REASONING]"
DECISION = "[DECISION]"
MODES = ("reasoning", "fast")

INSTRUCTION = (
    "You route user requests to language models. Read the conversation, think about "
    "what answering it takes, and pick exactly one route from the list."
)


def routes_xml(policies: tuple[str, ...] = POLICIES) -> str:
    lines = ["<routes>"]
    for name in policies:
        lines.append(f'  <route name="{name}">{escape(POLICY_DESCRIPTIONS[name])}</route>')
    lines.append("</routes>")
    return "\n".join(lines)


def build_prompt(query: str) -> str:
    """The router prompt for one query. The query is XML-escaped so that it cannot
    close the conversation block or pose as a route."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("router prompt needs a non-empty query string")
    return (
        f"{INSTRUCTION}\n\n{routes_xml()}\n\n"
        f"<conversation>\n{escape(query.strip())}\n</conversation>\n\n"
    )


_CONVERSATION = re.compile(r"<conversation>\n(.*)\n</conversation>", re.DOTALL)


def query_from_prompt(prompt: str) -> str:
    """Inverse of build_prompt: the (unescaped) query inside the conversation block."""
    found = _CONVERSATION.findall(prompt)
    if len(found) != 1:
        raise ValueError("prompt does not hold exactly one <conversation> block")
    return unescape(found[0])


def build_completion(policy: str, analysis: str, mode: str = "reasoning") -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    reasoning = f"{analysis.strip()} {POLICY_SENTENCES[policy]}".strip()
    if mode == "reasoning":
        return f"{REASONING} {reasoning} {DECISION} {policy}"
    if mode == "fast":
        return f"{DECISION} {policy} {REASONING} {reasoning}"
    raise ValueError(f"unknown completion mode {mode!r}; expected one of {MODES}")


@dataclass(frozen=True)
class ParsedRoute:
    policy: str | None
    reasoning: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.policy is not None


_POLICY_AFTER_DECISION = re.compile(r"\s*([A-Za-z_]+)")


def parse_completion(generated: str, mode: str = "reasoning") -> ParsedRoute:
    """Read the policy from the generated span only (never from the prompt).

    Only the three policy names are accepted, right after the first [DECISION]
    marker; anything else is a parse failure with a reason, never a guess.
    """
    if mode not in MODES:
        raise ValueError(f"unknown completion mode {mode!r}; expected one of {MODES}")
    text = generated or ""
    reasoning = ""
    if REASONING in text:
        after = text.split(REASONING, 1)[1]
        reasoning = after.split(DECISION, 1)[0].strip()
    if DECISION not in text:
        return ParsedRoute(None, reasoning, f"no {DECISION} marker in the output")
    decisions = []
    for chunk in text.split(DECISION)[1:]:
        m = _POLICY_AFTER_DECISION.match(chunk)
        decisions.append(m.group(1) if m else "")
    first = decisions[0]
    if first not in POLICIES:
        return ParsedRoute(None, reasoning, f"{DECISION} is followed by {first!r}, not a policy name")
    if any(d in POLICIES and d != first for d in decisions[1:]):
        return ParsedRoute(None, reasoning, "conflicting decisions in one output")
    return ParsedRoute(first, reasoning)
