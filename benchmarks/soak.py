"""Soak run of the Serve app on 127.0.0.1: a fixed number of closed-loop clients for N minutes, half of them
streaming, against a freshly initialised `tiny` model; with `--kill-every`, a chaos run as well.

Every minute it prints the requests done, the failures, latency p50/p99 and the RSS of each model server replica
(and of the router). A leak shows as an RSS slope after the warm-up: the slope (MB per minute, least squares over
the minutes after `--warmup-minutes`) is printed per replica at the end.

Every request's outcome is counted: completed; retried (answered by a second replica after the first was lost:
the router's `x-rugpt-retried` header); error-ended (a stream that ended with an `{"error": ...}` event and
`[DONE]`); failed (an HTTP error status); silent cut (a stream that stopped without `[DONE]`, or a connection
closed mid-response); hang (no answer within the request timeout plus `HANG_MARGIN_S`). With `--kill-every S`
one model server replica actor is killed (`ray.kill`, as Ray's own chaos test does) every S seconds, in turn,
whenever all `--replicas` are running: these counts are the README's chaos row, and the RSS figures then
follow the replacement replicas.

    python benchmarks/soak.py [--minutes 10] [--clients 8] [--replicas 1] [--max-tokens 32]
                              [--kill-every SECONDS] [--warmup-minutes 1] [--out result.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from serve_load import free_port  # benchmarks/ is on sys.path when a script there runs

from rugpt_ray.config import data_root
from rugpt_ray.serving.router import RETRIED_HEADER

APP = "soak"
SERVER = "RuGPTServer"
PROMPTS = ["Александр Сергеевич Пушкин родился в", "Москва — столица", "Однажды весною, в час небывало жаркого",
           "Искусственный интеллект"]
OUTCOMES = ("completed", "retried", "error_ended", "failed", "silent_cut", "hang")
HANG_MARGIN_S = 30.0
"""Beyond the app's request timeout: the proxy's and the router's own time on a loaded machine."""


# ----------------------------------------------------------------------------------------- one request's outcome

async def request_outcome(client: httpx.AsyncClient, body: dict[str, Any], hang_after_s: float) -> str:
    """One `/v1/completions` request and what became of it (one of `OUTCOMES`)."""
    try:
        async with asyncio.timeout(hang_after_s):
            return await (_streamed(client, body) if body.get("stream") else _whole(client, body))
    except TimeoutError:
        return "hang"
    except httpx.TransportError:  # the connection closed mid-response: nothing told the client why
        return "silent_cut"


async def _whole(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        return "failed"
    return "retried" if RETRIED_HEADER in r.headers else "completed"


async def _streamed(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return "failed"
        events = [line[len("data: "):] async for line in r.aiter_lines() if line.startswith("data: ")]
        retried = RETRIED_HEADER in r.headers
    if not events or events[-1] != "[DONE]":
        return "silent_cut"
    if any("error" in json.loads(event) for event in events[:-1]):
        return "error_ended"
    return "retried" if retried else "completed"


# ----------------------------------------------------------------------------------------- the replicas

def replica_actors(app: str) -> list[str]:
    """Names of the live model server replica actors of `app` (namespace "serve"), sorted."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{SERVER}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


def running_replicas(app: str) -> int:
    """Model server replicas of `app` that Serve reports RUNNING."""
    from ray import serve

    status = serve.status().applications.get(app)
    deployment = status.deployments.get(SERVER) if status else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def kill_replica(name: str) -> None:
    """Kill a replica actor as a crash would: Serve's controller notices and starts a replacement."""
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def serve_processes_rss_mb(app: str) -> dict[str, float]:
    """RSS (MB) of this machine's Serve processes of `app` by process title and pid (Ray titles a replica's worker
    `ray::ServeReplica:<app>:<deployment>`)."""
    import psutil

    prefix, rss = f"ray::ServeReplica:{app}:", {}
    for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith(prefix) and p.info["memory_info"] is not None:
            deployment = title[len(prefix):].split(".")[0].split()[0]  # then the method it runs, if any
            rss[f"{deployment}[{p.info['pid']}]"] = p.info["memory_info"].rss / 2**20
    return rss


# ----------------------------------------------------------------------------------------- the run

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (minute, MB) points; None with fewer than two."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


async def soak(url: str, args: argparse.Namespace, hang_after_s: float) -> dict[str, Any]:
    """The clients for `args.minutes`, a report every minute, and the kills when asked for."""
    done: list[tuple[float, str, float]] = []  # (end, outcome, latency) of every request
    start = time.monotonic()
    end = start + 60 * args.minutes
    kills: list[str] = []

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while time.monotonic() < end:
            body = {"prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": args.max_tokens, "ignore_eos": True,
                    "temperature": 1.0, "seed": n, "stream": i % 2 == 0}
            began = time.monotonic()
            outcome = await request_outcome(client, body, hang_after_s)
            done.append((time.monotonic(), outcome, time.monotonic() - began))
            n += 1

    async def chaos() -> None:
        while time.monotonic() + args.kill_every < end:
            await asyncio.sleep(args.kill_every)
            names = await asyncio.to_thread(replica_actors, APP)
            if len(names) == args.replicas and await asyncio.to_thread(running_replicas, APP) == args.replicas:
                victim = names[len(kills) % len(names)]
                await asyncio.to_thread(kill_replica, victim)
                kills.append(victim)

    minutes: list[dict[str, Any]] = []

    async def report() -> None:
        for minute in range(1, args.minutes + 1):
            await asyncio.sleep(max(0.0, start + 60 * minute - time.monotonic()))
            rows = [(outcome, latency) for t, outcome, latency in done
                    if start + 60 * (minute - 1) <= t < start + 60 * minute]
            latencies = [latency for _, latency in rows]
            row = {"minute": minute, "requests": len(rows),
                   "failures": sum(outcome not in ("completed", "retried") for outcome, _ in rows),
                   "latency_p50_ms": 1000 * percentile(latencies, 0.5) if latencies else None,
                   "latency_p99_ms": 1000 * percentile(latencies, 0.99) if latencies else None,
                   "rss_mb": await asyncio.to_thread(serve_processes_rss_mb, APP)}
            minutes.append(row)
            print(f"minute {minute}: {row['requests']} requests, {row['failures']} failures, p50 "
                  f"{row['latency_p50_ms'] or 0:.0f} ms, p99 {row['latency_p99_ms'] or 0:.0f} ms, RSS MB "
                  + ", ".join(f"{k} {v:.0f}" for k, v in row["rss_mb"].items()), flush=True)

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        tasks = [asyncio.create_task(client_loop(client, i)) for i in range(args.clients)]
        tasks.append(asyncio.create_task(report()))
        if args.kill_every:
            tasks.append(asyncio.create_task(chaos()))
        await asyncio.gather(*tasks)
    outcomes = Counter(outcome for _, outcome, _ in done)
    slopes = {}
    for process in {k for m in minutes for k in m["rss_mb"]}:
        points = [(m["minute"], m["rss_mb"][process]) for m in minutes
                  if m["minute"] > args.warmup_minutes and process in m["rss_mb"]]
        slopes[process] = slope_per_minute(points)
    return {"minutes": minutes, "outcomes": {k: outcomes.get(k, 0) for k in OUTCOMES}, "kills": len(kills),
            "rss_slope_mb_per_minute": slopes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10, choices=range(1, 1441), metavar="1..1440")
    parser.add_argument("--clients", type=int, default=8, choices=range(1, 129), metavar="1..128")
    parser.add_argument("--replicas", type=int, default=1, choices=range(1, 9), metavar="1..8")
    parser.add_argument("--max-tokens", type=int, default=32, choices=range(1, 1025), metavar="1..1024")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="the app's request_timeout_s")
    parser.add_argument("--kill-every", type=float, default=0.0,
                        help="kill a model server replica every this many seconds (0: never; needs --replicas 2+)")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="minutes left out of the RSS slope")
    parser.add_argument("--tokenizer", default=str(data_root() / "tokenizer"))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.kill_every and (args.kill_every < 1 or args.replicas < 2):
        parser.error("--kill-every must be at least 1 s, with --replicas 2 or more (a retry needs another replica)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import torch
    from ray import serve

    from rugpt_ray.checkpoints import save_native
    from rugpt_ray.config import preset
    from rugpt_ray.model import GPT
    from rugpt_ray.serving import ServeConfig
    from rugpt_ray.serving.app import serve_app

    torch.manual_seed(0)
    model_dir = save_native(GPT(preset("tiny")), Path(tempfile.mkdtemp(prefix="soak-")) / "tiny")
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(models={"tiny": str(model_dir)}, tokenizer=args.tokenizer, max_ongoing_requests=64,
                      max_queued_requests=-1, request_timeout_s=args.request_timeout, stream_interval_s=0.05)
    cpus = min(1.0, os.cpu_count() / (args.replicas + 1))  # room for a replacement while a killed one goes
    serve.run(serve_app(cfg, num_replicas=args.replicas, health_check_period_s=1,
                        ray_actor_options={"num_cpus": cpus}), name=APP, route_prefix="/")
    with open("/proc/loadavg") as f:
        load_before = float(f.read().split()[0])
    results = asyncio.run(soak(f"http://127.0.0.1:{port}", args, args.request_timeout + HANG_MARGIN_S))
    with open("/proc/loadavg") as f:
        results["load_average_before_after"] = [load_before, float(f.read().split()[0])]
    results.update(clients=args.clients, replicas=args.replicas, max_tokens=args.max_tokens,
                   kill_every_s=args.kill_every, cores=os.cpu_count())
    serve.shutdown()
    ray.shutdown()

    print(f"\n{args.clients} clients (half streaming), {args.replicas} replica(s), {args.minutes} min, "
          f"load average {results['load_average_before_after']}; {results['kills']} replicas killed")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in results["outcomes"].items()))
    for process, slope in sorted(results["rss_slope_mb_per_minute"].items()):
        print(f"RSS slope after warm-up, {process}: " + ("n/a (too few minutes)" if slope is None
                                                         else f"{slope:+.2f} MB/min"))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
