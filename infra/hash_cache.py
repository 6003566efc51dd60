"""sha256 of input files, remembered by their stamp.

Merging the same checkpoints again (a hyper-parameter sweep, a scheduled re-merge, a resumed or
repeated job) should not read every input once more just to hash it for the manifest: hashing
costs about a CPU-second per GB. A file's stamp is its size and mtime (local files) or its size and
ETag (S3 objects), the same evidence `mergeflow remerge` trusts in a parent's manifest: a file
rewritten in place keeps neither unless someone forges them.

The entries live in one JSON file on the machine that runs the driver,
`$MERGEFLOW_CACHE_DIR/input-sha256.json` (default `~/.cache/mergeflow`). It is only a cache:
deleting it costs time, never correctness; concurrent writers may drop each other's new entries
but never leave a torn file (each write replaces it atomically). `execution.hash_cache: false`
turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "input-sha256.json"
MAX_ENTRIES = 100_000  # a few MB of JSON; the oldest entries go first


def cache_file() -> Path:
    root = os.environ.get("MERGEFLOW_CACHE_DIR") or Path.home() / ".cache" / "mergeflow"
    return Path(root) / FILE


def _load(path: Path) -> dict[str, list[str]]:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or unreadable: an empty cache


def cached_hashes(stamps: dict[str, str]) -> dict[str, str]:
    """sha256 of the files whose stamp is the one recorded with their hash."""
    entries = _load(cache_file())
    out = {}
    for uri, stamp in stamps.items():
        entry = entries.get(uri)
        if entry and entry[0] == stamp:
            out[uri] = entry[1]
    return out


def remember(stamps: dict[str, str], hashes: dict[str, str]) -> None:
    """Record sha256 by stamp for the files in both maps. Failure to write is logged, not raised:
    the merge it serves has already succeeded."""
    fresh = {uri: [stamps[uri], sha] for uri, sha in hashes.items() if uri in stamps}
    if not fresh:
        return
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _load(path)
        for uri in fresh:
            entries.pop(uri, None)  # re-inserted last: dict order is age
        entries.update(fresh)
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".input-sha256-")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not update the input hash cache %s: %s", path, e)
