"""The Definitions object that `dagster dev -w workspace.yaml` and `dagster` commands load.

The configuration comes from the YAML file named by $LLM2LOSS_CONFIG (default: the embedded
default); every value stays editable per run in the launchpad, under `resources:`. The factory
itself is `defs/build.py`, which `llm2loss run` (defs/runner.py) uses too.
"""

from __future__ import annotations

import os

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.defs.build import ASSETS, CHECKS, build_definitions

__all__ = ["ASSETS", "CHECKS", "build_definitions", "defs"]

defs = build_definitions(load_config(os.environ.get("LLM2LOSS_CONFIG") or None))
