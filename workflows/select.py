"""The model scale chosen on validation data (`alpha: auto`; LOT's `lambda: auto`), for every method.

The map writes the unscaled merged vector (delta/, float32) instead of a model; theta_0 + s * delta
is scored on every task for each candidate scale s; the best average normalized score (merged /
fine-tuned, per task) wins, ties going to the first candidate in grid order; a cheap apply pass then
writes model/ from base + delta. Every trial is a Ray task; trials and scores go into the manifest
(`selection.alpha`), and from there into MLflow child runs. A method's other `auto` parameters are
its own to choose (TALL masks' lambda: workers/methods/tall_masks/lambdas.py).
"""

from __future__ import annotations

from mergeflow.infra.storage import join
from mergeflow.workers.evaluation import score_finetuned, score_scaled


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first best in grid order


def finetuned_scores(run) -> dict[str, float]:
    calls = [(run.scoring, t, run.storage) for t in run.task_names]
    return dict(zip(run.task_names, run.map(score_finetuned, calls, desc="fine-tuned scores")))


def select_scale(run) -> dict:
    """{"grid", "finetuned", "trials", "chosen"}: the scale by average normalized validation score."""
    grid = tuple(run.selection_config.alphas)
    scoring = run.scoring
    delta_files = tuple(join(s.output, s.delta_file()) for s in run.shards)
    finetuned = finetuned_scores(run)
    calls = [(scoring, run.base_files, delta_files, a, run.task_names, run.storage) for a in grid]
    results = run.map(
        score_scaled, calls, desc="alpha trials" if run.method.scale == "alpha" else "scale trials", unit="trial"
    )
    trials = []
    for a, scores in zip(grid, results):
        normalized = {t: scores[t] / finetuned[t] if finetuned[t] else 0.0 for t in run.task_names}
        trials.append(
            {
                "alpha": a,
                "scores": scores,
                "normalized": normalized,
                "avg_score": sum(scores.values()) / len(scores),
                "avg_normalized": sum(normalized.values()) / len(normalized),
            }
        )
    best = _argmax([tr["avg_normalized"] for tr in trials])
    return {"grid": list(grid), "finetuned": finetuned, "trials": trials, "chosen": grid[best]}
