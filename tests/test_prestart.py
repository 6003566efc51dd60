"""When `mergeflow merge` starts the private Ray runtime early (workflows/prestart.py), and when not."""

from __future__ import annotations

import pytest

from mergeflow.workflows import prestart


def test_config_address_reads_the_file_alone(tmp_path):
    (tmp_path / "local.yaml").write_text("base: b\ntasks: []\nexecution: {device: cpu}\n")
    (tmp_path / "cluster.yaml").write_text("base: b\nexecution:\n  ray_address: ray://head:10001\n")
    (tmp_path / "list.yaml").write_text("- not a config\n")
    assert prestart.config_address(str(tmp_path / "local.yaml")) == ""
    assert prestart.config_address(str(tmp_path / "cluster.yaml")) == "ray://head:10001"
    assert prestart.config_address(str(tmp_path / "list.yaml")) is None
    assert prestart.config_address(str(tmp_path / "missing.yaml")) is None
    assert prestart.config_address("s3://bucket/merge.yaml") is None  # not read here: no early start


@pytest.mark.parametrize(
    "address, env, config",
    [
        ("ray://head:10001", {}, "local"),  # --ray-address
        (None, {"RAY_ADDRESS": "auto"}, "local"),
        (None, {"MERGEFLOW_PRESTART": "0"}, "local"),
        (None, {}, "cluster"),  # the config joins a cluster
        (None, {}, "missing"),  # unreadable here: connect() decides later, as before
    ],
)
def test_no_early_start_when_the_merge_may_join_a_cluster(tmp_path, monkeypatch, address, env, config):
    (tmp_path / "local.yaml").write_text("base: b\n")
    (tmp_path / "cluster.yaml").write_text("execution: {ray_address: 'auto'}\n")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MERGEFLOW_PRESTART", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert prestart.begin(address, str(tmp_path / f"{config}.yaml")) is False
    assert not prestart.in_flight()


def test_the_driver_runs_the_first_calls_while_its_runtime_starts(ray_session, monkeypatch):
    """runtime.run_tasks: while the background start is in flight the driver runs calls itself, in
    order; once it is not, Ray runs the rest. Results in call order either way."""
    import os

    import torch

    from mergeflow.workflows import runtime

    torch.set_num_threads(2)
    checks = iter([True, True, True])  # in flight for three checks (one to begin), then up
    monkeypatch.setattr(prestart, "in_flight", lambda: next(checks, False))
    landed = []
    where = lambda i: (i, __import__("os").getpid())  # noqa: E731  (pickled by value for the workers)
    out = runtime.run_tasks(
        where, [(i,) for i in range(5)], desc="t", quiet=True, on_result=lambda i, r: landed.append(i)
    )
    assert [i for i, _ in out] == list(range(5))
    assert [pid == os.getpid() for _, pid in out] == [True, True, False, False, False]
    assert landed[:2] == [0, 1] and sorted(landed) == list(range(5))
    assert runtime.current_node()[0] != runtime.DRIVER  # Ray is up here: a real node id
    assert torch.get_num_threads() == 2  # the driver's own thread count is back


def test_device_known_without_ray():
    from mergeflow.workflows import runtime

    assert runtime.device_while_starting("cpu") == "cpu"
    assert runtime.device_while_starting("cuda") is None  # Ray says whether the cluster has one
    import torch

    assert runtime.device_while_starting("auto") == (None if torch.cuda.is_available() else "cpu")
