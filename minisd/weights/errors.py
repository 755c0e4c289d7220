"""Readable error messages for weights that do not fit a model: grouped, short, and saying what to
do."""
from __future__ import annotations

from collections import defaultdict


def group_keys(keys: list[str], depth: int = 3, limit: int = 8) -> str:
    """'unet.down_levels.0.resnets.0.conv1.weight', ... -> 'unet.down_levels.0.* (12 keys), ...'."""
    groups: dict[str, int] = defaultdict(int)
    for key in keys:
        groups[".".join(key.split(".")[:depth])] += 1
    items = [f"{prefix}.* ({n} key{'s' if n > 1 else ''})" for prefix, n in sorted(groups.items())]
    more = f", and {len(items) - limit} more groups" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def describe_key_problems(source: str, missing: list, unexpected: list, mismatched: list) -> str:
    parts = [f"{source} does not fit the model it describes:"]
    if missing:
        parts.append(f"{len(missing)} missing keys: {group_keys(missing)}.")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {group_keys(unexpected)}.")
    for key, expected, found in mismatched[:10]:
        parts.append(f"shape mismatch at {key}: expected {list(expected)}, found {list(found)}.")
    if len(mismatched) > 10:
        parts.append(f"... and {len(mismatched) - 10} more shape mismatches.")
    return " ".join(parts)
