"""LOT merging (Sun et al. 2025): not element-wise, so it registers a kind instead of a chunk
function; the math is in workers/lot/solve.py and the shard worker in workers/lot/shard.py."""

from mergeflow.workers.methods.registry import register_features_method

register_features_method(
    "lot", "LOT: per layer, the closed-form merge that minimises feature drift on each task's exemplars"
)
