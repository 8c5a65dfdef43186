"""`rugpt-ray serve`: a local Ray and Serve (on 127.0.0.1 unless told otherwise) from flags (the quick case) or from
a Serve config file, blocking until SIGINT/SIGTERM, which let the requests in flight finish. The app's ingress
replica listens on the port itself (direct_ingress.py)."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve

from rugpt_ray.errors import UserError
from rugpt_ray.ray_start import start_ray
from rugpt_ray.serving.app import serve_app
from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.serving.direct_ingress import bindable_port, local_ray_env

APP_NAME = "rugpt"
SERVER_DEPLOYMENT = "RuGPTServer"
BUILDER = "rugpt_ray.serving.app:build_app"  # the import_path of this package's app in a Serve config


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


def drain(grace_s: float, app_name: str) -> None:
    """Stop taking requests (503), then wait for those in flight, at most `grace_s`; says how many there are. The
    command's app has one server replica, which counts every request (the router's too)."""
    server = serve.get_deployment_handle(SERVER_DEPLOYMENT, app_name)
    left, deadline = server.drain.remote().result(), time.monotonic() + grace_s
    print(f"stopping: new requests get 503; {left} in flight get up to {grace_s:g} s to finish", flush=True)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = server.in_flight.remote().result()
    print(f"stopped{f' ({left} in flight cut)' if left else ''}", flush=True)


@dataclass
class ServeRun:
    """What the command serves: the app's settings, RuGPTServer's deployment options, where it listens."""
    cfg: ServeConfig
    host: str
    port: int
    server_options: dict[str, Any] = field(default_factory=dict)
    app_name: str = APP_NAME
    route_prefix: str = "/"


def run_from_flags(args: argparse.Namespace) -> ServeRun:
    """The quick case: the flags are ServeConfig's fields (`--request-timeout` is request_timeout_s), and
    `--num-cpus` the server replica's reservation (default: `node_cpus()`)."""
    if not args.model or not args.tokenizer:
        raise UserError("serve: give --model and --tokenizer, or --config FILE")
    if args.num_cpus is not None and args.num_cpus <= 0:
        raise UserError(f"serve: --num-cpus {args.num_cpus:g}: must be positive")
    models = parse_named("--model", args.model)
    adapters = {name: {"path": path} for name, path in parse_named("--adapter", args.adapter, models).items()}
    cfg = ServeConfig.from_dict(dict(
        models=models, adapters=adapters, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
        max_batch_size=args.max_batch_size, max_new_tokens=args.max_new_tokens,
        request_timeout_s=args.request_timeout, api_key_env=args.api_key_env,
        shutdown_grace_s=args.shutdown_grace, ingress=args.ingress), where="serve")
    options = {} if args.num_cpus is None else {"ray_actor_options": {"num_cpus": args.num_cpus}}
    return ServeRun(cfg, args.host or "127.0.0.1", args.port or 8000, options)


def run_from_file(path: str, args: argparse.Namespace) -> ServeRun:
    """A Serve config file of this package's app (serve_configs/local.yaml's form), as `serve run FILE` would
    deploy it, with one server replica: this command then stops it gracefully, which Ray's `serve run` does not.
    `--host`/`--port` override its http_options; the other flags belong to the quick case."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    where = f"--config {path}"
    if args.model or args.adapter or args.tokenizer:
        raise UserError(f"{where}: the models and the tokenizer come from the file; drop --model, --adapter and "
                        "--tokenizer")
    if args.num_cpus is not None:
        raise UserError(f"{where}: the server's CPUs come from the file (its RuGPTServer entry's "
                        "ray_actor_options.num_cpus; none: every CPU); drop --num-cpus")
    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{where}: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"{where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if len(schema.applications) != 1 or schema.applications[0].import_path != BUILDER:
        raise UserError(f"{where}: expected one application with import_path {BUILDER}")
    app = schema.applications[0]
    options: dict[str, Any] = {}
    for deployment in app.deployments:
        if deployment.name != SERVER_DEPLOYMENT:
            raise UserError(f"{where}: deployments: only {SERVER_DEPLOYMENT}'s options can be set, not "
                            f"{deployment.name}'s")
        options = deployment.model_dump(exclude_unset=True, exclude={"name"})
    if options.get("num_replicas", 1) != 1 or "autoscaling_config" in options:
        raise UserError(f"{where}: {SERVER_DEPLOYMENT} runs one replica here (num_replicas 1, no "
                        f"autoscaling_config); a config with more is for a cluster: serve deploy {path}")
    cfg = ServeConfig.from_dict(app.args, where=f"{where} applications[0].args")
    return ServeRun(cfg, args.host or schema.http_options.host, args.port or schema.http_options.port, options,
                    app.name, app.route_prefix or "/")


def cmd_serve(args: argparse.Namespace) -> int:
    """`rugpt-ray serve`: a local Ray and Serve until SIGINT or SIGTERM, which drain the requests in flight."""
    run = run_from_file(args.config, args) if args.config else run_from_flags(args)
    cfg = run.cfg
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise UserError(f"api_key_env {cfg.api_key_env}: that environment variable is not set")
    app = serve_app(cfg, **run.server_options)  # resolves and checks the model paths before Ray starts
    port, fallback_port = bindable_port(run.host, run.port), bindable_port(run.host, 0)
    stop = threading.Event()
    os.environ.update(local_ray_env(port))  # read by the Ray processes this process starts
    start_ray(private=True, log_to_driver=False, dashboard=False)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": run.host, "port": fallback_port})
        serve.run(app, name=run.app_name, route_prefix=run.route_prefix)
        print(f"serving {', '.join([*cfg.models, *cfg.adapters])} on http://{run.host}:{run.port} "
              f"(POST /generate, /v1/completions, /v1/chat/completions, /tokenize, /detokenize; GET /v1/models, "
              f"/tokenizer_info, /stats, /healthz); Ctrl-C or SIGTERM stops", flush=True)
        while not stop.wait(0.5):
            pass
        drain(cfg.shutdown_grace_s, run.app_name)
        serve.delete(run.app_name)  # Serve stops the replicas once their requests have ended
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
