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


def _plain(value):
    """JSON-ready: numpy arrays and scalars to lists and numbers, tuples to lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def result_to_json(r: ShardResult) -> dict:
    return {
        "index": r.index,
        "outputs": {k: list(v) for k, v in r.outputs.items()},
        "layers": {k: {"numel": s.numel, "tau_sq": _plain(s.tau_sq), **_plain(s.sums)} for k, s in r.layers.items()},
        "sums": _plain(r.sums),
        "globals_used": _plain(r.globals_used),
        "bytes_read": r.bytes_read,
        "seconds": r.seconds,
        "node": r.node,
        "node_ip": r.node_ip,
    }


def result_from_json(d: dict) -> ShardResult:
    layers = {
        k: LayerStats(
            v["numel"],
            np.asarray(v["tau_sq"], dtype=np.float64),
            {key: np.asarray(x) for key, x in v.items() if key not in ("numel", "tau_sq") and x is not None},
        )
        for k, v in d["layers"].items()
    }
    return ShardResult(
        index=d["index"],
        outputs={safe_relpath(k, "journal record"): (v[0], int(v[1])) for k, v in d["outputs"].items()},
        layers=layers,
        sums=d.get("sums", {}),
        globals_used=d.get("globals_used", {}),
        bytes_read=d["bytes_read"],
        seconds=d["seconds"],
        node=d.get("node", ""),
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
            doc = self._read(uri[len(self.root.rstrip("/")) + 1 :])
            if isinstance(doc, dict) and isinstance(doc.get("outputs"), dict):
                listed |= {safe_relpath(rel, uri) for rel in doc["outputs"]}
        return listed

    def save_globals(self, doc: dict) -> None:
        self._write("globals.json", doc)

    def load_globals(self) -> dict | None:
        return self._read("globals.json")
