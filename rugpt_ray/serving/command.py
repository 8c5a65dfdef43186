"""`rugpt-ray serve`: the quick case — a local Ray, Serve on 127.0.0.1, blocking until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from pydantic import ValidationError

from rugpt_ray.errors import UserError
from rugpt_ray.serving.config import ServeConfig

APP_NAME = "rugpt"


def parse_models(values: list[str]) -> dict[str, str]:
    """`NAME=PATH` entries, or a bare PATH named after its last path component (a hub id's model part)."""
    models: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value.rstrip("/")).name, value
        if not name or not path:
            raise UserError(f"--model {value!r}: expected PATH or NAME=PATH")
        if name in models:
            raise UserError(f"--model {value!r}: the name {name!r} is already used by {models[name]!r}")
        models[name] = path
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from rugpt_ray.serving.app import build_app

    try:
        cfg = ServeConfig(models=parse_models(args.model), tokenizer=args.tokenizer, device=args.device,
                          dtype=args.dtype, max_batch_size=args.max_batch_size, max_new_tokens=args.max_new_tokens,
                          request_timeout_s=args.request_timeout, api_key_env=args.api_key_env)
    except ValidationError as e:
        raise UserError(f"serve: {e}") from None
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise UserError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set")
    app = build_app(cfg)  # resolves and checks the model paths before Ray starts
    stop = threading.Event()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"serving {', '.join(cfg.models)} on http://{args.host}:{args.port} "
              f"(POST /generate, /v1/completions; GET /v1/models, /healthz); Ctrl-C or SIGTERM stops", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the CLI's subparsers; its `func` returns the exit code."""
    p = subparsers.add_parser("serve", help="serve models over HTTP with Ray Serve (blocks until interrupted)")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="checkpoint folder/file or hub id, optionally named (repeat for several; the first is "
                        "the default)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", metavar="VAR",
                   help="environment variable holding an API key; requests then need 'Authorization: Bearer <key>'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together per model")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens one request may ask for")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="stop a generation after this long (504, or an error event when streaming)")
    p.set_defaults(func=cmd_serve)
    return p
