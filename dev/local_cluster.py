"""A multi-node Ray cluster on 127.0.0.1: for tests, benchmarks, and trying cluster mode on one machine.

`ray.cluster_utils.Cluster` starts a head node and worker nodes (a raylet each) from one
process. We run it in a child process of its own because a process can drive only one Ray
runtime, and Cluster.shutdown() resets process-wide Ray state that a driver living in the
same process would still need. Ray's files (session dirs, sockets, the `ray_current_cluster`
address file) go under a private short temp dir through RAY_TMPDIR, so the cluster never
touches /tmp/ray, which other Ray users of the machine share. Nodes listen on 127.0.0.1 only.

CLI::

    python -m mergeflow.dev.local_cluster --nodes 3 --cpus 1    # prints RAY_ADDRESS=...; Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LOOPBACK_ENV", "ClusterInfo", "LocalRayCluster", "main"]

_HOST = "127.0.0.1"
# Every process of the cluster and every driver that joins it needs these. Ray rewrites a
# 127.0.0.1 address to the machine's outward IP unless this switch (named for Windows and
# macOS, read when ray is imported) says clusters stay on loopback. Token auth is off: the
# cluster is reachable from this machine only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@dataclass(frozen=True)
class ClusterInfo:
    address: str  # GCS address: what --ray-address / RAY_ADDRESS take
    node_ids: tuple[str, ...]  # head first


class LocalRayCluster:
    """A head and `nodes - 1` worker nodes with `cpus` CPUs each (the head `head_cpus`: 0 makes
    it a driver-only head, as in the cluster configs), in a child process.

    `env` is added to the nodes' environment, and so to every Ray worker's: on a real
    cluster that is where S3 credentials come from (an instance role, a Secret)."""

    def __init__(
        self,
        nodes: int = 3,
        cpus: int = 1,
        env: dict[str, str] | None = None,
        head_cpus: int | None = None,
        object_store_mib: int = 150,
        start_timeout: float = 120,
    ) -> None:
        if nodes < 1 or cpus < 0 or (head_cpus or 0) < 0:
            raise ValueError("a cluster needs at least one node and cpus >= 0")
        self.nodes, self.cpus, self.env = nodes, cpus, dict(env or {})
        self.head_cpus = cpus if head_cpus is None else head_cpus
        self.object_store_mib = object_store_mib
        self.start_timeout = start_timeout
        self.info: ClusterInfo | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._temp: str | None = None

    @property
    def address(self) -> str:
        assert self.info is not None, "cluster not started"
        return self.info.address

    def start(self) -> ClusterInfo:
        self.launch()
        return self.wait()

    def launch(self) -> None:
        """Start the nodes in the background (they take ~10-25 s); wait() returns once they are up."""
        # Short and private: Ray's socket paths break past ~100 characters.
        self._temp = tempfile.mkdtemp(prefix="mfrc", dir="/tmp")
        env = os.environ | self.env | {"RAY_TMPDIR": self._temp} | LOOPBACK_ENV
        cmd = [
            sys.executable,
            "-m",
            "mergeflow.dev.local_cluster",
            "--nodes",
            str(self.nodes),
            "--cpus",
            str(self.cpus),
            "--head-cpus",
            str(self.head_cpus),
            "--object-store-mib",
            str(self.object_store_mib),
            "--serve",
        ]
        log = open(Path(self._temp) / "cluster.log", "w")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,  # own process group: a Ctrl-C in a test run reaches stop(), not the nodes
        )
        log.close()

    def wait(self) -> ClusterInfo:
        if self.info is None:
            doc = json.loads(self._first_line(self.start_timeout))
            self.info = ClusterInfo(doc["address"], tuple(doc["node_ids"]))
        return self.info

    def _first_line(self, timeout: float) -> str:
        """The child's announcement: the first stdout line that is JSON."""
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        why = f"not up after {timeout:.0f}s"
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0 and sel.select(left):
                line = self._proc.stdout.readline()
                if not line:
                    why = f"its process exited with code {self._proc.wait()}"
                    break
                if line.startswith("{"):
                    return line
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"local Ray cluster failed to start: {why}; its log ends:\n{tail}")

    def driver_env(self) -> dict[str, str]:
        """Environment for a driver process (e.g. `mergeflow merge`) that joins this cluster."""
        return {"RAY_ADDRESS": self.address, **LOOPBACK_ENV}

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((Path(self._temp or "") / "cluster.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"<no log: {e}>"

    def stop(self, timeout: float = 60) -> int | None:
        """Ask the child to run Cluster.shutdown() (closing its stdin), then wait for it.
        Returns its exit code: 0 after a clean shutdown."""
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # only our child's group
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._temp and code == 0:  # otherwise keep cluster.log (and Ray's session logs) for log_tail()
            shutil.rmtree(self._temp, ignore_errors=True)
        return code

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _serve(nodes: int, cpus: int, head_cpus: int, object_store_mib: int, announce) -> None:
    """Run the cluster until stdin closes (or SIGTERM), then shut it down cleanly."""
    from ray.cluster_utils import Cluster

    def on_sigterm(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    args = {
        "num_cpus": cpus,
        "node_ip_address": _HOST,
        "object_store_memory": object_store_mib * 2**20,
        "include_dashboard": False,
    }
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=args | {"num_cpus": head_cpus})
        for _ in range(nodes - 1):
            cluster.add_node(**args)
        cluster.wait_for_nodes()
        announce(cluster.address, [n.node_id for n in cluster.list_all_nodes()])
        while sys.stdin.read(4096):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if cluster is not None:
            cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mergeflow.dev.local_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="head + workers (default 3)")
    p.add_argument("--cpus", type=int, default=1, help="CPUs each node offers to Ray (default 1)")
    p.add_argument("--head-cpus", type=int, default=None, help="CPUs of the head (default: --cpus; 0: driver only)")
    p.add_argument("--object-store-mib", type=int, default=150)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # child mode of LocalRayCluster
    args = p.parse_args(argv)

    if args.serve:

        def announce(address, node_ids):
            print(json.dumps({"address": address, "node_ids": node_ids}), flush=True)

        _serve(
            args.nodes,
            args.cpus,
            args.cpus if args.head_cpus is None else args.head_cpus,
            args.object_store_mib,
            announce,
        )
        return 0

    cluster = LocalRayCluster(args.nodes, args.cpus, head_cpus=args.head_cpus, object_store_mib=args.object_store_mib)
    t0 = time.monotonic()
    info = cluster.start()
    print(
        f"{len(info.node_ids)} Ray nodes on {_HOST} in {time.monotonic() - t0:.1f}s; in another shell:\n"
        f"  export {' '.join(f'{k}={v}' for k, v in cluster.driver_env().items())}\n"
        f"  mergeflow merge CONFIG   (or --ray-address {info.address})\nCtrl-C stops the cluster.",
        flush=True,
    )
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print(f"stopped (exit {cluster.stop()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
