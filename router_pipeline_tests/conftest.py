import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from router_pipeline.llm.fake_gemini import FakeGemini
from router_pipeline.labels.questions import load_questions
from router_pipeline.labels.split import split_questions
from router_pipeline.text import normalise
from router_pipeline_tests.support import ADMIN_KEY


@pytest.fixture(scope="session", autouse=True)
def shared_models_dir(tmp_path_factory):
    """Converted models are shared by the whole session (ROUTER_PIPELINE_MODELS, when
    set, lets CI reuse the conversion made by its materialisation)."""
    if not os.environ.get("ROUTER_PIPELINE_MODELS"):
        os.environ["ROUTER_PIPELINE_MODELS"] = str(tmp_path_factory.mktemp("models"))
    return os.environ["ROUTER_PIPELINE_MODELS"]


@pytest.fixture(autouse=True)
def artifacts(tmp_path, monkeypatch):
    path = tmp_path / "artifacts"
    monkeypatch.setenv("ROUTER_PIPELINE_ARTIFACTS", str(path))
    (tmp_path / "council").mkdir()  # the test's own llm-council folder, never the checkout's
    monkeypatch.setenv("ROUTER_PIPELINE_COUNCIL_DIR", str(tmp_path / "council"))
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-not-secret")
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_BASE_URL", raising=False)
    return path


@pytest.fixture
def defs(artifacts):
    """The definitions as they build in this test's environment (artifacts under tmp_path)."""
    from router_pipeline.definitions import build_defs

    return build_defs()


@pytest.fixture
def resources(artifacts):
    """The resources the definitions build now (offline profile); tests override entries."""
    from router_pipeline import settings
    from router_pipeline.defs.resources import build_resources

    return build_resources(settings.load())


@pytest.fixture(scope="session")
def gemma_path(shared_models_dir):
    from router_pipeline.local_models import GEMMA3_270M, resolve_model

    return resolve_model(GEMMA3_270M)


@pytest.fixture(scope="session")
def tiny_model_dir(gemma_path, tmp_path_factory):
    """A 2-layer, 64-wide random Gemma 3 with the real Gemma tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gemma_path)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                           sliding_window=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp("tiny-gemma")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def sample_questions():
    """24 real SimpleQA questions with their split."""
    frame, _ = load_questions(sample_size=24, sample_seed=3)
    train, test = split_questions(frame, 0.2, 42)
    return pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)


def oracle_responder(questions: pd.DataFrame):
    """A fake Gemini that knows SimpleQA: medium is right on qids starting 0-7, large on
    0-b, the rest abstain or guess; the judge compares the answer to the reference."""
    gold = {q: (qid, g) for q, qid, g in zip(questions["query"], questions["qid"], questions["gold_answer"])}

    def respond(model: str, prompt: str) -> str:
        if "There is no reference answer" in prompt:  # the rubric judge knows the reference too
            question = re.search(r"Question: (.*)\n", prompt).group(1)
            ans = prompt.rsplit("Answer to grade: ", 1)[1]
            grade = ("NOT_ATTEMPTED" if "don't know" in ans else
                     "CORRECT" if normalise(gold[question][1]) == normalise(ans) else "INCORRECT")
            return json.dumps({"grade": grade, "reason": "checked against what I know"})
        if "Answer to grade:" in prompt:
            ref = re.search(r"Reference answer: (.*)\n", prompt).group(1)
            ans = re.search(r"Answer to grade: (.*)\n", prompt).group(1)
            if "don't know" in ans:
                return "NOT_ATTEMPTED"
            return "CORRECT" if normalise(ref) == normalise(ans) else "INCORRECT"
        if "Analysis:" in prompt:
            return "It asks for one precise, little-known fact. Nothing more."
        query = prompt.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]
        qid, g = gold[query]
        known = "01234567" if "flash" in model else "0123456789ab"
        if qid[0] in known:
            return g
        return "I don't know" if qid[0] in "cd" else "Atlantis"

    return respond


@pytest.fixture
def fake_gemini(sample_questions):
    with FakeGemini(responder=oracle_responder(sample_questions)) as fake:
        yield fake


@pytest.fixture
def gemini_cloud(monkeypatch):
    """The server's models on Gemini's protocol, answered by a local stand-in that records
    every call; an admin key for /metrics."""
    with FakeGemini() as cloud:
        monkeypatch.setenv("ROUTER_PIPELINE_PROFILE", "gemini")
        monkeypatch.setenv("GEMINI_BASE_URL", cloud.base_url)
        monkeypatch.setenv("ROUTER_ADMIN_KEY", ADMIN_KEY)
        yield cloud


MMLU_OUTCOMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing_outcomes" / "mmlu_dev_outcomes.csv"


@pytest.fixture(scope="session")
def mmlu_outcomes():
    """The recorded MMLU development outcomes beside the repository (never copied into it)."""
    if not MMLU_OUTCOMES.exists():
        pytest.skip(f"the shared MMLU outcomes are not at {MMLU_OUTCOMES}")
    return MMLU_OUTCOMES


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on a free loopback port, from Debian's package
    (.ci/run installs it and sets ROUTER_TEST_POSTGRES=required, so CI never skips).
    Run as the postgres user when the tests run as root: PostgreSQL refuses root."""
    import glob
    import shutil
    import socket
    import subprocess
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    as_root = os.geteuid() == 0
    if not bins or (as_root and not shutil.which("runuser")):
        if os.environ.get("ROUTER_TEST_POSTGRES") == "required":
            pytest.fail("PostgreSQL is required here (ROUTER_TEST_POSTGRES=required) but its binaries are missing")
        pytest.skip("PostgreSQL's server binaries (Debian's postgresql package) are not installed")
    bindir = Path(bins[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="router-pg-"))
    as_pg = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(as_pg + [str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(as_pg + [str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-o",
                            f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_pg + [str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
