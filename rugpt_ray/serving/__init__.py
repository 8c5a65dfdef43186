"""Serve ruGPT3 models over HTTP with Ray Serve: our `/generate` API and OpenAI's completions, streamed and batched.

- `rugpt_ray.serving.app:build_app` — the Serve app builder (the `import_path` of serve_configs/*.yaml);
  its `args` are `ServeConfig`'s fields.
- `add_serve_command(subparsers)` — the `rugpt-ray serve` subcommand.
- `rugpt_ray.serving.engine.BatchEngine` — continuous batching over one model, usable without Serve.

This package imports Ray and FastAPI only in `app`, so the CLI stays quick to start.
"""

from rugpt_ray.serving.command import add_serve_command
from rugpt_ray.serving.config import ServeConfig

__all__ = ["ServeConfig", "add_serve_command"]
