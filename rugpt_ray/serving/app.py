"""The Serve app builders: `build_app` is the `import_path` of serve_configs/*.yaml; `serve_app` builds the same app
in Python with deployment options.

The app is two deployments, `RuGPTRouter` (router.py) in front of `RuGPTServer` (server.py), even for one served
name: from outside the replicas the router sees one die, and retries or ends the stream with an error event, where
Serve's proxy would cut it silently (ray#47219). That costs an actor hop per request and streamed chunk, which
`ingress: direct` saves by making the server its own ingress.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.serve import Application

from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.serving.router import RuGPTRouter
from rugpt_ray.serving.server import RuGPTServer


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """Serve app builder: `import_path: rugpt_ray.serving.app:build_app`, `args:` = `ServeConfig`'s fields."""
    return serve_app(args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args))


def serve_app(cfg: ServeConfig, **server_options: Any) -> Application:
    """The router in front of the model servers, or the model server alone (`ingress: direct`). Model paths are
    resolved here (env vars, globs), so every replica loads the same checkpoint. `server_options` are Serve
    deployment options of `RuGPTServer`, as a Serve config's `deployments:` entry for it sets them, for apps built
    in Python; its replicas reserve `node_cpus()` unless their `ray_actor_options` name `num_cpus`."""
    cfg = cfg.resolved()
    actor = {"num_cpus": node_cpus(), **server_options.pop("ray_actor_options", {})}
    server = RuGPTServer.options(**{"max_ongoing_requests": cfg.max_ongoing_requests,
                                    "max_queued_requests": cfg.max_queued_requests,
                                    "backpressure_config": {"retry_after_s": cfg.retry_after_s},
                                    "ray_actor_options": actor, **server_options}).bind(cfg)
    return server if cfg.ingress == "direct" else RuGPTRouter.bind(server, cfg)


def node_cpus() -> float:
    """What a model server replica reserves unless its `ray_actor_options` say otherwise: every CPU of the largest
    node of the Ray cluster this process is connected to, or of this machine when it is not connected yet (the
    local Ray that `rugpt-ray serve` starts gets them all). The replica decodes on as many torch threads."""
    if ray.is_initialized():
        return max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    return len(os.sched_getaffinity(0))
