"""A Serve app for a test module, spoken to over HTTP as a client would, on the shared Ray.

Serve itself (its controller and its proxy, on a free loopback port) starts once per test process and stays up
for the next module's app: starting and stopping it took seconds per module. Each module's app is deleted with
the module."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from ports import free_port

from rugpt_ray.serving import ServeConfig

_serve_port: int | None = None


def serve_port() -> int:
    """The port of this process's Serve proxy, started on the first call."""
    global _serve_port
    if _serve_port is None:
        from ray import serve

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _serve_port = port
    return _serve_port


@contextmanager
def app_client(cfg: ServeConfig, name: str, **server_options: Any) -> Iterator[httpx.Client]:
    """`server_options`: Serve deployment options of the model server (see `serve_app`). Its replica reserves one
    CPU unless they say otherwise (not the node's two): another module's app or run may share the test Ray."""
    from ray import serve

    from rugpt_ray.serving.app import serve_app

    port = serve_port()
    actor = {"num_cpus": 1, **server_options.pop("ray_actor_options", {})}
    serve.run(serve_app(cfg, ray_actor_options=actor, **server_options), name=name, route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client
    finally:
        serve.delete(name)
