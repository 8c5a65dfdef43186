"""The environment for a command that starts a Ray of its own (`rugpt-ray ...` without a cluster, `ray start`,
`ray.cluster_utils`), as a user's shell has it, and a `ray start` head for commands to join."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from ports import free_port

RAY = str(Path(sys.executable).parent / "ray")


@contextlib.contextmanager
def own_ray_env(**extra: str) -> Iterator[dict[str, str]]:
    """This process's environment plus `extra`, without RAY_ADDRESS, and with RAY_TMPDIR a short folder of its own
    (removed after): Ray puts its sockets there (their paths must fit in 107 bytes) and the pointer to the cluster
    it started (ray/ray_current_cluster), so no other cluster on the machine is joined and no dead pointer is left
    in /tmp/ray."""
    folder = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    (Path(folder) / "ray").mkdir()
    env = {**os.environ, **extra, "RAY_TMPDIR": folder}
    env.pop("RAY_ADDRESS", None)
    try:
        yield env
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Head:
    gcs: str
    """What RAY_ADDRESS takes to join it: `127.0.0.1:PORT`."""
    dashboard: str
    """The Jobs API's address: `http://127.0.0.1:PORT`."""


@contextlib.contextmanager
def ray_start_head(env: dict[str, str], dashboard: bool = True) -> Iterator[Head]:
    """`ray start --head` (2 CPUs) on 127.0.0.1 with ports of its own and `env` (an own_ray_env: its processes and
    workers keep it); `dashboard`: with the dashboard, which serves the Jobs API. Stops only the processes of this
    cluster (those naming its temp dir), never another Ray on the machine as `ray stop` would."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rugpt-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    gcs, dashboard_port = free_port(), free_port()
    command = [RAY, "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--include-dashboard", str(dashboard).lower(), "--dashboard-agent-listen-port", str(free_port()),
               "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard_port}")
    finally:
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes_under(temp_dir: Path) -> None:
    """SIGTERM, then SIGKILL for what still runs 3 s later (the GCS server and one Python process of a head let
    15 s pass and more)."""
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    mine = [p for p in psutil.process_iter(["cmdline"])
            if p.pid not in me and str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for process in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=3)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
