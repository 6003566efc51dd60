"""A task that asks for more memory than any Ray node has would stay pending for ever: on the private
runtime that is a one-line error before any work, on a cluster (which may grow) a warning."""

from __future__ import annotations

import logging

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.workflows import runtime


def test_infeasible_memory_is_an_error_on_the_private_runtime(ray_session, monkeypatch):
    monkeypatch.setattr(runtime, "_guard", object())  # as when runtime.connect() started its own runtime
    with pytest.raises(MergeflowError, match=r"^merge: a task needs about 931322\.6 GiB of memory .* more than any"):
        runtime.run_tasks(print, [("never runs",)], desc="merge", memory=10**15, quiet=True)
    runtime.check_fits(2**20, "merge")  # a megabyte fits anywhere


def test_infeasible_memory_is_a_warning_on_a_cluster(ray_session, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "_guard", None)
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        runtime.check_fits(10**15, "merge")
    assert "its tasks wait until the cluster has such a node" in caplog.text
