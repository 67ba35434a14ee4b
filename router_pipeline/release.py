"""The release rule: which candidate router to release, chosen on cross-validated
evidence, never on test rows.

A candidate's evidence is its P(Complex_Query) on rows it never trained on, each row in
a stratum: a head router's out-of-fold scores on its training rows (one stratum per
cross-validation fold, from OOF_FILE) and every candidate's scores on the validation
slice (one stratum). A LoRA adapter has no out-of-fold scores: its evidence is the
validation slice. Two candidates are compared on the rows both have evidence for, by
APGR within each stratum weighted by rows (``evaluation.crossfit_apgr``: scores of two
folds' models are never ranked together), with a paired bootstrap within strata.

Candidates are taken in the configured order; one replaces the candidate chosen so
far only when its APGR is higher on the rows they share (a tie is no evidence, so the
earlier one stays). A candidate that decides one policy for almost every validation
query is skipped. The choice, every candidate's evidence APGR and the chosen one's
intervals against each other are recorded with the release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from router_pipeline.evaluation import aligned, collapsed, crossfit_apgr, oracle_policies, paired_bootstrap, plain
from router_pipeline.policies import CORRECT

VALIDATION_STRATUM = "validation"


@dataclass
class Choice:
    name: str
    why: str
    record: dict = field(default_factory=dict)  # evidence APGR per candidate, the chosen one's intervals


def evidence_frame(validation_qids, validation_scores, oof: pd.DataFrame | None = None) -> pd.DataFrame:
    """One candidate's evidence: qid, stratum, score. ``oof``: qid, fold, p_complex (a
    head's out-of-fold scores on its training rows), or None."""
    frames = [pd.DataFrame({"qid": pd.Series(list(validation_qids), dtype=object).astype(str),
                            "stratum": VALIDATION_STRATUM,
                            "score": np.asarray(validation_scores, float)})]
    if oof is not None and len(oof):
        frames.append(pd.DataFrame({"qid": oof["qid"].astype(str).to_numpy(), "stratum": "fold " + oof["fold"].astype(str),
                                    "score": oof["p_complex"].to_numpy(float)}))
    return pd.concat(frames, ignore_index=True).drop_duplicates("qid", keep="first")


def _shared(a: pd.DataFrame, b: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """The rows both candidates have evidence for, in the same stratum, with both grades."""
    both = a.merge(b, on=["qid", "stratum"], suffixes=("_a", "_b"))
    return both.merge(_graded(outcomes), on="qid")


def _apgr(rows: pd.DataFrame, column: str) -> float:
    if rows.empty:
        return math.nan
    return crossfit_apgr(rows[column], rows["medium_label"] == CORRECT, rows["large_label"] == CORRECT,
                         pd.factorize(rows["stratum"])[0])


def from_evaluation(validation: pd.DataFrame, decisions: dict[str, pd.DataFrame], oof: dict[str, pd.DataFrame],
                    train: pd.DataFrame, **kwargs) -> Choice:
    """``choose`` from what router_evaluation has: the validation outcome table, each
    candidate's validation decisions (decisions_frame rows with qid), the heads'
    out-of-fold scores (name -> OOF_FILE frame; absent for adapters) and the training
    rows' outcome table."""
    evidence, collapsed_ = {}, {}
    val_oracle = oracle_policies(validation) if len(validation) else []
    for name, dec in decisions.items():
        dec = aligned(dec, validation) if len(validation) else dec.iloc[:0]
        evidence[name] = evidence_frame(dec["qid"], dec["p_large"], oof.get(name))
        collapsed_[name] = bool(len(validation)) and collapsed(dec["policy"], val_oracle)
    outcomes = pd.concat([train, validation], ignore_index=True).drop_duplicates("qid")
    return choose(evidence, outcomes, collapsed_, **kwargs)


def _graded(outcomes: pd.DataFrame) -> pd.DataFrame:
    """The grades, keyed by qid as text (as evidence_frame keys them: read back from a CSV,
    a numeric-looking qid would otherwise be a number)."""
    return outcomes[["qid", "medium_label", "large_label"]].astype({"qid": str})


def choose(evidence: dict[str, pd.DataFrame], outcomes: pd.DataFrame, is_collapsed: dict[str, bool] | None = None, *,
           resamples: int = 1000, seed: int = 0) -> Choice:
    """The candidate to release. ``evidence``: name -> evidence_frame, in the configured
    order; ``outcomes``: qid, medium_label, large_label of the evidence rows (training
    rows and the validation slice; test rows are never given); ``is_collapsed``: name ->
    whether it decides one policy for almost every validation query."""
    if not evidence:
        raise ValueError("no candidate router to choose from")
    is_collapsed = is_collapsed or {}
    names = list(evidence)
    eligible = [n for n in names if not is_collapsed.get(n)] or names
    graded = {n: evidence[n].merge(_graded(outcomes), on="qid") for n in names}
    own, rows = {n: _apgr(graded[n], "score") for n in names}, {n: len(graded[n]) for n in names}
    chosen = eligible[0]
    for challenger in eligible[1:]:
        shared = _shared(evidence[challenger], evidence[chosen], outcomes)
        a, b = _apgr(shared, "score_a"), _apgr(shared, "score_b")
        if not math.isnan(a) and (math.isnan(b) or a > b):
            chosen = challenger
    versus = {}
    for other in (n for n in names if n != chosen):
        shared = _shared(evidence[chosen], evidence[other], outcomes)
        if shared.empty:
            continue
        d = paired_bootstrap(shared, shared["score_a"], shared["score_b"], resamples=resamples, seed=seed,
                             folds=pd.factorize(shared["stratum"])[0])
        versus[other] = {"rows": int(len(shared)), **{k: plain(d[k]) for k in ("diff", "lo", "hi")}}
    record = {"rule": "best APGR on out-of-fold training rows + validation rows, candidates compared on the rows "
                      "both have; ties to the earlier candidate",
              "chosen": chosen, "apgr": {n: plain(own[n]) for n in names}, "rows": rows,
              "chosen_minus": versus, "collapsed_on_validation": [n for n in names if n not in eligible]}
    return Choice(chosen, _why(chosen, names, eligible, own, rows, versus), record)


def _why(chosen, names, eligible, own, rows, versus) -> str:
    if all(math.isnan(own[n]) for n in eligible):
        return ("no evidence APGR (no out-of-fold or validation rows with a quality gap): the first candidate in "
                f"the configured order, {chosen}")
    why = f"best cross-validated APGR: {chosen} {own[chosen]:.3f} on {rows[chosen]} rows"
    others = [f"{n} {versus[n]['diff']:+.3f} [{versus[n]['lo']:+.3f}, {versus[n]['hi']:+.3f}] on {versus[n]['rows']}"
              for n in names if n in versus and versus[n]["diff"] is not None]
    if others:
        why += f" ({chosen} minus " + "; ".join(others) + ")"
    skipped = [n for n in names if n not in eligible]
    if skipped:
        why += f"; collapsed to one policy on validation: {', '.join(skipped)}"
    return why
