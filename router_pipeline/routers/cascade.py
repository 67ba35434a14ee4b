"""Cascades: ask cheaper models first and let their answers decide whether a dearer one
is worth paying for. Two models that pick the same answer are rarely both wrong, and
whether they agree does not depend on the topic: evidence a router reading the query
alone lacks.

A ``Plan`` is an ordered list of steps over the pool's models (a step may call several
at once). After step k (k = 0: nothing called yet) a policy returns the next action:
call step k+1, or stop with model m's answer (m answered: accept it; m not yet called:
jump to it and take its answer). Policies are pure: they read the query-only pool
router's P(correct) per model and the answers so far and never call a model, so a
server runs them in a small loop (``next_action``: state in, action out).

- ``FixedCascade``: accept the most common answer as soon as two answered models
  agree, else go on; after the last step, the last step's first model.
- ``LearnedCascade``: after each step, a calibrated logistic head per model gives
  P(correct | the query-only log-odds, agreement of every answered pair, abstentions,
  answer lengths), and a ridge head the expected gain of going on over the best stop
  (right - lambda x further cost, one output per knob value); the action with the best
  P(correct) - lambda x further cost wins. At step 0 the P are the query-only router's own, so
  "jump straight to one model" is the query-only router.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router_pipeline.routers.pool import PoolHead
from router_pipeline.text import normalise

GO_ON = -1  # the action code of "call the next step"; any other code is the model to stop with
COMPARATORS = ("letter", "text")  # exact choice letters | normalised free text (text.normalise)
ABSTENTIONS = frozenset({"", "idk", "i dont know", "i do not know", "unknown", "no answer", "cannot answer"})
_NOT_WORD = re.compile(r"[^\w\s]")


class PlanError(ValueError):
    """A plan that cannot run: an unknown model, an empty step, a model called twice."""


@dataclass(frozen=True)
class Plan:
    """Steps of model indices into ``models`` (the pool's names, in the pool's order)."""

    models: tuple[str, ...]
    steps: tuple[tuple[int, ...], ...]

    def called(self, k: int) -> tuple[int, ...]:
        """The models that have answered after ``k`` steps."""
        return tuple(m for step in self.steps[:k] for m in step)

    def step_of(self, answered: set[int]) -> int:
        """The k whose called models are exactly ``answered`` (PlanError otherwise: the
        answers do not come from this plan's first steps)."""
        for k in range(len(self.steps) + 1):
            if set(self.called(k)) == answered:
                return k
        names = sorted(self.models[m] for m in answered)
        raise PlanError(f"answers from {names} are not the first steps of {self.describe()}")

    def step_names(self, k: int) -> list[str]:
        """The models step ``k`` (1-based) calls, by name."""
        return [self.models[m] for m in self.steps[k - 1]]

    def describe(self) -> str:
        return " -> ".join("+".join(self.models[m] for m in step) for step in self.steps)


def make_plan(steps, models) -> Plan:
    """A validated plan from steps of model names (a step: a name or a list of names)."""
    models = tuple(models)
    if not steps:
        raise PlanError("a plan needs at least one step")
    seen: dict[str, int] = {}
    out = []
    for k, step in enumerate(steps, 1):
        names = [step] if isinstance(step, str) else list(step)
        if not names:
            raise PlanError(f"step {k} is empty: a step calls at least one model")
        for name in names:
            if name not in models:
                raise PlanError(f"step {k}: unknown model {name!r}; the pool has {list(models)}")
            if name in seen:
                raise PlanError(
                    f"step {k}: {name!r} is already called at step {seen[name]}: "
                    "a model is called once per query (no loops)"
                )
            seen[name] = k
        out.append(tuple(models.index(n) for n in names))
    return Plan(models, tuple(out))


def abstains(answer) -> bool:
    """No answer: missing, blank, or a refusal such as "I don't know". (Not through
    ``normalise``: it drops articles, and the choice letter "A" would vanish.)"""
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return True
    return " ".join(_NOT_WORD.sub("", str(answer).lower()).split()) in ABSTENTIONS


def canonical(answer, comparator: str = "text") -> str:
    """The form two answers are compared in ("" for an abstention, which agrees with
    nothing): choice letters exactly, case and spaces aside; free text normalised."""
    if comparator not in COMPARATORS:
        raise ValueError(f"unknown comparator {comparator!r}; expected one of {COMPARATORS}")
    if abstains(answer):
        return ""
    return str(answer).strip().upper() if comparator == "letter" else normalise(answer)


def same_answer(a, b, comparator: str = "text") -> bool:
    """Whether two answers agree (an abstention agrees with nothing)."""
    ca = canonical(a, comparator)
    return bool(ca) and ca == canonical(b, comparator)


def classes(answers, same, comparator: str = "text") -> list[str]:
    """Agreement classes of one row's answers: a label per answer, equal labels agreeing
    ("" for an abstention, which agrees with nothing). Answers of equal canonical form
    share a class without asking; any other free-text answer is put to ``same(first,
    answer) -> bool`` against each class's first member (its raw answer), in order, and
    opens a class of its own when none agrees (choice letters are exact: never asked). A
    class's label is its first member's canonical form, so with a ``same`` that never
    agrees the labels are ``canonical``'s: ``Answers.canon`` may hold them, and every
    feature and policy reads them unchanged."""
    labels: list[str] = []
    label_of: dict[str, str] = {}  # canonical form -> its class's label (every member's)
    firsts: list[tuple[str, object]] = []  # (label, raw answer) of each class's first member
    for answer in answers:
        form = canonical(answer, comparator)
        if form and form not in label_of:
            label_of[form] = next((label for label, first in firsts if comparator != "letter" and same(first, answer)),
                                  form)
            if label_of[form] == form:
                firsts.append((form, answer))
        labels.append(label_of.get(form, ""))
    return labels


def comparator_for(raw) -> str:
    """ "letter" when every recorded answer is one choice letter (A-Z), else "text"."""
    given = [str(a).strip() for a in np.ravel(np.asarray(raw, dtype=object)) if not abstains(a)]
    return "letter" if given and all(len(a) == 1 and a.isalpha() for a in given) else "text"


def fixed_from_dict(raw, models, costs, where: str = "cascade", heads: Path | None = None):
    """A fixed cascade from configuration: ``{plan: [[flash-lite, flash], pro], comparator:
    text}`` (a step: a model name or a list called together; ``comparator``: letter or
    text, default text). A released cascade may be ``kind: learned`` too, its heads in
    ``heads`` (the npz ``save_cascade`` wrote). PlanError naming ``where`` for anything else."""
    if not isinstance(raw, dict) or set(raw) - {"plan", "comparator", "kind", "about", "default"}:
        raise PlanError(f"{where}: expected a mapping with 'plan' (a list of steps) and optionally 'comparator'")
    kind = raw.get("kind", "fixed")
    if kind not in ("fixed", "learned") or (kind == "learned" and heads is None):
        raise PlanError(f"{where}: kind {kind!r} cannot be served here; a configured cascade is 'fixed' (accept on "
                        "agreement), a learned one comes released with the pool router")
    comparator = raw.get("comparator", "text")
    if comparator not in COMPARATORS:
        raise PlanError(f"{where}: comparator must be one of {', '.join(COMPARATORS)}, got {comparator!r}")
    steps = raw.get("plan")
    if not isinstance(steps, list) or not all(isinstance(s, (str, list)) for s in steps):
        raise PlanError(f"{where}: plan must be a list of steps, each a model name or a list of names")
    try:
        plan = make_plan(steps, models)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None
    by_default = raw.get("default", True) is True
    if kind == "learned":
        try:
            return _load_learned(heads, plan, comparator, by_default)
        except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise PlanError(f"{heads}: the learned cascade's heads cannot be read ({exc}); release the pool router "
                            "again") from None
    return FixedCascade(plan, np.asarray(costs, float), comparator, by_default=by_default)


def released_cascade(router) -> "FixedCascade | LearnedCascade | None":
    """The cascade released with a pool router (its folder's cascade.json: a fixed plan,
    or a learned one with its heads beside it), None without one; ValueError naming the
    file when it cannot be served."""
    from router_pipeline.artifacts import CASCADE_FILE, CASCADE_HEADS_FILE
    from router_pipeline.routers.contract import read_json_object

    path = Path(router.path) / CASCADE_FILE
    if not path.is_file():
        return None
    try:
        return fixed_from_dict(read_json_object(path, "a cascade's 'plan'", "release the pool router again"),
                               router.models, router.costs, where=str(path), heads=path.parent / CASCADE_HEADS_FILE)
    except PlanError as exc:
        raise ValueError(str(exc)) from None


def save_cascade(policy, folder: Path, **about) -> list[Path]:
    """cascade.json (kind, plan, comparator, and ``about``: default, about) and, for a
    learned cascade, its heads as arrays: the files ``released_cascade`` reads."""
    from router_pipeline.artifacts import CASCADE_FILE, CASCADE_HEADS_FILE

    learned = isinstance(policy, LearnedCascade)
    spec = {"kind": "learned" if learned else "fixed", "comparator": policy.comparator,
            "plan": [[policy.plan.models[m] for m in step] for step in policy.plan.steps], **about}
    (folder / CASCADE_FILE).write_text(json.dumps(spec, indent=1))
    (folder / CASCADE_HEADS_FILE).unlink(missing_ok=True)
    if not learned:
        return [folder / CASCADE_FILE]
    arrays = {"models": np.array(policy.plan.models), "costs": policy.costs, "lambdas": policy.lambdas,
              "readable": policy.readable}
    for k, head in enumerate(policy.p_heads, 1):
        arrays.update({f"p{k}.{name}": a for name, a in head.arrays.items()})
    for k, lin in enumerate(policy.go_on):
        arrays.update({f"go{k}.{name}": a for name, a in vars(lin).items()})
    np.savez(folder / CASCADE_HEADS_FILE, **arrays)
    return [folder / CASCADE_FILE, folder / CASCADE_HEADS_FILE]


def _load_learned(path: Path, plan: Plan, comparator: str, by_default: bool) -> "LearnedCascade":
    with np.load(path, allow_pickle=False) as z:
        a = {name: z[name] for name in z.files}
    models = list(plan.models)

    def part(prefix: str) -> dict:
        return {name.split(".", 1)[1]: v for name, v in a.items() if name.startswith(prefix + ".")}

    if a["models"].tolist() != models:
        raise ValueError(f"heads for the pool {a['models'].tolist()}, not {models}")
    p_heads = [PoolHead(models, "logistic", part(f"p{k}")) for k in range(1, len(plan.steps) + 1)]
    go_on = [Linear(**part(f"go{k}")) for k in range(len(plan.steps))]
    policy = LearnedCascade(plan, a["costs"], a["lambdas"], p_heads, go_on, a["readable"].astype(bool), comparator,
                            by_default=by_default)
    row = read_answers(np.array([["x"] * len(models)], dtype=object), comparator)
    for k in range(len(plan.steps) + 1):  # heads of another plan fail here, not in the middle of a request
        policy.decide(k, np.zeros((1, len(models))), row, np.array([0.0]))
    return policy


@dataclass
class Answers:
    """Every model's answer on some rows, ready for the features: ``canon`` (rows, models)
    canonical forms ("" abstains or not recorded), ``length`` (rows, models) characters."""

    canon: np.ndarray
    length: np.ndarray

    def rows(self, which) -> Answers:
        return Answers(self.canon[which], self.length[which])


def read_answers(raw: np.ndarray, comparator: str = "letter") -> Answers:
    """``Answers`` of a (rows, models) array of raw answers (None / NaN where missing)."""
    raw = np.asarray(raw, dtype=object)
    canon = np.vectorize(lambda a: canonical(a, comparator), otypes=[object])(raw) if raw.size else raw
    length = (
        np.vectorize(lambda a: 0.0 if abstains(a) else float(len(str(a))), otypes=[float])(raw)
        if raw.size
        else np.zeros(raw.shape)
    )
    return Answers(canon, length)


def state_features(q_logit: np.ndarray, answers: Answers, plan: Plan, k: int, readable: np.ndarray) -> np.ndarray:
    """(rows, features) after ``k`` steps: the query-only log-odds of every model, then for
    the answered models whose answers are ``readable`` (recorded at all), agreement of
    every pair, abstention and log(1 + answer length). Reads no model not yet called."""
    seen = [m for m in plan.called(k) if readable[m]]
    cols = [np.asarray(q_logit, float)]
    for i, a in enumerate(seen):
        for b in seen[i + 1 :]:
            cols.append(((answers.canon[:, a] == answers.canon[:, b]) & (answers.canon[:, a] != ""))[:, None])
    for m in seen:
        cols.append((answers.canon[:, m] == "")[:, None])
        cols.append(np.log1p(answers.length[:, [m]]))
    return np.concatenate([np.asarray(c, float) for c in cols], axis=1)


def gain_features(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """What the go-on heads read: the state features, each model's P(correct) and
    P(1 - P) (another answer is worth most where P is least sure: a bump, not a line)."""
    return np.concatenate([x, p, p * (1 - p)], axis=1)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def priced(lams: np.ndarray, usd) -> np.ndarray:
    """lambda x a cost for every lambda (infinity at lambda infinity: nothing is worth a call)."""
    lams = np.asarray(lams, float)
    finite = np.where(np.isinf(lams), 0.0, lams)
    return np.where(np.isinf(lams), math.inf, finite * usd)


def stop_utility(p: np.ndarray, called: tuple[int, ...], costs: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """(rows, lambdas, models): P(correct) of stopping with each model minus lambda x its
    cost unless it has answered (lambda infinity: minus the cost alone, whatever P says)."""
    further = np.where(np.isin(np.arange(len(costs)), called), 0.0, costs)
    util = p[:, None, :] - priced(lams, further[:, None]).T[None, :, :]
    if np.isinf(lams).any():
        util[:, np.isinf(lams)] = -further[None, None, :]
    return util


def choose(p: np.ndarray, called: tuple[int, ...], costs: np.ndarray, lams: np.ndarray, gain=None) -> np.ndarray:
    """(rows, lambdas) action codes: the model with the best stop utility, or going on
    where ``gain`` (rows, lambdas: the expected return of going on, its step priced in,
    minus that best stop utility) is above 0. Ties go to an answered model, then to the
    cheaper."""
    further = np.where(np.isin(np.arange(len(costs)), called), 0.0, costs)
    order = np.lexsort((costs, further))  # answered first, then by cost: argmax keeps the first of a tie
    best = order[np.argmax(stop_utility(p, called, costs, lams)[:, :, order], axis=2)]
    return best if gain is None else np.where(gain > 1e-12, GO_ON, best)


@dataclass
class Linear:
    """A linear map of standardised features: (rows, features) -> (rows, outputs)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (outputs, features)
    intercept: np.ndarray  # (outputs,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept


@dataclass
class FixedCascade:
    """Accept on agreement, no learning: after a step, the most common answer as soon as
    two answered models agree (its first model in plan order), else the next step;
    after the last step, the last step's first model. The same at every lambda."""

    plan: Plan
    costs: np.ndarray
    comparator: str = "letter"
    name: str = "fixed"
    by_default: bool = True  # a released one: served unless a profile turns it off (else only when asked for)

    def decide(self, k: int, q_logit: np.ndarray, answers: Answers, lams: np.ndarray) -> np.ndarray:
        called = self.plan.called(k)
        codes = np.full(len(answers.canon), self.plan.steps[-1][0] if k == len(self.plan.steps) else GO_ON)
        if len(called) >= 2:
            canon = answers.canon[:, list(called)]
            votes = np.stack([((canon == canon[:, [i]]) & (canon != "")).sum(axis=1) for i in range(len(called))], 1)
            agreed = votes.max(axis=1) >= 2  # a model agrees with itself: 2 means one other agrees
            codes[agreed] = np.asarray(called)[np.argmax(votes, axis=1)][agreed]
        return np.repeat(codes[:, None], len(lams), axis=1)


@dataclass
class LearnedCascade:
    """``p_heads[k-1]`` (k >= 1): a Platt-calibrated logistic head per model on the state
    after step k, as the pool router's; ``go_on[k]`` (k < K): on the state features and
    those P, the expected gain of going on after step k (its return, right - lambda x
    further cost, minus the best stop now), one output per value of ``lambdas``. ``readable``: the models
    whose answers the features read (those the training file records)."""

    plan: Plan
    costs: np.ndarray
    lambdas: np.ndarray
    p_heads: list[PoolHead]
    go_on: list[Linear]
    readable: np.ndarray
    comparator: str = "letter"
    name: str = "learned"
    by_default: bool = True  # as FixedCascade's

    def p_correct(self, k: int, q_logit: np.ndarray, answers: Answers) -> np.ndarray:
        """P(correct) per (row, model) after ``k`` steps (the query-only router's at k = 0)."""
        if k == 0:
            return _sigmoid(q_logit)
        return self.p_heads[k - 1].proba(state_features(q_logit, answers, self.plan, k, self.readable))

    def decide(self, k: int, q_logit: np.ndarray, answers: Answers, lams: np.ndarray) -> np.ndarray:
        p = self.p_correct(k, q_logit, answers)
        gain = None
        if k < len(self.plan.steps):
            x = gain_features(state_features(q_logit, answers, self.plan, k, self.readable), p)
            step_cost = self.costs[list(self.plan.steps[k])].sum()
            gain = self.go_on[k](x)[:, nearest(self.lambdas, lams)] - priced(lams, step_cost)[None, :]
        return choose(p, self.plan.called(k), self.costs, lams, gain)


def nearest(grid: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """The index in ``grid`` of each lambda of ``lams`` (nearest in log(1 + lambda);
    infinity to the grid's largest): the knob values the go-on heads were fitted for."""
    grid = np.asarray(grid, float)
    out = []
    for lam in np.atleast_1d(np.asarray(lams, float)):
        if math.isinf(lam):
            out.append(int(np.argmax(grid)))
        else:
            gap = np.where(
                np.isinf(grid), math.inf, np.abs(np.log1p(np.where(np.isinf(grid), 0, grid)) - math.log1p(lam))
            )
            out.append(int(np.argmin(gap)))
    return np.array(out, dtype=int)


@dataclass(frozen=True)
class Action:
    """What to do next: ``call`` step ``step`` (1-based) of the plan, or ``stop`` with
    ``model``'s answer (a model not yet called: call it, then stop with its answer)."""

    kind: str  # call | stop
    step: int | None = None
    model: str | None = None


def next_action(policy, p_correct: dict[str, float], answers: dict[str, str | None], lam: float) -> Action:
    """The next action for one query, calling no model. ``p_correct``: the query-only pool
    router's P(correct) per model (``RouteDecision.p_correct``); ``answers``: model name ->
    answer (None when it failed to give one) of the models called so far, which must be
    the plan's first steps; ``lam``: the knob. A server loop: ``next_action`` with no
    answers, call the step it names, add its answers, ask again, until ``stop`` (then
    call the named model when it has not answered, and return its answer)."""
    plan = policy.plan
    unknown = sorted(set(answers) - set(plan.models))
    if unknown:
        raise PlanError(f"answers from models outside the pool: {unknown}")
    k = plan.step_of({plan.models.index(m) for m in answers})
    q_logit = logit(np.array([[p_correct[m] for m in plan.models]]))
    row = read_answers(np.array([[answers.get(m) for m in plan.models]], dtype=object), policy.comparator)
    code = int(policy.decide(k, q_logit, row, np.array([float(lam)]))[0, 0])
    return Action("call", step=k + 1) if code == GO_ON else Action("stop", model=plan.models[code])
