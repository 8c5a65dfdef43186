"""Ray start-up never hangs: a stale `ray start` pointer is reported and passed over."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_dead_heads_pointer_falls_back_to_a_local_ray_within_30_s():
    # Ray's socket paths must fit in 107 bytes: a short temp dir, as Ray's own would be
    with tempfile.TemporaryDirectory(prefix="rugpt-ray-", dir="/tmp") as tmp:
        pointer = Path(tmp) / "ray" / "ray_current_cluster"
        pointer.parent.mkdir()
        pointer.write_text("127.0.0.1:9")  # what a killed `ray start --head` leaves: nobody listens there now
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        code = ("import ray; from rugpt_ray.ray_start import start_ray; start_ray(log_to_driver=False); "
                "print('CPUS', ray.cluster_resources()['CPU']); ray.shutdown()")
        out = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_TMPDIR": tmp}, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPUS " in out.stdout  # a Ray of its own, started instead of waiting for the dead one
    warning = [line for line in out.stderr.splitlines() if line.startswith("rugpt-ray:")]
    assert len(warning) == 1 and "'127.0.0.1:9'" in warning[0] and "does not answer" in warning[0]
    assert "Run `ray stop` to clear the pointer, or set RAY_ADDRESS" in warning[0]


def test_a_live_pointer_is_taken(tmp_path, monkeypatch):
    import socket

    from rugpt_ray.ray_start import live_local_head

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
        assert live_local_head() == address
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    assert live_local_head() is None  # no `ray start` on this machine: start our own, silently
