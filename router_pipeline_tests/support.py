"""Helpers several test modules share (test modules never import each other)."""


import dagster as dg
import pandas as pd

from router_pipeline.policies import POLICIES
from router_pipeline.training.examples import build_training_examples

QUERIES = [
    "Who received the IEEE Frank Rosenblatt Award in 2010?",
    "What is the capital of France?",
    "In which year did the 3rd Ballyhooly fair close?",
    "How many fouls did Inter commit in the 2010 final?",
    "Who wrote Hamlet?",
    "Which architect designed the Abasto market?",
    "What is 2 + 2?",
    "When was the Lego part gal56 first released?",
]


def training_examples() -> pd.DataFrame:
    """Eight labelled examples (the three policies in turn) with analyses."""
    policies = [POLICIES[i % 3] for i in range(len(QUERIES))]
    oracle = pd.DataFrame({"qid": [f"q{i}" for i in range(len(QUERIES))], "query": QUERIES,
                           "medium_label": "Correct", "large_label": "Correct", "policy": policies, "rationale": "r"})
    analyses = pd.DataFrame({"qid": oracle["qid"], "analysis": [f"It asks about item {i}." for i in range(len(QUERIES))]})
    return build_training_examples(oracle, analyses)[0]


def write_asset(io_manager, key: str, frame: pd.DataFrame) -> None:
    """Put an upstream asset on disk where the IO manager reads it."""
    path = io_manager.path_for(dg.AssetKey(key))
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)


class FakeRemote:
    """Stands in for modal.Function.from_name: records the call, runs the real body locally."""

    calls: list = []

    def __init__(self, app_name, name):
        import modal_app

        self.app_name, self.name, self._fn = app_name, name, getattr(modal_app, name)

    def remote(self, *args):
        FakeRemote.calls.append((self.app_name, self.name, args))
        return self._fn.local(*args)


ADMIN_KEY = "sk-admin-test-key-0001"  # what the gemini_cloud fixture sets as ROUTER_ADMIN_KEY


def serving(state):
    """The app on a free 127.0.0.1 port, served by uvicorn in a thread."""
    from router_pipeline.serve.server import serving_in_thread

    return serving_in_thread(state)
