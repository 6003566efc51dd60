"""`mergeflow suite report`: every method on a suite (digits or words), hyper-parameters chosen on validation
data, scored on test data, as one table (Markdown + JSON) and one bar chart (PNG).

Rows: zero-shot (the base), fine-tuned (each task's own model), then one merge per method, each run
by the ordinary merge job (`run_merge`) with `auto` selection. TALL masks are scored as the paper
does, on each task's model rebuilt from the compressed bundle; every other merge on its one model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import OutputError
from mergeflow.infra.storage import StorageOptions
from mergeflow.workers.evaluation import Scoring, score_checkpoint, score_rebuilt
from mergeflow.workers.methods import get_method, methods
from mergeflow.workflows import runtime
from mergeflow.workflows.config import MergeConfig, config_from_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    method: dict | None = None  # None: zero-shot / fine-tuned, scored without a merge
    rebuilt: bool = False  # score each task's model rebuilt from the bundle
    alphas: tuple[float, ...] | None = None  # the selection grid of the model scale, when not the default


# Iso-C's official scale is chosen on validation data above 1 (its flattened spectrum has a smaller norm).
WIDE_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


ROWS = [
    Row("zero_shot", "Zero-shot (base)"),
    Row("finetuned", "Fine-tuned (one model per task)"),
    Row("task_arithmetic", "Task Arithmetic", {"name": "task_arithmetic", "alpha": "auto"}),
    Row("ties", "TIES", {"name": "ties", "alpha": "auto"}),
    # model/ of a tall_masks run is plain TA; the masks are what is scored, so alpha stays fixed.
    Row(
        "tall_masks",
        "TALL masks (rebuilt models)",
        {"name": "tall_masks", "alpha": 0.3, "lambda": "auto"},
        rebuilt=True,
    ),
    Row("consensus_ta", "Consensus TA", {"name": "consensus", "alpha": "auto", "lambda": "auto"}),
    Row(
        "consensus_ties",
        "Consensus TIES",
        {"name": "consensus", "base_merge": "ties", "alpha": "auto", "lambda": "auto"},
    ),
    # LOT's lambda is its model scale: auto selects it like alpha. The MLP sees one feature row per
    # exemplar, so 256 train exemplars per task (2048 rows for 512 inputs); 64 rows per task, fine for
    # a ViT's many tokens per image, leave the 512-wide least squares barely determined (val 0.23).
    # Their model source (`model`, exemplar files) is the suite's: `suite.lot_method`.
    Row("lot", "LOT", {"name": "lot", "lambda": "auto", "exemplars": 256}),
    Row("regmean", "RegMean", {"name": "regmean", "scale": "auto", "exemplars": 256}),
    Row("dare_linear", "DARE (TA)", {"name": "dare_linear", "alpha": "auto"}),
    Row("dare_ties", "DARE-TIES", {"name": "dare_ties", "alpha": "auto"}),
    Row("breadcrumbs", "Breadcrumbs", {"name": "breadcrumbs", "alpha": "auto"}),
    Row("breadcrumbs_ties", "Breadcrumbs-TIES", {"name": "breadcrumbs_ties", "alpha": "auto"}),
    Row("della_linear", "DELLA (linear)", {"name": "della_linear", "alpha": "auto"}),
    Row("della", "DELLA", {"name": "della", "alpha": "auto"}),
    Row("tsv_merge", "TSV-M", {"name": "tsv_merge", "alpha": "auto"}),
    Row("iso_c", "Iso-C", {"name": "iso_c", "alpha": "auto"}, alphas=WIDE_ALPHAS),
    Row("iso_cts", "Iso-CTS", {"name": "iso_cts", "alpha": "auto"}, alphas=WIDE_ALPHAS),
    # Bundles: each task's model is rebuilt and scored, as TALL masks; nothing there is chosen on val.
    Row("emr", "EMR (rebuilt models)", {"name": "emr"}, rebuilt=True),
    Row("tsv_compress", "TSV-C (rebuilt models)", {"name": "tsv_compress"}, rebuilt=True),
]


def rows() -> list[Row]:
    return [r for r in ROWS if r.method is None or r.method["name"] in methods()]


FEATURE_METHODS = ("lot", "regmean")  # run each task's model on exemplars: the suite says how


def method(suite, suite_dir: Path, tasks: list[str], row: Row) -> dict:
    if row.method["name"] in FEATURE_METHODS:
        return row.method | suite.lot_method(suite_dir, tasks)
    return row.method


def merge_config(suite, suite_dir: Path, tasks: list[str], row: Row, output: Path) -> MergeConfig:
    raw = {
        "base": str(suite_dir / "base"),
        "tasks": [{"name": t, "checkpoint": str(suite_dir / t)} for t in tasks],
        "output": str(output),
        "method": method(suite, suite_dir, tasks, row),
        "selection": {"evaluator": suite.EVALUATOR, "split": "val"}
        | ({"alphas": list(row.alphas)} if row.alphas else {}),
    }
    return config_from_dict(raw, source=f"suite report ({row.key})")


def run_merges(suite, suite_dir: Path, tasks: list[str], out: Path, track_options, quiet: bool) -> dict[str, dict]:
    """One merge job per method row; a finished run of the same inputs and settings is reused."""
    from mergeflow.workflows.merge import run_merge, track

    manifests = {}
    for row in rows():
        if row.method is None:
            continue
        cfg = merge_config(suite, suite_dir, tasks, row, out / "runs" / row.key)
        try:
            report = run_merge(cfg, quiet=quiet)
        except OutputError:  # these run folders belong to the report: an older run of other settings goes
            report = run_merge(cfg, overwrite=True, quiet=quiet)
        if report.state.value != "complete":
            track(report, json.dumps({"method": row.method}), track_options)
        manifests[row.key] = report.manifest
        log.info("%s: %s", row.key, report.manifest["method"])
    return manifests


def score_all(suite, suite_dir: Path, tasks: list[str], out: Path, manifests: dict, split: str, quiet: bool) -> dict:
    """Test scores of every row on every task, as Ray tasks."""
    storage = StorageOptions()
    checkpoints = {t: str(suite_dir / t) for t in tasks}
    scoring = Scoring(suite.EVALUATOR, split, checkpoints)
    zero_shot = Scoring(suite.EVALUATOR, split, checkpoints, dict(suite.ZERO_SHOT_OPTIONS))
    base_files = (str(suite_dir / "base" / "model.safetensors"),)
    fns, calls, keys = [], [], []
    for row in rows():
        for t in tasks:
            run = str(out / "runs" / row.key)
            if row.key == "zero_shot":
                fn, call = score_checkpoint, (zero_shot, str(suite_dir / "base"), t, storage)
            elif row.key == "finetuned":
                fn, call = score_checkpoint, (scoring, checkpoints[t], t, storage)
            elif row.rebuilt and row.method["name"] == "tall_masks":  # theta_0 + m_t * tau_MTL, in memory
                fn, call = score_rebuilt, (scoring, run, base_files, t, storage)
            elif row.rebuilt:
                fn, call = (
                    score_checkpoint,
                    (scoring, rebuild(run, t, out / "rebuilt" / row.key / t, quiet), t, storage),
                )
            else:
                fn, call = score_checkpoint, (scoring, str(out / "runs" / row.key / "model"), t, storage)
            fns.append(fn)
            calls.append(call)
            keys.append((row.key, t))
    values = runtime.run_tasks(_dispatch, list(zip(fns, calls)), desc=f"{split} scores", quiet=quiet, unit="model")
    scores: dict[str, dict[str, float]] = {}
    for (key, t), v in zip(keys, values):
        scores.setdefault(key, {})[t] = v
    return scores


def rebuild(run: str, task: str, folder: Path, quiet: bool) -> str:
    """Task `task`'s model rebuilt from a bundle by `mergeflow reconstruct`'s own code; its folder."""
    from mergeflow.workflows.reconstruct import reconstruct

    reconstruct(run, task, str(folder), StorageOptions(), overwrite=True, quiet=quiet)
    return str(folder)


def _dispatch(fn, call):
    return fn(*call)


def hyperparameters(manifest: dict | None) -> str:
    if manifest is None:
        return ""
    m, sel = manifest["method"], manifest.get("selection", {})
    parts = []
    if "alpha" in sel:  # the model scale, whatever the method calls it
        scale = get_method(m["name"]).scale.rstrip("_")
        parts.append(f"{scale} {m[scale]:g}")
    if "lambda" in sel:
        lams = sorted(m["lambda"].values())
        parts.append(
            f"lambda {lams[0]:g}-{lams[-1]:g} (median {lams[len(lams) // 2]:g})"
            if lams[0] != lams[-1]
            else f"lambda {lams[0]:g}"
        )
    if m["name"] == "consensus":
        parts.append(f"k {m['k']}")
    return ", ".join(parts)


def artifact(manifest: dict | None, suite_dir: Path, tasks: list[str]) -> dict:
    """Bytes a user keeps for this row against keeping every fine-tuned checkpoint."""
    checkpoints = sum((suite_dir / t / "model.safetensors").stat().st_size for t in tasks)
    if manifest is None:
        return {"bytes": checkpoints, "checkpoints_bytes": checkpoints, "what": "T checkpoints"}
    s = manifest["summary"]
    if "compressed_bytes" in s:
        return {"bytes": s["compressed_bytes"], "checkpoints_bytes": checkpoints, "what": "compressed bundle"}
    return {"bytes": s["model_bytes"], "checkpoints_bytes": checkpoints, "what": "one merged model"}


def build_results(suite, meta: dict, suite_dir: Path, manifests: dict, scores: dict, split: str) -> dict:
    tasks = [t["name"] for t in meta["tasks"]]
    ft = scores["finetuned"]
    out_rows = []
    for row in rows():
        acc = scores[row.key]
        normalized = {t: acc[t] / ft[t] for t in tasks}
        manifest = manifests.get(row.key)
        out_rows.append(
            {
                "key": row.key,
                "label": row.label,
                "accuracy": acc,
                "average": sum(acc.values()) / len(acc),
                "normalized": sum(normalized.values()) / len(normalized),
                "hyperparameters": hyperparameters(manifest),
                "method": manifest["method"] if manifest else None,
                "artifact": artifact(manifest, suite_dir, tasks) if row.key != "zero_shot" else None,
            }
        )
    return {
        "suite": {
            "name": suite.NAME,
            "tasks": tasks,
            "seed": meta["seed"],
            "splits": meta["splits"],
            "settings": meta["settings"],
        },
        "split": split,
        "selection_split": "val",
        "evaluator": suite.EVALUATOR,
        "rows": out_rows,
    }


def markdown(results: dict) -> str:
    tasks = results["suite"]["tasks"]
    head = ["model", *tasks, "avg acc", "avg normalized", "chosen on val", "kept on disk"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        a = r["artifact"]
        size = f"{a['bytes'] / 1e6:.2f} MB ({a['bytes'] / a['checkpoints_bytes']:.2f}x of checkpoints)" if a else ""
        cells = [
            r["label"],
            *(f"{100 * r['accuracy'][t]:.1f}" for t in tasks),
            f"**{100 * r['average']:.1f}**",
            f"{100 * r['normalized']:.1f}%",
            r["hyperparameters"],
            size,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# (better, worse) as the methods' papers report them on their benchmarks.
IMPROVES_ON = (
    ("consensus_ta", "task_arithmetic"),  # consensus merging paper
    ("consensus_ties", "ties"),
    ("lot", "task_arithmetic"),  # LOT paper, table 1: LOT above TA on every benchmark
    ("regmean", "task_arithmetic"),  # RegMean paper
    ("dare_ties", "ties"),  # DARE paper: dropping 90% and rescaling helps the merge it feeds
    ("breadcrumbs", "task_arithmetic"),  # Breadcrumbs paper
    ("della", "dare_ties"),  # DELLA paper: MagPrune above DARE's uniform drop
    ("tsv_merge", "task_arithmetic"),  # TSV paper
    ("iso_c", "task_arithmetic"),  # Iso paper
    ("iso_cts", "iso_c"),  # Iso paper: CTS above C, more so as tasks grow
)


def _rebuilt(key: str) -> bool:
    return any(r.rebuilt for r in ROWS if r.key == key)


def claims(results: dict) -> list[tuple[str, bool, str]]:
    """The papers' claims, checked against this run: (claim, holds, the numbers)."""
    by = {r["key"]: r for r in results["rows"]}
    out = []
    if "tall_masks" in by:
        n = by["tall_masks"]["normalized"]
        out.append(("TALL-mask rebuilt models keep >= 99% of fine-tuned accuracy", n >= 0.99, f"{100 * n:.2f}%"))
    if "tsv_compress" in by:  # TSV paper: the compressed task models keep ~99% of fine-tuned accuracy
        n = by["tsv_compress"]["normalized"]
        out.append(("TSV-C rebuilt models keep >= 99% of fine-tuned accuracy", n >= 0.99, f"{100 * n:.2f}%"))
    for better, worse in IMPROVES_ON:
        if better in by and worse in by:
            b, w = by[better]["average"], by[worse]["average"]
            out.append(
                (f"{by[better]['label']} improves on {by[worse]['label']}", b > w, f"{100 * b:.2f} vs {100 * w:.2f}")
            )
    singles = [r for r in results["rows"] if r["method"] is not None and not _rebuilt(r["key"])]
    if "emr" in by and singles:  # EMR paper: its rebuilt models beat every one-model merge
        best = max(singles, key=lambda r: r["average"])
        emr = by["emr"]["average"]
        out.append(
            (
                "EMR rebuilt models beat every single merged model",
                emr > best["average"],
                f"{100 * emr:.2f} vs {100 * best['average']:.2f} ({best['label']})",
            )
        )
    zs = by["zero_shot"]["average"]
    for r in results["rows"]:
        if r["method"] is not None:
            out.append(
                (f"{r['label']} beats zero-shot", r["average"] > zs, f"{100 * r['average']:.2f} vs {100 * zs:.2f}")
            )
    return out


def bar_chart(results: dict) -> bytes:
    """Averages as bars (top) and every row's accuracy per task as an annotated heat map (bottom):
    with 20 rows, grouped bars per task could not be told apart."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, rows_ = results["suite"]["tasks"], results["rows"]
    n = len(rows_)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(max(10, 0.9 * len(tasks) + 5), 3 + 0.62 * n),
        gridspec_kw={"height_ratios": [1, 1.1]},
    )
    labels = [r["label"] for r in rows_]
    y = np.arange(n)
    avg = np.array([100 * r["average"] for r in rows_])
    norm = np.array([100 * r["normalized"] for r in rows_])
    top.barh(y - 0.2, avg, 0.4, label="average accuracy (%)")
    top.barh(y + 0.2, norm, 0.4, label="normalized to fine-tuned (%)")
    for i in range(n):
        top.text(avg[i] + 0.2, y[i] - 0.2, f"{avg[i]:.1f}", va="center", fontsize=7)
    top.set_yticks(y, labels)
    top.invert_yaxis()
    top.set_xlim(max(0.0, 5 * np.floor((min(avg.min(), norm.min()) - 5) / 5)), 101)
    top.legend(loc="upper center", bbox_to_anchor=(0.5, -0.04), ncols=2, fontsize=8)
    name = results["suite"].get("name", "digits")
    top.set_title(f"{name} suite, {len(tasks)} tasks: {results['split']} accuracy (hyper-parameters chosen on val)")
    acc = np.array([[100 * r["accuracy"][t] for t in tasks] for r in rows_])
    image = bottom.imshow(acc, aspect="auto", cmap="viridis")
    for i in range(n):
        for j in range(len(tasks)):
            shade = "white" if acc[i, j] < acc.min() + 0.6 * (acc.max() - acc.min()) else "black"
            bottom.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=7, color=shade)
    bottom.set_xticks(np.arange(len(tasks)), tasks, rotation=30, ha="right")
    bottom.set_yticks(y, labels)
    fig.colorbar(image, ax=bottom, label="accuracy (%)", fraction=0.03)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(out: Path, results: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    checks = claims(results)
    results = results | {"claims": [{"claim": c, "holds": ok, "numbers": n} for c, ok, n in checks]}
    text = (
        markdown(results)
        + "\nClaims from the papers, checked on this run:\n\n"
        + "".join(f"- {'holds' if ok else 'does NOT hold'}: {c} ({n})\n" for c, ok, n in checks)
    )
    paths = {"markdown": out / "results.md", "json": out / "results.json", "png": out / "results.png"}
    paths["markdown"].write_text(text)
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["png"].write_bytes(bar_chart(results))
    return paths
