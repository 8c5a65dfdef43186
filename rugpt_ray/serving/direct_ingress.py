"""Ray Serve's direct ingress, as `rugpt-ray serve` runs it: the app's one ingress replica (the router, or the model
server with `ingress: direct`) listens on the command's port itself, so requests and every streamed chunk skip
Serve's proxy, a process and an actor hop each way (16 streaming clients on 2 cores got 10-16 % more tokens/s
through the router, 20-31 % with `ingress: direct`: README, Performance). Ray still starts its proxy, on another
free port, as a fallback no one is told of.
"""

from __future__ import annotations

import functools
import os
import socket

from rugpt_ray.errors import UserError

ENABLED_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


def local_ray_env(port: int) -> dict[str, str]:
    """The environment of a local Ray whose one ingress replica listens on `port`. The command drains the replica
    itself before deleting the app, so Ray's hold of a stopping replica (for a load balancer to notice it, 30 s) is
    dropped, and so is the quarantine of its port: a replica Serve restarts after a crash takes the port at once."""
    return {ENABLED_ENV: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0", "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def bindable_port(host: str, port: int) -> int:
    """`port` on `host` if it can be listened on now (0: a free one), checked before Ray starts, with the options the
    replica's socket will have (`listen_as_the_proxy_does`, less SO_REUSEPORT, which would share a port in use);
    else a UserError."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"serve: cannot listen on {host}:{port}: {e.strerror}") from None
        return s.getsockname()[1]


def listen_as_the_proxy_does() -> None:
    """In an ingress replica's process, before Serve starts its HTTP server: bind that server's socket with the
    options Serve binds its proxy's with (SO_REUSEADDR, SO_REUSEPORT). Ray binds a direct-ingress replica's socket
    without them, so a server restarted on the same port within a minute of a stop that closed kept-alive
    connections (every pooled client's) would be refused while the kernel holds those in TIME_WAIT."""
    if os.environ.get(ENABLED_ENV) != "1":
        return
    from ray.serve._private import replica

    start = replica.start_asgi_http_server
    if getattr(start, "reuses_address", False):
        return

    @functools.wraps(start)
    async def start_reusing_address(*args, **kwargs):
        return await start(*args, **{**kwargs, "enable_so_reuseport": True})

    start_reusing_address.reuses_address = True
    replica.start_asgi_http_server = start_reusing_address
