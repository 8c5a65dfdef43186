"""Prometheus metrics of the serving engines, through Ray's own metrics system (`ray.serve.metrics`).

They appear on every node's metrics endpoint (`ray start --metrics-export-port`) beside Serve's, with Ray's
`ray_` prefix (`ray_rugpt_time_to_first_token_seconds_bucket{model="...",...}`), tagged by `model` and by
Serve's deployment, replica and application. Latencies are taken on the engine's worker thread when a decode
step ends: time to first token counts from the request's arrival at the engine (queueing included), inter-token
latency is the time between two steps that gave the request tokens.
"""

from __future__ import annotations

from functools import cache

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@cache
def _metrics() -> dict[str, Counter | Gauge | Histogram]:
    """One set per process (Ray keeps one series per name and tags); models share it through their tag."""
    tags = ("model",)
    return {
        "ttft": Histogram("rugpt_time_to_first_token_seconds", "From a request's arrival to its first token",
                          boundaries=LATENCY_BUCKETS, tag_keys=tags),
        "itl": Histogram("rugpt_inter_token_latency_seconds", "Between two decode steps that gave a request tokens",
                         boundaries=LATENCY_BUCKETS, tag_keys=tags),
        "e2e": Histogram("rugpt_request_latency_seconds", "From a request's arrival to its last token",
                         boundaries=LATENCY_BUCKETS, tag_keys=tags),
        "rows": Histogram("rugpt_decode_step_rows", "Sequences decoded together in one step",
                          boundaries=ROW_BUCKETS, tag_keys=tags),
        "prompt": Counter("rugpt_prompt_tokens", "Prompt tokens of finished requests", tag_keys=tags),
        "generated": Counter("rugpt_generation_tokens", "Tokens generated for finished requests", tag_keys=tags),
        "running": Gauge("rugpt_running_requests", "Requests in the decoding batch", tag_keys=tags),
        "waiting": Gauge("rugpt_waiting_requests", "Requests waiting for free batch rows", tag_keys=tags),
        "loads": Counter("rugpt_model_loads", "Times a served model or adapter was loaded into a replica",
                         tag_keys=tags),
    }


def model_loaded(model: str) -> None:
    """Count one load of a served name (a base or an adapter): more than one per replica means LRU thrash."""
    _metrics()["loads"].inc(1, {"model": model})


class EngineMetrics:
    """What one model's `BatchEngine` reports; each call records one observation under the model's tag."""

    def __init__(self, model: str):
        self.tags = {"model": model}
        self.metrics = _metrics()

    def first_token(self, seconds: float) -> None:
        self.metrics["ttft"].observe(seconds, self.tags)

    def inter_token(self, seconds: float) -> None:
        self.metrics["itl"].observe(seconds, self.tags)

    def finished(self, seconds: float, prompt_tokens: int, generated_tokens: int) -> None:
        self.metrics["e2e"].observe(seconds, self.tags)
        self.metrics["prompt"].inc(prompt_tokens, self.tags)
        if generated_tokens:  # a Ray counter only takes positive increments
            self.metrics["generated"].inc(generated_tokens, self.tags)

    def decode_step(self, rows: int) -> None:
        self.metrics["rows"].observe(rows, self.tags)

    def requests(self, running: int, waiting: int) -> None:
        self.metrics["running"].set(running, self.tags)
        self.metrics["waiting"].set(waiting, self.tags)
