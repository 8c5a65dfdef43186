"""The playground: a web page beside the API (`/`, `/playground`) for trying the served models in a browser.

The page is three static files in `static/` (HTML, CSS and plain JavaScript: no build step, no CDN, so it works
offline). It speaks the public API as any client does (`/v1/models`, `/v1/completions`, `/v1/chat/completions`)
with the key its user gives, so it needs no access of its own: the files are open, every call behind them is
authorized as the API's are. `/playground/settings` tells it the server's sampling defaults and limits.

The routes are methods of `PlaygroundRoutes`, a base of `RuGPTServer`: Serve's class-based view runs them with the
server as `self`, so the settings read the server's config and are authorized by the server's own check.
"""
# No `from __future__ import annotations` here: FastAPI reads the route annotations at runtime.

from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.serving.protocol import ApiError, CompletionRequest

router = APIRouter(include_in_schema=False)

ASSETS = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8"}
"""Every file the page is made of, and its media type: nothing else under static/ is served."""
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
"""The page runs only its own files and talks only to this server."""
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "n")
"""The settings the page offers, by their `/v1/completions` names."""


@cache
def asset(name: str) -> bytes:
    return (files("rugpt_ray.serving") / "static" / name).read_bytes()


def field_settings(schema: type[BaseModel], name: str) -> dict[str, Any]:
    """A request field's default and range, as the request schema checks them (`{"default", "ge", "le", ...}`)."""
    field = schema.model_fields[name]
    bounds = {key: getattr(rule, key) for rule in field.metadata for key in ("ge", "gt", "le", "lt")
              if getattr(rule, key, None) is not None}
    return {"default": field.get_default(), **bounds}


def page_settings(cfg: ServeConfig) -> dict[str, Any]:
    """What the page's controls start at and may reach: the request schema's defaults and ranges, narrowed by the
    server's limits (`max_new_tokens`, `max_n`), and the alternatives per token it may ask for."""
    settings = {name: field_settings(CompletionRequest, name) for name in SAMPLING_FIELDS}
    settings["max_tokens"]["le"] = cfg.max_new_tokens
    settings["n"]["le"] = cfg.max_n
    return {"sampling": settings, "max_top_logprobs": cfg.max_top_logprobs, "max_prompt_tokens": cfg.max_prompt_tokens,
            "max_stop_strings": cfg.max_stop_strings}


def asset_response(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"{name!r} is not a file of the playground", kind="not_found_error")
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)


class PlaygroundRoutes:
    """The playground's routes, for `RuGPTServer` to inherit: `cfg` is its config, `_authorize` its key check."""

    cfg: ServeConfig

    def _authorize(self, request: Request) -> None:
        raise NotImplementedError

    @router.get("/")
    @router.get("/playground")
    async def playground_page(self) -> Response:
        return asset_response("index.html")

    @router.get("/playground/static/{name}")
    async def playground_asset(self, name: str) -> Response:
        return asset_response(name)

    @router.get("/playground/settings")
    async def playground_settings(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return page_settings(self.cfg)
