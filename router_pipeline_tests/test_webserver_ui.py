"""The Dagster UI path for real: a webserver on 127.0.0.1, a materialisation launched
through its GraphQL API (as the UI launches one), and the asset graph rendered by
headless Chromium. CI installs Chromium (.ci/run); elsewhere the browser test is
skipped when no chromium is installed."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

LOCATION = "router_pipeline.definitions"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    # Runs launched from the UI start at once (no daemon needed for a queue).
    (home / "dagster.yaml").write_text("run_coordinator:\n  module: dagster._core.run_coordinator\n"
                                       "  class: DefaultRunCoordinator\ntelemetry:\n  enabled: false\n")
    artifacts = tmp_path_factory.mktemp("ui_artifacts")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "ROUTER_PIPELINE_ARTIFACTS": str(artifacts)}
    exe = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen([str(exe), "-m", LOCATION, "-h", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            if proc.poll() is not None:
                pytest.fail(f"dagster-webserver exited: {proc.stderr.read()[-2000:]}")
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("dagster-webserver did not answer within 90 s")
        yield url, artifacts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                 headers={"Content-Type": "application/json"})
    body = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert "errors" not in body, body
    return body["data"]


LAUNCH = """mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
STATUS = "query Status($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
METADATA = """query Meta($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    ... on Asset { assetMaterializations(limit: 1) { runId metadataEntries { label
      ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue } ... on TextMetadataEntry { text } } } }
  }
}"""


def test_materialise_through_graphql_and_read_the_metadata_back(webserver):
    url, artifacts = webserver
    params = {"selector": {"repositoryLocationName": LOCATION, "repositoryName": "__repository__",
                           "jobName": "__ASSET_JOB",
                           "assetSelection": [{"path": [k]} for k in ("questions", "train_questions", "test_questions")]},
              "runConfigData": {"ops": {"questions": {"config": {"sample_size": 30, "sample_seed": 5}},
                                        "split_questions": {"config": {"test_fraction": 0.2}}}}}
    launched = _graphql(url, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    status = None
    for _ in range(240):
        status = _graphql(url, STATUS, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(0.5)
    assert status == "SUCCESS"
    (mat,) = _graphql(url, METADATA, {"path": ["questions"]})["assetOrError"]["assetMaterializations"]
    meta = {e["label"]: e.get("intValue", e.get("text")) for e in mat["metadataEntries"]}
    assert mat["runId"] == run_id and meta["rows"] == 30 and meta["source"] == "bundled"
    (train,) = _graphql(url, METADATA, {"path": ["train_questions"]})["assetOrError"]["assetMaterializations"]
    rows = {e["label"]: e.get("intValue") for e in train["metadataEntries"]}["rows"]
    assert 18 <= rows <= 30
    assert (artifacts / "assets" / "questions.parquet").exists()  # written by the run the UI launched


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _dump_dom(page: str, profile: Path) -> str:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,900",
                           "--virtual-time-budget=30000", "--dump-dom", page],
                          capture_output=True, text=True, timeout=180).stdout


def _group_assets() -> dict[str, set[str]]:
    from router_pipeline.definitions import build_defs

    graph = build_defs().resolve_asset_graph()
    groups: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
    return groups


GROUPS = sorted(_group_assets())


@pytest.mark.parametrize("group", GROUPS)
def test_asset_group_list_page_names_every_asset_in_headless_chromium(webserver, tmp_path, group):
    url, _ = webserver
    page = f"{url}/locations/{LOCATION}/asset-groups/{group}/list"
    dom = _dump_dom(page, tmp_path / "profile")
    missing = [k for k in sorted(_group_assets()[group]) if k not in dom]
    assert not missing, f"{page} does not list {missing}"


def test_asset_lineage_page_draws_the_graph_in_headless_chromium(webserver, tmp_path):
    # The lineage canvas draws only the nodes in view, so this checks that it draws
    # the group's nodes at all; the list pages above check that every asset is there.
    url, _ = webserver
    page = f"{url}/locations/{LOCATION}/asset-groups/data"
    dom = _dump_dom(page, tmp_path / "profile")
    drawn = [k for k in sorted(_group_assets()["data"]) if f">{k}<" in dom]
    assert len(drawn) >= 3 and "Materialize all" in dom, f"{page} draws {drawn}"
