"""The tracking process of the `mergeflow merge` command (infra/tracking_child.py): calls come back
as their values or as their own exceptions, and a process that died is one TrackingError line."""

from __future__ import annotations

import pytest

from mergeflow.infra import tracking, tracking_child
from mergeflow.infra.tracking import TrackingError, TrackingOptions


@pytest.fixture
def child():
    c = tracking_child.start()
    assert c is not None
    yield c
    c.close()


def _call(child, manifest, tmp_path, enabled=True):
    options = TrackingOptions(enabled=enabled, uri=f"sqlite:///{tmp_path}/mlflow.db")
    kwargs = dict(manifest=manifest, output=str(tmp_path / "out"), config_text=None, files={}, options=options)
    return child.call("log_merge", kwargs)


def test_values_and_exceptions_come_back_as_themselves(child, tmp_path):
    assert _call(child, {}, tmp_path, enabled=False) is None
    with pytest.raises(KeyError):  # a malformed manifest is a bug, not "tracking failed"
        _call(child, {}, tmp_path)
    with pytest.raises(RuntimeError, match="serves"):
        child.call("os.system", {"command": "true"})
    assert _call(child, {}, tmp_path, enabled=False) is None  # still serving after its errors
    child.close()
    assert child._proc.poll() is not None


def test_a_dead_tracking_process_is_one_tracking_error_line(child, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_child", child)
    child._proc.kill()
    child._proc.wait()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingError) as info:
        tracking.log_merge({}, output="s3://bucket/run", config_text=None, files={}, options=TrackingOptions(uri=uri))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert uri in message and "tracking process exited" in message and "committed at s3://bucket/run" in message
