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

The gate (``gate``) then says whether the chosen router may replace the served one:
each rule gives a ``Verdict``; a failed blocking verdict stops the release. The files
of an evaluation (``record``) and of a release (``publish``) are written here too, so
the Dagster assets only route, call these and show the results.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from router_pipeline.artifacts import (
    CALIBRATION_FILE, EVALUATION_FILE, HEADS, INTERVALS_FILE, STAGES, SUMMARY_FILE, Artifacts, install,
)
from router_pipeline.evaluation.metrics import (
    AMBIGUOUS_CHOICES, COLLAPSE_SHARE, MIN_LABEL_SHARE, Report, aligned, collapsed, crossfit_apgr, oracle_policies, paired_bootstrap, plain,
    policy_mix,
)
from router_pipeline.policies import CORRECT, MEDIUM, POLICIES
from router_pipeline.routers.head import export_head_router
from router_pipeline.routers.manifest import write_manifest

VALIDATION_STRATUM = "validation"
CANDIDATES = (*HEADS, *STAGES)  # every router kind the pipeline trains


@dataclass(frozen=True)
class EvaluationSpec:
    """How the candidates are evaluated and released (the one owner of these defaults)."""

    # In this order: the first is preferred when the evidence cannot tell them apart.
    candidates: tuple[str, ...] = (*HEADS, "sft")  # any of CANDIDATES
    ambiguous: Literal[AMBIGUOUS_CHOICES] = MEDIUM  # what Ambiguous_Query routes to here  # type: ignore[valid-type]
    random_seeds: int = 20
    bootstrap_resamples: int = 1000
    target_share: float | None = None  # calibrate to this share of large calls ...
    target_pgr: float = 0.9  # ... or else to the cheapest threshold recovering this much of the gap
    regression_tolerance: float = 0.05  # allowed drop in served accuracy / policy accuracy vs the released router


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
        evidence[name] = evidence_frame(dec["qid"], dec["p_complex"], oof.get(name))
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


# -- what is recorded -------------------------------------------------------------
def figures(report: Report, name: str, test: pd.DataFrame, validation: pd.DataFrame, parse_rate: float,
            mode: str | None) -> dict:
    """A candidate's headline figures (EVALUATION_FILE): the gate compares these."""
    row = report.summary.set_index("router").loc[name]
    return {
        "candidate": name, "mode": mode, "test_questions": len(test), "validation_questions": len(validation),
        "threshold": report.calibrations[name].get("threshold"),
        **{k: plain(row[k]) for k in ("served_correct", "served_large_share", "served_savings_vs_large", "correct",
                                      "policy_accuracy", "apgr", "validation_apgr")},
        "random_apgr": plain(report.random_apgr),
        **{k: plain(row[k]) for k in ("cpt50", "cpt80", "ece_p_complex")},
        "parse_failure_rate": round(parse_rate, 4),
        "policy_mix": {p: plain(row[f"mix_{p}"]) for p in POLICIES},
    }


def record(layout: Artifacts, report: Report, choice: Choice, test: pd.DataFrame, validation: pd.DataFrame,
           parse_rates: dict[str, float], modes: dict[str, str | None]) -> None:
    """Each candidate's calibration and figures (evaluation/<candidate>/), and the summary
    and intervals of them all (evaluation/)."""
    for name in report.calibrations:
        out = layout.evaluation(name)
        out.mkdir(parents=True, exist_ok=True)
        (out / CALIBRATION_FILE).write_text(json.dumps(
            {**report.calibrations[name], "score": "P(Complex_Query)", "split": "validation"}, indent=2))
        (out / EVALUATION_FILE).write_text(json.dumps(
            {**figures(report, name, test, validation, parse_rates[name], modes[name]), "chosen": name == report.chosen,
             "why": report.why, "release_evidence": choice.record}, indent=2))
    report.summary.to_csv(layout.root / "evaluation" / SUMMARY_FILE, index=False)
    report.intervals.to_csv(layout.root / "evaluation" / INTERVALS_FILE, index=False)


class ReleaseError(ValueError):
    """A release that cannot be read or written as it stands."""


def released_figures(layout: Artifacts) -> dict:
    """The headline figures of the router released now ({} when none is)."""
    path = layout.release / EVALUATION_FILE
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReleaseError(f"{path} of the released router is unreadable ({exc}); restore it or delete the "
                           "release") from None
    return value if isinstance(value, dict) else {}


# -- the gate -----------------------------------------------------------------------
REGRESSION_METRICS = ("served_correct", "policy_accuracy")
MAX_PARSE_FAILURE_RATE = 0.05  # a router that fails to decide more often than this is never released
# Below this many test rows, one policy for every query is no evidence of a collapse: a warning.
MIN_ROWS_FOR_COLLAPSE = 30
RULES = {
    "beats_random": "The chosen router's APGR exceeds the mean APGR of random routers on the same data.",
    "no_regression": "Served accuracy and policy accuracy are not worse than the released router's beyond the "
                     "tolerance.",
    "parse_failures_within_limit": f"At most {MAX_PARSE_FAILURE_RATE:.0%} of the test decisions are parse failures.",
    "no_policy_collapse": f"The chosen router decides no single policy for more than {COLLAPSE_SHARE:.0%} of the test "
                          f"queries while the labels have at least two policies above {MIN_LABEL_SHARE:.0%} each.",
}


@dataclass(frozen=True)
class Verdict:
    rule: str  # a key of RULES
    passed: bool
    metadata: dict
    blocking: bool = True  # False: a failure warns and the release goes on
    note: str | None = None


def gate(report: Report, test: pd.DataFrame, chosen_figures: dict, released: dict, *,
         regression_tolerance: float) -> list[Verdict]:
    """A verdict per rule of RULES on the chosen router: its test figures against random,
    the released router (``released``: released_figures) and the limits above."""
    chosen, apgr, rand = report.chosen, chosen_figures["apgr"], report.random_apgr
    gap = float((test["large_label"] == CORRECT).mean() - (test["medium_label"] == CORRECT).mean())
    if apgr is None:
        # No quality gap between the tiers on this test split: APGR is undefined, so the
        # router cannot be shown to beat random. Say so; do not block on it.
        beats = Verdict("beats_random", False, {"apgr": None, "random_apgr": None, "accuracy_gap": gap},
                        blocking=False, note=f"undefined: always-large is not more accurate than always-medium on "
                                             f"these {len(test)} test questions (gap {gap:+.3f})")
    else:
        beats = Verdict("beats_random", bool(apgr > rand), {"candidate": chosen, "apgr": float(apgr),
                                                             "random_apgr": float(rand), "accuracy_gap": gap})
    drops = {m: released[m] - chosen_figures[m] for m in REGRESSION_METRICS
             if released.get(m) is not None and chosen_figures[m] is not None
             and released[m] - chosen_figures[m] > regression_tolerance}
    regression = Verdict("no_regression", not drops, {
        "released": {m: released.get(m) for m in REGRESSION_METRICS} if released else {"note": "no released router yet"},
        "current": {m: chosen_figures[m] for m in REGRESSION_METRICS}, "tolerance": regression_tolerance,
        "regressions": drops})
    rate = chosen_figures["parse_failure_rate"]
    parses = Verdict("parse_failures_within_limit", rate <= MAX_PARSE_FAILURE_RATE,
                     {"parse_failures": round(rate * len(test)), "rate": rate, "limit": MAX_PARSE_FAILURE_RATE})
    is_collapsed = collapsed(report.per_query["policy"], report.per_query["oracle_policy"])
    few = len(test) < MIN_ROWS_FOR_COLLAPSE
    collapse = Verdict("no_policy_collapse", not is_collapsed,
                       {"candidate": chosen, "decided": chosen_figures["policy_mix"],
                        "labels": policy_mix(report.per_query["oracle_policy"])},
                       blocking=not few, note=(f"only {len(test)} test rows (< {MIN_ROWS_FOR_COLLAPSE}): a warning, "
                                               "not a verdict") if few and is_collapsed else None)
    return [beats, regression, parses, collapse]


# -- the release ----------------------------------------------------------------------
def publish(layout: Artifacts, name: str) -> dict:
    """Copy candidate ``name`` with its calibration and figures to the release folder
    (what `router-pipeline route` and `serve` run by default). Returns what was released."""
    evaluated = layout.evaluation(name)
    if not (evaluated / EVALUATION_FILE).exists():
        raise ReleaseError(f"no evaluation of {name} at {evaluated}: evaluate the candidates first")
    return install_release(layout.candidate(name), [evaluated / CALIBRATION_FILE, evaluated / EVALUATION_FILE],
                           layout.release, layout.root / "release-staging")


def install_release(src, files: list, dest, staging) -> dict:
    """``src`` with ``files`` added, installed whole at ``dest``: a Gemma encoder exported
    for the fast path on the way, and a manifest of every file the router reads."""
    install(src, staging)
    for file in files:
        shutil.copy2(file, staging / file.name)
    t0 = time.perf_counter()
    export = export_head_router(staging)
    exported = {} if export is None else {
        "export_sha256": export["sha256"], "export_s": round(time.perf_counter() - t0, 1),
        "export_mb": round(sum(f.stat().st_size for f in (staging / export["dir"]).iterdir()) / 1e6, 1)}
    write_manifest(staging)  # every file the released router reads, checked when it is loaded
    dest = install(staging, dest)
    shutil.rmtree(staging, ignore_errors=True)
    return {"router_dir": dest, "from": str(src), **exported,
            "figures": json.loads((dest / EVALUATION_FILE).read_text())}