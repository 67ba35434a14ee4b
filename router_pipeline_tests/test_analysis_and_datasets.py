import pandas as pd

from router_pipeline.labels.analysis import analyse_queries, analyse_query, find_leaks, scrub_leaks
from router_pipeline.llm import RoleSpec, make_client
from router_pipeline.policies import AMBIGUOUS, COMPLEX, POLICIES, STANDARD
from router_pipeline.labels.questions import load_questions
from router_pipeline.routers.prompt import parse_completion, query_from_prompt
from router_pipeline.training.examples import build_dpo_dataset, build_sft_dataset, build_training_examples


def test_rules_analyser_never_leaks_on_simpleqa():
    frame, _ = load_questions(sample_size=600, sample_seed=1)
    leaks = [q for q, g in zip(frame["query"], frame["gold_answer"]) if find_leaks(analyse_query(q), q, {"gold": g})]
    assert leaks == []
    sentence = analyse_query("Who received the IEEE Frank Rosenblatt Award in 2010?")
    assert sentence.startswith("The request asks for a person's name") and "2010" in sentence
    assert sentence.count(".") >= 1 and sentence.endswith(".")


def test_leak_detection():
    q = "Who designed the Abasto market in Buenos Aires?"
    assert find_leaks("Asks for the architect; it was Delpini.", q, {"gold": "Delpini", "medium_answer": "Bes"}) == ["gold"]
    # Words the query itself contains are no leak.
    assert find_leaks("Asks about Buenos Aires.", q, {"gold": "Buenos Aires"}) == []
    assert find_leaks("Asks about a market.", q, {"gold": None, "large_answer": "a"}) == []


def test_llm_analyses_that_leak_are_replaced(fake_gemini, sample_questions):
    fake_gemini.responder = lambda model, prompt: "The answer is Atlantis, obviously. More text."
    spec = RoleSpec("gemini", "gemini-2.5-flash")
    frame, stats = analyse_queries(sample_questions.head(4), analyser=spec,
                                   client=make_client(spec, gemini_base_url=fake_gemini.base_url), progress=False)
    assert stats.calls == 4 and (frame["analysis"] == "The answer is Atlantis, obviously.").all()
    # The analyser only ever saw the query.
    assert all("Reference" not in c.prompt and "gold" not in c.prompt.lower() for c in fake_gemini.calls)
    secrets = {q: {"large_answer": "Atlantis"} for q in frame["qid"]}
    scrubbed, replaced = scrub_leaks(frame, secrets)
    assert replaced == 4 and scrubbed["analyser"].str.contains("revealed large_answer").all()
    assert not scrubbed["analysis"].str.contains("Atlantis").any()


def _examples():
    oracle = pd.DataFrame({
        "qid": ["a", "b", "c", "d"],
        "query": ["Who wrote Hamlet?", "What year was the 3rd Ballyhooly fair?", "who wrote  HAMLET?", "When?"],
        "medium_label": ["Correct", "Incorrect", "Correct", "IDK"],
        "large_label": ["Correct", "Correct", "Correct", "IDK"],
        "policy": [STANDARD, COMPLEX, STANDARD, AMBIGUOUS],
        "rationale": ["r1", "r2", "r3", "r4"],
    })
    analyses = pd.DataFrame({"qid": list("abcd"), "analysis": [analyse_query(q) for q in oracle["query"]]})
    return build_training_examples(oracle, analyses)


def test_training_examples_deduplicate_by_normalised_query():
    examples, dropped = _examples()
    assert dropped == 1 and list(examples["qid"]) == ["a", "b", "d"]
    assert (examples["source"] == "oracle").all() and examples["analysis"].str.len().gt(20).all()


def test_sft_and_dpo_datasets_round_trip():
    examples, _ = _examples()
    for mode in ("reasoning", "explained", "fast"):
        sft = build_sft_dataset(examples, mode)
        assert list(sft.columns[:3]) == ["qid", "prompt", "completion"]
        assert [parse_completion(c, mode).policy for c in sft["completion"]] == list(examples["policy"])
        assert [query_from_prompt(p) for p in sft["prompt"]] == list(examples["query"])
        dpo = build_dpo_dataset(examples, mode, rejected_per_example=2)
        assert len(dpo) == 2 * len(examples)
        assert (dpo["chosen"] != dpo["rejected"]).all()
        for row in dpo.itertuples():
            assert parse_completion(row.chosen, mode).policy == row.chosen_policy
            assert parse_completion(row.rejected, mode).policy == row.rejected_policy != row.chosen_policy
        # Every wrong policy serves as a rejection for each example.
        for qid, group in dpo.groupby("qid"):
            assert set(group["rejected_policy"]) == set(POLICIES) - set(group["chosen_policy"])
    one = build_dpo_dataset(examples, "reasoning", rejected_per_example=1)
    assert len(one) == len(examples)


def test_the_validation_slice_never_reaches_training():
    oracle = pd.DataFrame({"qid": [f"q{i}" for i in range(200)], "query": [f"Question number {i}?" for i in range(200)],
                           "policy": STANDARD, "rationale": "r"})
    analyses = pd.DataFrame({"qid": oracle["qid"], "analysis": "It asks for a number."})
    examples, _ = build_training_examples(oracle, analyses, validation_fraction=0.1, seed=7)
    held_out = set(examples.loc[examples["split"] == "validation", "qid"])
    assert 8 <= len(held_out) <= 35  # a seeded hash, about 10%
    assert held_out.isdisjoint(build_sft_dataset(examples)["qid"]) and held_out.isdisjoint(build_dpo_dataset(examples)["qid"])
    assert len(build_sft_dataset(examples)) == 200 - len(held_out)
    again, _ = build_training_examples(oracle.iloc[::-1], analyses, validation_fraction=0.1, seed=7)
    assert set(again.loc[again["split"] == "validation", "qid"]) == held_out  # independent of row order
