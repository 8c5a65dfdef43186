"""Serve ruGPT3 models over HTTP with Ray Serve: our `/generate` API and OpenAI's completions, streamed and batched.

- `rugpt_ray.serving.app:build_app` — the Serve app builder (the `import_path` of serve_configs/*.yaml);
  its `args` are `ServeConfig`'s fields.
- `rugpt_ray.serving.command:cmd_serve` — the `rugpt-ray serve` quick case (flags registered in `rugpt_ray.cli`).
- `rugpt_ray.serving.engine.BatchEngine` — continuous batching over one model, usable without Serve.

Importing the package does not import Ray or FastAPI (only `app` and `command` do).
"""

from rugpt_ray.serving.config import ServeConfig

__all__ = ["ServeConfig"]
