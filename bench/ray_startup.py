"""Where Ray start-up time goes, and what a persistent cluster (`ray start --head`) saves.

Each measurement runs in a fresh Python process, as a `mergeflow merge` does: import ray,
ray.init (local runtime: GCS, raylet; or connect to a running head), the first task (a
worker process starts and imports torch), a second task (worker reused), shutdown.
The head started here listens on 127.0.0.1 with its own short temp dir, and is stopped by
ending exactly the processes started under that temp dir (never `ray stop`, which would
end every Ray on the machine).

    .venv/bin/python bench/ray_startup.py --repeats 3
    .venv/bin/python bench/ray_startup.py --start-head     # for `mergeflow merge --ray-address`
    .venv/bin/python bench/ray_startup.py --stop-head /tmp/mfheadXXXX
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent

PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import ray
t_import = time.perf_counter()
address = (sys.argv[1] if len(sys.argv) > 1 else "") or None
kw = {} if address else {"_temp_dir": sys.argv[2] if len(sys.argv) > 2 else None}
ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False,
         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, **{k: v for k, v in kw.items() if v})
t_init = time.perf_counter()

@ray.remote(num_cpus=1)
def task():
    import torch
    return torch.__version__

ray.get(task.remote())
t_first = time.perf_counter()
ray.get(task.remote())
t_second = time.perf_counter()
ray.shutdown()
t_end = time.perf_counter()
print(json.dumps({"import_ray": t_import - t0, "init": t_init - t_import, "first_task": t_first - t_init,
                  "second_task": t_second - t_first, "shutdown": t_end - t_second, "total": t_end - t0}))
"""


def probe(address: str | None, temp: str | None) -> dict:
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-c", PROBE] + ([address] if address else ["", temp or ""])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"process_wall": wall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_under(temp: str) -> list[int]:
    """Processes whose command line names our head's temp dir (and only ours)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if temp.encode() in cmdline:
                out.append(int(entry))
    return out


def start_head(temp: str) -> tuple[str, float]:
    port = free_port()
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--temp-dir={temp}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    return f"127.0.0.1:{port}", time.perf_counter() - t0


def stop_head(temp: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_under(temp)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids_under(temp) and time.time() < deadline:
            time.sleep(0.2)


def summarise(label: str, rows: list[dict]) -> None:
    keys = ["import_ray", "init", "first_task", "second_task", "shutdown", "total", "process_wall"]
    print(f"{label:22} " + " ".join(f"{k}={statistics.median(r[k] for r in rows):.2f}" for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--start-head", action="store_true", help="only start a head; print its address and temp dir")
    ap.add_argument("--stop-head", metavar="TEMP_DIR", help="only stop the head started with that temp dir")
    args = ap.parse_args()
    if args.start_head:
        temp = tempfile.mkdtemp(prefix="mfhead", dir="/tmp")
        address, head_s = start_head(temp)
        print(json.dumps({"address": address, "temp_dir": temp, "seconds": round(head_s, 2)}))
        return
    if args.stop_head:
        if not Path(args.stop_head).name.startswith("mfhead"):
            raise SystemExit("--stop-head takes a temp dir printed by --start-head")
        stop_head(args.stop_head)
        return
    local, joined = [], []
    temp = tempfile.mkdtemp(prefix="mfhead", dir="/tmp")
    address, head_s = start_head(temp)
    print(f"head started in {head_s:.2f}s at {address} (temp dir {temp})")
    try:
        for _ in range(args.repeats):
            local.append(probe(None, tempfile.mkdtemp(prefix="mfloc", dir="/tmp")))
            joined.append(probe(address, None))
    finally:
        stop_head(temp)
    print(f"load average {os.getloadavg()[0]:.2f}; medians over {args.repeats} (seconds)")
    summarise("local ray.init()", local)
    summarise("join running head", joined)
    print(json.dumps({"local": local, "joined": joined, "head_start": head_s}))


if __name__ == "__main__":
    main()
