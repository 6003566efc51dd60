"""LOT merging (Sun et al., arXiv 2505.23859): closed-form, layer-wise task-vector fusion that
minimises the drift of each layer's output features on every task's own exemplars.

`solve` holds the math (tensors in, tensors out), `features` the statistics pass over one task's
model, `models` the ways to build that model and its exemplars, `shard` the per-shard merge.
"""
