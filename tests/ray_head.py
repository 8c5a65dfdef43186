"""`ray start --head` for a test: a cluster of its own on 127.0.0.1, stopped by its temp dir, never by `ray stop`."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
from ports import free_port

RAY = str(Path(sys.executable).parent / "ray")


@contextlib.contextmanager
def ray_start_head(env: dict[str, str]) -> Iterator[str]:
    """`ray start --head` on 127.0.0.1 with ports of its own, started with `env` (its workers' environment); yields
    the Jobs API address. It writes its address to RAY_TMPDIR/ray/ray_current_cluster, where `rugpt_ray.ray_start`
    finds it. Stops only the processes of this cluster (those naming its temp dir), never another Ray on the
    machine as `ray stop` would."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rugpt-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    dashboard = free_port()
    command = [RAY, "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
               "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
               "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes_under(temp_dir: Path) -> None:
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    mine = [p for p in psutil.process_iter(["cmdline"])
            if p.pid not in me and str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for process in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
