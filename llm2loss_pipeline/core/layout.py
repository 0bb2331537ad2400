"""The folder layout under `LLM2LOSS_HOME`: one place that names every artifact's path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llm2loss_pipeline.core.storage import resolve_home


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
    def black_box(self) -> Path:
        return self.models / "black_box" / "model.safetensors"

    @property
    def encoder_dir(self) -> Path:
        """An open_clip-loadable folder (`local-dir:` schema) plus our sidecar."""
        return self.models / "encoder"

    @property
    def heads_dir(self) -> Path:
        return self.models / "heads"

    # outputs
    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def duckdb(self) -> Path:
        return self.home / "llm2loss.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"
