"""A cascade for one request: call a step of the plan, compare the answers, stop or go on
(routers/cascade.py's policy decides, calling nothing), and the money of every call.

``Bill`` is the money path of a cascaded request in one place: before a call, the
call's upper-bound cost is reserved in the profile's budget and in the model's own cap
(a call the budget cannot cover is not made: the best answer so far is returned and
the routing info says why); after it, what it cost replaces the reservation, or the
reservation is dropped when the call failed. ``Bill.settlements`` is what the gateway
charges when the request is settled (into the journal when the state database fails),
once, whatever the number of calls: a retry with the request's ``Idempotency-Key`` gets
the recorded answer and pays no call again.

``run`` is the loop: the policy's next action, the step's models called together (a
model that fails gives no answer and the cascade goes on without it), until it stops
with an answer; a stop with a model not yet called calls it (a jump).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from router_pipeline.routers.cascade import canonical, next_action


class Unaffordable(RuntimeError):
    """The budget (or the model's own cap) cannot cover the call."""


@dataclass
class Hold:
    model: str
    estimate: float
    reservation: str | None = None  # in the profile's budget
    model_reservation: str | None = None  # in the model's own cap
    cost: float | None = None  # what the call cost, once made (None: not made, or failed)


@dataclass
class Bill:
    """``mapper``: the profile's (its ledger, limit and per-model caps); methods that read
    or write the ledger run in the state database's threads."""

    mapper: object
    holds: list[Hold] = field(default_factory=list)

    def admit(self, model: str, estimate: float) -> Hold:
        """Reserve ``estimate`` for a call of ``model``; Unaffordable when the budget or the
        model's cap is used up (nothing held then)."""
        m, hold = self.mapper, Hold(model, estimate)
        if m.ledger is not None and (limit := m.budget_limit()) is not None:
            hold.reservation = m.ledger.admit(limit, estimate)
            if hold.reservation is None:
                raise Unaffordable(f"the budget {m.ledger.name} is used up")
        if m.ledger is not None and model in m.model_budgets:
            hold.model_reservation = m.ledger.part(model).admit(m.model_budgets[model], estimate)
            if hold.model_reservation is None:
                self._drop(hold)
                raise Unaffordable(f"the budget of {model} is used up")
        self.holds.append(hold)
        return hold

    def failed(self, hold: Hold) -> None:
        """The call spent nothing: its reservations are dropped."""
        self._drop(hold)
        self.holds.remove(hold)

    def _drop(self, hold: Hold) -> None:
        if hold.reservation is not None:
            self.mapper.ledger.release(hold.reservation)
        if hold.model_reservation is not None:
            self.mapper.ledger.part(hold.model).release(hold.model_reservation)

    @property
    def cost(self) -> float:
        return sum(h.cost or 0.0 for h in self.holds)

    def settlements(self) -> list[tuple[object, str | None, float]]:
        """(ledger, reservation, USD) to settle: every call in the profile's budget and in
        its model's own cap."""
        if self.mapper.ledger is None:
            return []
        out = []
        for h in self.holds:
            out.append((self.mapper.ledger, h.reservation, h.cost or 0.0))
            if h.model in self.mapper.model_budgets:
                out.append((self.mapper.ledger.part(h.model), h.model_reservation, h.cost or 0.0))
        return out


@dataclass
class Call:
    """One model called by the cascade."""

    model: str
    step: int  # 1-based; the plan's length + 1 for a jump
    text: str | None = None  # None: it failed or gave no answer
    served: object = None  # backends.Served
    error: str | None = None

    @property
    def cost(self) -> float:
        return self.served.cost_usd if self.served is not None else 0.0


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


async def run(policy, p_correct: dict[str, float], lam: float, call) -> Run:
    """``call(model, step) -> Call`` (async; it pays, and raises Unaffordable when the
    budget cannot cover it)."""
    done = await _run(policy, p_correct, lam, call)
    done.comparator = policy.comparator
    return done


async def _run(policy, p_correct: dict[str, float], lam: float, call) -> Run:
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
                jump = await call(action.model, len(plan.steps) + 1)
            except Unaffordable as exc:
                return Run(calls, _best(calls, policy.comparator), f"{action.model} not called: {exc}")
            calls.append(jump)
            if jump.text is None:
                return Run(calls, _best(calls, policy.comparator), f"{action.model} failed")
            return Run(calls, jump, "escalated" if calls[:-1] else "the policy chose it")
        step = await asyncio.gather(*(call(m, action.step) for m in plan.step_names(action.step)),
                                    return_exceptions=True)
        made = [r for r in step if isinstance(r, Call)]
        calls += made
        errors = [r for r in step if isinstance(r, BaseException) and not isinstance(r, Unaffordable)]
        if errors and not any(c.served is not None for c in calls):
            raise errors[0]  # nothing paid: refused, and a retry may try again
        if stopped := [r for r in step if isinstance(r, BaseException)]:
            # Something was paid (perhaps by this step's other model): never refused, never paid again on a retry.
            why = stopped[0] if isinstance(stopped[0], Unaffordable) else f"{type(stopped[0]).__name__} before the call"
            return Run(calls, _best(calls, policy.comparator),
                       f"step {action.step} not called in full: {why}")
        for c in made:
            answers[c.model] = c.text


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
