"""The layout's promises, checked on the source: the folders are the pipeline's stages
and the imports run one way (no circle; the server and the pipeline meet only in the
shared vocabulary, the router and ``artifacts``); one reader of the environment; one
owner for every default the check can see; a Dagster-free serving package; no reference
to documents outside the repository."""

import ast
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

from router_pipeline.text import MAX_QUERY_CHARS

PACKAGE = Path(__file__).resolve().parents[1] / "router_pipeline"
STAGES = ("labels", "training", "evaluation")  # in the order the pipeline runs them
DAGSTER = ("defs", "definitions")
# What each part may not import (by its first name under router_pipeline).
FORBIDDEN = {
    "serve": {*STAGES, *DAGSTER},
    "routers": {*STAGES, *DAGSTER, "serve"},
    "llm": {*STAGES, *DAGSTER, "serve", "routers"},
    "labels": {"training", "evaluation", *DAGSTER, "serve"},
    "training": {"evaluation", *DAGSTER, "serve"},
    "evaluation": {*DAGSTER, "serve"},
    "defs": {"serve"},
    "root": {*STAGES, *DAGSTER, "serve", "routers"},  # the shared vocabulary: settings, artifacts, policies, ...
}


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def _module(path: Path) -> str:
    parts = ("router_pipeline", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in _sources()}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module of this package imported, line) for every import in the file, inside functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:  # `from pkg import module` imports the module
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in MODULES else node.module, node.lineno))
    return [(m, line) for m, line in out if m in MODULES]


GRAPH = {m: {i for i, _ in _imports(p)} - {m} for m, p in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 and MODULES[module].name != "__init__.py" and parts[1] not in DAGSTER:
        return "root"
    return parts[1] if len(parts) > 1 else "root"


def test_no_import_circle():
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_imports_run_one_way():
    """Nothing in the pipeline imports serve/, serve/ imports no stage, the router imports
    neither, and a stage never imports a later one."""
    offenders = []
    for module, path in MODULES.items():
        banned = FORBIDDEN.get(_part(module), set())
        offenders += [f"{path.relative_to(PACKAGE)}:{line} imports {target}" for target, line in _imports(path)
                      if target.split(".")[1] in banned]
    not_serve = [m for m in MODULES if _part(m) != "serve"]
    offenders += [f"{m} imports {t}" for m in not_serve for t in GRAPH[m] if _part(t) == "serve"]
    assert not offenders, offenders


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The rule above is not vacuous: a serve module importing a stage is caught."""
    path = PACKAGE / "serve" / "gateway.py"
    tree = ast.parse(path.read_text() + "\nfrom router_pipeline.labels.questions import load_questions\n")
    seen = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert "router_pipeline.labels.questions" in seen and "labels" in FORBIDDEN["serve"]


# -- one owner per default --------------------------------------------------------
def _literals():
    """(value, where) of every constant in the package's code (docstrings left out), and of
    every tuple/list of constants."""
    for path in _sources():
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Constant) and id(node) not in docs:
                yield node.value, where
            elif isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) >= 2 and \
                    all(isinstance(e, ast.Constant) for e in node.elts):
                yield tuple(e.value for e in node.elts), where


MODEL_ID = re.compile(r"^(google/)?gemini-\d[\w.-]*$|^gemma3-270m$|^all-MiniLM-L6-v2$")


def _twice(literals) -> dict:
    seen = defaultdict(list)
    for value, where in literals:
        seen[repr(value)].append(where)
    return {v: w for v, w in seen.items() if len(w) > 1}


def test_every_default_the_check_can_see_has_one_owner():
    literals = list(_literals())
    counts = Counter(repr(v) for v, _ in literals)
    where = defaultdict(list)
    for v, w in literals:
        where[repr(v)].append(w)
    assert counts[repr(MAX_QUERY_CHARS)] == 1, where[repr(MAX_QUERY_CHARS)]  # text.MAX_QUERY_CHARS
    assert counts[repr(("medium", "large"))] <= 1, where[repr(("medium", "large"))]  # policies.TIERS
    ids = {repr(v): w for v, w in literals if isinstance(v, str) and MODEL_ID.match(v)}
    assert ids, "the check sees no model id"
    doubled_ids = {v: where[v] for v in ids if counts[v] > 1}
    assert not doubled_ids, doubled_ids  # llm.models, local_models
    # Any tuple or list of three or more names, written out twice.
    doubled = {v: w for v, w in _twice((v, w) for v, w in literals if isinstance(v, tuple) and len(v) >= 3
                                       and all(isinstance(x, str) for x in v)).items()}
    assert not doubled, doubled


def test_the_default_check_sees_a_second_copy():
    doubled = _twice([(MAX_QUERY_CHARS, "text.py:1"), (MAX_QUERY_CHARS, "labels/council.py:9")])
    assert list(doubled.values()) == [["text.py:1", "labels/council.py:9"]]


def test_module_constants_are_not_written_twice():
    """An UPPER_CASE module constant holding the same name (a string) or tuple as another
    module's is a second owner (numbers are left out: equal limits of unrelated things
    are common)."""
    owners = defaultdict(list)
    for path in _sources():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id.isupper():
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                if isinstance(value, tuple) and len(value) > 1 or isinstance(value, str) and len(value) >= 3:
                    owners[repr(value)].append(f"{path.relative_to(PACKAGE)}:{node.targets[0].id}")
    doubled = {v: w for v, w in owners.items() if len({x.split(':')[0] for x in w}) > 1}
    assert not doubled, doubled


# -- the environment, Dagster, documents -------------------------------------------
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
            "router_pipeline.serve.ledger, router_pipeline.serve.decision_log, router_pipeline.serve.server; "
            "c._parser(); from router_pipeline.routers.registry import load_router; "
            "import router_pipeline.evaluation.release; "
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
