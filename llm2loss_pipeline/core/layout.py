"""The folder layout under `LLM2LOSS_HOME`: one place that names every artifact's path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llm2loss_pipeline.core.storage import resolve_home

LOSSES_TABLE = "per_sample_losses"
EMBEDDINGS_TABLE = "image_embeddings"
"""Shard tables under tables/ (one folder of Parquet shards each, `Layout.shard_dir`)."""


@dataclass(frozen=True)
class Layout:
    home: Path

    @classmethod
    def at(cls, home: str | os.PathLike[str] | None = None) -> Layout:
        return cls(resolve_home(home))

    # data
    @property
    def world_dir(self) -> Path:
        return self.home / "world"

    @property
    def tables(self) -> Path:
        return self.home / "tables"

    @property
    def manifest(self) -> Path:
        return self.tables / "manifest.parquet"

    @property
    def attributes(self) -> Path:
        return self.tables / "attributes.parquet"

    def shard_dir(self, table: str) -> Path:
        return self.tables / table

    def shard_table(self, table: str, shard: str) -> Path:
        return self.shard_dir(table) / f"{shard}.parquet"

    # models
    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def black_box_dir(self) -> Path:
        return self.models / "black_box"

    @property
    def black_box(self) -> Path:
        return self.black_box_dir / "model.safetensors"

    @property
    def black_box_reference(self) -> Path:
        """Where a model that is not trained here (user model, loss table) is recorded."""
        return self.black_box_dir / "reference.json"

    @property
    def black_box_curve(self) -> Path:
        return self.black_box_dir / "training_curve.png"

    @property
    def loss_table_copy(self) -> Path:
        """The user's loss table as it was read (`black_box.source: loss_table`)."""
        return self.black_box_dir / "loss_table.parquet"

    @property
    def encoder_dir(self) -> Path:
        """An open_clip-loadable folder (`local-dir:` schema) plus our sidecar."""
        return self.models / "encoder"

    @property
    def heads_dir(self) -> Path:
        return self.models / "heads"

    @property
    def heads_index(self) -> Path:
        """The ensemble's index file (`core.heads.checkpoint.INDEX`)."""
        return self.heads_dir / "ensemble.json"

    @property
    def heads_metrics_dir(self) -> Path:
        return self.models / "heads_metrics"

    @property
    def member_metrics(self) -> Path:
        return self.heads_metrics_dir / "member_metrics.parquet"

    @property
    def kind_metrics(self) -> Path:
        return self.heads_metrics_dir / "kind_metrics.json"

    @property
    def gap_effect(self) -> Path:
        return self.heads_metrics_dir / "gap_effect.json"

    # outputs
    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def attribute_table(self) -> Path:
        return self.reports / "attribute_disparity.parquet"

    @property
    def headline(self) -> Path:
        return self.reports / "headline.json"

    @property
    def report_html(self) -> Path:
        return self.reports / "report.html"

    @property
    def hypotheses(self) -> Path:
        return self.reports / "failure_hypotheses.parquet"

    @property
    def evidence(self) -> Path:
        return self.reports / "failure_evidence.parquet"

    @property
    def discovery_dir(self) -> Path:
        """One evidence sheet per hypothesis."""
        return self.reports / "discovery"

    @property
    def discovery_html(self) -> Path:
        return self.reports / "discovery.html"

    @property
    def duckdb(self) -> Path:
        return self.home / "llm2loss.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"
