"""Shared fixtures: one real local Ray runtime per test session, and checkpoint families."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# CLI merges in tests log to a throwaway sqlite store, never ./mlflow.db in the repository.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='mfmlflow')}/mlflow.db"
# ... and keep input hashes in a throwaway cache, never the user's ~/.cache/mergeflow.
os.environ["MERGEFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="mfcache")


@pytest.fixture(autouse=True)
def _own_input_hash_cache(tmp_path, monkeypatch):
    """Every test starts with an empty input hash cache: what it hashes never depends on which
    tests ran before it."""
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "mfcache"))


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray runtime, started once (~5 s). Its temp dir is kept short:
    Ray's socket paths break past ~100 characters."""
    import ray

    temp = tempfile.mkdtemp(prefix="mfray", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def family(tmp_path):
    """Factory: write a small synthetic family and return (base, [(name, path)])."""
    from mergeflow.dev.synthetic import make_family

    def make(tasks=3, layers=2, hidden=16, vocab=32, dtype=torch.bfloat16, shards=1, seed=0, root=None):
        return make_family(
            root or tmp_path / "family",
            tasks=tasks,
            layers=layers,
            hidden=hidden,
            vocab=vocab,
            dtype=dtype,
            shards=shards,
            seed=seed,
        )

    return make


def config_for(base, tasks, output, method: dict, **execution) -> MergeConfig:  # noqa: F821
    from mergeflow.workflows.config import config_from_dict

    raw = {
        "base": str(base),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": str(output),
        "method": method,
    }
    if execution:
        raw["execution"] = execution
    return config_from_dict(raw)


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """A 3-task digits suite small enough to build in seconds: (folder, task names)."""
    from mergeflow.dev.suite.models import build_suite

    root = tmp_path_factory.mktemp("tinysuite") / "suite"
    meta = build_suite(root, tasks=3, seed=0, hidden=64, epochs_scale=0.4)
    return root, [t["name"] for t in meta["tasks"]]


@pytest.fixture(scope="module")
def s3_server(request, tmp_path_factory):
    """One real SeaweedFS S3 server per test module, started with the credentials the
    environment (and so every Ray worker) carries: modules that use it set AWS_* at import."""
    from mergeflow.dev.local_services import SeaweedS3Server

    server = SeaweedS3Server(
        tmp_path_factory.mktemp("seaweed"),
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )
    request.addfinalizer(server.stop)
    server.start()
    return server


def reference_args(cfg) -> dict:
    """The config's method parameters as tests/reference_impl.merge takes them (its defaults where
    the method has no such parameter)."""
    p, names = cfg.method.params, cfg.task_names
    lam = getattr(p, "lambda_", 0.4)
    return {
        "alpha": p.alpha,
        "density": getattr(p, "density", 0.2),
        "scope": getattr(p, "scope", "global"),
        "merge": getattr(p, "merge", "mean"),
        "base_merge": getattr(p, "base_merge", "task_arithmetic"),
        "k": getattr(p, "k", 2),
        "lambdas": [lam[n] for n in names] if isinstance(lam, dict) else [lam] * len(names),
    }


def same_place_free(outputs: dict) -> dict:
    """A manifest's outputs less the model card, which names the inputs' URIs (so a merge of the same
    checkpoints from another store writes another card, and the same weights)."""
    return {rel: o for rel, o in outputs.items() if rel != "model/README.md"}
