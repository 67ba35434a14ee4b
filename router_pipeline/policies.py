"""Routing policies, the judge's grades, the two tiers and the 9-cell oracle matrix.

The matrix maps (medium-model grade, large-model grade) to the policy the router
should have chosen. Each cell carries a one-line rationale that stays with the label.
"""

from __future__ import annotations

from dataclasses import dataclass

STANDARD = "Standard_Query"
COMPLEX = "Complex_Query"
AMBIGUOUS = "Ambiguous_Query"
POLICIES: tuple[str, ...] = (STANDARD, COMPLEX, AMBIGUOUS)

# The two tiers a policy routes to: the cheaper model and the stronger one.
MEDIUM = "medium"
LARGE = "large"
TIERS: tuple[str, ...] = (MEDIUM, LARGE)

POLICY_DESCRIPTIONS: dict[str, str] = {
    STANDARD: "the cheaper model answers it well",
    COMPLEX: "only the stronger model is likely to answer it well",
    AMBIGUOUS: "both models are likely to fail or decline",
}

# The sentence that follows the analysis in a router completion, one per policy.
POLICY_SENTENCES: dict[str, str] = {
    STANDARD: "The cheaper model should handle this reliably.",
    COMPLEX: "This needs the stronger model.",
    AMBIGUOUS: "Both models are likely to fail or abstain here.",
}

CORRECT = "Correct"
INCORRECT = "Incorrect"
IDK = "IDK"
GRADES: tuple[str, ...] = (CORRECT, INCORRECT, IDK)


@dataclass(frozen=True)
class OracleCell:
    policy: str
    rationale: str


ORACLE_MATRIX: dict[tuple[str, str], OracleCell] = {
    (CORRECT, CORRECT): OracleCell(STANDARD, "Both models are right, so the cheaper one suffices."),
    (CORRECT, INCORRECT): OracleCell(STANDARD, "Only the medium model is right; escalating would hurt."),
    (CORRECT, IDK): OracleCell(STANDARD, "The medium model answers what the large model declines."),
    (INCORRECT, CORRECT): OracleCell(COMPLEX, "Only the large model is right: escalate."),
    (INCORRECT, INCORRECT): OracleCell(AMBIGUOUS, "Both models are wrong; neither can be trusted."),
    (INCORRECT, IDK): OracleCell(COMPLEX, "The large model abstains instead of being wrong: escalating is safer."),
    (IDK, CORRECT): OracleCell(COMPLEX, "Only the large model knows the answer: escalate."),
    (IDK, INCORRECT): OracleCell(AMBIGUOUS, "The medium model abstains and the large model is wrong."),
    (IDK, IDK): OracleCell(AMBIGUOUS, "Neither model knows the answer."),
}


def oracle_cell(medium_grade: str, large_grade: str) -> OracleCell:
    """The policy and rationale for a pair of grades; raises on an unknown label."""
    try:
        return ORACLE_MATRIX[(medium_grade, large_grade)]
    except KeyError:
        raise ValueError(
            f"unknown grade pair ({medium_grade!r}, {large_grade!r}); grades must be one of {GRADES}"
        ) from None
