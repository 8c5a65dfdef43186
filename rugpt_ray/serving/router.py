"""The HTTP ingress: it reads the body's `model` and relays the request to a `RuGPTServer` replica through Serve's
model multiplexing, so requests go where their model is loaded and clients send no header. Standing outside the
replicas, it also sees one die (ray#47219: Serve's proxy would cut the stream silently, or answer a bare 500):
a request that has sent the client nothing yet is sent once more, to another replica, and a stream that has
started ends with an error event and `[DONE]`.

Requests and their streamed chunks go over each replica's gRPC server (Serve's `_by_reference=False`, the default of
its throughput-optimized mode) rather than as Ray actor calls, where each chunk is an object put in the store and
fetched: a replica lost is still a `RayActorError` (`ActorUnavailableError`) here."""
# No `from __future__ import annotations` here: Serve reads `__call__`'s annotations at runtime.

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.serving.direct_ingress import listen_as_the_proxy_does
from rugpt_ray.serving.protocol import ApiError, read_body
from rugpt_ray.serving.streaming import DONE, sse

logger = logging.getLogger("ray.serve")
FORWARDED_SCOPE = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
                   "root_path", "headers", "client", "server")  # what the server's app needs of the router's
ROUTER_MAX_ONGOING = 4096  # the router only relays: the server deployment's limits are the ones that bite
RETRIED_HEADER = "x-rugpt-retried"
"""On a response that a second replica gave after the first one was lost: the first one's error, in short."""


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


def replica_lost(error: RayActorError) -> ApiError:
    """What a client is told when its replica died (or could not be reached) and no retry is left."""
    return ApiError(503, f"the model server replica was lost mid-request ({type(error).__name__}); retry",
                    kind="server_error", code="replica_lost")


def is_event_stream(start: dict[str, Any]) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
               for name, value in start["headers"])


@serve.deployment(name="RuGPTRouter", max_ongoing_requests=ROUTER_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
class RuGPTRouter:
    """The HTTP ingress: sends each request to a `RuGPTServer` replica chosen by the model it names (Serve's
    multiplexed routing) and relays the response as it streams. It reads the body to find the model and
    answers only what the servers cannot: a body over the limit (413), no room in their queues (503), and a
    replica lost before a retry could answer (503, or an error event in a stream)."""

    def __init__(self, server: DeploymentHandle, cfg: ServeConfig):
        # over the replicas' own gRPC servers, not as Ray actor calls that make every streamed chunk an object
        self.server, self.cfg = server.options(stream=True, _by_reference=False), cfg
        listen_as_the_proxy_does()

    async def __call__(self, request: Request) -> Response:
        try:
            body = await read_body(request.stream(), self.cfg.max_body_bytes)
        except ApiError as e:
            return e.response()
        model = requested_model(request, body) or self.cfg.default_model
        scope: dict[str, Any] = {key: request.scope[key] for key in FORWARDED_SCOPE if key in request.scope}
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
        retried: RayActorError | None = None
        while True:
            call = self.server.options(multiplexed_model_id=model).forward.remote(scope, body)
            try:
                # the first try is bounded by the replica's own request timeout; a retry, by what is left of it
                async with asyncio.timeout_at(deadline if retried else None):
                    return await self._answer(call, retried, deadline)
            except BackPressureError:
                return ApiError(503, "overloaded: every model server's queue is full; retry later",
                                kind="server_error", code="overloaded",
                                headers={"Retry-After": str(self.cfg.retry_after_s)}).response()
            except RayActorError as e:  # nothing was sent to the client yet: Serve routes the retry elsewhere
                call.cancel()
                if retried:
                    return replica_lost(e).response()
                logger.warning("model server replica lost before answering (%s): sending the request again", e)
                retried = e
            except TimeoutError:
                call.cancel()
                return self._timed_out().response()

    def _timed_out(self) -> ApiError:
        return ApiError(504, f"request timed out after {self.cfg.request_timeout_s} s (sent again after its "
                             "replica was lost)", kind="timeout_error", code="request_timeout")

    async def _answer(self, call: DeploymentResponseGenerator, retried: RayActorError | None,
                      deadline: float) -> Response:
        """The replica's response: a whole one read to its end before the client sees a byte (so that a replica
        lost meanwhile can still be retried), an event stream relayed as it comes."""
        start = await call.__anext__()
        headers = [tuple(h) for h in start["headers"]]
        if retried:
            headers.append((RETRIED_HEADER.encode(), type(retried).__name__.encode()))
        if is_event_stream(start):
            response: Response = StreamingResponse(self._relay(call, deadline if retried else None),
                                                   status_code=start["status"])
        else:
            response = Response(b"".join([chunk async for chunk in call]), status_code=start["status"])
        response.raw_headers = headers
        return response

    async def _relay(self, call: DeploymentResponseGenerator, deadline: float | None) -> AsyncIterator[bytes]:
        """A stream's chunks (whole events each) until `deadline` (a retried stream's); if its replica is lost,
        an error event and `[DONE]`, so that the client can tell the end from a short answer."""
        try:
            while True:
                async with asyncio.timeout_at(deadline):  # around the wait only: never around a `yield`
                    chunk = await anext(call, None)
                if chunk is None:
                    break
                yield chunk
        except RayActorError as e:
            logger.warning("model server replica lost mid-stream (%s): ending the stream with an error event", e)
            yield (sse(replica_lost(e).body()) + DONE).encode()
        except TimeoutError:
            yield (sse(self._timed_out().body()) + DONE).encode()
        finally:
            call.cancel()  # the client left: the server stops generating
