"""The HTTP ingress of a multi-model app: it reads the body's `model` and relays the request to a `RuGPTServer`
replica through Serve's model multiplexing, so requests go where their model is loaded and clients send no header."""
# No `from __future__ import annotations` here: Serve reads `__call__`'s annotations at runtime.

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.serving.protocol import ApiError, read_body
from rugpt_ray.serving.server import error_response

FORWARDED_SCOPE = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
                   "root_path", "headers", "client", "server")  # what the server's app needs of the router's
ROUTER_MAX_ONGOING = 4096  # the router only relays: the server deployment's limits are the ones that bite


def requested_model(request: Request, body: bytes) -> str | None:
    """The `model` a request names: its JSON body's field, or `?model=` of a GET."""
    if request.method == "GET":
        return request.query_params.get("model")
    try:
        fields = json.loads(body)
    except ValueError:
        return None  # the server answers 400 for it
    model = fields.get("model") if isinstance(fields, dict) else None
    return model if isinstance(model, str) else None


@serve.deployment(name="RuGPTRouter", max_ongoing_requests=ROUTER_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
class RuGPTRouter:
    """The HTTP ingress: sends each request to a `RuGPTServer` replica chosen by the model it names (Serve's
    multiplexed routing) and relays the response as it streams. It reads the body to find the model and
    answers only what the servers cannot: a body over the limit (413) and no room in their queues (503)."""

    def __init__(self, server: DeploymentHandle, cfg: ServeConfig):
        self.server, self.cfg = server.options(stream=True), cfg

    async def __call__(self, request: Request) -> Response:
        try:
            body = await read_body(request.stream(), self.cfg.max_body_bytes)
        except ApiError as e:
            return error_response(e)
        model = requested_model(request, body) or self.cfg.default_model
        scope: dict[str, Any] = {key: request.scope[key] for key in FORWARDED_SCOPE if key in request.scope}
        call = self.server.options(multiplexed_model_id=model).forward.remote(scope, body)
        try:
            start = await call.__anext__()
        except BackPressureError:
            return error_response(ApiError(503, "overloaded: every model server's queue is full; retry later",
                                           kind="server_error", code="overloaded"))

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in call:
                    yield chunk
            finally:
                call.cancel()  # the client left: the server stops generating

        response = StreamingResponse(rest(), status_code=start["status"])
        response.raw_headers = [tuple(h) for h in start["headers"]]
        return response
