"""The layout's promises, checked on the source: one reader of the environment, a
Dagster-free serving package, no reference to documents outside the repository."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "router_pipeline"


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_settings_is_the_only_reader_of_the_environment():
    readers = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert readers and all(r.startswith("settings.py:") for r in readers), readers


def test_the_serving_package_never_imports_dagster():
    code = ("import sys; import router_pipeline.serve.cli as c, router_pipeline.serve.mapper, "
            "router_pipeline.serve.ledger, router_pipeline.serve.decision_log; c._parser(); "
            "from router_pipeline.routing import Router; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_stage_modules_do_not_import_the_dagster_side():
    """defs/ wraps the stage modules; the reverse would make them untestable without Dagster."""
    offenders = []
    for path in _sources():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "defs" or rel.name == "definitions.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] == "dagster" or
                          n.startswith("router_pipeline.defs") or n == "router_pipeline.definitions"]
    assert not offenders, offenders


def test_no_file_cites_documents_outside_the_repository():
    cited = [str(p.relative_to(PACKAGE)) for p in _sources() if "DESIGN.md" in p.read_text()]
    assert not cited, cited


def test_dg_check_defs_passes():
    """The dg CLI loads the project as CI and `dg dev` do (pyproject's [tool.dg])."""
    dg = Path(sys.executable).with_name("dg")
    out = subprocess.run([str(dg), "check", "defs"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "All definitions loaded successfully" in out.stdout + out.stderr
