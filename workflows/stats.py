"""Per-layer statistics reduced from shard results, the headline numbers, and the
task-overlap plot (the TALL/consensus paper's main diagnostic)."""

from __future__ import annotations

import io

import numpy as np

from mergeflow.workers.layers import natural_key
from mergeflow.workers.shard import LayerStats, ShardResult


def merge_layers(results: list[ShardResult]) -> dict[str, LayerStats]:
    layers: dict[str, LayerStats] = {}
    for r in results:
        for key, s in r.layers.items():
            if key in layers:
                layers[key].add(s)
            else:
                layers[key] = LayerStats(s.numel, s.tau_sq.copy(), dict(s.sums))
    return dict(sorted(layers.items(), key=lambda kv: natural_key(kv[0])))


def layers_doc(layers: dict[str, LayerStats], tasks: tuple[str, ...]) -> dict:
    doc = {}
    for key, s in layers.items():
        entry: dict = {"numel": s.numel, "tau_norm": dict(zip(tasks, np.sqrt(s.tau_sq).round(6).tolist()))}
        if "kept" in s.sums:  # a method with task masks reports how many weights each keeps
            entry["mask_density"] = dict(zip(tasks, (s.sums["kept"] / max(s.numel, 1)).round(6).tolist()))
            entry["tasks_keeping"] = s.sums["count_hist"].tolist()  # index c: weights kept by exactly c tasks
        doc[key] = entry
    return doc


def summary(layers: dict[str, LayerStats], tasks: tuple[str, ...]) -> dict:
    numel = sum(s.numel for s in layers.values())
    out: dict = {"parameters": numel}
    kept = [s.sums["kept"] for s in layers.values() if "kept" in s.sums]
    if kept and numel:
        hist = sum(s.sums["count_hist"] for s in layers.values())
        out["mask_density"] = dict(zip(tasks, (sum(kept) / numel).round(6).tolist()))
        out["tasks_keeping"] = hist.tolist()
        out["selfish_share"] = round(float(hist[1] / numel), 6) if len(hist) > 1 else 0.0
        out["catastrophic_share"] = round(float(hist[0] / numel), 6)
    return out


def preload_plotting() -> None:
    """Import matplotlib in a background thread while the shards run (~0.5 s the commit would
    otherwise wait for, to draw task_overlap.png)."""
    import threading

    def work() -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception:  # the commit's own import reports a real failure
            pass

    threading.Thread(target=work, name="mergeflow-preload-matplotlib", daemon=True).start()


def overlap_png(layers: dict[str, LayerStats], tasks: tuple[str, ...]) -> bytes | None:
    """Stacked bars per layer: the share of weights kept by 0, 1, ..., T tasks."""
    rows = [(k, s.sums["count_hist"] / max(s.numel, 1)) for k, s in layers.items() if "count_hist" in s.sums]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = len(tasks)
    names = [k for k, _ in rows]
    shares = np.stack([h for _, h in rows])  # (layers, T+1)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4.5))
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, t + 1))
    bottom = np.zeros(len(names))
    for c in range(t + 1):
        label = {0: "0 (catastrophic)", 1: "1 (selfish)"}.get(c, str(c))
        ax.bar(range(len(names)), shares[:, c], bottom=bottom, color=colors[c], label=label, width=0.85)
        bottom += shares[:, c]
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("share of weights")
    ax.set_ylim(0, 1)
    ax.set_title(f"How many of {t} task masks keep each weight, per layer")
    ax.legend(title="tasks keeping", fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
