"""What a "layer" is: the unit the planner keeps together and stats are reported per."""

import re

_NUMBERED = re.compile(r"^(.*?\.\d+)(?:\.|$)")
_NATURAL = re.compile(r"(\d+)")


def layer_of(name: str) -> str:
    """`model.layers.7.mlp.up_proj.weight` -> `model.layers.7`; `lm_head.weight` -> `lm_head`."""
    m = _NUMBERED.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


def natural_key(name: str) -> tuple:
    """Sort `layers.2` before `layers.10`."""
    return tuple(int(p) if p.isdigit() else p for p in _NATURAL.split(name))
