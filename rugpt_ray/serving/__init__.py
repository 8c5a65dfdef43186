"""Serve ruGPT3 models over HTTP with Ray Serve: our `/generate` API and OpenAI's completions and chat completions,
streamed and batched.

- `rugpt_ray.serving.app:build_app` — the Serve app builder (the `import_path` of serve_configs/*.yaml);
  its `args` are `ServeConfig`'s fields.
- `rugpt_ray.serving.command:cmd_serve` — the `rugpt-ray serve` quick case (flags registered in `rugpt_ray.cli`).
- `rugpt_ray.serving.engine.BatchEngine` — continuous batching over one model, usable without Serve.

Inside, as vLLM's entrypoints split them: `protocol` (requests and errors), `completions` and `chat_completions`
(response shapes), `streaming`, `server` (the deployment and its routes), `router`, `app` (the builders).
Importing the package does not import Ray or FastAPI (only `server`, `router`, `app` and `command` do).
"""

from rugpt_ray.serving.config import ServeConfig

__all__ = ["ServeConfig"]
