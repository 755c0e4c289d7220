"""One error type for weights that cannot be read or do not fit, and one formatter for key
problems: grouped, short, and saying what is wrong."""
from __future__ import annotations

import re

# how many groups of keys, and how many shape mismatches, a message lists before "and N more"
SHOWN = 8


class ConversionError(ValueError):
    """Weights that cannot be loaded or converted; the message says why and what to do."""


def group_keys(keys: list[str], limit: int = SHOWN) -> str:
    """Keys grouped by their block: 'model.diffusion_model.output_blocks.4.1.* (26 keys)'; a lone
    key in full."""
    groups: dict[str, list] = {}
    for key in keys:
        # up to the first run of numbers: a block's address
        block = re.match(r"^(.*?\.\d+(?:\.\d+)*)\.", key)
        groups.setdefault(block.group(1) if block else key.rsplit(".", 1)[0], []).append(key)
    items = [
        members[0] if len(members) == 1 else f"{prefix}.* ({len(members)} keys)"
        for prefix, members in groups.items()
    ]
    more = f", and {len(items) - limit} more groups" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_keys(source: str, missing: list, unexpected: list, mismatched: list) -> None:
    """Raise one ConversionError naming every kind of problem; `mismatched` holds (key, expected
    shape, found shape)."""
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{source} does not fit the model it describes:"]
    if missing:
        parts.append(f"{len(missing)} missing keys: {group_keys(missing)}.")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {group_keys(unexpected)}.")
    parts += [
        f"shape mismatch at {key}: expected {list(expected)}, found {list(found)}."
        for key, expected, found in mismatched[:SHOWN]
    ]
    if len(mismatched) > SHOWN:
        parts.append(f"... and {len(mismatched) - SHOWN} more shape mismatches.")
    raise ConversionError(" ".join(parts))
