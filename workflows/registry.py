"""The task registry: which checkpoints a merge takes.

Either the config's `tasks:` list, or `tasks_from:` a folder or s3:// prefix where new checkpoints
land, one sub-folder per task (task name = folder name), or both (listed tasks first).

Task order matters to Task Arithmetic re-merges: a new task extends the previous sum only when it
comes after every task the previous run summed. So discovered tasks keep the order of the previous
run, and newly discovered ones follow, sorted by name; a first run is simply sorted.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from mergeflow.errors import ConfigError
from mergeflow.infra.storage import join, storage_for
from mergeflow.workers.checkpoint import INDEX_NAME, SINGLE_NAME, UnreadableIndex, folder_files
from mergeflow.workflows.config import TASK_NAME, MergeConfig, _format_error

log = logging.getLogger(__name__)


def _complete(folder: str, names: set[str], store) -> bool:
    """A checkpoint that has fully landed: every file a merge would read from it is there (write the
    index last when uploading a sharded checkpoint). Judged by mergeflow.workers.checkpoint.folder_files, so
    the index wins over a model.safetensors beside it, as it does when the merge reads the folder;
    an index naming files outside the folder is a CheckpointError, not a folder still uploading."""
    try:
        files = folder_files(folder, names.__contains__, store.read_bytes)
    except UnreadableIndex:
        return False  # perhaps caught mid-write (a local copy); judged again on the next run
    return files is not None and set(files) <= names


def discover(prefix: str, options, exclude: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(name, uri) of every complete checkpoint folder directly under prefix, sorted by name."""
    store = storage_for(prefix, options)
    root = prefix.rstrip("/") + "/"
    folders: dict[str, set[str]] = {}
    for uri in store.list(prefix):
        parts = uri[len(root) :].split("/")
        if len(parts) == 2:
            folders.setdefault(parts[0], set()).add(parts[1])
    found = []
    for name in sorted(folders):
        uri = join(prefix, name)
        if name.startswith((".", "_")) or uri in exclude:
            continue
        if not TASK_NAME.match(name):
            log.warning("%s: folder name is not a valid task name; skipped", uri)
        elif not _complete(uri, folders[name], store):
            log.info("%s: no complete checkpoint yet; skipped until it is", uri)
        else:
            found.append((name, uri))
    return found


def resolve(config: MergeConfig, previous_order: list[str] | tuple[str, ...] = ()) -> MergeConfig:
    """The config with `tasks_from` expanded into concrete tasks (and validated as a whole)."""
    if config.tasks_from is None:
        return config
    listed = {t.name for t in config.tasks}
    found = {
        n: uri for n, uri in discover(config.tasks_from, config.storage.options(), (config.base,)) if n not in listed
    }
    known = [n for n in previous_order if n in found]
    order = known + sorted(n for n in found if n not in known)
    tasks = [t.model_dump() for t in config.tasks] + [{"name": n, "checkpoint": found[n]} for n in order]
    if not tasks:
        raise ConfigError(
            f"tasks_from: no complete checkpoint folder under {config.tasks_from} "
            f"(each needs {SINGLE_NAME} or {INDEX_NAME} with its shards)"
        )
    raw = config.model_dump(by_alias=True) | {"tasks": tasks, "tasks_from": None}
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(f"tasks_from {config.tasks_from}", e)) from None
