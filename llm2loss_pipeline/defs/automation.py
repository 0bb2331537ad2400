"""Declarative automation: what follows on its own when an upstream asset changes.

Everything downstream of the black box and the encoder is `eager`: a new model version requests
its losses, then the heads, then the report, while the embeddings (which do not depend on the black
box) stay as they are.
"""

from __future__ import annotations

import dagster as dg

FOLLOW_UPSTREAM = dg.AutomationCondition.eager()
