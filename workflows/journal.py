"""The run's journal under OUT/.mergeflow: what lets a killed merge resume.

plan.json names the plan's fingerprint; shards/NNNNN.json is written after a shard's
files are committed. A shard is reused only when its record matches the plan and its
files still hash to what was recorded.
"""

from __future__ import annotations

import json

import numpy as np

from mergeflow.infra.storage import StorageOptions, join, safe_relpath, storage_for
from mergeflow.workers.shard import LayerStats, ShardResult

JOURNAL_DIR = ".mergeflow"


def result_to_json(r: ShardResult) -> dict:
    def arr(a):
        return None if a is None else np.asarray(a).tolist()

    return {
        "index": r.index,
        "outputs": {k: list(v) for k, v in r.outputs.items()},
        "layers": {
            k: {"numel": s.numel, "tau_sq": arr(s.tau_sq), "kept": arr(s.kept), "count_hist": arr(s.count_hist)}
            for k, s in r.layers.items()
        },
        "sign_sum": r.sign_sum,
        "ambiguous": r.ambiguous,
        "majority_used": r.majority_used,
        "thresholds_used": None if r.thresholds_used is None else list(r.thresholds_used),
        "zeros": None if r.zeros is None else list(r.zeros),
        "bytes_read": r.bytes_read,
        "seconds": r.seconds,
        "node": r.node,
        "node_ip": r.node_ip,
    }


def result_from_json(d: dict) -> ShardResult:
    def arr(a, dtype):
        return None if a is None else np.asarray(a, dtype=dtype)

    layers = {
        k: LayerStats(v["numel"], arr(v["tau_sq"], np.float64), arr(v["kept"], np.int64), arr(v["count_hist"], np.int64))
        for k, v in d["layers"].items()
    }
    return ShardResult(
        index=d["index"],
        outputs={safe_relpath(k, "journal record"): (v[0], int(v[1])) for k, v in d["outputs"].items()},
        layers=layers,
        sign_sum=d["sign_sum"],
        ambiguous=d["ambiguous"],
        majority_used=d["majority_used"],
        thresholds_used=None if d.get("thresholds_used") is None else tuple(d["thresholds_used"]),
        zeros=None if d.get("zeros") is None else tuple(d["zeros"]),
        bytes_read=d["bytes_read"],
        seconds=d["seconds"],
        node=d.get("node", ""),  # absent in records written before nodes were recorded
        node_ip=d.get("node_ip", ""),
    )


class Journal:
    def __init__(self, output: str, options: StorageOptions):
        self.root = join(output, JOURNAL_DIR)
        self._store = storage_for(output, options)

    def _read(self, rel: str) -> dict | None:
        uri = join(self.root, rel)
        if not self._store.exists(uri):
            return None
        try:
            return json.loads(self._store.read_bytes(uri))
        except ValueError:
            return None  # a torn record is as good as none: the shard is redone

    def _write(self, rel: str, doc: dict) -> None:
        self._store.write_bytes(join(self.root, rel), json.dumps(doc, indent=1).encode())

    def fingerprint(self) -> str | None:
        doc = self._read("plan.json")
        return doc and doc.get("fingerprint")

    def start(self, fingerprint: str) -> None:
        self._write("plan.json", {"fingerprint": fingerprint})

    def record(self, result: ShardResult) -> None:
        self._write(f"shards/{result.index + 1:05d}.json", result_to_json(result))

    def recorded(self, index: int) -> ShardResult | None:
        doc = self._read(f"shards/{index + 1:05d}.json")
        return result_from_json(doc) if doc else None

    def listed_outputs(self) -> set[str]:
        """Every output file a shard record names (checked to stay inside the run)."""
        listed: set[str] = set()
        for uri in self._store.list(join(self.root, "shards")):
            doc = self._read(uri[len(self.root.rstrip("/")) + 1:])
            if isinstance(doc, dict) and isinstance(doc.get("outputs"), dict):
                listed |= {safe_relpath(rel, uri) for rel in doc["outputs"]}
        return listed

    def save_globals(self, doc: dict) -> None:
        self._write("globals.json", doc)

    def load_globals(self) -> dict | None:
        return self._read("globals.json")
