"""Input sha256 remembered by stamp (infra/hash_cache.py): a repeated merge of the same files
hashes nothing, a file rewritten since is hashed again, and the manifest's hashes are always
those of the bytes on disk."""

import hashlib
import json
import os

from conftest import config_for

from mergeflow.infra import hash_cache
from mergeflow.workflows.merge import run_merge


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(base, tasks):
    return [base / "model.safetensors", *(p / "model.safetensors" for _, p in tasks)]


def _manifest_hashes(report) -> dict[str, str]:
    inputs = report.manifest["inputs"]
    return {
        f"{cp['uri']}/{name}": e["sha256"]
        for cp in [inputs["base"], *inputs["tasks"]]
        for name, e in cp["files"].items()
    }


def test_second_merge_of_the_same_inputs_hashes_nothing(ray_session, family, tmp_path):
    base, tasks = family(tasks=3)
    files = _files(base, tasks)
    first = run_merge(config_for(base, tasks, tmp_path / "a", {"name": "task_arithmetic"}), quiet=True)
    assert first.bytes_hashed == sum(f.stat().st_size for f in files)
    assert hash_cache.cache_file().is_file()

    second = run_merge(config_for(base, tasks, tmp_path / "b", {"name": "ties"}), quiet=True)
    assert second.bytes_hashed == 0
    assert _manifest_hashes(second) == _manifest_hashes(first) == {str(f): _sha(f) for f in files}


def test_a_rewritten_file_is_hashed_again(ray_session, family, tmp_path):
    base, tasks = family(tasks=2)
    run_merge(config_for(base, tasks, tmp_path / "a", {"name": "task_arithmetic"}), quiet=True)
    changed = tasks[1][1] / "model.safetensors"
    data = bytearray(changed.read_bytes())
    data[-1] ^= 1  # same size, other bytes (the last byte of the last tensor)
    changed.write_bytes(bytes(data))
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock could repeat the mtime

    again = run_merge(config_for(base, tasks, tmp_path / "b", {"name": "task_arithmetic"}), quiet=True)
    assert again.bytes_hashed == changed.stat().st_size
    assert _manifest_hashes(again)[str(changed)] == _sha(changed)


def test_cache_off_hashes_everything_and_writes_no_cache(ray_session, family, tmp_path):
    base, tasks = family(tasks=2)
    files = _files(base, tasks)
    cfg = config_for(base, tasks, tmp_path / "a", {"name": "task_arithmetic"}, hash_cache=False)
    first = run_merge(cfg, quiet=True)
    second = run_merge(
        config_for(base, tasks, tmp_path / "b", {"name": "task_arithmetic"}, hash_cache=False), quiet=True
    )
    assert first.bytes_hashed == second.bytes_hashed == sum(f.stat().st_size for f in files)
    assert not hash_cache.cache_file().exists()


def test_an_unreadable_cache_is_an_empty_one(ray_session, family, tmp_path):
    base, tasks = family(tasks=2)
    hash_cache.cache_file().parent.mkdir(parents=True)
    hash_cache.cache_file().write_text("{not json")
    report = run_merge(config_for(base, tasks, tmp_path / "a", {"name": "task_arithmetic"}), quiet=True)
    assert report.bytes_hashed == sum(f.stat().st_size for f in _files(base, tasks))
    assert len(json.loads(hash_cache.cache_file().read_text())) == 3  # rewritten whole
