"""Hyper-parameter selection on validation data, as the TALL-masks reference code does it.

- lambda (TALL masks, consensus), per task: one extra map pass writes the masks for every candidate
  lambda into a scratch area; each task's rebuilt model theta_0 + m_t(lambda) * tau_MTL is scored on
  that task; the best lambda wins. Only the chosen masks end up in the run (the final pass writes them).
- alpha (every method): the map pass writes the unscaled merged vector (delta/, float32) instead of a
  model; theta_0 + alpha * delta is scored on every task for each candidate alpha; the best average
  normalized score (merged / fine-tuned, per task) wins; a cheap apply pass writes model/ from
  base + delta.

Every trial is a Ray task; ties go to the first candidate in grid order. The trials and their scores go
into the manifest (`selection`), and from there into MLflow child runs.
"""

from __future__ import annotations

import dataclasses

from mergeflow.infra.storage import join, storage_for
from mergeflow.workers.evaluation import Scoring, score_finetuned, score_masked, score_scaled
from mergeflow.workers.shard import ShardSpec, majority_redo, merge_shard
from mergeflow.workflows import runtime
from mergeflow.workflows.plan import Plan

SCRATCH = ".mergeflow/select"  # inside the run's journal folder: never mistaken for a result


def scoring_for(plan: Plan) -> Scoring:
    sel = plan.config.selection
    checkpoints = {t.name: t.checkpoint for t in plan.config.tasks}
    return Scoring(sel.evaluator, sel.split, checkpoints, dict(sel.options))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first best in grid order


def select_lambdas(plan: Plan, quiet: bool) -> dict:
    """Per-task lambda by the validation score of each task's rebuilt model."""
    config, storage = plan.config, plan.config.storage.options()
    grid = tuple(config.selection.lambdas)
    scratch = join(config.output, SCRATCH)
    specs = [dataclasses.replace(s, output=scratch, write_model=False, write_delta=False, mask_grid=grid)
             for s in plan.shards]
    results = runtime.run_tasks(merge_shard, [(s,) for s in specs], desc="lambda candidates",
                                sizes=[s.nbytes for s in specs], quiet=quiet)
    if plan.params.uses_ties:  # the candidates' tau_MTL must be the one the final pass writes
        _, redo = majority_redo(specs, results)
        runtime.run_tasks(merge_shard, [(s,) for s in redo], desc="TIES majority-sign fix-up", quiet=quiet)
    scoring = scoring_for(plan)
    base_files = plan.base.files
    tau_files = tuple(join(scratch, s.tau_file()) for s in specs)
    calls, keys = [], []
    for task in plan.task_names:
        for i, lam in enumerate(grid):
            masks = tuple(join(scratch, s.grid_mask_file(i, task)) for s in specs)
            calls.append((scoring, base_files, tau_files, masks, task, storage))
            keys.append((task, lam))
    scores = runtime.run_tasks(score_masked, calls, desc="lambda trials", quiet=quiet, unit="trial")
    storage_for(scratch, storage).delete_prefix(scratch)
    trials = [{"task": t, "lambda": lam, "score": s} for (t, lam), s in zip(keys, scores)]
    chosen = {}
    for task in plan.task_names:
        mine = [tr["score"] for tr in trials if tr["task"] == task]
        chosen[task] = grid[_argmax(mine)]
    return {"grid": list(grid), "trials": trials, "chosen": chosen}


def finetuned_scores(plan: Plan, quiet: bool) -> dict[str, float]:
    scoring, storage = scoring_for(plan), plan.config.storage.options()
    calls = [(scoring, t, storage) for t in plan.task_names]
    scores = runtime.run_tasks(score_finetuned, calls, desc="fine-tuned scores", quiet=quiet, unit="task")
    return dict(zip(plan.task_names, scores))


def select_alpha(plan: Plan, delta_specs: list[ShardSpec], quiet: bool) -> dict:
    """alpha by average normalized validation score of theta_0 + alpha * delta."""
    config, storage = plan.config, plan.config.storage.options()
    grid = tuple(config.selection.alphas)
    scoring = scoring_for(plan)
    delta_files = tuple(join(s.output, s.delta_file()) for s in delta_specs)
    finetuned = finetuned_scores(plan, quiet)
    calls = [(scoring, plan.base.files, delta_files, a, plan.task_names, storage) for a in grid]
    results = runtime.run_tasks(score_scaled, calls, desc="alpha trials", quiet=quiet, unit="trial")
    trials = []
    for a, scores in zip(grid, results):
        normalized = {t: scores[t] / finetuned[t] if finetuned[t] else 0.0 for t in plan.task_names}
        trials.append({"alpha": a, "scores": scores, "normalized": normalized,
                       "avg_score": sum(scores.values()) / len(scores),
                       "avg_normalized": sum(normalized.values()) / len(normalized)})
    best = _argmax([tr["avg_normalized"] for tr in trials])
    return {"grid": list(grid), "finetuned": finetuned, "trials": trials, "chosen": grid[best]}
