"""Connecting to Ray, the one way every command does it: train, tune, prepare-data and serve.

Ray's own `ray.init()` follows the pointer file the last `ray start` left in Ray's temp dir, and waits for that
cluster's GCS with no end in sight when the head was killed instead of stopped. Here the pointer is checked first
(a TCP connect, a few seconds at most) and a dead one is reported and passed over.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator

PROBE_TIMEOUT_S = 3.0
"""How long a local `ray start` head may take to accept a connection before it counts as gone."""


def start_ray(*, log_to_driver: bool = True, private: bool = False, dashboard: bool = True) -> None:
    """Connect to RAY_ADDRESS's cluster if it is set, else to a live local `ray start` head, else start a Ray of
    our own on 127.0.0.1 (not on every interface). `private`: always our own (the `serve` quick case).
    `dashboard`: a Ray of our own serves the State API, which Ray Train's placement-group cleaner polls (without
    it, it logs a failure every few seconds); data preparation and serving need none.
    Does nothing when this process is connected already."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") and not private:
        ray.init(log_to_driver=log_to_driver)
        return
    head = None if private else live_local_head()
    if head:
        ray.init(address=head, log_to_driver=log_to_driver)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=None if dashboard else False,
                 log_to_driver=log_to_driver)


def live_local_head() -> str | None:
    """The GCS address of the last `ray start` on this machine if it still answers; a stale pointer is reported on
    stderr (with what to do) and None returned, so the caller starts its own Ray instead of hanging."""
    from ray._common.utils import get_ray_address_file  # where `ray start` writes the pointer (Ray 2.60)

    pointer = get_ray_address_file(None)
    try:
        with open(pointer, encoding="utf-8") as f:
            address = f.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            return address
    except (OSError, ValueError):
        print(f"rugpt-ray: the Ray cluster {address!r} named in {pointer} does not answer (a head killed without "
              "`ray stop`?); starting a local Ray instead. Run `ray stop` to clear the pointer, or set RAY_ADDRESS "
              "to the cluster you mean.", file=sys.stderr, flush=True)
        return None


@contextlib.contextmanager
def ray_connection() -> Iterator[None]:
    """For a command's work: leaves Ray afterwards if the work connected to it (a caller's own connection stays).
    Ray forwards workers' log lines asynchronously; a late one would otherwise land after the command's last
    line (the run or sweep folder, which scripts read)."""
    import ray

    connected_before = ray.is_initialized()
    try:
        yield
    finally:
        if not connected_before:
            ray.shutdown()
