"""`mergeflow suite build`: a small real benchmark suite (scikit-learn digits, fixed transforms)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    s = sub.add_parser("suite", help="build a small real benchmark suite (digits tasks) to merge and score",
                       description="Real tasks from scikit-learn's digits under fixed transforms, on a shared MLP "
                                   "backbone; per-task heads are stored apart (head.safetensors) so merges see only "
                                   "the backbone. Score a model with workers.suite_models:evaluate.")
    ss = s.add_subparsers(dest="suite_command", required=True, metavar="SUITE_COMMAND")
    b = ss.add_parser("build", help="train (or reuse) base and task checkpoints; print zero-shot vs fine-tuned accuracy")
    b.add_argument("--dir", default="suite-out", help="where to write base/, <task>/, suite.json, config.yaml "
                                                      "(default: suite-out)")
    b.add_argument("--tasks", type=int, choices=[8, 14, 20], default=8)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="retrain even when suite.json matches")


def run(args) -> int:
    if args.suite_command == "build":
        return build(args)
    raise SystemExit(f"unknown suite command {args.suite_command!r}")


def table(meta: dict, split: str = "test") -> str:
    acc = meta["accuracy"]
    ta, lot = "task_arithmetic_0.3", "lot_1.0"
    nan = float("nan")
    lines = [f"{'task':<18} {'zero-shot':>9} {'fine-tuned':>10} {'TA a=0.3':>9} {'LOT l=1':>8}   ({split} accuracy)"]
    for t in meta["tasks"]:
        r = acc[t["name"]][split]
        lines.append(f"{t['name']:<18} {r['zero_shot']:>9.3f} {r['finetuned']:>10.3f} {r.get(ta, nan):>9.3f} "
                     f"{r.get(lot, nan):>8.3f}")
    avg = meta["average"][split]
    lines.append(f"{'average':<18} {avg['zero_shot']:>9.3f} {avg['finetuned']:>10.3f} {avg.get(ta, nan):>9.3f} "
                 f"{avg.get(lot, nan):>8.3f}")
    return "\n".join(lines)


def build(args) -> int:
    from workers.suite_models import build_suite

    out = Path(args.dir)
    meta = build_suite(out, tasks=args.tasks, seed=args.seed, force=args.force,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    how = "reused (suite.json matches)" if meta.get("cached") else f"built in {meta['build_seconds']:.1f}s"
    print(f"suite of {len(meta['tasks'])} digits tasks under {out}: {how}; splits {meta['splits']}")
    print(table(meta, "test"))
    print(f"merge config: {out / 'config.yaml'}   evaluator: {meta['evaluator']}")
    return 0
