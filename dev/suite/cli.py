"""`mergeflow suite build | report`: real benchmark suites to merge and score (dev/suite/suites.py):
digits (an MLP trained here on scikit-learn's digits under fixed transforms) and words (word tasks
labelled by lexicons, on the pretrained all-MiniLM-L6-v2)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mergeflow.dev.suite.suites import SUITES, get


def add_parser(sub) -> None:
    s = sub.add_parser(
        "suite",
        help="build and score real benchmark suites (digits on an MLP, words on MiniLM)",
        description="digits: scikit-learn's digits under fixed transforms, on an MLP backbone trained "
        "here. words: word tasks labelled by lexicons (VADER, wordfreq, the CMU Pronouncing "
        "Dictionary) on the pretrained all-MiniLM-L6-v2. Per-task heads are stored apart "
        "(head.safetensors), so merges see only the shared network.",
    )
    ss = s.add_subparsers(dest="suite_command", required=True, metavar="SUITE_COMMAND")
    b = ss.add_parser(
        "build",
        help="train (or reuse) base and task checkpoints; print zero-shot vs fine-tuned accuracy",
        description="digits: trains an MLP base and its task fine-tunes in-process (~30 s). words: "
        "fine-tunes all-MiniLM-L6-v2 on each task as parallel Ray tasks, one thread each (8 tasks in "
        "about 7 minutes on 2 cores); a task trained before with the same settings is reused, so "
        "--tasks 20 after --tasks 8 trains 12. Nothing is downloaded.",
    )
    b.add_argument("--suite", choices=list(SUITES), default="digits", help="which suite (default: digits)")
    b.add_argument(
        "--dir",
        help="where to write base/, <task>/, suite.json, config.yaml (default: suite-out, words: suite-out-words)",
    )
    b.add_argument("--tasks", type=int, choices=[8, 14, 20], default=8, help="suite size (default: 8)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--seed", type=int, default=0, help="data and training seed (default: 0)")
    b.add_argument("--force", action="store_true", help="retrain even when the stored settings match")
    r = ss.add_parser(
        "report",
        help="merge the suite with every method, choose hyper-parameters on val, "
        "score on test; write a Markdown/JSON table and a PNG bar chart",
        description="Builds (or reuses) the suite, runs one merge job per method with alpha/lambda "
        "auto (chosen on the validation split, each trial an MLflow child run), scores "
        "zero-shot, fine-tuned and every merge on the test split (TALL masks on the models "
        "rebuilt from the bundle), and checks the papers' claims on the numbers.",
    )
    r.add_argument("--suite", choices=list(SUITES), default="digits", help="which suite (default: digits)")
    r.add_argument(
        "--dir", help="suite folder (default: suite-out, words: suite-out-words); the report goes to DIR/report"
    )
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


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _make(args, out: Path, force: bool = False) -> dict:
    return get(args.suite).build_suite(out, tasks=args.tasks, seed=args.seed, force=force, log=_say, quiet=args.quiet)


def _splits(splits: dict) -> str:
    if all(isinstance(v, int) for v in splits.values()):
        return str(splits)
    sizes = [tuple(v.values()) for v in splits.values()]  # words: per task, train/val/test words
    return f"{min(s[0] for s in sizes)}-{max(s[0] for s in sizes)} train words per task (val/test apart by word)"


def build(args) -> int:
    suite = get(args.suite)
    out = Path(args.dir or suite.DEFAULT_DIR)
    meta = _make(args, out, force=args.force)
    how = "reused (suite.json matches)" if meta.get("cached") else f"built in {meta['build_seconds']:.1f}s"
    if "trained" in meta:
        how += f" ({len(meta['trained'])} tasks trained, {len(meta['tasks']) - len(meta['trained'])} reused)"
    print(f"suite of {len(meta['tasks'])} {suite.NAME} tasks under {out}: {how}; splits {_splits(meta['splits'])}")
    print(table(meta, "test"))
    print(f"merge config: {out / 'config.yaml'}   evaluator: {meta['evaluator']}")
    return 0


def report(args) -> int:
    from mergeflow.dev.suite import report as suite_report
    from mergeflow.infra.tracking import TrackingOptions
    from mergeflow.workflows import runtime

    suite = get(args.suite)
    suite_dir = Path(args.dir or suite.DEFAULT_DIR).resolve()
    t0 = time.perf_counter()
    meta = _make(args, suite_dir)
    tasks = [t["name"] for t in meta["tasks"]]
    out = suite_dir / "report" / f"{len(tasks)}tasks"
    runtime.connect(None)
    options = TrackingOptions(enabled=not args.no_tracking, uri=args.tracking_uri, experiment=args.experiment)
    t1 = time.perf_counter()
    manifests = suite_report.run_merges(suite, suite_dir, tasks, out, options, args.quiet)
    scores = suite_report.score_all(suite, suite_dir, tasks, out, manifests, "test", args.quiet)
    results = suite_report.build_results(suite, meta, suite_dir, manifests, scores, "test")
    paths = suite_report.write_report(out, results)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    print(f"suite ready in {t1 - t0:.0f} s, merges and scores in {time.perf_counter() - t1:.0f} s")
    return 0
