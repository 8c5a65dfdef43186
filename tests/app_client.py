"""A Serve app for a test module: started on a free loopback port of the shared Ray, spoken to over HTTP as a
client would, and shut down with the module."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from ports import free_port

from rugpt_ray.serving import ServeConfig


@contextmanager
def app_client(cfg: ServeConfig, name: str, **server_options: Any) -> Iterator[httpx.Client]:
    """`server_options`: Serve deployment options of the model server (see `serve_app`)."""
    from ray import serve

    from rugpt_ray.serving.app import serve_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serve_app(cfg, **server_options), name=name, route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client
    finally:
        serve.shutdown()
