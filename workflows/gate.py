"""The evaluation gate of a re-merge: the new run may replace the published one only when it scores
as well as its parent on validation data.

Each task's model is scored with the configured evaluator (for a bundle, each task's model rebuilt
from it, as users will load it). The default rule: no task drops by more than `max_task_drop` and
the mean over the tasks both runs have does not drop; a task the parent did not have must beat the
base model. Scores are written next to the run's manifest (gate.json), so a run that becomes a
parent is not scored again with the same evaluator and split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from mergeflow.infra.storage import join, storage_for
from mergeflow.workers.evaluation import Scoring, score_checkpoint
from mergeflow.workers.methods import get_method
from mergeflow.workflows import runtime
from mergeflow.workflows.config import MergeConfig

GATE = "gate.json"
EXIT_GATE_FAILED = 4
SCRATCH = ".mergeflow/gate"  # rebuilt task models, inside the journal folder, removed after scoring


@dataclass
class Verdict:
    passed: bool
    reason: str  # one line: why it passed or failed, naming the worst task
    scores: dict[str, float]  # the new run's, per task
    parent: dict[str, float] = field(default_factory=dict)  # the parent's, for the tasks both have
    base: dict[str, float] = field(default_factory=dict)  # the base model's, for new tasks
    worst: str | None = None

    def metrics(self) -> dict[str, float]:
        out = {f"gate.score.{t}": v for t, v in self.scores.items()}
        out |= {f"gate.parent.{t}": v for t, v in self.parent.items()}
        out |= {f"gate.base.{t}": v for t, v in self.base.items()}
        out["gate.passed"] = float(self.passed)
        return out


def scoring_for(config: MergeConfig) -> Scoring:
    gate, sel = config.gate, config.selection
    evaluator = gate.evaluator or sel.evaluator
    options = gate.options if gate.options is not None else (dict(sel.options) if sel else {})
    return Scoring(evaluator, gate.split, {t.name: t.checkpoint for t in config.tasks}, options)


def run_scores(run: str, manifest: dict, tasks: list[str], scoring: Scoring, options, quiet: bool) -> dict[str, float]:
    """Validation scores of a finished run's model per task (a bundle's rebuilt task models)."""
    store = storage_for(run, options)
    recorded = _recorded(run, scoring, options)
    todo = [t for t in tasks if t not in recorded]
    if not todo:
        return {t: recorded[t] for t in tasks}
    if get_method(manifest["method"]["name"]).compresses:
        from mergeflow.workflows.reconstruct import reconstruct

        uris = {}
        for t in todo:
            uris[t] = join(run, SCRATCH, t)
            reconstruct(run, t, uris[t], options, overwrite=True, quiet=quiet)
    else:
        uris = {t: join(run, "model") for t in todo}
    got = runtime.run_tasks(
        score_checkpoint,
        [(scoring, uris[t], t, options) for t in todo],
        desc=f"gate: score {run.rstrip('/').rsplit('/', 1)[-1]}",
        quiet=quiet,
        unit="task",
    )
    store.delete_prefix(join(run, SCRATCH))
    return {t: recorded.get(t, dict(zip(todo, got)).get(t)) for t in tasks}


def _recorded(run: str, scoring: Scoring, options) -> dict[str, float]:
    store = storage_for(run, options)
    uri = join(run, GATE)
    if not store.exists(uri):
        return {}
    try:
        doc = json.loads(store.read_bytes(uri))
    except ValueError:
        return {}
    if (doc.get("evaluator"), doc.get("split")) != (scoring.evaluator, scoring.split):
        return {}
    return {t: float(v) for t, v in doc.get("scores", {}).items()}


def evaluate(config: MergeConfig, run: str, manifest: dict, parent, quiet: bool = True) -> Verdict:
    """Score `run` (and its parent, and the base for new tasks) and apply the gate's rule."""
    options = config.storage.options()
    scoring = scoring_for(config)
    tasks = [t["name"] for t in manifest["inputs"]["tasks"]]
    scores = run_scores(run, manifest, tasks, scoring, options, quiet)
    before = [t for t in tasks if parent is not None and t in parent.task_names]
    parent_scores = run_scores(parent.uri, parent.manifest, before, scoring, options, quiet) if before else {}
    new = [t for t in tasks if t not in parent_scores]
    base = (
        dict(
            zip(
                new,
                runtime.run_tasks(
                    score_checkpoint,
                    [(scoring, config.base, t, options) for t in new],
                    desc="gate: score the base",
                    quiet=quiet,
                    unit="task",
                ),
            )
        )
        if new
        else {}
    )
    verdict = _rule(config.gate, scores, parent_scores, base)
    doc = {"evaluator": scoring.evaluator, "split": scoring.split} | asdict(verdict)
    storage_for(run, options).write_bytes(join(run, GATE), json.dumps(doc, indent=1).encode())
    return verdict


def _rule(gate, scores: dict[str, float], parent: dict[str, float], base: dict[str, float]) -> Verdict:
    drops = {t: parent[t] - scores[t] for t in parent}
    worst = max(drops, key=drops.get) if drops else None
    if worst is not None and drops[worst] > gate.max_task_drop:
        return Verdict(
            False,
            f"task {worst!r} dropped from {parent[worst]:.4f} to {scores[worst]:.4f} "
            f"(more than max_task_drop {gate.max_task_drop:g})",
            scores,
            parent,
            base,
            worst,
        )
    if parent and gate.mean_must_not_drop:
        old, now = sum(parent.values()) / len(parent), sum(scores[t] for t in parent) / len(parent)
        if now < old:
            return Verdict(
                False,
                f"the mean over the parent's tasks dropped from {old:.4f} to {now:.4f} (worst task {worst!r})",
                scores,
                parent,
                base,
                worst,
            )
    behind = {t: base[t] - scores[t] for t in base if scores[t] <= base[t]}
    if behind:
        t = max(behind, key=behind.get)
        return Verdict(
            False,
            f"new task {t!r} scores {scores[t]:.4f}, not above the base model's {base[t]:.4f}",
            scores,
            parent,
            base,
            t,
        )
    note = f"; worst task {worst!r} {-drops[worst]:+.4f}" if worst is not None else ""
    return Verdict(True, f"every task within {gate.max_task_drop:g} of the parent{note}", scores, parent, base, worst)
