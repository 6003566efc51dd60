"""Ray: connect (local runtime by default, a cluster by address) and map a worker
function over shards with a progress bar, turning worker failures into one line."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Sequence

import ray
from tqdm import tqdm

from workers.errors import MergeflowError

log = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local runtime."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    t0 = time.perf_counter()
    if not address:
        # A runtime we start ourselves listens on this machine only; token auth (on by
        # default since Ray 2.5x) would only get in the way of nodes we add to it.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address=address,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}},
    )
    log.info("ray %s in %.1fs: %s", "joined" if address else "started", time.perf_counter() - t0, ray.cluster_resources())


def disconnect() -> None:
    """Leave the runtime (a local one we started stops with it); connect() may follow."""
    ray.shutdown()


def current_node() -> tuple[str, str]:
    """(Ray node id, node IP) of the process calling it: where a task ran."""
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def resolve_device(requested: str) -> str:
    """'auto' means CUDA when the cluster has GPUs."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if requested == "cuda" and not gpus:
        raise MergeflowError("--device cuda: the Ray cluster has no GPU; use --device cpu or auto")
    if requested == "auto":
        return "cuda" if gpus else "cpu"
    return requested


def _in_worker(fn: Callable, *args: Any) -> Any:
    import torch

    # Ray reuses worker processes and each task owns one CPU: one torch thread avoids
    # oversubscription that makes 2-core machines 20x slower.
    torch.set_num_threads(1)
    return fn(*args)


_remote_in_worker = None


def _remote():
    global _remote_in_worker
    if _remote_in_worker is None:
        _remote_in_worker = ray.remote(_in_worker)
    return _remote_in_worker


def submit(fn: Callable, calls: Sequence[tuple]) -> list:
    """Start fn(*call) for every call in the background; pass the handles to gather()."""
    return [_remote().options(num_cpus=1).remote(fn, *call) for call in calls]


def cancel(handles: list) -> None:
    """Stop tasks a failed run no longer needs, so they cannot race a re-run's writes.

    force=True ends the worker process: a KeyboardInterrupt delivered while a task is
    still importing torch leaves that reused process unable to import it again."""
    for ref in handles:
        ray.cancel(ref, force=True)


def gather(handles: list) -> list:
    try:
        return ray.get(handles)
    except Exception as e:
        raise _clean(e) from None


def _clean(err: Exception) -> Exception:
    """A user error raised in a worker, without Ray's wrapping and remote traceback."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, MergeflowError):
        return cause.__class__(*cause.args)
    return err


def run_tasks(
    fn: Callable,
    calls: Sequence[tuple],
    *,
    desc: str,
    sizes: Sequence[int] | None = None,
    on_result: Callable[[int, Any], None] | None = None,
    gpu: bool = False,
    memory: int | None = None,
    quiet: bool = False,
    unit: str = "B",
) -> list[Any]:
    """Run fn(*call) for every call as Ray tasks; results in call order.

    `on_result(i, result)` runs in the driver as each finishes (journaling for resume).
    The first failure cancels the rest and is re-raised.
    """
    opts: dict[str, Any] = {"num_cpus": 1}
    if gpu:
        opts["num_gpus"] = 0.5
    if memory:
        opts["memory"] = memory
    refs = [_remote().options(**opts).remote(fn, *call) for call in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    sizes = list(sizes) if sizes is not None else [1] * len(refs)
    pending = list(refs)
    with tqdm(total=sum(sizes), desc=desc, unit=unit, unit_scale=unit == "B", disable=quiet, leave=False, smoothing=0) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                results[i] = ray.get(done[0])
                if on_result:
                    on_result(i, results[i])
            except BaseException as e:
                cancel(pending)
                raise _clean(e) from None
            bar.update(sizes[i])
    return results
