"""Ray: connect (local runtime by default, a cluster by address) and map a worker
function over shards with a progress bar, turning worker failures into one line."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
from ray._private import ray_constants
from ray._private import worker as ray_worker
from tqdm import tqdm

from mergeflow.errors import MergeflowError
from mergeflow.workflows import prestart, ray_guard

log = logging.getLogger(__name__)


# One OpenMP thread per task: Ray runs one task per CPU, and more threads make 2-core machines slow.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _init_options(joined: bool) -> dict[str, Any]:
    """ray.init() options. A joined cluster's workers get WORKER_ENV as a runtime_env; a private
    runtime's inherit it from its raylet instead (_start_private), since any runtime_env makes
    each new worker wait for Ray's runtime-env agent: ~1 s more before the first tasks run."""
    options: dict[str, Any] = dict(include_dashboard=False, configure_logging=False, log_to_driver=False)
    if joined:
        options["runtime_env"] = {"env_vars": dict(WORKER_ENV)}
    return options


_guard: ray_guard.Guard | None = None  # the watchdog of the private runtime this process runs, if any
_token: str | None = None  # a token made up for private runtimes when HOME cannot hold one


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a private local runtime (or
    take the one workflows/prestart.py began starting in the background)."""
    prestart.wait()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized() and address and _guard is not None:
        log.warning("a private Ray runtime was started early, but this run joins %s: leaving it", address)
        disconnect()
    _connect_now(address)


def _connect_now(address: str | None) -> None:
    if ray.is_initialized():
        return
    t0 = time.perf_counter()
    if address:
        # Joined as the cluster is: its auth (RAY_AUTH_MODE, the token) comes from the environment.
        ray.init(address=address, **_init_options(joined=True))
    else:
        _start_private()
    log.info(
        "ray %s in %.1fs: %s", "joined" if address else "started", time.perf_counter() - t0, ray.cluster_resources()
    )


def _start_private() -> None:
    """A runtime for this process only (docs/cluster.md, "The private runtime"): every listener on
    127.0.0.1, Ray's token auth as Ray sets it (on unless RAY_AUTH_MODE says otherwise), its files
    in a temp dir of its own, and a watchdog (workflows/ray_guard.py) that ends its processes and
    removes that dir when this process ends, even by SIGKILL."""
    global _guard
    if _guard is not None:  # the previous runtime was shut down without disconnect()
        _guard.release()
        _guard = None
    temp = tempfile.mkdtemp(prefix=ray_guard.PREFIX, dir=ray_guard.BASE)
    try:
        guard = ray_guard.start(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    try:
        _ensure_token()
        with _loopback_node(), _env({ray_guard.MARKER: temp} | WORKER_ENV), _quiet(_RAY_AUTH_LOG):
            ray.init(_node_ip_address="127.0.0.1", _temp_dir=temp, **_init_options(joined=False))
        ip = ray.util.get_node_ip_address()
        if ip != "127.0.0.1":
            raise MergeflowError(
                f"the local Ray runtime came up on {ip}, not 127.0.0.1: refusing to run it where "
                "other hosts can reach it (Ray version other than the pinned one?)"
            )
    except BaseException:
        ray.shutdown()
        guard.release()
        raise
    _guard = guard


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Make ray.init() keep 127.0.0.1 as the node's address, for the duration of the call.

    Ray's GCS, raylet and workers listen on 127.0.0.1 only when the node address on their command
    line is exactly "127.0.0.1" (else on all interfaces), but ray.init() rewrites a loopback address
    to the outward IP (services.resolve_ip_for_localhost) unless ray_constants.ENABLE_RAY_CLUSTER is
    false. Ray sets that constant from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported: too
    early to set the variable here, and process-wide it would also give a later join of a real
    cluster the driver address 127.0.0.1. Hence this switch for one call; details in docs/cluster.md."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


# Ray logs "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out" at every
# local ray.init(): noise on every merge, and advice a private runtime should not follow.
_RAY_AUTH_LOG = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from `logger` for the duration."""
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """os.environ updated with `values` while Ray starts its processes (they inherit them), then as before."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _ensure_token() -> None:
    """Give Ray's token auth a token that only this user can read, if none is configured.

    With RAY_AUTH_MODE unset (or "token") a local ray.init() turns token auth on (it sets
    RAY_AUTH_MODE=token in os.environ, which every Ray process inherits) and every process loads
    the token from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token,
    which ray.init() writes when missing, as the umask has it (0644 under the usual 022). Writing it
    first, mode 0600, keeps other users of the machine from joining the runtime on 127.0.0.1; where
    HOME is not writable, RAY_AUTH_TOKEN carries a token made up for this process instead."""
    global _token
    mode = os.environ.get("RAY_AUTH_MODE")
    if (
        (mode is not None and mode.lower() != "token")
        or os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        return
    try:
        path = Path.home() / ".ray" / "auth_token"
        if path.exists():
            return
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except (OSError, RuntimeError) as e:  # RuntimeError: no home directory at all
        if isinstance(e, FileExistsError) and path.exists():  # another process wrote it just now
            return
        _token = _token or secrets.token_hex(32)
        os.environ["RAY_AUTH_TOKEN"] = _token
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray's own generator writes (authentication_token_generator.py)


def disconnect() -> None:
    """Leave the runtime (a private one stops with it, and its watchdog cleans up); connect() may follow."""
    global _guard
    ray.shutdown()
    if _guard is not None:
        _guard.release()
        _guard = None


def leave_to_watchdog() -> bool:
    """At the end of a command: skip Ray's shutdown of a private runtime (its atexit handler, ~1.5 s
    of a command's wall time) and let the watchdog end those processes once this one has exited, as
    it does for a killed driver. False (nothing changed) on a joined cluster or with no runtime."""
    if prestart.in_flight():  # still starting: the watchdog, already running, reaps it all the same
        atexit.unregister(ray_worker.shutdown)
        return True
    if _guard is None or not ray.is_initialized():
        return False
    atexit.unregister(ray_worker.shutdown)
    return True


DRIVER = "driver"  # the node of a shard the driver ran while its private runtime was starting


def current_node() -> tuple[str, str]:
    """(Ray node id, node IP) of the process calling it: where a task ran."""
    if not ray.is_initialized():  # the driver, its runtime still starting (run_tasks)
        return DRIVER, "127.0.0.1"
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def device_while_starting(requested: str) -> str | None:
    """The device of a merge whose private runtime is still starting, when it is known without
    Ray: "cpu" asked for, or "auto" where torch sees no GPU. None: connect and ask Ray."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        import torch

        return None if torch.cuda.is_available() else "cpu"
    return None


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


_shipped: set[str] = set()


def ship_plugins() -> None:
    """Methods and storage backends registered from outside mergeflow travel by value: Ray pickles
    their modules' code with the tasks, so workers need no installation of a plugin (a notebook's
    method, a test's backend) beyond the packages the plugin itself imports."""
    from mergeflow.infra.storage import registered
    from mergeflow.workers.methods.registry import plugin_modules

    names = plugin_modules() | {getattr(f, "__module__", "") for _, f in registered()}
    for name in sorted(names - _shipped):
        module = sys.modules.get(name)
        if module is not None and name != "__main__" and not name.startswith("mergeflow."):
            ray.cloudpickle.register_pickle_by_value(module)
        _shipped.add(name)


def submit(fn: Callable, calls: Sequence[tuple]) -> list:
    """Start fn(*call) for every call in the background; pass the handles to gather()."""
    ship_plugins()
    return [_remote().options(num_cpus=1).remote(fn, *call) for call in calls]


def cancel(handles: list) -> None:
    """Stop tasks a failed run no longer needs, so they cannot race a re-run's writes.

    force=True ends the worker process: a KeyboardInterrupt delivered while a task is
    still importing torch leaves that reused process unable to import it again."""
    for ref in handles:
        ray.cancel(ref, force=True)
    if handles:  # cancelling is asynchronous: wait until they have stopped writing
        ray.wait(list(handles), num_returns=len(handles), timeout=CANCEL_WAIT)


CANCEL_WAIT = 30.0  # seconds a failed run waits for its cancelled tasks to end


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


def check_fits(memory: int, desc: str) -> None:
    """Ray keeps a task that asks for more memory than any node has pending, silently, for ever.
    On the private runtime (this machine, which will not grow) that is an error, before any work;
    on a cluster a warning, since an autoscaler may still add a node that large."""
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if memory <= largest:
        return
    what = (
        f"{desc}: a task needs about {memory / 2**30:.1f} GiB of memory (its method's estimate), more "
        f"than any Ray node offers ({largest / 2**30:.1f} GiB)"
    )
    if _guard is not None:
        raise MergeflowError(f"{what}; run it on a machine or cluster with more memory")
    log.warning("%s; its tasks wait until the cluster has such a node", what)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _while_starting(fn: Callable, calls: Sequence[tuple], results: list, on_result, done, desc: str) -> int:
    """Run calls in order in the driver while its private runtime is still starting (a GPU task
    or one larger than half the machine never does); how many ran."""
    import torch

    t0, n = time.perf_counter(), 0
    threads = torch.get_num_threads()  # _in_worker sets 1, as for a worker; the driver's own after
    try:
        while n < len(calls) and prestart.in_flight():
            results[n] = _in_worker(fn, *calls[n])
            if on_result:
                on_result(n, results[n])
            done(n)
            n += 1
    finally:
        torch.set_num_threads(threads)
    log.info("%s: the driver ran %d of %d while Ray started (%.1fs)", desc, n, len(calls), time.perf_counter() - t0)
    return n


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
    The first failure cancels the rest and is re-raised. While the private runtime is still
    starting in the background (workflows/prestart.py), the driver runs the first calls itself,
    one at a time, so that Ray's start-up is not idle time; Ray takes the rest once it is up.
    """
    results: list[Any] = [None] * len(calls)
    sizes = list(sizes) if sizes is not None else [1] * len(calls)
    with tqdm(
        total=sum(sizes), desc=desc, unit=unit, unit_scale=unit == "B", disable=quiet, leave=False, smoothing=0
    ) as bar:
        first = 0
        if not gpu and prestart.in_flight() and (memory or 0) <= _physical_memory() // 2:
            first = _while_starting(fn, calls, results, on_result, lambda i: bar.update(sizes[i]), desc)
        prestart.wait()
        opts: dict[str, Any] = {"num_cpus": 1}
        if gpu:
            opts["num_gpus"] = 0.5
        if memory and first < len(calls):
            check_fits(memory, desc)
            opts["memory"] = memory
        ship_plugins()
        refs = [_remote().options(**opts).remote(fn, *call) for call in calls[first:]]
        index = {ref: first + i for i, ref in enumerate(refs)}
        pending = list(refs)
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
