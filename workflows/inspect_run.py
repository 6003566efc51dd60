"""`mergeflow inspect RUN`: a human summary of a finished run."""

from __future__ import annotations

import json

from mergeflow.infra.storage import StorageOptions, join, storage_for
from mergeflow.workflows.reconstruct import load_run


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def describe(run: str, options: StorageOptions) -> str:
    m = load_run(run, options)
    method = m["method"]
    s = m.get("summary", {})
    tasks = [t["name"] for t in m["inputs"]["tasks"]]
    params = [f"alpha {method['alpha']:g}"]
    if method["name"] == "lot":
        params = [f"lambda {method['alpha']:g}", f"model {method['model']}", f"{method['exemplars']} exemplars per task"]
    if method["name"] == "ties" or method.get("base_merge") == "ties" and method["name"] != "task_arithmetic":
        params += [f"density {method['density']:g}", f"scope {method['scope']}", f"merge {method['merge']}"]
    if method["name"] in ("tall_masks", "consensus"):
        params.append(f"tau_MTL = {method['base_merge']}")
    if method["name"] == "consensus":
        params.append(f"k {method['k']}")
    lines = [
        f"run         {run}",
        f"created     {m['created']} (mergeflow {m['mergeflow_version']})",
        *([f"parent      {m['parent']['run']}"] if m.get("parent") else []),
        f"method      {method['name']} ({', '.join(params)})",
        f"base        {m['inputs']['base']['uri']}",
        f"tasks       {len(tasks)}: {', '.join(tasks)}",
        f"parameters  {s.get('parameters', 0):,} in {m['shards']} shard(s)",
        f"input       {_gb(s.get('input_bytes', 0))}",
        f"model/      {_gb(s.get('model_bytes', 0))}",
    ]
    if "compressed_bytes" in s:
        lines.append(
            f"compressed/ {_gb(s['compressed_bytes'])} (tau_MTL + masks) against {_gb(s['checkpoints_bytes'])} of task "
            f"checkpoints; with the base: {s['compression_ratio']:.2f}x smaller"
        )
    if "mask_density" in s:
        lines.append("mask density per task (share of weights the task's mask keeps):")
        for t in tasks:
            lam = method.get("lambdas", {}).get(t)
            lines.append(f"  {t:<24} {s['mask_density'][t]:7.2%}   lambda {lam:g}")
        hist = s["tasks_keeping"]
        total = max(sum(hist), 1)
        lines.append("weights kept by c tasks (c = 0 catastrophic, 1 selfish):")
        for c, n in enumerate(hist):
            bar = "#" * round(40 * n / total)
            lines.append(f"  {c:>3}  {n / total:7.2%}  {bar}")
    if "ties" in m:
        lines.append(f"TIES        thresholds per task {[f'{x:.3g}' for x in m['ties']['thresholds']] or 'per tensor'}, majority sign {m['ties']['majority']:+d}")
        guess = {"confirmed": "0 from the sample, confirmed by the merge's zero counts",
                 "refuted": "the sample's 0 was refuted by the merge's zero counts; merged again with these"}
        if m["ties"].get("zero_guess") in guess:
            lines.append(f"            thresholds: {guess[m['ties']['zero_guess']]}")
    if "lot" in m:
        lot = m["lot"]
        rules = ", ".join(f"{k} {v}" for k, v in lot["rules"].items() if v)
        lines.append(f"LOT         features of {len(lot['stats'])} task(s): {lot['features_computed']} computed, "
                     f"{lot['features_reused']} reused from {lot['stats_cache']}; tensors per rule: {rules}")
        if lot.get("thin_layers"):
            lines.append(f"  warning: {len(lot['thin_layers'])} linear layer(s) saw fewer feature rows than twice their "
                         "input width (manifest lot.thin_layers); raise method.exemplars")
    nodes = m.get("nodes", {})
    if nodes:
        lines.append(f"ray nodes   {len(nodes)} computed the shards:")
        for node_id, n in nodes.items():
            lines.append(f"  {n['ip']:<15} {node_id[:12]}  {len(n['shards']):>4} shard(s) {_gb(n['bytes_read']):>10} "
                         f"read, {n['seconds']:.1f}s  shards {_ranges(n['shards'])}")
    t = m.get("timings", {})
    if t:
        lines.append("timings     " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    store = storage_for(run, options)
    if store.exists(join(run, "stats/task_overlap.png")):
        lines.append(f"plot        {join(run, 'stats/task_overlap.png')}")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3,5'."""
    runs: list[list[int]] = []
    for x in sorted(numbers):
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def layers_table(run: str, options: StorageOptions) -> dict:
    return json.loads(storage_for(run, options).read_bytes(join(run, "stats/layers.json")))
