"""Where the pipeline reads and writes on disk."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
DATA_DIR = REPO_ROOT / "data"
BUNDLED_SIMPLEQA = DATA_DIR / "simpleqa" / "simple_qa_test_set.csv.gz"
COUNCIL_DIR = DATA_DIR / "council_sessions"  # drop llm-council exports here (override: ROUTER_PIPELINE_COUNCIL_DIR)


def council_dir() -> Path:
    return Path(os.environ.get("ROUTER_PIPELINE_COUNCIL_DIR") or COUNCIL_DIR)


def artifacts_dir() -> Path:
    """artifacts/ beside the project (override: ROUTER_PIPELINE_ARTIFACTS)."""
    path = Path(os.environ.get("ROUTER_PIPELINE_ARTIFACTS") or REPO_ROOT / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path
