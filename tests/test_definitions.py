"""The Definitions object: asset keys, groups, lineage edges, resources, placement tags."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from llm2loss_pipeline.definitions import build_definitions, defs

EXPECTED_GROUPS = {
    "dataset_manifest": "data",
    "celeba_attributes": "data",
    "black_box_model": "models",
    "semantic_encoder": "models",
    "per_sample_losses": "signals",
    "image_embeddings": "signals",
    "diagnosis_heads": "diagnosis",
    "attribute_disparity_report": "report",
    "failure_hypotheses": "report",
}

# The asset graph of ARCHITECTURE.md, as (upstream, downstream) edges.
EXPECTED_EDGES = {
    ("dataset_manifest", "celeba_attributes"),
    ("dataset_manifest", "black_box_model"),
    ("celeba_attributes", "black_box_model"),  # an attribute task's labels (issue 19)
    ("dataset_manifest", "semantic_encoder"),
    ("celeba_attributes", "semantic_encoder"),
    ("dataset_manifest", "per_sample_losses"),
    ("black_box_model", "per_sample_losses"),
    ("dataset_manifest", "image_embeddings"),
    ("semantic_encoder", "image_embeddings"),
    ("per_sample_losses", "diagnosis_heads"),
    ("image_embeddings", "diagnosis_heads"),
    ("semantic_encoder", "diagnosis_heads"),
    ("diagnosis_heads", "attribute_disparity_report"),
    ("per_sample_losses", "attribute_disparity_report"),
    ("image_embeddings", "attribute_disparity_report"),
    ("celeba_attributes", "attribute_disparity_report"),
    ("semantic_encoder", "attribute_disparity_report"),
    ("diagnosis_heads", "failure_hypotheses"),
    ("image_embeddings", "failure_hypotheses"),
    ("per_sample_losses", "failure_hypotheses"),
    ("semantic_encoder", "failure_hypotheses"),
    # for ordering only: discovery republishes the report's DuckDB views beside its own
    ("attribute_disparity_report", "failure_hypotheses"),
}


def _graph():
    return defs.resolve_asset_graph()


def test_asset_keys_and_groups() -> None:
    graph = _graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(EXPECTED_GROUPS)
    for name, group in EXPECTED_GROUPS.items():
        assert graph.get(dg.AssetKey(name)).group_name == group, name


def test_lineage_edges_are_those_of_the_architecture() -> None:
    graph = _graph()
    edges = {
        (parent.to_user_string(), key.to_user_string())
        for key in graph.get_all_asset_keys()
        for parent in graph.get(key).parent_keys
    }
    assert edges == EXPECTED_EDGES
    # the black box must not feed the embeddings, nor the encoder the losses
    assert ("black_box_model", "image_embeddings") not in edges
    assert ("semantic_encoder", "per_sample_losses") not in edges


def test_per_sample_assets_are_shard_partitioned() -> None:
    graph = _graph()
    for name in ("per_sample_losses", "image_embeddings"):
        partitions = graph.get(dg.AssetKey(name)).partitions_def
        assert isinstance(partitions, dg.DynamicPartitionsDefinition)
        assert partitions.name == "shards"
    assert graph.get(dg.AssetKey("diagnosis_heads")).partitions_def is None


def test_model_running_assets_carry_gpu_pool_and_k8s_request() -> None:
    repo = defs.get_repository_def()
    for name in ("black_box_model", "semantic_encoder", "per_sample_losses", "image_embeddings"):
        assets_def = repo.assets_defs_by_key[dg.AssetKey(name)]
        op = assets_def.op
        assert op.pool == "gpu", name
        k8s = json.loads(op.tags["dagster-k8s/config"])
        assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert op.tags["dagster-celery/queue"] == "gpu"


def test_every_asset_has_description_owner_kind_and_code_version() -> None:
    graph = _graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and len(node.description) > 40, key
        assert node.owners, key
        assert node.kinds, key
        assert node.code_version, key


def test_settings_reach_the_launchpad_as_resource_config() -> None:
    job = defs.resolve_job_def("prepare")
    resources = job.run_config_schema.config_type.fields["resources"].config_type.fields
    world = resources["world"].config_type.fields["config"].config_type.fields
    assert {"seed", "n_identities", "images_per_identity", "hard_attributes"} <= set(world)
    device = resources["black_box_device"].config_type.fields["config"].config_type.fields
    assert {"device", "precision", "batch_size", "num_workers"} <= set(device)


def test_launchpad_values_are_validated_by_the_core_model() -> None:
    from llm2loss_pipeline.defs.resources import WorldResource

    with pytest.raises(ValueError, match="n_identities"):
        WorldResource(n_identities=1).spec()


def test_jobs_and_checks() -> None:
    assert {job.name for job in defs.resolve_all_job_defs()} >= {"prepare", "signals", "diagnose"}
    check_keys = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert {"report_is_complete", "report_group_sizes", "heads_validation_floor"} <= check_keys


def test_build_definitions_from_config_applies_values() -> None:
    from llm2loss_pipeline.core.config import validate_config

    config = validate_config(
        {"world": {"n_identities": 7}, "devices": {"losses": {"device": "cpu"}}}
    )
    built = build_definitions(config)
    resources = built.resources
    assert resources["world"].n_identities == 7
    assert resources["losses_device"].device == "cpu"
    # a launchpad edit of one key must keep the file's other values: they are the defaults
    job = built.resolve_job_def("prepare")
    world = job.run_config_schema.config_type.fields["resources"].config_type.fields["world"]
    fields = world.config_type.fields["config"].config_type.fields
    assert fields["n_identities"].default_value == 7
