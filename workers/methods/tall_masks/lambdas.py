"""`lambda: auto`: each task's lambda chosen on validation data, as the TALL-masks reference code does.

One extra pass over the inputs writes the masks of every candidate lambda (1 bit per weight per
task per candidate) into a scratch area under the run's journal; each task's model rebuilt with
each candidate, theta_0 + m_t(lambda) * tau_MTL, is scored on that task, and the best lambda wins
(ties: the first in grid order). Only the chosen masks end up in the run: the map writes them.
"""

from __future__ import annotations

import dataclasses

from mergeflow.infra.storage import join, storage_for
from mergeflow.workers.evaluation import score_masked
from mergeflow.workers.methods.tall_masks.bundle import grid_mask_file, tau_file
from mergeflow.workers.shard import merge_shard

SCRATCH = ".mergeflow/select"  # inside the run's journal folder: never mistaken for a result


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first best in grid order


def select(run, redo_majority) -> dict:
    """{"grid", "trials", "chosen": {task: lambda}}; `redo_majority(run, specs, results)` gives the
    shards to merge again for TIES' majority sign (None when tau_MTL is plain Task Arithmetic)."""
    grid = tuple(run.selection_config.lambdas)
    scratch = join(run.output, SCRATCH)
    specs = [
        dataclasses.replace(s.with_globals(mask_grid=grid), output=scratch, write_model=False, write_delta=False)
        for s in run.shards
    ]
    results = run.each_shard(merge_shard, desc="lambda candidates", shards=specs)
    if redo_majority is not None:  # the candidates' tau_MTL must be the one the final pass writes
        redo = redo_majority(specs, results)
        run.each_shard(merge_shard, desc="TIES majority-sign fix-up", shards=redo)
    scoring, storage = run.scoring, run.storage
    tau_files = tuple(join(scratch, tau_file(s.part)) for s in specs)
    calls, keys = [], []
    for task in run.task_names:
        for i, lam in enumerate(grid):
            masks = tuple(join(scratch, grid_mask_file(s.part, i, task)) for s in specs)
            calls.append((scoring, run.base_files, tau_files, masks, task, storage))
            keys.append((task, lam))
    scores = run.map(score_masked, calls, desc="lambda trials", unit="trial")
    storage_for(scratch, storage).delete_prefix(scratch)
    trials = [{"task": t, "lambda": lam, "score": s} for (t, lam), s in zip(keys, scores)]
    chosen = {}
    for task in run.task_names:
        mine = [tr["score"] for tr in trials if tr["task"] == task]
        chosen[task] = grid[_argmax(mine)]
    return {"grid": list(grid), "trials": trials, "chosen": chosen}
