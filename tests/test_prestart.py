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
