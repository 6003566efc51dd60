"""Input hashing for the manifest: driver threads (local runs) and Ray tasks (clusters) agree
with hashlib, and a failure names the file."""

import hashlib

import pytest

from mergeflow.errors import StorageError
from mergeflow.infra.storage import StorageOptions
from mergeflow.workflows.input_hashes import InputHashes, hash_in_driver


def _files(tmp_path, sizes):
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"part-{i}.safetensors"
        p.write_bytes(bytes((j * 7 + i) % 251 for j in range(size)))
        paths.append(str(p))
    return paths


def _want(paths):
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def test_driver_threads_hash_every_file(tmp_path):
    paths = _files(tmp_path, [0, 1, 4096, 300_000, 17])
    hashes = InputHashes(paths, StorageOptions(), in_driver=True)
    assert hashes.result() == _want(paths)
    assert hashes.for_tasks() == _want(paths)


def test_ray_tasks_hash_every_file(tmp_path, ray_session):
    paths = _files(tmp_path, [5, 200_000])
    hashes = InputHashes(paths, StorageOptions(), in_driver=False)
    hashes.connected()
    assert hashes.result() == _want(paths)
    got = ray_session.get(list(hashes.for_tasks().values()))
    assert dict(zip(paths, got)) == _want(paths)


def test_a_missing_input_is_named(tmp_path):
    paths = _files(tmp_path, [10])
    missing = str(tmp_path / "gone.safetensors")
    hashes = InputHashes([*paths, missing], StorageOptions(), in_driver=True)
    with pytest.raises(StorageError, match="gone.safetensors: file not found"):
        hashes.result()


def test_no_files_is_nothing_to_wait_for():
    assert InputHashes([], StorageOptions(), in_driver=True).result() == {}


def test_joining_a_cluster_hashes_on_the_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert hash_in_driver(None)
    assert not hash_in_driver("10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert not hash_in_driver(None)
