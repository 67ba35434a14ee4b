"""`pip install .` (not editable): a wheel, installed into a fresh venv, runs the CLI and
a materialisation from a directory outside the checkout, with its bundled data, and
writes its artifacts to the working directory."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding the wheel only; the dependencies come from this environment's
    site-packages through a .pth line (no download), where this checkout's editable
    install is not active (its .pth hook is only run for real site directories)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so that building leaves nothing in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv*", "artifacts", "*.egg-info", "build",
                                                              "__pycache__", ".dagster_home", ".hypothesis"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)])
    (wheel,) = (tmp / "dist").glob("router_pipeline-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n" +
                                      "\n".join(p for p in site.getsitepackages() if p != sysconfig.get_paths()["purelib"]))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)])
    return venv


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_PIPELINE_") and k != "PYTHONPATH"}
    return {**env, "ROUTER_PIPELINE_MODELS": os.environ["ROUTER_PIPELINE_MODELS"], **extra}


def test_the_wheel_carries_its_data_and_imports_from_site_packages(installed, tmp_path):
    code = ("import router_pipeline, router_pipeline.labels.questions as q, pathlib; p = pathlib.Path(router_pipeline.__file__).parent;"
            "print(p); print(q.BUNDLED_SIMPLEQA.stat().st_size); print((p / 'py.typed').exists(), (p / 'dg.toml').exists())")
    where, size, flags = _run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, env=_env()).stdout.split("\n")[:3]
    assert where.startswith(str(installed)) and "site-packages" in where
    assert int(size) > 100_000 and flags == "True True"


def test_the_installed_cli_routes_from_outside_the_checkout(installed, tmp_path, tiny_model_dir):
    out = _run([str(installed / "bin" / "router-pipeline"), "route", "Who wrote Hamlet?", "--base-model",
                tiny_model_dir, "--json"], cwd=tmp_path, env=_env()).stdout
    decision = json.loads(out)
    assert decision["query"] == "Who wrote Hamlet?" and decision["policy"] in ("Standard_Query", "Complex_Query",
                                                                                 "Ambiguous_Query")
    assert sum(decision["probabilities"].values()) == pytest.approx(1.0)


def test_the_installed_package_materialises_into_the_working_directory(installed, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = _env(DAGSTER_HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    _run([str(installed / "bin" / "python"), "-m", "dagster", "asset", "materialize", "-m",
          "router_pipeline.definitions", "--select", "questions,train_questions,test_questions"], cwd=work, env=env)
    import pandas as pd

    questions = pd.read_parquet(work / "artifacts" / "assets" / "questions.parquet")
    assert len(questions) == 24 and questions["qid"].is_unique  # the bundled SimpleQA, sampled
    assert not any((installed / "lib").glob("python*/site-packages/artifacts"))  # nothing written into the install
