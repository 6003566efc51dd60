"""What a method's driver-side stages see of one merge: the plan, the values they reduce for the
shards (`globals`), the journal they can persist to (`saved`), and a map over Ray.

Methods (mergeflow.workers.methods) never import this: the engine hands them a Run, so they stay
free of Ray. Everything here is the engine's; a method reads and sets only the attributes below.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergeflow.workers.evaluation import Scoring
from mergeflow.workers.shard import ShardSpec
from mergeflow.workflows import runtime
from mergeflow.workflows.journal import Journal
from mergeflow.workflows.plan import Plan


@dataclass(frozen=True)
class Reuse:
    """Work a re-merge takes from its parent run instead of redoing it (built by workflows/remerge.py)."""

    input_hashes: Mapping[str, str] = field(default_factory=dict)  # input file -> sha256 known to be current
    worker: Callable[..., Any] | None = None  # the map's shard function in place of merge_shard
    manifest: dict = field(default_factory=dict)  # extra manifest keys: the parent, what was reused
    parent: dict | None = None  # the parent run's manifest
    digests: Any = None  # this run's inputs by content (remerge.TaskSet), when known before the map
    parent_digests: Any = None  # the parent's
    cache_root: str | None = None  # where caches shared across runs live (a re-merge: its root)


def memory_per_task(plan: Plan, chunk: int) -> int:
    # float32 task rows, their abs/bit views and masks: ~6 words per element per task, plus I/O buffers.
    return 6 * 4 * chunk * (len(plan.tasks) + 2) + 256 * 2**20


class Run:
    """One merge as its method's stages see it."""

    def __init__(
        self,
        plan: Plan,
        journal: Journal,
        reuse: Reuse,
        *,
        device: str,
        chunk: int,
        quiet: bool,
        input_hashes: Callable[[], dict],
    ):
        self.plan = plan
        self.method = plan.method
        self.params = plan.params  # a stage may replace it (a value chosen on validation data)
        self.globals: dict[str, Any] = {}  # reduced values every shard of the map sees (ctx.globals)
        self.saved: dict[str, Any] = journal.load_globals() or {}  # journaled: a resumed run finds it again
        self.selection: dict[str, Any] = {}  # what was chosen on validation data, for the manifest
        self.reused: dict[str, Any] = {}  # what a re-merge took from its parent, for the manifest
        self.notes: dict[str, Any] = {}  # a method's own scratch state for this run
        self.parent, self.digests, self.parent_digests = reuse.parent, reuse.digests, reuse.parent_digests
        self.cache_root = reuse.cache_root or plan.config.output
        self.device, self.chunk, self.quiet = device, chunk, quiet
        self.write_model = True
        self.write_delta = plan.config.execution.keep_delta is True
        self._journal = journal
        self._input_hashes = input_hashes
        self._keep: list[int] | None = None  # a task subset (task_subset)

    # ------------------------------------------------------------------ what the run is

    @property
    def task_names(self) -> tuple[str, ...]:
        names = self.plan.task_names
        return names if self._keep is None else tuple(names[i] for i in self._keep)

    @property
    def output(self) -> str:
        return self.plan.config.output

    @property
    def storage(self):
        return self.plan.config.storage.options()

    @property
    def base_files(self) -> tuple[str, ...]:
        return self.plan.base.files

    @property
    def selection_config(self):
        return self.plan.config.selection

    @property
    def scoring(self) -> Scoring:
        sel = self.plan.config.selection
        checkpoints = {t.name: t.checkpoint for t in self.plan.config.tasks}
        return Scoring(sel.evaluator, sel.split, checkpoints, dict(sel.options))

    @property
    def shards(self) -> list[ShardSpec]:
        """The plan's shards as the map runs them now: current params, globals and writes."""
        out = []
        for s in self.plan.shards:
            s = dataclasses.replace(
                s,
                params=self.params,
                globals=dict(self.globals),
                device=self.device,
                chunk_elems=self.chunk,
                write_model=self.write_model,
                write_delta=self.write_delta,
            )
            if self._keep is not None:
                keep = self._keep
                s = dataclasses.replace(
                    s,
                    task_names=tuple(s.task_names[i] for i in keep),
                    tensors=tuple(dataclasses.replace(j, tasks=tuple(j.tasks[i] for i in keep)) for j in s.tensors),
                )
            out.append(s)
        return out

    def task_subset(self, keep: Sequence[int]) -> Run:
        """The same run restricted to some tasks (for statistics that depend on each task alone)."""
        sub = copy.copy(self)
        sub._keep = [self._keep[i] for i in keep] if self._keep is not None else list(keep)
        return sub

    def input_hashes(self) -> dict:
        """Input file URI -> sha256, or the Ray task computing it (pass it to a task: Ray resolves it)."""
        return self._input_hashes()

    # ------------------------------------------------------------------ what a stage does

    def save(self) -> None:
        self._journal.save_globals(self.saved)

    def each_shard(self, fn: Callable, *extra, desc: str, shards: Sequence[ShardSpec] | None = None) -> list:
        """fn(spec, *extra) for every shard (or the specs given) as Ray tasks; results in order."""
        specs = list(self.shards if shards is None else shards)
        return runtime.run_tasks(
            fn,
            [(s, *extra) for s in specs],
            desc=desc,
            sizes=[s.nbytes for s in specs],
            memory=memory_per_task(self.plan, self.chunk),
            gpu=self.device == "cuda",
            quiet=self.quiet,
        )

    def map(self, fn: Callable, calls: Sequence[tuple], *, desc: str, unit: str = "task", gpu: bool = False) -> list:
        """fn(*call) for every call as Ray tasks; results in call order."""
        return runtime.run_tasks(fn, calls, desc=desc, gpu=gpu, quiet=self.quiet, unit=unit)
