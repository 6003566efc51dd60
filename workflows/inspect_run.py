"""`mergeflow inspect RUN`: a human summary of a finished run."""

from __future__ import annotations

import json

from mergeflow.errors import MergeflowError
from mergeflow.infra.storage import StorageOptions, join, storage_for
from mergeflow.workers.methods import get_method
from mergeflow.workflows.reconstruct import load_run


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def describe(run: str, options: StorageOptions) -> str:
    m = load_run(run, options)
    record = m["method"]
    s = m.get("summary", {})
    tasks = [t["name"] for t in m["inputs"]["tasks"]]
    try:
        method = get_method(record["name"])
        params, extra = method.describe_params(record), method.describe(m)
    except MergeflowError:  # a method this installation does not have (a plugin): its record as it is
        params, extra = ", ".join(f"{k} {v}" for k, v in record.items() if k != "name"), []
    lines = [
        f"run         {run}",
        f"created     {m['created']} (mergeflow {m['mergeflow_version']})",
        *_lineage_lines(m, options),
        f"method      {record['name']} ({params})",
        f"base        {m['inputs']['base']['uri']}",
        f"tasks       {len(tasks)}: {', '.join(tasks)}",
        f"parameters  {s.get('parameters', 0):,} in {m['shards']} shard(s)",
        f"input       {_gb(s.get('input_bytes', 0))}",
        f"model/      {_gb(s.get('model_bytes', 0))}",
    ]
    if "compressed_bytes" in s:
        lines.append(
            f"compressed/ {_gb(s['compressed_bytes'])} (the bundle) against {_gb(s['checkpoints_bytes'])} of task "
            f"checkpoints; with the base: {s['compression_ratio']:.2f}x smaller"
        )
    lines += extra
    nodes = m.get("nodes", {})
    if nodes:
        lines.append(f"ray nodes   {len(nodes)} computed the shards:")
        for node_id, n in nodes.items():
            lines.append(
                f"  {n['ip']:<15} {node_id[:12]}  {len(n['shards']):>4} shard(s) {_gb(n['bytes_read']):>10} "
                f"read, {n['seconds']:.1f}s  shards {_ranges(n['shards'])}"
            )
    t = m.get("timings", {})
    if t:
        lines.append("timings     " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    store = storage_for(run, options)
    if store.exists(join(run, "stats/task_overlap.png")):
        lines.append(f"plot        {join(run, 'stats/task_overlap.png')}")
    return "\n".join(lines)


def lineage(manifest: dict, options: StorageOptions, limit: int = 100) -> list[dict]:
    """The chain of parents back to the first merge: each run's URI, creation time, MLflow run id and
    what changed against its own parent (from the manifests: no tracking server needed)."""
    from mergeflow.workflows.commit import read_manifest

    chain, seen = [], set()
    parent = manifest.get("parent")
    while parent and parent["run"] not in seen and len(chain) < limit:
        seen.add(parent["run"])
        entry = {"run": parent["run"], "mlflow_run_id": parent.get("mlflow_run_id")}
        try:
            m = read_manifest(parent["run"], options)
        except MergeflowError:
            m = None
        if m is None:
            chain.append(entry | {"missing": True})
            break
        changes = ((m.get("remerge") or {}).get("changes")) or {}
        entry |= {
            "created": m.get("created"),
            "method": m["method"]["name"],
            "changes": "; ".join(f"{k} {', '.join(v)}" for k, v in changes.items() if isinstance(v, list) and v)
            or ("first merge" if not m.get("parent") else "settings or contents"),
        }
        chain.append(entry)
        parent = m.get("parent")
    return chain


def _lineage_lines(m: dict, options: StorageOptions) -> list[str]:
    if not m.get("parent"):
        return []
    lines = [f"parent      {m['parent']['run']}", "lineage     this run's parents, newest first:"]
    for e in lineage(m, options):
        if e.get("missing"):
            lines.append(f"  {e['run']}  (gone: no manifest there)")
            continue
        mlflow = f", mlflow run {e['mlflow_run_id']}" if e.get("mlflow_run_id") else ""
        lines.append(f"  {e['run']}  {e['created']} {e['method']} ({e['changes']}{mlflow})")
    return lines


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
