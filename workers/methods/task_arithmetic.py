from mergeflow.workers.methods.registry import ChunkGlobals, MethodOutput, MethodParams, merge_method, running_sum


@merge_method("task_arithmetic")
def task_arithmetic(taus, params: MethodParams, g: ChunkGlobals) -> MethodOutput:
    """Task Arithmetic: the sum of task vectors, scaled by alpha (Ilharco et al. 2023)."""
    return MethodOutput(delta=running_sum(taus))
