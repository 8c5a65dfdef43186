"""The environment for a command that starts a Ray of its own (`rugpt-ray ...` without a cluster, `ray start`,
`ray.cluster_utils`), as a user's shell has it."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
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
