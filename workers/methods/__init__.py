"""Merge methods: pure functions over float32 chunks of task vectors, one registry.

Importing this package registers every built-in method.
"""

from mergeflow.workers.methods.registry import METHODS, ChunkGlobals, MethodOutput, MethodParams, get_method, merge_method
from mergeflow.workers.methods import task_arithmetic, ties, tall_masks, consensus, lot  # noqa: F401  (registration)

__all__ = ["METHODS", "ChunkGlobals", "MethodOutput", "MethodParams", "get_method", "merge_method"]
