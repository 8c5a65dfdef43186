"""`rugpt-ray serve`: the quick case — a local Ray, Serve on 127.0.0.1, blocking until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

import ray
from ray import serve

from rugpt_ray.errors import UserError
from rugpt_ray.ray_start import start_ray
from rugpt_ray.serving.app import build_app
from rugpt_ray.serving.config import ServeConfig

APP_NAME = "rugpt"
SERVER_DEPLOYMENT = "RuGPTServer"


def parse_named(flag: str, values: list[str], taken: dict[str, str] | None = None) -> dict[str, str]:
    """`NAME=PATH` entries, or a bare PATH named after its last path component (a hub id's model part); a name
    may be used once, here or in `taken`."""
    named, taken = {}, taken or {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name, value
        if not name or not path:
            raise UserError(f"{flag} {value!r}: expected PATH or NAME=PATH")
        if name in named or name in taken:
            raise UserError(f"{flag} {value!r}: the name {name!r} is already used by "
                            f"{named.get(name) or taken[name]!r}")
        named[name] = path
    return named


def drain(grace_s: float) -> None:
    """Stop taking requests (503), then wait for those in flight, at most `grace_s`; says how many there are. The
    command's app has one server replica, which counts every request (the router's too)."""
    server = serve.get_deployment_handle(SERVER_DEPLOYMENT, APP_NAME)
    left, deadline = server.drain.remote().result(), time.monotonic() + grace_s
    print(f"stopping: new requests get 503; {left} in flight get up to {grace_s:g} s to finish", flush=True)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = server.in_flight.remote().result()
    print(f"stopped{f' ({left} in flight cut)' if left else ''}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """`rugpt-ray serve`: the flags are ServeConfig's fields (`--request-timeout` is request_timeout_s)."""
    models = parse_named("--model", args.model)
    adapters = {name: {"path": path} for name, path in parse_named("--adapter", args.adapter, models).items()}
    cfg = ServeConfig.from_dict(dict(
        models=models, adapters=adapters, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
        max_batch_size=args.max_batch_size, max_new_tokens=args.max_new_tokens,
        request_timeout_s=args.request_timeout, api_key_env=args.api_key_env,
        shutdown_grace_s=args.shutdown_grace), where="serve")
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise UserError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set")
    app = build_app(cfg)  # resolves and checks the model paths before Ray starts
    stop = threading.Event()
    start_ray(private=True, log_to_driver=False, dashboard=False)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"serving {', '.join([*cfg.models, *cfg.adapters])} on http://{args.host}:{args.port} "
              f"(POST /generate, /v1/completions, /v1/chat/completions, /tokenize, /detokenize; GET /v1/models, "
              f"/tokenizer_info, /stats, /healthz); Ctrl-C or SIGTERM stops", flush=True)
        while not stop.wait(0.5):
            pass
        drain(cfg.shutdown_grace_s)
        serve.delete(APP_NAME)  # Serve stops the replicas after their last bytes are relayed; the proxy stays up
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
