"""`mergeflow suite build`: a small real benchmark suite (scikit-learn digits, fixed transforms)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    s = sub.add_parser(
        "suite",
        help="build a small real benchmark suite (digits tasks) to merge and score",
        description="Real tasks from scikit-learn's digits under fixed transforms, on a shared MLP "
        "backbone; per-task heads are stored apart (head.safetensors) so merges see only "
        "the backbone. Score a model with mergeflow.dev.suite.models:evaluate.",
    )
    ss = s.add_subparsers(dest="suite_command", required=True, metavar="SUITE_COMMAND")
    b = ss.add_parser(
        "build", help="train (or reuse) base and task checkpoints; print zero-shot vs fine-tuned accuracy"
    )
    b.add_argument(
        "--dir", default="suite-out", help="where to write base/, <task>/, suite.json, config.yaml (default: suite-out)"
    )
    b.add_argument("--tasks", type=int, choices=[8, 14, 20], default=8)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="retrain even when suite.json matches")
    r = ss.add_parser(
        "report",
        help="merge the suite with every method, choose hyper-parameters on val, "
        "score on test; write a Markdown/JSON table and a PNG bar chart",
        description="Builds (or reuses) the suite, runs one merge job per method with alpha/lambda "
        "auto (chosen on the validation split, each trial an MLflow child run), scores "
        "zero-shot, fine-tuned and every merge on the test split (TALL masks on the models "
        "rebuilt from the bundle), and checks the papers' claims on the numbers.",
    )
    r.add_argument("--dir", default="suite-out", help="suite folder (default: suite-out); report goes to DIR/report")
    r.add_argument("--tasks", type=int, choices=[8, 14, 20], default=8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"
    )
    r.add_argument("--experiment", default="mergeflow-suite", help="MLflow experiment (default: mergeflow-suite)")
    r.add_argument("--no-tracking", action="store_true", help="do not log the merges to MLflow")


def run(args) -> int:
    if args.suite_command == "build":
        return build(args)
    if args.suite_command == "report":
        return report(args)
    raise SystemExit(f"unknown suite command {args.suite_command!r}")


def table(meta: dict, split: str = "test") -> str:
    acc = meta["accuracy"]
    ta = "task_arithmetic_0.3"
    lines = [f"{'task':<18} {'zero-shot':>9} {'fine-tuned':>10} {'TA a=0.3':>9}   ({split} accuracy)"]
    for t in meta["tasks"]:
        r = acc[t["name"]][split]
        lines.append(f"{t['name']:<18} {r['zero_shot']:>9.3f} {r['finetuned']:>10.3f} {r.get(ta, float('nan')):>9.3f}")
    avg = meta["average"][split]
    lines.append(
        f"{'average':<18} {avg['zero_shot']:>9.3f} {avg['finetuned']:>10.3f} {avg.get(ta, float('nan')):>9.3f}"
    )
    return "\n".join(lines)


def build(args) -> int:
    from mergeflow.dev.suite.models import build_suite

    out = Path(args.dir)
    meta = build_suite(
        out, tasks=args.tasks, seed=args.seed, force=args.force, log=lambda s: print(s, file=sys.stderr, flush=True)
    )
    how = "reused (suite.json matches)" if meta.get("cached") else f"built in {meta['build_seconds']:.1f}s"
    print(f"suite of {len(meta['tasks'])} digits tasks under {out}: {how}; splits {meta['splits']}")
    print(table(meta, "test"))
    print(f"merge config: {out / 'config.yaml'}   evaluator: {meta['evaluator']}")
    return 0


def report(args) -> int:
    from mergeflow.dev.suite import report as suite_report
    from mergeflow.dev.suite.models import build_suite
    from mergeflow.infra.tracking import TrackingOptions
    from mergeflow.workflows import runtime

    suite_dir = Path(args.dir).resolve()
    meta = build_suite(suite_dir, tasks=args.tasks, seed=args.seed, log=lambda s: print(s, file=sys.stderr, flush=True))
    tasks = [t["name"] for t in meta["tasks"]]
    out = suite_dir / "report" / f"{len(tasks)}tasks"
    runtime.connect(None)
    options = TrackingOptions(enabled=not args.no_tracking, uri=args.tracking_uri, experiment=args.experiment)
    manifests = suite_report.run_merges(suite_dir, tasks, out, options, args.quiet)
    scores = suite_report.score_all(suite_dir, tasks, out, manifests, "test", args.quiet)
    results = suite_report.build_results(meta, suite_dir, manifests, scores, "test")
    paths = suite_report.write_report(out, results)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
