import subprocess
import sys
import textwrap

import pytest

from router_pipeline.serve.database import Database
from router_pipeline.serve.ledger import BudgetLedger
from router_pipeline.serve.mapper import ABSTAIN, MapperConfigError, PolicyMapper
from router_pipeline.policies import AMBIGUOUS, COMPLEX, STANDARD
from router_pipeline.routers.contract import RouteDecision


def decision(query="Who wrote Hamlet?", policy=STANDARD, confidence=0.9, parse_ok=True):
    others = [p for p in (STANDARD, COMPLEX, AMBIGUOUS) if p != policy]
    probs = {policy: confidence, others[0]: (1 - confidence) / 2, others[1]: (1 - confidence) / 2} if parse_ok else {}
    return RouteDecision(query, policy, probs, parse_ok, "fast", parse_error=None if parse_ok else "no [DECISION]")


def mapper(rules, **kw):
    return PolicyMapper.from_dict({"rules": rules, "fallback": "large", **kw})


POLICY = {"kind": "policy", "map": {STANDARD: "medium", COMPLEX: "large", AMBIGUOUS: "medium"}}


def test_policy_map_and_fallback():
    m = mapper([{"kind": "policy", "map": {STANDARD: "medium", COMPLEX: "large"}}])
    assert m.map(decision(policy=STANDARD)).target == "medium"
    got = m.map(decision(policy=COMPLEX))
    assert (got.target, got.model, got.rule) == ("large", "gemini-2.5-pro", "policy")
    missing = m.map(decision(policy=AMBIGUOUS))  # not in the map -> fallback
    assert (missing.target, missing.rule) == ("large", "fallback")


@pytest.mark.parametrize("query, hit", [
    ("Email me at jane.doe@example.org please", "email"),
    ("My card is 4111 1111 1111 1111", "card"),
    ("Call +44 20 7946 0958 tomorrow", "phone"),
    ("SSN 123-45-6789", "ssn"),
    ("Pay to DE89370400440532013000", "iban"),
])
def test_privacy_forces_local_model(query, hit):
    m = mapper([{"kind": "privacy", "target": "local"}, POLICY])
    got = m.map(decision(query))
    assert got.target == "local" and got.model == "gemma3-270m" and got.rule == "privacy" and hit in got.reason


@pytest.mark.parametrize("query", [
    "In which year, 1987 or 1988, did the Berlin Wall speech happen?",
    # Year ranges and scores (SimpleQA and MMLU questions once sent to the local model as phone numbers)
    "What team finished with 38 points at the end of the 2021-2022 Premier League season?",
    "Toronto mayors Sir Adam Wilson (Mayor from 1859-1861), John George Bowes (Mayor from 1861-1864)",
    "The vote was 232 - 190 in favour.",
])
def test_privacy_ignores_plain_queries_years_and_ranges(query):
    m = mapper([{"kind": "privacy", "target": "local"}, POLICY])
    assert m.map(decision(query)).rule == "policy"


@pytest.mark.parametrize("query", ["Call 555-123-4567", "My number is (555) 123-4567", "+1 (555) 123-4567",
                                   "Ring 01 23 45 67 89", "Berlin 030 123456"])
def test_privacy_finds_phone_numbers_of_nine_digits_or_more(query):
    m = mapper([{"kind": "privacy", "target": "local"}, POLICY])
    got = m.map(decision(query))
    assert got.rule == "privacy" and "phone" in got.reason


def test_keyword_override_whole_words_case_insensitive():
    m = mapper([{"kind": "keyword", "name": "legal", "keywords": ["contract", "lawsuit"], "target": "large"}, POLICY])
    assert m.map(decision("Review this CONTRACT clause")).rule == "legal"
    assert m.map(decision("Who was the contractor on the bridge?")).rule == "policy"


def test_long_query_and_math_heuristics():
    m = mapper([{"kind": "long_query", "min_chars": 50, "target": "large"}, {"kind": "math", "target": "large"}, POLICY])
    assert m.map(decision("x" * 50)).rule == "long_query"
    assert m.map(decision("What is 17 * 23?")).rule == "math"
    assert m.map(decision("Solve the equation for x")).rule == "math"
    assert m.map(decision(r"Compute \frac{1}{2}")).rule == "math"
    assert m.map(decision("Who painted the Mona Lisa?")).rule == "policy"


def test_low_confidence_goes_to_a_model_or_escalates_to_the_council_endpoint():
    m = mapper([{"kind": "low_confidence", "below": 0.6, "target": "large"}, POLICY])
    assert m.map(decision(confidence=0.5)).rule == "low_confidence"
    assert m.map(decision(confidence=0.7)).rule == "policy"
    unparsed = m.map(decision(parse_ok=False))  # no confidence at all counts as low
    assert unparsed.rule == "low_confidence" and "unparsed" in unparsed.reason

    council = PolicyMapper.from_dict({"escalation": {"url": "http://127.0.0.1:8001/v1/chat/completions"},
                                      "rules": [{"kind": "low_confidence", "below": 0.6, "target": "escalate"}, POLICY]})
    got = council.map(decision(confidence=0.4))
    assert got.escalate and got.model is None  # the gateway posts it to the endpoint (test_server)


def test_escalation_without_an_endpoint_is_a_config_error():
    with pytest.raises(MapperConfigError, match="no escalation"):
        mapper([{"kind": "low_confidence", "below": 0.6, "target": "escalate"}, POLICY])
    with pytest.raises(MapperConfigError, match="'escalation' must be a mapping like"):
        PolicyMapper.from_dict({"escalation": {"url": "ftp://council"}, "rules": [POLICY]})
    spec = {"escalation": {"url": "http://127.0.0.1:8001/v1/chat/completions"},
            "rules": [{"kind": "low_confidence", "below": 0.6, "target": "escalate"}, POLICY]}
    assert PolicyMapper.from_dict(spec).escalation_url == "http://127.0.0.1:8001/v1/chat/completions"


def test_first_match_wins_in_order_but_privacy_rules_come_first_wherever_they_stand():
    rules = [{"kind": "keyword", "keywords": ["mail"], "target": "medium"}, {"kind": "math", "target": "large"}, POLICY]
    query = "mail 2 + 2 to the team"
    assert mapper(rules).map(decision(query)).rule == "keyword"
    assert mapper([rules[1], rules[0], POLICY]).map(decision(query)).rule == "math"
    private = {"kind": "privacy", "target": "local"}
    got = mapper([rules[1], private, POLICY]).map(decision("mail 2 + 2 to bob@example.com"))
    assert (got.rule, got.target, got.allowed) == ("privacy", "local", ("local",))


def test_a_privacy_rule_scans_the_whole_conversation_and_names_the_models_it_allows():
    m = PolicyMapper.from_dict({"rules": [{"kind": "privacy", "name": "pii"}, POLICY], "fallback": "medium"},
                               private=lambda alias, model: alias == "local")
    assert m.map(decision("Summarise my notes"), text="system: my mail is bob@example.com\nSummarise my notes").rule \
        == "pii"
    assert m.map(decision("Summarise my notes"), text="Summarise my notes").rule == "policy"
    got = m.map(decision("bob@example.com"))
    assert (got.target, got.allowed) == ("local", ("local",)) and "rule pii" in got.reason
    named = PolicyMapper.from_dict({"rules": [{"kind": "privacy", "models": ["local", "medium"], "target": "medium"},
                                              POLICY]})
    assert named.map(decision("bob@example.com")).allowed == ("medium", "local")
    with pytest.raises(MapperConfigError, match="not among its models"):
        PolicyMapper.from_dict({"rules": [{"kind": "privacy", "models": ["local"], "target": "large"}, POLICY]})
    with pytest.raises(MapperConfigError, match="never escalated"):
        PolicyMapper.from_dict({"escalation": {"url": "http://council/v1"},
                                "rules": [{"kind": "privacy", "target": "escalate"}, POLICY]})
    with pytest.raises(MapperConfigError, match="no model to keep a query on"):
        PolicyMapper.from_dict({"rules": [{"kind": "privacy"}, POLICY]})  # nothing private, no target
    with pytest.raises(MapperConfigError, match="not model aliases"):
        PolicyMapper.from_dict({"rules": [{"kind": "privacy", "models": ["cloud"]}, POLICY]})


def test_a_failed_router_maps_to_the_default_model_and_privacy_still_holds():
    m = mapper([{"kind": "privacy", "target": "local"}, {"kind": "threshold", "at_least": 0.0, "target": "large"},
                POLICY])
    got = m.map(decision("Who wrote Hamlet?"), router_failed="timed out after 0.5 s")
    assert (got.rule, got.target) == ("router_failed", m.fallback) and "timed out" in got.reason
    assert m.map(decision("bob@example.com"), router_failed="raised").rule == "privacy"


@pytest.mark.parametrize("choice, target", [("medium", "medium"), ("large", "large"), ("abstain", ABSTAIN)])
def test_ambiguous_choice(choice, target):
    m = PolicyMapper.from_dict({"preset": "balanced", "ambiguous": choice})
    got = m.map(decision(policy=AMBIGUOUS))
    assert got.target == target and got.abstain == (choice == "abstain")


def test_presets_differ_where_they_should():
    low = decision(policy=COMPLEX, confidence=0.55)
    assert PolicyMapper.preset("cost_first").map(low).target == "medium"  # not sure enough to pay for large
    assert PolicyMapper.preset("quality_first").map(low).target == "large"
    assert PolicyMapper.preset("balanced").map(low).target == "large"
    amb = decision(policy=AMBIGUOUS)
    assert [PolicyMapper.preset(p).map(amb).target for p in ("cost_first", "quality_first", "balanced")] == \
        [ABSTAIN, "large", "medium"]


def test_budget_rule_switches_when_spent(tmp_path):
    spec = {"budget": {"ledger": "spend.json", "period": "total"},
            "rules": [{"kind": "budget", "limit_usd": 0.01, "target": "medium"}, POLICY]}
    m = PolicyMapper.from_dict(spec, base_dir=tmp_path)
    m.ledger.bind(Database(tmp_path / "state.sqlite"))
    assert m.map(decision(policy=COMPLEX)).target == "large"
    m.ledger.settle(None, 0.004)  # what the gateway charges once a call is answered
    m.ledger.settle(None, 0.006)
    got = m.map(decision(policy=COMPLEX))
    assert (got.target, got.rule) == ("medium", "budget") and "$0.0100" in got.reason
    assert m.describe()["budget"] == {"ledger": "spend.json", "period": "total"}  # a name, not a path


def test_budget_spend_persists_across_processes(tmp_path):
    state = tmp_path / "state.sqlite"
    script = textwrap.dedent(f"""
        from router_pipeline.serve.database import Database
        from router_pipeline.serve.ledger import BudgetLedger
        BudgetLedger("team", "month").bind(Database({str(state)!r})).settle(None, 0.25)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    ledger = BudgetLedger("team", "month").bind(Database(state))
    assert ledger.spent() == 1.0 and len(ledger.key()) == 7  # this month's, keyed by YYYY-MM


def test_yaml_file_with_preset_override(tmp_path):
    path = tmp_path / "mapper.yaml"
    path.write_text(textwrap.dedent("""
        preset: quality_first
        models: {medium: my-flash, large: my-pro}
        ambiguous: abstain
    """))
    m = PolicyMapper.from_file(path)
    assert m.map(decision(policy=STANDARD)).model == "my-flash"
    assert m.map(decision(policy=AMBIGUOUS)).abstain
    assert m.map(decision("What is 3 + 4?")).rule == "math"  # from the preset's rules


@pytest.mark.parametrize("text, message", [
    ("rules: [{kind: teleport, target: large}]", "unknown kind 'teleport'"),
    ("rules: [{kind: keyword, target: large}]", "'keywords' is required"),
    ("rules: [{kind: policy, map: {Easy_Query: medium}}]", "bad keys ['Easy_Query']"),
    ("rules: [{kind: math, target: huge}]", "target 'huge'"),
    ("rules: [{kind: budget, limit_usd: 1, target: medium}]", "needs a 'budget' section"),
    ("budget: {ledger: b.json}\nrules: [{kind: budget, limit_usd: 5e-05, target: medium}]",
     "limit_usd must be a number, got '5e-05' (YAML needs a dot"),
    ("budget: {ledger: b, models: {lrage: 1.0}}", "budget.models names ['lrage'], not model aliases"),
    ("budget: {ledger: b, models: {large: -1.0}}", "USD caps >= 0"),
    ("budget: {ledger: b, models: {large: lots}}", "USD caps >= 0"),
    ("budget: {ledger: b, limit: 5.0}", "unknown budget keys ['limit']"),
    ("preset: cheapest", "unknown preset"),
    ("rules: [unclosed", "not valid YAML"),
    ("- just\n- a list", "must be a mapping"),
])
def test_bad_config_names_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MapperConfigError, match="bad.yaml") as err:
        PolicyMapper.from_file(path)
    assert message in str(err.value)


def test_a_router_without_calibration_is_served_with_the_balanced_preset_and_a_warning(caplog, tmp_path,
                                                                                       monkeypatch):
    import logging

    from router_pipeline.serve.profiles import OPEN, load_profiles

    models = {"medium": "gemini-2.5-flash", "large": "gemini-2.5-pro"}
    monkeypatch.setenv("TEST_KEYS_A", "key-a-0123456789abcdef")
    monkeypatch.setenv("TEST_KEYS_B", "key-b-0123456789abcdef")
    own = tmp_path / "own.yaml"  # every profile brings its mapper: nothing falls back to the preset
    own.write_text("profiles:\n  a: {keys_env: TEST_KEYS_A, mapper: {preset: cost_first}}\n")
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("profiles:\n  a: {keys_env: TEST_KEYS_A, mapper: {preset: cost_first}}\n"
                     "  b: {keys_env: TEST_KEYS_B}\n")
    with caplog.at_level(logging.WARNING, logger="router_pipeline.serve.profiles"):
        calibrated = load_profiles(None, calibration={"threshold": 0.3}, default_models=models)
        load_profiles(own, calibration={}, default_models=models)
        assert "no calibration" not in caplog.text
        load_profiles(mixed, calibration={}, default_models=models)
        assert "profile(s) b use the balanced preset" in caplog.text
        bare = load_profiles(None, calibration={}, default_models=models)
    assert f"no calibration (router_calibration.json): profile(s) {OPEN} use" in caplog.text
    assert [r.kind for r in calibrated.profiles[OPEN].mapper.rules] == ["threshold", "policy"]
    assert [r.kind for r in bare.profiles[OPEN].mapper.rules] == ["privacy", "low_confidence", "policy"]
