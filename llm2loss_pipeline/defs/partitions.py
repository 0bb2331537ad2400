"""Shard partitions of the per-sample assets.

Dynamic, not static: how many shards exist depends on the dataset chosen at run time (the
generated world, a CelebA root, a different shard size), which a static definition loaded with the
code cannot know. `dataset_manifest` registers the shard keys of the manifest it writes and removes
keys that no longer exist, so the UI's backfill dialog always offers exactly the current shards.
"""

from __future__ import annotations

import dagster as dg

SHARDS = dg.DynamicPartitionsDefinition(name="shards")


def sync_shard_partitions(instance: dg.DagsterInstance, keys: list[str]) -> tuple[int, int]:
    """Make the registered shard keys equal `keys`; return (added, removed)."""
    existing = set(instance.get_dynamic_partitions(SHARDS.name))
    wanted = set(keys)
    added = [key for key in keys if key not in existing]
    removed = sorted(existing - wanted)
    if added:
        instance.add_dynamic_partitions(SHARDS.name, added)
    for key in removed:
        instance.delete_dynamic_partition(SHARDS.name, key)
    return len(added), len(removed)
