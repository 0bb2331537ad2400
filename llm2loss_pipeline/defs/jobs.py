"""The jobs behind `llm2loss run`: the graph in three stages, because its middle is per shard.

Dagster runs one partition per run of a partitioned job, so the whole graph is: `prepare`
(unpartitioned data and models), then `signals` once per shard (or a backfill of all shards on a
distributed executor), then `diagnose` (heads and report over all shards).
"""

from __future__ import annotations

import dagster as dg

from llm2loss_pipeline.defs.partitions import SHARDS

PREPARE = dg.AssetSelection.groups("data", "models")
SIGNALS = dg.AssetSelection.groups("signals")
DIAGNOSE = dg.AssetSelection.groups("diagnosis", "report")

prepare_job = dg.define_asset_job(
    "prepare", selection=PREPARE, description="Dataset manifest, attributes, black box and encoder."
)
signals_job = dg.define_asset_job(
    "signals",
    selection=SIGNALS,
    partitions_def=SHARDS,
    description="Per-sample losses and image embeddings of one shard.",
)
diagnose_job = dg.define_asset_job(
    "diagnose",
    selection=DIAGNOSE,
    description="Diagnosis heads and the attribute disparity report.",
)

JOBS = [prepare_job, signals_job, diagnose_job]
