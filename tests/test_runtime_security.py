"""The private Ray runtime that `mergeflow merge` starts without --ray-address (workflows/runtime.py):

- it is reachable from this machine only: every TCP listener of every one of its processes is
  bound to a loopback address, and the same port through the machine's outward address refuses
  the connection; and it runs with Ray's token auth on, in an environment without RAY_AUTH_MODE;
- it does not outlive its driver: after `kill -9` of the driver, none of its processes (Ray's
  agents included) is left within a few seconds, and its temp dir is gone.

The first two tests run a real merge as a subprocess, with the environment a user's shell would
give it (no RAY_AUTH_MODE, no RAY_ADDRESS; HOME points to a temp dir, where the auth token goes).
Processes are read from /proc: a private runtime's processes are the driver's descendants while
the driver lives. The last two check the watchdog (workflows/ray_guard.py) with stand-ins for
Ray's processes: what it kills, what it spares, and how it reaps what a killed watchdog left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergeflow.workflows import ray_guard

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MERGEFLOW = Path(sys.executable).with_name("mergeflow")
RAY_CORE = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


# --- /proc ------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [19] start time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of `root` and every process below it."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(int(st[1]), []).append(int(entry))
            starts[int(entry)] = st[19]
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            found[pid] = starts[pid]
            todo += children.get(pid, [])
    return found


def alive(procs: dict[int, str]) -> dict[int, str]:
    """Those of {pid: start time} still running (not a zombie, and not a later process with the same pid)."""
    left = {}
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[19] == start and st[0] not in ("Z", "X"):
            left[pid] = _cmdline(pid)[:100]
    return left


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp{,6} print the address as 32-bit words in host (little-endian) byte order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def listening(pid: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every listening TCP socket that process `pid` holds open."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        found = []
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # 0A: TCP_LISTEN
                    addr, port = f[1].split(":")
                    found.append((_address(addr), int(port, 16)))
        return found
    except OSError:  # the process ended meanwhile
        return []


def is_loopback(addr) -> bool:
    return addr.is_loopback or (addr.version == 6 and addr.ipv4_mapped is not None and addr.ipv4_mapped.is_loopback)


def outward_address() -> str | None:
    """This machine's non-loopback IPv4 address: the one a route out uses (a UDP connect only looks
    the route up, it sends nothing), else what the host name resolves to."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))  # TEST-NET-1
            candidates.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        candidates.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return next((ip for ip in candidates if not ipaddress.ip_address(ip).is_loopback), None)


# --- the merge ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_config(tmp_path_factory):
    """A family whose merge takes several seconds after Ray is up (~0.2 GB of checkpoints)."""
    from mergeflow.dev.synthetic import make_family

    root = tmp_path_factory.mktemp("secfamily")
    _, tasks = make_family(root, tasks=6, layers=8, hidden=384, vocab=8192, shards=2, seed=0)
    cfg = root / "config.yaml"
    cfg.write_text(
        "base: base\ntasks:\n"
        + "".join(f"- {{name: {n}, checkpoint: {p.name}}}\n" for n, p in tasks)
        + "output: run\nmethod: {name: tall_masks}\n"
    )
    return cfg


class Merge:
    """`mergeflow merge CONFIG` in a session of its own, with a user's environment: no RAY_AUTH_MODE."""

    def __init__(self, config: Path, tmp: Path, *, early_start: bool = False) -> None:
        home = tmp / "home"
        home.mkdir()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_TMPDIR")
        }
        env["HOME"] = str(home)
        # Started early, the runtime may come up after the driver computed every shard itself and
        # exited: these tests look at a runtime that does the merge.
        env["MERGEFLOW_PRESTART"] = "1" if early_start else "0"
        self.home, self.log, self.out = home, tmp / "merge.log", tmp / "out"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(MERGEFLOW), "merge", str(config), "--quiet", "--no-tracking", "--output", str(self.out)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.seen: dict[int, str] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_for_runtime(self, timeout: float = 90) -> dict[int, str]:
        """Poll until the runtime's core processes and at least one worker run; {pid: start time}."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the merge ended before its runtime was seen:\n{self.output()}"
            procs = descendants(self.proc.pid)
            self.seen |= procs
            names = [_cmdline(p) for p in procs]
            if all(any(n.startswith(k) or f"/{k} " in n for n in names) for k in RAY_CORE) and any(
                n.startswith(("ray::IDLE", "ray::_in_worker")) for n in names
            ):
                return procs
            time.sleep(0.1)
        pytest.fail(f"no Ray runtime under the driver after {timeout:.0f}s:\n{self.output()}")

    def cleanup(self) -> None:
        """Whatever happens in the test, leave no process of this merge behind (after giving the
        runtime's watchdog, one of them, the time to do its work)."""
        if self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)
            self.proc.kill()
        deadline = time.monotonic() + 15
        while alive(self.seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in alive(self.seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def runtime_dir(self) -> Path | None:
        """The temp dir of the driver's runtime, from Ray's command lines (--temp-dir=DIR)."""
        return next(
            (
                Path(a.split("=", 1)[1])
                for p in self.seen
                for a in _cmdline(p).split()
                if a.startswith(("--temp-dir=", "--temp_dir="))
            ),
            None,
        )


@pytest.fixture
def merge(family_config, tmp_path):
    runs: list[Merge] = []

    def start() -> Merge:
        runs.append(Merge(family_config, tmp_path))
        return runs[-1]

    yield start
    for m in runs:
        m.cleanup()


@pytest.mark.slow
def test_private_runtime_listens_on_loopback_only_with_token_auth(merge):
    m = merge()
    m.wait_for_runtime()
    temp = m.runtime_dir()
    time.sleep(0.5)  # workers open their listener right after they start
    sockets = {pid: listening(pid) for pid in descendants(m.proc.pid)}
    every = [(pid, addr, port) for pid, found in sockets.items() for addr, port in found]
    assert every, "the runtime's processes hold no listening socket: nothing was checked"
    exposed = [(_cmdline(pid)[:70], str(addr), port) for pid, addr, port in every if not is_loopback(addr)]
    assert not exposed, f"listeners reachable from other hosts: {exposed}"

    outward = outward_address()
    if outward is not None:
        reached = []
        for _, _, port in every:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                try:
                    s.connect((outward, port))
                    reached.append(port)
                except ConnectionRefusedError:
                    pass
        assert not reached, f"ports accepting connections on {outward}: {reached}"

    # The runtime does its work with Ray's token auth on (the mode Ray picks when RAY_AUTH_MODE is unset).
    assert m.proc.wait(timeout=150) == 0, m.output()
    nodes = json.loads((m.out / "manifest.json").read_text())["nodes"]
    assert [n["ip"] for n in nodes.values()] == ["127.0.0.1"], nodes
    token = m.home / ".ray" / "auth_token"
    assert token.is_file(), "no auth token: the runtime ran without token auth"
    assert stat.S_IMODE(token.stat().st_mode) & 0o077 == 0, "the auth token is readable by other users"

    # After a normal exit too, nothing of the runtime stays: no process, no temp dir.
    deadline = time.monotonic() + 15
    while (alive(m.seen) or (temp and temp.exists())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(m.seen), f"still running after the merge ended: {alive(m.seen)}"
    assert temp is not None and not temp.exists(), f"the runtime's temp dir is left: {temp}"


@pytest.mark.slow
def test_private_runtime_dies_with_a_killed_driver(merge):
    m = merge()
    m.wait_for_runtime()
    procs = m.seen = m.seen | descendants(m.proc.pid)
    temp = m.runtime_dir()
    os.kill(m.proc.pid, signal.SIGKILL)
    m.proc.wait(timeout=10)
    driver = {m.proc.pid}
    runtime = {p: s for p, s in procs.items() if p not in driver}

    deadline = time.monotonic() + 20
    while alive(runtime) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(runtime), f"still running 20 s after the driver was killed: {alive(runtime)}"
    deadline = time.monotonic() + 5
    while temp is not None and temp.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert temp is not None and not temp.exists(), f"the runtime's temp dir is left: {temp}"


def test_a_finished_merge_leaves_its_runtime_to_the_watchdog_and_nothing_behind(merge):
    """`mergeflow merge` skips Ray's own shutdown at exit (workflows/cli.py run()): the watchdog
    must still end every process of the runtime and remove its dir, as for a killed driver."""
    m = merge()
    m.wait_for_runtime()
    temp = m.runtime_dir()
    while m.proc.poll() is None:
        m.seen |= descendants(m.proc.pid)
        time.sleep(0.2)
    assert m.proc.returncode == 0, m.output()
    assert "exit " in m.output()  # the exit note: the command ended through run()'s quick exit
    runtime = {p: s for p, s in m.seen.items() if p != m.proc.pid}
    deadline = time.monotonic() + 20
    while (alive(runtime) or (temp is not None and temp.exists())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(runtime), f"still running 20 s after the merge ended: {alive(runtime)}"
    assert temp is not None and not temp.exists(), f"the runtime's temp dir is left: {temp}"


# --- the watchdog on its own (no Ray: stand-ins that look like a runtime's processes) ----------


def _stand_in(
    *, title: str | None = None, names: Path | None = None, env_marker: Path | None = None, holds: Path | None = None
) -> subprocess.Popen:
    """A sleeping process that names a dir in its arguments, or else has a title (argv[0]) and
    maybe a file open under a dir; with the runtime's marker in its environment if asked."""
    env = dict(os.environ)
    if env_marker is not None:
        env[ray_guard.MARKER] = str(env_marker)
    if names is not None:
        args, shown = [sys.executable, "-c", "import time; time.sleep(600)", f"--temp-dir={names}"], str(names)
    else:
        cmd = f"exec -a {title or 'sleep'} sleep 600"
        if holds is not None:
            holds.mkdir(parents=True, exist_ok=True)
            cmd += f" 3>>{holds / 'x.log'}"
        args, shown = ["bash", "-c", cmd], title or "sleep"
    proc = subprocess.Popen(args, env=env)
    deadline = time.monotonic() + 10
    while (
        not (_cmdline(proc.pid).startswith(shown) or (names is not None and shown in _cmdline(proc.pid)))
        and time.monotonic() < deadline
    ):  # until bash has exec'd (or python has started)
        time.sleep(0.02)
    return proc


@pytest.fixture
def stand_ins():
    procs: list[subprocess.Popen] = []

    def start(**kw) -> subprocess.Popen:
        procs.append(_stand_in(**kw))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _gone(proc: subprocess.Popen, timeout: float = 10) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_watchdog_kills_its_runtime_and_nothing_else_when_the_driver_lets_go(tmp_path, stand_ins):
    temp = tmp_path / f"{ray_guard.PREFIX}abcdefgh"
    (temp / "session" / "logs").mkdir(parents=True)
    guard = ray_guard.start(str(temp))
    named = stand_ins(names=temp)  # like the GCS: --temp-dir=TEMP
    marked = stand_ins(env_marker=temp)  # a title over everything but the environment
    titled = stand_ins(title="ray::IDLE", holds=temp / "session" / "logs")  # a worker: title, log open
    other_dir = tmp_path / f"{ray_guard.PREFIX}abcdefgh2"
    bystanders = [
        stand_ins(),
        stand_ins(title="ray::IDLE", holds=tmp_path / "elsewhere"),
        stand_ins(names=other_dir),
        stand_ins(holds=temp / "session"),
    ]  # untitled: e.g. `tail -f`
    time.sleep(0.5)
    assert all(p.poll() is None for p in [named, marked, titled, *bystanders])

    guard.release()
    assert all(_gone(p) for p in (named, marked, titled)), "the runtime's processes outlived its watchdog"
    deadline = time.monotonic() + 10
    while temp.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not temp.exists()
    assert all(p.poll() is None for p in bystanders), "the watchdog killed processes not of its runtime"


def test_watchdog_reaps_what_a_killed_watchdog_left(tmp_path, stand_ins):
    def runtime_dir(name: str, age: float) -> Path:
        d = tmp_path / f"{ray_guard.PREFIX}{name}"
        (d / "logs").mkdir(parents=True)
        os.utime(d, (time.time() - age, time.time() - age))
        return d

    left = runtime_dir("leftover", 600)  # its driver and watchdog were killed, an agent lingers
    agent = stand_ins(title="ray::DashboardAgent", holds=left / "logs")
    os.utime(left, (time.time() - 600, time.time() - 600))
    live = runtime_dir("livelive", 600)  # old, but its GCS (or watchdog) is alive
    gcs = stand_ins(names=live)
    fresh = runtime_dir("freshnew", 0)  # just made by a driver about to start its watchdog

    assert ray_guard.stale_dirs(str(tmp_path)) == [str(left)]
    ray_guard.sweep(str(tmp_path))
    assert _gone(agent) and not left.exists()
    assert gcs.poll() is None and live.exists() and fresh.exists()


def test_a_merge_that_fails_while_its_runtime_starts_leaves_nothing_behind(tmp_path):
    """`mergeflow merge` starts the private runtime in the background as it begins
    (workflows/prestart.py); a config that fails in planning ends the command at once, with one
    line, and the watchdog still ends what had started of the runtime and removes its dir."""
    (tmp_path / "base").mkdir()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("base: base\ntasks: [{name: a, checkpoint: base}]\noutput: run\nmethod: {name: ties}\n")
    m = Merge(cfg, tmp_path, early_start=True)
    try:
        lines: dict[int, str] = {}  # command lines as seen: the watchdog may be gone by the end
        while m.proc.poll() is None:
            m.seen |= descendants(m.proc.pid)
            lines |= {p: c for p in m.seen if "ray_guard.py" in (c := _cmdline(p))}
            time.sleep(0.05)
        out = m.output().strip()
        assert m.proc.returncode == 2 and out.startswith("mergeflow: error: base:"), out
        assert len(out.splitlines()) == 1, out
        assert lines, "no watchdog seen: the runtime did not start early"
        argv = next(iter(lines.values())).split()
        temp = Path(argv[[a.endswith("ray_guard.py") for a in argv].index(True) + 1])
        assert temp.name.startswith(ray_guard.PREFIX), argv
        deadline = time.monotonic() + 20
        while (alive(m.seen) or temp.exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(m.seen), f"still running 20 s after the merge failed: {alive(m.seen)}"
        assert not temp.exists(), f"the runtime's temp dir is left: {temp}"
    finally:
        m.cleanup()


WORKER_ENV_CHILD = """
import json, os
from mergeflow.workflows import runtime
runtime.connect(None)
seen = runtime.run_tasks(lambda: {k: os.environ.get(k) for k in runtime.WORKER_ENV}, [()], desc="env", quiet=True)
print(json.dumps({"worker": seen[0], "driver": {k: os.environ.get(k) for k in runtime.WORKER_ENV}}))
runtime.disconnect()
"""


def test_private_runtime_workers_get_one_thread_and_the_driver_keeps_its_environment(tmp_path):
    """The private runtime passes WORKER_ENV through its raylet's environment, not a runtime_env
    (which makes every new worker wait for Ray's agent); the driver's own environment is as before."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env |= {"RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER_ENV_CHILD], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["worker"] == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, seen
    assert seen["driver"] == {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None}, seen
