"""The money of a request, and a cascade for one request.

``Bill`` is the money path of every request in one place: before a model is called, an
upper bound of the call's cost is held (``admit``: reserved in the profile's budget and
in the model's own cap, each check and its reservation one locked step; a call neither
can cover is not made); after it, what it cost replaces the hold, or the hold is dropped
when the call failed (a fallback then holds its own). ``Bill.settle`` charges every paid
call when the request is settled (what the state database cannot take goes to the
journal), once, whatever the number of calls: a retry with the request's
``Idempotency-Key`` gets the recorded answer and pays no call again. One model's answer
is a bill of one hold, the council's too (at its price), a cascade's one hold per call.

``run`` is the cascade's loop (routers/cascade.py's policy decides, calling nothing): the
policy's next action, the step's models called together (a model that fails gives no
answer and the cascade goes on without it), until it stops with an answer; a stop with a
model not yet called calls it (a jump). The call whose answer is returned whatever it
says (a jump; a fixed cascade's last step of one model that nothing before can agree
with) may be made by ``final`` instead: the gateway streams it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field

from router_pipeline.routers.cascade import FixedCascade, canonical, next_action
from router_pipeline.serve.ledger import LedgerError

log = logging.getLogger(__name__)


class Unaffordable(RuntimeError):
    """The budget (or the model's own cap) cannot cover the call. ``model``: the model
    whose own cap is used up (None: the profile's budget)."""

    def __init__(self, message: str, model: str | None = None):
        super().__init__(message)
        self.model = model


@dataclass
class Hold:
    model: str  # the alias called (its own cap), or the council's target
    estimate: float
    reservation: str | None = None  # in the profile's budget
    model_reservation: str | None = None  # in the model's own cap
    cost: float | None = None  # what the call cost, once made (None: not made yet)


@dataclass
class Bill:
    """``mapper``: the profile's (its ledger, limit and per-model caps); methods that read
    or write the ledger run in the state database's threads. ``in_budget``: calls are
    reserved in the profile's budget (False for a request its budget rule mapped, or that
    found the budget used up: it pays without a reservation, as the rule allows)."""

    mapper: object
    in_budget: bool = True
    holds: list[Hold] = field(default_factory=list)

    def admit(self, model: str, estimate: float) -> Hold:
        """Reserve ``estimate`` for a call of ``model``; Unaffordable when the budget or the
        model's cap is used up (nothing held then)."""
        m, hold = self.mapper, Hold(model, estimate)
        if self.in_budget and m.ledger is not None and (limit := m.budget_limit()) is not None:
            hold.reservation = m.ledger.admit(limit, estimate)
            if hold.reservation is None:
                raise Unaffordable(f"the budget {m.ledger.name} is used up")
        if m.ledger is not None and model in m.model_budgets:
            try:
                hold.model_reservation = m.ledger.part(model).admit(m.model_budgets[model], estimate)
            except LedgerError:
                self._drop(hold)  # never a reservation left behind by a call not made
                raise
            if hold.model_reservation is None:
                self._drop(hold)
                raise Unaffordable(f"the budget of {model} is used up", model)
        self.holds.append(hold)
        return hold

    def failed(self, hold: Hold) -> None:
        """The call spent nothing: its reservations are dropped."""
        self._drop(hold)
        self.holds.remove(hold)

    def abandon(self) -> None:
        """The request ends without making (or finishing) the calls still held: nothing
        is paid for them."""
        for hold in [h for h in self.holds if h.cost is None]:
            self.failed(hold)

    def _drop(self, hold: Hold) -> None:
        # An unreadable ledger stops spending anyway; a reservation left expires (RESERVATION_TTL_S).
        with contextlib.suppress(LedgerError):
            if hold.reservation is not None:
                self.mapper.ledger.release(hold.reservation)
            if hold.model_reservation is not None:
                self.mapper.ledger.part(hold.model).release(hold.model_reservation)

    @property
    def cost(self) -> float:
        return sum(h.cost or 0.0 for h in self.holds)

    def settle(self) -> tuple[list[dict], str | None]:
        """Every call charged what it cost in place of its reservations, in the profile's
        budget and its model's own cap: (the spends the state database could not take, as
        journal entries; what the caller is told when a ledger cannot be read, else None)."""
        m, spends, error = self.mapper, [], None
        if m.ledger is None:
            return spends, error
        for h in self.holds:
            charged = [(m.ledger, h.reservation)]
            if h.model in m.model_budgets:
                charged.append((m.ledger.part(h.model), h.model_reservation))
            for ledger, rid in charged:
                try:
                    ledger.settle(rid, h.cost or 0.0)
                except LedgerError as exc:
                    log.error("budget ledger: %s", exc)
                    if exc.database:  # the database failed: the spend waits in the journal
                        spends.append(ledger.settlement(rid, h.cost or 0.0))
                    else:  # the next request meets the unreadable ledger (503)
                        error = f"budget ledger {exc.file or ''} cannot be read: spending stops from the next request"
        return spends, error


@dataclass
class Call:
    """One model called by the cascade."""

    model: str
    step: int  # 1-based; the plan's length + 1 for a jump
    text: str | None = None  # None: it failed or gave no answer; "" while streamed
    served: object = None  # backends.Served (a streamed call's, once read)
    error: str | None = None
    streamed: object = None  # backends.Streamed: the final answer, read as it is sent
    hold: Hold | None = None  # what it was reserved under (a streamed call's cost goes there once read)

    @property
    def cost(self) -> float:
        return self.served.cost_usd if self.served is not None else 0.0

    @property
    def paid(self) -> bool:
        return self.served is not None or self.streamed is not None


@dataclass
class Run:
    calls: list[Call]
    final: Call | None  # the call whose answer is returned (None: no model answered)
    stopped: str  # why the cascade stopped
    comparator: str = "text"

    @property
    def agreed(self) -> str | None:
        """The answer two or more of the models gave (as the first of them wrote it), else None."""
        agreed = _agreed_call(self.calls, self.comparator)
        return agreed.text if agreed else None


async def run(policy, p_correct: dict[str, float], lam: float, call, final=None) -> Run:
    """``call(model, step) -> Call`` (async; it pays, and raises Unaffordable when the
    budget cannot cover it). ``final``: the same, for the call whose answer is returned
    whatever it says (its Call may still be reading the answer: ``Call.streamed``)."""
    done = await _run(policy, p_correct, lam, call, final or call)
    done.comparator = policy.comparator
    return done


async def _run(policy, p_correct: dict[str, float], lam: float, call, final) -> Run:
    plan, calls, answers = policy.plan, [], {}
    while True:
        action = next_action(policy, p_correct, answers, lam)
        if action.kind == "stop":
            if action.model in answers and answers[action.model] is not None:
                why = "agreement" if _agreed_call(calls, policy.comparator) else "the policy accepted it"
                return Run(calls, _last(calls, action.model), why)
            if action.model in answers:  # it failed: the best answer there is
                return Run(calls, _best(calls, policy.comparator), f"{action.model} gave no answer")
            try:
                jump = await final(action.model, len(plan.steps) + 1)
            except Exception as exc:
                if not isinstance(exc, Unaffordable) and not any(c.paid for c in calls):
                    raise  # nothing paid: refused, and a retry may try again
                why = exc if isinstance(exc, Unaffordable) else f"{type(exc).__name__} before the call"
                return Run(calls, _best(calls, policy.comparator), f"{action.model} not called: {why}")
            calls.append(jump)
            if jump.text is None:
                return Run(calls, _best(calls, policy.comparator), f"{action.model} failed")
            return Run(calls, jump, "escalated" if calls[:-1] else "the policy chose it")
        how = final if _returned_anyway(policy, calls, action.step) else call
        step = await asyncio.gather(*(how(m, action.step) for m in plan.step_names(action.step)),
                                    return_exceptions=True)
        made = [r for r in step if isinstance(r, Call)]
        calls += made
        errors = [r for r in step if isinstance(r, BaseException) and not isinstance(r, Unaffordable)]
        if errors and not any(c.paid for c in calls):
            raise errors[0]  # nothing paid: refused, and a retry may try again
        if stopped := [r for r in step if isinstance(r, BaseException)]:
            # Something was paid (perhaps by this step's other model): never refused, never paid again on a retry.
            why = stopped[0] if isinstance(stopped[0], Unaffordable) else f"{type(stopped[0]).__name__} before the call"
            return Run(calls, _best(calls, policy.comparator),
                       f"step {action.step} not called in full: {why}")
        for c in made:
            answers[c.model] = c.text


def _returned_anyway(policy, calls: list[Call], step: int) -> bool:
    """Whether step ``step``'s answer is the one returned, whatever it says: a fixed
    cascade's last step of one model (it accepts that model's answer) when no answer so far
    could agree with it (agreement would return the earlier model's text)."""
    plan = policy.plan
    return (isinstance(policy, FixedCascade) and step == len(plan.steps) and len(plan.steps[-1]) == 1
            and not any(canonical(c.text, policy.comparator) for c in calls))


def _last(calls: list[Call], model: str) -> Call:
    return next(c for c in reversed(calls) if c.model == model)


def _agreed_call(calls: list[Call], comparator: str) -> Call | None:
    """The first call whose answer two or more of the calls gave (an abstention agrees
    with nothing), else None."""
    answered = [c for c in calls if c.text is not None and canonical(c.text, comparator)]
    top = Counter(canonical(c.text, comparator) for c in answered).most_common(1)
    if not top or top[0][1] < 2:
        return None
    return next(c for c in answered if canonical(c.text, comparator) == top[0][0])


def _best(calls: list[Call], comparator: str) -> Call | None:
    """The best answer so far: the one most models agree on, else the dearest step's."""
    if agreed := _agreed_call(calls, comparator):
        return agreed
    answered = [c for c in calls if c.text is not None and canonical(c.text, comparator)] or \
        [c for c in calls if c.text is not None]
    return answered[-1] if answered else None
