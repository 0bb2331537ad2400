"""The UI for real: `dagster-webserver -w workspace.yaml` serves the asset graph of the design.

The server is started the way scripts/screenshot_asset_graph.py starts it (that file's
`webserver()`), in throwaway DAGSTER_HOME and LLM2LOSS_HOME folders, and queried over GraphQL.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# The asset graph of ARCHITECTURE.md: the same expectations as the in-process test.
from tests.test_definitions import EXPECTED_EDGES, EXPECTED_GROUPS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

ASSET_NODES = """{ assetNodes {
    assetKey { path } dependencyKeys { path } groupName
    isPartitioned partitionDefinition { type name }
} }"""

INSTIGATORS = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
    name
    sensors { name sensorState { status } }
    schedules { name cronSchedule scheduleState { status } }
    jobs { name }
} } } }"""


def _load_script():
    path = REPO / "scripts" / "screenshot_asset_graph.py"
    spec = importlib.util.spec_from_file_location("screenshot_asset_graph", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    script = _load_script()
    root = tmp_path_factory.mktemp("ui")
    # No registry named: the registry sensor must show its default, stopped.
    env = {"LLM2LOSS_MODEL_REGISTRY": ""}
    with script.webserver(root / "dagster", root / "home", env=env) as running:
        script.wait_for_code_location(running)
        yield running
    assert running.process.poll() is not None  # stopped with its process group


def test_server_info_answers(server) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/server_info", timeout=10) as response:
        info = json.loads(response.read())
    assert info["dagster_version"].startswith("1.13")


def test_asset_graph_lineage_and_groups(server) -> None:
    nodes = server.graphql(ASSET_NODES)["assetNodes"]
    groups = {"/".join(node["assetKey"]["path"]): node["groupName"] for node in nodes}
    edges = {
        ("/".join(dep["path"]), "/".join(node["assetKey"]["path"]))
        for node in nodes
        for dep in node["dependencyKeys"]
    }
    assert groups == EXPECTED_GROUPS
    assert edges == EXPECTED_EDGES
    partitioned = {
        "/".join(node["assetKey"]["path"]): node["partitionDefinition"]["name"]
        for node in nodes
        if node["isPartitioned"]
    }
    assert partitioned == {"per_sample_losses": "shards", "image_embeddings": "shards"}


def test_sensors_schedule_and_jobs_are_served(server) -> None:
    [repository] = server.graphql(INSTIGATORS)["repositoriesOrError"]["nodes"]
    sensors = {sensor["name"]: sensor["sensorState"]["status"] for sensor in repository["sensors"]}
    assert sensors == {"model_registry_sensor": "STOPPED", "llm2loss_automation": "RUNNING"}
    [schedule] = repository["schedules"]
    assert schedule["name"] == "retrain_black_box"
    assert schedule["scheduleState"]["status"] == "STOPPED"
    assert {"prepare", "signals", "diagnose"} <= {job["name"] for job in repository["jobs"]}
