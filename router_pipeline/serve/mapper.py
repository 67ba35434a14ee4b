"""The policy mapper: a router decision -> the model that answers.

Ordered rules, first match wins; every mapping names the rule that fired. Rule
kinds (each takes a ``target``, a model alias from ``models`` or ``abstain``):

- ``privacy``        any message of the conversation (system messages and earlier
                     turns included) matches a PII pattern (e-mail, phone, card, IBAN,
                     SSN). Privacy rules are checked before every other rule, wherever
                     they stand, and the query may then go only to the rule's ``models``
                     (default: the profile's private models, those on a ``local``
                     backend or an endpoint marked ``private: true``, and the rule's
                     target): fallbacks, cooldown skips, model budgets and a pool's
                     knob choose among those only, and when all of them fail the
                     caller gets a 503, never another model's answer. A pool profile's
                     privacy rule may leave out ``target``: the pool router's best
                     choice among ``models`` answers
- ``keyword``        the query contains one of ``keywords`` (case-insensitive, whole words)
- ``long_query``     the query has at least ``min_chars`` characters
- ``math``           the query looks like arithmetic / maths (operators, equations, LaTeX, maths words)
- ``budget``         the persisted spend of the period has reached ``limit_usd``
- ``low_confidence`` the router's probability for its policy is below ``below``
                     (``target: escalate`` hands the query to the llm-council endpoint
                     of the mapper's ``escalation: {url: ...}`` section)
- ``threshold``      the router's P(Complex_Query) is at least ``at_least`` (the
                     calibrated threshold the evaluation scored)
- ``policy``         ``map`` from policy to target (Ambiguous_Query may map to
                     ``abstain``: answer "I don't know" without a model call)
- ``pool``           a pool router's choice (no target: the model of the pool whose
                     P(correct) - lambda * cost is highest, lambda from the model name
                     the caller asked for); what a pool router serves by default

A budget may also cap single models (``budget: {ledger, period, models: {pro: 5.0}}``):
a model whose spend of the period has reached its cap is not chosen; the request goes
to the pool router's next choice (a two-tier mapper: its ``fallback``), and when every
candidate is capped it is answered "I don't know" without a model call (rule
``model_budget``).

Nothing matched (e.g. a policy missing from the map) -> ``fallback``, the profile's
default model; so does a request whose router failed or timed out (``router_failed``:
only the rules that do not read the router's decision apply: privacy, keyword,
long_query, math, budget). Presets
``cost_first``, ``quality_first`` and ``balanced`` are complete rule lists; a
YAML/JSON file can start from a preset and override its parts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from router_pipeline.serve.errors import Forbidden
from router_pipeline.serve.ledger import BudgetLedger, LedgerError
from router_pipeline.policies import AMBIGUOUS, COMPLEX, POLICIES, STANDARD

ABSTAIN = "abstain"
ESCALATE = "escalate"
ABSTAIN_ANSWER = "I don't know."
KINDS = ("privacy", "keyword", "long_query", "math", "budget", "low_confidence", "threshold", "policy", "pool")
READS_ROUTER = frozenset({"low_confidence", "threshold", "policy", "pool"})  # skipped when the router failed

PII_PATTERNS: dict[str, str] = {
    # A match starts only where a run of its characters starts (the lookbehind): linear
    # time on any input (without it, 32,000 digits took 4 s).
    "email": r"(?<![\w.+-])[\w.+-]+@[\w-]+\.[\w.-]+",
    # At least 9 digits (the lookahead): a year range such as 2021-2022 is not a number to call.
    "phone": r"(?<!\w)\+?\d(?=(?:[ ()-]{0,3}\d){8})[\d ()-]{7,}\d(?!\w)",
    "card": r"\b(?:\d[ -]?){13,16}\b",
    "iban": r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b",
    "ssn": r"\b\d{3}-\d{2}-\d{4}\b",
}
MATH = re.compile(
    r"(\d\s*[-+*/^=<>]\s*\d)|(\\(frac|int|sum|sqrt))|\b(solve|integral|derivative|equation|prove|"
    r"factori[sz]e|probability|matrix|eigen\w*)\b", re.IGNORECASE)


class MapperConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    kind: str
    target: str
    name: str = ""
    keywords: tuple[str, ...] = ()
    min_chars: int = 0
    limit_usd: float = 0.0
    below: float = 0.0
    at_least: float = 0.0
    map: dict = field(default_factory=dict)
    patterns: tuple[str, ...] = ()  # privacy: pattern names from PII_PATTERNS (default all)
    models: tuple[str, ...] = ()  # privacy: the aliases a matching query may go to (default: the private ones)

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass
class Mapping:
    model: str | None  # concrete model id; None when abstaining or escalating
    target: str  # alias, "abstain" or "escalate"
    rule: str  # which rule fired ("fallback" when none did)
    policy: str
    reason: str
    allowed: tuple[str, ...] | None = None  # a privacy rule's: the only aliases that may answer (None: any)

    @property
    def privacy_rule(self) -> str | None:
        """The privacy rule that keeps this query on its models (None: not private)."""
        return self.rule if self.allowed is not None else None

    @property
    def abstain(self) -> bool:
        return self.target == ABSTAIN

    @property
    def escalate(self) -> bool:
        return self.target == ESCALATE


def _medium_large_models() -> dict[str, str]:
    from router_pipeline.llm.roles import GEMINI_MODELS
    from router_pipeline.local_models import GEMMA3_270M

    return {"medium": GEMINI_MODELS["medium"], "large": GEMINI_MODELS["large"], "local": GEMMA3_270M}


PRESETS: dict[str, dict] = {
    # Spend as little as possible: escalate only confident Complex decisions; decline
    # what both models are likely to get wrong.
    "cost_first": {"fallback": "medium", "rules": [
        {"kind": "privacy", "target": "local"},
        {"kind": "low_confidence", "below": 0.7, "target": "medium"},
        {"kind": "policy", "map": {STANDARD: "medium", COMPLEX: "large", AMBIGUOUS: ABSTAIN}},
    ]},
    # Answer as well as possible: doubt and hard-looking queries go to the large model.
    "quality_first": {"fallback": "large", "rules": [
        {"kind": "privacy", "target": "local"},
        {"kind": "math", "target": "large"},
        {"kind": "long_query", "min_chars": 2000, "target": "large"},
        {"kind": "low_confidence", "below": 0.6, "target": "large"},
        {"kind": "policy", "map": {STANDARD: "medium", COMPLEX: "large", AMBIGUOUS: "large"}},
    ]},
    "balanced": {"fallback": "large", "rules": [
        {"kind": "privacy", "target": "local"},
        {"kind": "low_confidence", "below": 0.5, "target": "large"},
        {"kind": "policy", "map": {STANDARD: "medium", COMPLEX: "large", AMBIGUOUS: "medium"}},
    ]},
}
DEFAULT_PRESET = "balanced"


def evaluated_spec(calibration: dict) -> dict:
    """The mapping the evaluation scored as "router @ calibrated threshold": the large
    model when P(Complex_Query) reaches the threshold, the medium model otherwise
    (threshold None: nothing escalates). Serving applies exactly this by default."""
    threshold = calibration.get("threshold")
    rules = [] if threshold is None else [
        {"kind": "threshold", "name": "calibrated_threshold", "at_least": float(threshold), "target": "large"}]
    rules.append({"kind": "policy", "name": "below_threshold", "map": {p: "medium" for p in POLICIES}})
    return {"fallback": "medium", "rules": rules}


def pool_spec(models_by_price: list[str]) -> dict:
    """What a pool router serves by default: its choice at the requested lambda, the
    cheapest model when nothing decides (an unparsed decision)."""
    return {"fallback": models_by_price[0], "rules": [{"kind": "pool", "name": "pool_choice"}]}


class PolicyMapper:
    def __init__(self, rules: list[Rule], models: dict[str, str] | None = None, fallback: str = "large",
                 ledger: BudgetLedger | None = None, escalation_url: str | None = None,
                 model_budgets: dict[str, float] | None = None, private: frozenset[str] = frozenset(),
                 escalation_price: tuple[float, float] | None = None):
        """``model_budgets``: alias -> USD cap of the period on that model (``ledger.part``).
        ``private``: the aliases whose models keep a query on the operator's machines (a
        privacy rule's default ``models``). ``escalation_price``: the council's USD per
        million input and output tokens (None: charged at the dearest model's)."""
        self.models = dict(models or _medium_large_models())
        self.rules, self.fallback, self.ledger = list(rules), fallback, ledger
        self.escalation_url, self.model_budgets = escalation_url, dict(model_budgets or {})
        self.escalation_price = escalation_price
        self.private = frozenset(a for a in private if a in self.models)
        self._validate()

    # -- construction -------------------------------------------------------
    @classmethod
    def preset(cls, name: str = DEFAULT_PRESET, **kwargs) -> "PolicyMapper":
        return cls.from_dict({"preset": name}, **kwargs)

    @classmethod
    def from_dict(cls, spec: dict, *, base_dir: Path | None = None, default_models: dict[str, str] | None = None,
                  private: Callable[[str, str], bool] | None = None) -> "PolicyMapper":
        """``default_models`` (e.g. the profile's medium/large) fill aliases the spec leaves out;
        ``private(alias, model id)``: whether that model keeps a query on private machines."""
        if not isinstance(spec, dict):
            raise MapperConfigError(f"mapper config must be a mapping, got {type(spec).__name__}")
        unknown = set(spec) - {"preset", "models", "fallback", "rules", "ambiguous", "budget", "escalation"}
        if unknown:
            raise MapperConfigError(f"unknown mapper config keys {sorted(unknown)}")
        base = {}
        if "preset" in spec:
            if spec["preset"] not in PRESETS:
                raise MapperConfigError(f"unknown preset {spec['preset']!r}; expected one of {sorted(PRESETS)}")
            base = PRESETS[spec["preset"]]
        models = spec.get("models") or {}
        if not isinstance(models, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in models.items()):
            raise MapperConfigError(f"'models' must map aliases to model ids (e.g. medium: gemini-2.5-flash), got {models!r}")
        models = {**_medium_large_models(), **(default_models or {}), **models}
        raw_rules = spec.get("rules", base.get("rules", []))
        if not isinstance(raw_rules, list):
            raise MapperConfigError(f"'rules' must be a list of rules, got {type(raw_rules).__name__}")
        rules = [_rule(r, i) for i, r in enumerate(raw_rules)]
        if "ambiguous" in spec:  # shorthand: what Ambiguous_Query does in every policy rule
            rules = [Rule(**{**r.__dict__, "map": {**r.map, AMBIGUOUS: spec["ambiguous"]}}) if r.kind == "policy" else r
                     for r in rules]
        ledger = None
        if spec.get("budget"):
            b = spec["budget"]
            if not isinstance(b, dict) or not isinstance(b.get("ledger", ""), str):
                raise MapperConfigError(f"'budget' must be a mapping like {{ledger: team, period: month}}, got {b!r}")
            path = Path(b.get("ledger", "budget_ledger.json"))
            if not path.is_absolute():
                path = (base_dir or _default_ledger_dir()) / path
            unknown = set(b) - {"ledger", "period", "models"}
            if unknown:
                raise MapperConfigError(f"unknown budget keys {sorted(unknown)}; expected ledger, period, models")
            try:  # the spend is in the state database; a .json file of that name is an older ledger to take over
                ledger = BudgetLedger(path.name, b.get("period", "month"), legacy=path if path.suffix == ".json" else None)
            except LedgerError as exc:
                raise MapperConfigError(str(exc)) from None
            model_budgets = b.get("models") or {}
            if not isinstance(model_budgets, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v and v != float("inf")
                    for v in model_budgets.values()):
                raise MapperConfigError(f"'budget.models' must map model aliases to USD caps >= 0 (e.g. pro: 5.0), "
                                        f"got {model_budgets!r}")
        escalation_url, escalation_price = None, None
        if spec.get("escalation") is not None:
            e = spec["escalation"]
            if not isinstance(e, dict) or not isinstance(e.get("url"), str) or not e["url"].startswith(("http://", "https://")) \
                    or set(e) - {"url", "price_per_1m"}:
                raise MapperConfigError(f"'escalation' must be a mapping like {{url: http://council:8001/v1/chat/completions, "
                                        f"price_per_1m: [3.0, 15.0]}} (price optional), got {e!r}")
            escalation_url = e["url"]
            if "price_per_1m" in e:
                price = e["price_per_1m"]
                if not (isinstance(price, list) and len(price) == 2 and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in price)):
                    raise MapperConfigError(f"'escalation.price_per_1m' must be [USD per million input tokens, USD per "
                                            f"million output tokens], got {price!r}")
                escalation_price = (float(price[0]), float(price[1]))
        return cls(rules, models, spec.get("fallback", base.get("fallback", "large")), ledger, escalation_url,
                   model_budgets if ledger is not None else None,
                   frozenset(a for a, m in models.items() if private is not None and private(a, m)), escalation_price)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "PolicyMapper":
        path = Path(path)
        try:
            return cls.from_dict(load_spec(path), base_dir=kwargs.pop("base_dir", path.parent), **kwargs)
        except MapperConfigError as exc:
            raise MapperConfigError(f"{path}: {exc}") from None

    def _validate(self) -> None:
        targets = {self.fallback} | {r.target for r in self.rules if r.kind not in ("policy", "pool")
                                     and (r.kind != "privacy" or r.target)}
        targets |= {t for r in self.rules if r.kind == "policy" for t in r.map.values()}
        for t in targets:
            if t not in self.models and t not in (ABSTAIN, ESCALATE):
                raise MapperConfigError(f"target {t!r} is neither a model alias {sorted(self.models)} nor {ABSTAIN!r}/{ESCALATE!r}")
        if ESCALATE in targets and self.escalation_url is None:
            raise MapperConfigError("a rule escalates but there is no escalation (an 'escalation: {url: ...}' "
                                    "section)")
        for r in self.rules:
            if r.kind != "privacy":
                continue
            if unknown := [m for m in r.models if m not in self.models]:
                raise MapperConfigError(f"privacy rule {r.label!r}: models {unknown} are not model aliases "
                                        f"{sorted(self.models)}")
            if r.target == ESCALATE:
                raise MapperConfigError(f"privacy rule {r.label!r}: a private query is never escalated (the council "
                                        "is another service); its target is a private model or 'abstain'")
            if r.target and r.target != ABSTAIN and r.models and r.target not in r.models:
                raise MapperConfigError(f"privacy rule {r.label!r}: its target {r.target!r} is not among its models "
                                        f"{list(r.models)}")
            if not r.target and not self.allowed_by(r):
                raise MapperConfigError(f"privacy rule {r.label!r} has no model to keep a query on: give it 'models' "
                                        "(aliases), a 'target', or a model on a local backend (or an endpoint marked "
                                        "private: true in the pool file)")
        if self.fallback == ESCALATE:
            raise MapperConfigError("the fallback must be a model alias or 'abstain'")
        if any(r.kind == "budget" for r in self.rules) and self.ledger is None:
            raise MapperConfigError("a budget rule needs a 'budget' section (ledger: its name, period)")
        unknown = set(self.model_budgets) - set(self.models)
        if unknown:
            raise MapperConfigError(f"budget.models names {sorted(unknown)}, not model aliases {sorted(self.models)}")
        if self.model_budgets and self.ledger is None:
            raise MapperConfigError("per-model budgets need a 'budget' section (ledger: its name, period)")
        for alias in self.model_budgets:
            self.ledger.part(alias)

    # -- mapping ------------------------------------------------------------
    def allowed_by(self, rule: Rule) -> tuple[str, ...]:
        """The aliases a query that ``rule`` (privacy) matches may go to, in the mapper's order."""
        allowed = set(rule.models) if rule.models else self.private | ({rule.target} - {ABSTAIN, ""})
        return tuple(a for a in self.models if a in allowed)

    def map(self, decision, *, over_budget: bool = False, capped: frozenset = frozenset(), text: str | None = None,
            router_failed: str | None = None, named: str | None = None, shadow: bool = False) -> Mapping:
        """``decision`` is a RouteDecision (or anything with query, policy, confidence).
        ``over_budget``: the budget was found used up when this request tried to reserve
        its cost (``BudgetLedger.admit``): budget rules fire whatever the ledger read.
        ``capped``: models whose own budget was found used up so (not chosen). ``text``:
        the whole conversation, system messages included, for the privacy rules (default:
        what the router read). ``router_failed``: why the router gave no decision; the
        rules that read one are skipped and the fallback answers. ``named``: the alias the
        caller asked for by name: it answers, unless a privacy rule that matches keeps the
        conversation on other models (Forbidden). ``shadow``: the router decides off the
        request path; this request goes as if it had no router (rule ``shadow``)."""
        for rule in (r for r in self.rules if r.kind == "privacy"):  # first, wherever they stand
            if (hits := self._private(rule, text if text is not None else decision.query)) is None:
                continue
            allowed = self.allowed_by(rule)
            if named is not None and named not in allowed:
                raise Forbidden(f"privacy rule {rule.label!r} keeps this conversation on {', '.join(allowed)}: "
                                f"{named!r} may not answer it", "model_not_allowed", param="model")
            target = named or rule.target or next((a for a in getattr(decision, "ranked", ()) if a in allowed), allowed[0])
            reason = f"the conversation contains {hits}: kept on {', '.join(allowed) or 'no model'} (rule {rule.label})"
            return self._within_model_budgets(Mapping(self.models.get(target), target, rule.label, decision.policy,
                                                      reason, allowed), decision, capped)
        if named is not None:
            return self._within_model_budgets(Mapping(self.models[named], named, "by_name", decision.policy,
                                                      f"the caller asked for {named} by name"), decision, capped)
        for rule in self.rules:
            if rule.kind == "privacy" or ((router_failed is not None or shadow) and rule.kind in READS_ROUTER):
                continue
            reason = ("the budget was used up by requests in flight" if over_budget and rule.kind == "budget"
                      else self._match(rule, decision))
            if reason is None:
                continue
            target = {"policy": rule.map.get(decision.policy), "pool": getattr(decision, "model", None)}.get(
                rule.kind, rule.target)
            if target is None or (rule.kind == "pool" and target not in self.models):
                continue
            return self._within_model_budgets(Mapping(self.models.get(target), target, rule.label, decision.policy,
                                                      reason), decision, capped)
        reason, rule = ((f"the router failed ({router_failed}): the profile's default model", "router_failed")
                        if router_failed is not None else
                        ("shadow mode: the profile's default model; the router decides beside it", "shadow")
                        if shadow else (f"no rule matched policy {decision.policy!r}", "fallback"))
        return self._within_model_budgets(Mapping(self.models.get(self.fallback), self.fallback, rule,
                                                  decision.policy, reason), decision, capped)

    def capped(self, alias: str, in_flight: frozenset = frozenset()) -> str | None:
        """Why ``alias`` may not be chosen for its own budget (None: it may)."""
        if alias in in_flight:
            return f"{alias}'s budget was used up by requests in flight"
        limit = self.model_budgets.get(alias)
        if limit is None:
            return None
        spent = self.ledger.part(alias).committed()
        return f"{alias} spent ${spent:.4f} of its ${limit:.2f} this {self.ledger.period}" if spent >= limit else None

    def _within_model_budgets(self, mapping: Mapping, decision, in_flight: frozenset) -> Mapping:
        """``mapping``, or the next choice (the pool router's ranking, then the fallback) when
        its model's own budget is used up; abstain when every candidate's is."""
        if not self.model_budgets or mapping.target in (ABSTAIN, ESCALATE):
            return mapping
        why = self.capped(mapping.target, in_flight)
        if why is None:
            return mapping
        reasons = [why]
        for alias in dict.fromkeys([*getattr(decision, "ranked", ()), self.fallback, *(mapping.allowed or ())]):
            if alias == mapping.target or alias not in self.models or (
                    mapping.allowed is not None and alias not in mapping.allowed):
                continue
            if (other := self.capped(alias, in_flight)) is None:
                return Mapping(self.models[alias], alias, "model_budget", mapping.policy,
                               f"{'; '.join(reasons)}: the next choice answers", mapping.allowed)
            reasons.append(other)
        return Mapping(None, ABSTAIN, "model_budget", mapping.policy, f"{'; '.join(reasons)}: no model is left",
                       mapping.allowed)

    @staticmethod
    def _private(rule: Rule, text: str) -> str | None:
        """The PII patterns of ``rule`` that ``text`` matches, named; None when none does."""
        hits = [n for n in rule.patterns or tuple(PII_PATTERNS) if re.search(PII_PATTERNS[n], text)]
        return ", ".join(hits) or None

    def _match(self, rule: Rule, d) -> str | None:
        q = d.query
        if rule.kind == "keyword":
            hits = [k for k in rule.keywords if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", q, re.IGNORECASE)]
            return f"keyword {hits[0]!r}" if hits else None
        if rule.kind == "long_query":
            return f"{len(q)} characters >= {rule.min_chars}" if len(q) >= rule.min_chars else None
        if rule.kind == "math":
            m = MATH.search(q)
            return f"looks like maths ({m.group(0)!r})" if m else None
        if rule.kind == "budget":
            spent = self.ledger.committed()  # spend plus what requests in flight reserved
            return f"spent ${spent:.4f} of ${rule.limit_usd:.2f} this {self.ledger.period}" if spent >= rule.limit_usd else None
        if rule.kind == "threshold":
            p = d.p_complex
            return f"P(Complex_Query) {p:.3f} >= {rule.at_least:.3f}" if p >= rule.at_least else None
        if rule.kind == "low_confidence":
            conf = d.confidence
            if conf is None:
                return f"no confidence (router output unparsed: {getattr(d, 'parse_error', None)})"
            return f"confidence {conf:.2f} < {rule.below:.2f}" if conf < rule.below else None
        if rule.kind == "pool":
            model = getattr(d, "model", None)
            return f"P(correct) - lambda * cost is highest for {model}" if model else None
        return f"policy {d.policy}" if d.policy in rule.map else None

    def is_pool_rule(self, label: str | None) -> bool:
        """Whether the rule named ``label`` is the pool router's own choice (what a cascade
        escalates on)."""
        return any(r.kind == "pool" and r.label == label for r in self.rules)

    def budget_limit(self) -> float | None:
        """The tightest budget rule's limit (None without a budget rule)."""
        limits = [r.limit_usd for r in self.rules if r.kind == "budget"]
        return min(limits) if limits else None

    def describe(self) -> dict:
        return {"models": self.models, "fallback": self.fallback,
                "rules": [{"name": r.label, "kind": r.kind, "target": r.target or r.map,
                           **({"models": list(self.allowed_by(r))} if r.kind == "privacy" else {})} for r in self.rules],
                "budget": {"ledger": self.ledger.name, "period": self.ledger.period,
                           **({"models": self.model_budgets} if self.model_budgets else {})} if self.ledger else None}


def load_spec(path: str | Path) -> dict:
    """A mapper config file (YAML, or JSON by its .json suffix) as a dict."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as exc:
        raise MapperConfigError(f"cannot read mapper config {path}: {exc}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise MapperConfigError(f"mapper config {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(spec, dict):
        raise MapperConfigError(f"mapper config {path} must be a mapping, got {type(spec).__name__}")
    return spec


def _default_ledger_dir() -> Path:
    from router_pipeline import settings

    return settings.load().artifacts_dir


def _rule(raw, index: int) -> Rule:
    where = f"rule {index + 1}"
    if not isinstance(raw, dict) or "kind" not in raw:
        raise MapperConfigError(f"{where}: a rule is a mapping with a 'kind' ({', '.join(KINDS)})")
    kind = raw["kind"]
    if kind not in KINDS:
        raise MapperConfigError(f"{where}: unknown kind {kind!r}; expected one of {KINDS}")
    fields = dict(raw)
    if kind in ("pool", "privacy"):  # a privacy rule without one: the best of its models
        fields.setdefault("target", "")
    elif kind == "policy":
        bad = set(fields.get("map", {})) - set(POLICIES)
        if not fields.get("map") or bad:
            raise MapperConfigError(f"{where}: a policy rule needs 'map' from {POLICIES} to targets (bad keys {sorted(bad)})")
        fields.setdefault("target", "")
    elif "target" not in fields:
        raise MapperConfigError(f"{where} ({kind}): 'target' is required")
    required = {"keyword": "keywords", "long_query": "min_chars", "budget": "limit_usd", "low_confidence": "below",
                "threshold": "at_least"}
    if kind in required and required[kind] not in fields:
        raise MapperConfigError(f"{where} ({kind}): {required[kind]!r} is required")
    if kind == "privacy":
        unknown = set(fields.get("patterns", ())) - set(PII_PATTERNS)
        if unknown:
            raise MapperConfigError(f"{where}: unknown PII patterns {sorted(unknown)}; known {sorted(PII_PATTERNS)}")
        if not isinstance(fields.get("models", []), list) or not all(isinstance(m, str) for m in fields.get("models", [])):
            raise MapperConfigError(f"{where} (privacy): models must be a list of model aliases, got "
                                    f"{fields.get('models')!r}")
    for key in ("keywords", "patterns", "models"):
        if key in fields:
            fields[key] = tuple(fields[key])
    for key in ("min_chars", "limit_usd", "below", "at_least"):  # YAML reads 5e-05 (no dot) as text
        if key in fields and (isinstance(fields[key], bool) or not isinstance(fields[key], (int, float))):
            raise MapperConfigError(f"{where} ({kind}): {key} must be a number, got {fields[key]!r}"
                                    + (" (YAML needs a dot: 5.0e-05)" if isinstance(fields[key], str) else ""))
    try:
        return Rule(**fields)
    except TypeError as exc:
        raise MapperConfigError(f"{where} ({kind}): {exc}") from None
