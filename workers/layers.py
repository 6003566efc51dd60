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


def group_layers(base, tasks, shard_size: int) -> list[list[str]]:
    """Greedy packing of whole layers, in natural order, into shards of ~shard_size input bytes
    (base and tasks: mergeflow.workers.checkpoint.Checkpoint headers)."""
    layers: dict[str, list[str]] = {}
    for name in sorted(base.tensors, key=natural_key):
        layers.setdefault(layer_of(name), []).append(name)
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key in sorted(layers, key=natural_key):
        names = layers[key]
        nbytes = sum(base.tensors[n].nbytes + sum(t.tensors[n].nbytes for t in tasks) for n in names)
        if current and size + nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current += names
        size += nbytes
    if current:
        shards.append(current)
    return shards
