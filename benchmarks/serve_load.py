"""Load test of the Serve app on 127.0.0.1: one client at a time vs N concurrent clients, plus Serve's TTFT cost.

Starts a local Ray + Serve bound to 127.0.0.1 with a freshly initialised `tiny` model (the demo's), then for
each sampling mode (sampled: temperature 1 = OpenAI's default with top_p 0.9; and greedy):
- alternates `--rounds` times between 1 client and `--clients` concurrent clients, each client a closed loop
  of streamed `/v1/completions` requests for `--duration` seconds per phase; prints requests/s, tokens/s,
  latency p50/p99, time to first token (first SSE chunk with text) p50/p99, and the concurrent /
  one-at-a-time requests/s ratio;
- alternates `--ttft-repeats` times between the same request made directly on a `BatchEngine` in this
  process (no Serve) and over HTTP; Serve's added TTFT is the difference of the medians.
With `--with-adapter` the app also serves a LoRA adapter of the model, so it has two names and requests go
through the `RuGPTRouter` ingress (the requests still name the base): the router's cost.
`--listen` says who takes the HTTP requests: Serve's proxy, which hands them to the router (the default); the
router itself, as `rugpt-ray serve` runs it; or the model server itself, as `rugpt-ray serve --ingress direct`.
Alternating makes background load on the machine hit both sides alike. This process lowers its own priority
to that of Ray's workers (nice 15) for the same reason.

    python benchmarks/serve_load.py [--clients 16] [--duration 8] [--rounds 3] [--max-tokens 32]
                                    [--stream-interval 0.05] [--no-stream] [--with-adapter]
                                    [--listen proxy|router|direct] [--out result.json]
"""

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rugpt_ray.config import data_root

PROMPTS = ["Александр Сергеевич Пушкин родился в", "Москва — столица", "Однажды весною, в час небывало жаркого",
           "Искусственный интеллект"]
RAY_WORKER_NICENESS = 15


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def dechunked(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    out, at = [], 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2:end + 2 + size])
        at = end + 2 + size + 2


async def one_request(url: str, body: dict, timeout: float = 120.0) -> tuple[float, float | None, int]:
    """(latency, time to first SSE event or None when not streamed, completion tokens) of one `/v1/completions`, on
    a connection of its own (`Connection: close`; llama-server's HTTP library closes a kept-alive connection after 5
    requests, which a pooled client can meet mid-request).

    Raw asyncio streams, not httpx: the load generator shares the 2 cores with the server it measures, and httpx
    parsing every streamed line took 0.06 of a core under 16 clients (direct ingress), this 0.02. The events between
    the first and the usage are only counted as bytes arrive."""
    start = time.perf_counter()
    first, received = await asyncio.wait_for(exchange(url, body, start), timeout)
    latency = time.perf_counter() - start
    header, _, content = received.partition(b"\r\n\r\n")
    status = header.split(b"\r\n", 1)[0].decode("latin-1")
    if status.split(" ")[1:2] != ["200"]:
        raise RuntimeError(f"{url}/v1/completions answered {status!r}: {content[:200]!r}")
    if b"transfer-encoding: chunked" in header.lower():
        content = dechunked(content)
    if not body["stream"]:
        return latency, None, json.loads(content)["usage"]["completion_tokens"]
    usage = [line for line in content.split(b"\n") if line.startswith(b"data: {") and b'"usage"' in line]
    return latency, first, json.loads(usage[-1][6:])["usage"]["completion_tokens"] if usage else 0


async def exchange(url: str, body: dict, start: float) -> tuple[float | None, bytes]:
    """POST `body` to `url`/v1/completions and read the response until the server closes: (seconds from `start`
    to the first SSE event, or None; the response's bytes)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + payload)
        first, received = None, bytearray()
        while chunk := await reader.read(1 << 16):
            received += chunk
            if first is None and body["stream"] and b"data: {" in received:
                first = time.perf_counter() - start
    finally:
        writer.close()
    return first, bytes(received)


async def load(url: str, clients: int, duration: float, body: dict,
               budget: tuple[int, int] | None = None) -> tuple[list, float]:
    """`clients` closed-loop clients that start requests for `duration` seconds: every request, and the time until
    the last one finished. Requests still running at the deadline count, as the time they take does: counting
    only those finished in time while timing the wait for the rest cut 16 clients' tokens/s by up to a third.
    With `budget` (low, high), each request's max_tokens is drawn in it (seeded per client), so that requests end
    and start at different steps, as real traffic's do."""
    results = []
    start = time.perf_counter()
    end = start + duration

    async def loop(i: int) -> None:
        rng, n = random.Random(i), 0
        while time.perf_counter() < end:
            request = {**body, "prompt": PROMPTS[(i + n) % len(PROMPTS)]}
            if budget is not None:
                request["max_tokens"] = rng.randint(*budget)
            results.append(await one_request(url, request))
            n += 1

    await asyncio.gather(*(loop(i) for i in range(clients)))
    return results, time.perf_counter() - start


def summary(clients: int, results: list, elapsed: float) -> dict:
    latency, ttft, tokens = zip(*results, strict=True)
    out = {"clients": clients, "requests": len(results), "requests_per_s": len(results) / elapsed,
           "tokens_per_s": sum(tokens) / elapsed, "latency_p50_ms": 1000 * percentile(latency, 0.5),
           "latency_p99_ms": 1000 * percentile(latency, 0.99)}
    if ttft[0] is not None:
        out.update(ttft_p50_ms=1000 * percentile(ttft, 0.5), ttft_p99_ms=1000 * percentile(ttft, 0.99))
    return out


async def throughput(url: str, clients: int, duration: float, rounds: int, body: dict) -> dict:
    runs: dict[int, tuple[list, float]] = {1: ([], 0.0), clients: ([], 0.0)}
    await load(url, 2, 2.0, body)  # warm-up
    for _ in range(rounds):
        for n in (1, clients):
            results, elapsed = await load(url, n, duration, body)
            runs[n] = (runs[n][0] + results, runs[n][1] + elapsed)
    serial, concurrent = (summary(n, *runs[n]) for n in (1, clients))
    return {"one_at_a_time": serial, "concurrent": concurrent,
            "ratio": concurrent["requests_per_s"] / serial["requests_per_s"]}


async def ttft_pairs(url: str, engine, tokenizer, cfg, body: dict, repeats: int) -> dict:
    """Median TTFT of the same request on the engine in this process and through Serve, alternating."""
    direct, served = [], []
    for i in range(repeats + 1):
        prompt = PROMPTS[i % len(PROMPTS)]
        ids = tokenizer.encode_batch([prompt])
        start, first = time.perf_counter(), None
        async for events in engine.generate(ids, cfg):
            if first is None and any(e.text or e.finish_reason for e in events):
                first = time.perf_counter() - start
        _, served_first, _ = await one_request(url, {**body, "prompt": prompt})
        if i:  # the first pair warms up
            direct.append(1000 * first)
            served.append(1000 * served_first)
    return {"direct_ttft_p50_ms": statistics.median(direct), "served_ttft_p50_ms": statistics.median(served),
            "serve_added_ttft_ms": statistics.median(served) - statistics.median(direct)}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, choices=range(2, 65), metavar="2..64")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase and round (1..60)")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ttft-repeats", type=int, default=40, choices=range(5, 501), metavar="5..500")
    parser.add_argument("--tokenizer", default=str(data_root() / "tokenizer"))
    parser.add_argument("--stream-interval", type=float, default=0.05,
                        help="the app's stream_interval_s (serve_configs/local.yaml's value; 0 = a chunk per token)")
    parser.add_argument("--no-stream", action="store_true",
                        help="plain JSON responses instead of SSE (no TTFT; shows batching without per-token I/O)")
    parser.add_argument("--with-adapter", action="store_true",
                        help="also serve a LoRA adapter of the model: two names, so requests go through the router")
    parser.add_argument("--listen", choices=("proxy", "router", "direct"), default="proxy",
                        help="who takes the HTTP requests: Serve's proxy, then the router (default); the router "
                             "itself, as `rugpt-ray serve`; the model server itself, as `rugpt-ray serve --ingress "
                             "direct`")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if not 1 <= args.duration <= 60:
        parser.error("--duration must be between 1 and 60 seconds")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))

    import ray
    from ray import serve

    from rugpt_ray.checkpoints import load_model, save_native
    from rugpt_ray.config import LoraConfig, preset
    from rugpt_ray.generation import GenerationConfig
    from rugpt_ray.lora import add_lora, base_reference, save_adapter
    from rugpt_ray.model import GPT
    from rugpt_ray.quantization import prepack
    from rugpt_ray.serving import ServeConfig
    from rugpt_ray.serving.app import build_app
    from rugpt_ray.serving.direct_ingress import local_ray_env
    from rugpt_ray.serving.engine import BatchEngine, in_passing_thread
    from rugpt_ray.tokenizer import load_tokenizer

    def save_models(scratch: Path) -> tuple[Path, dict]:
        """The model (and the adapter) on disk; the served names of the adapters."""
        base = GPT(preset("tiny"))
        model_dir = save_native(base, scratch / "tiny")
        if not args.with_adapter:
            return model_dir, {}
        lora = LoraConfig()  # requests still name the base: the same work, with the router in front
        save_adapter(add_lora(copy.deepcopy(base), lora), lora, base_reference(base, str(model_dir), {}),
                     scratch / "adapter")
        return model_dir, {"tiny-lora": {"path": str(scratch / "adapter")}}

    torch.manual_seed(0)
    # torch work here runs on threads that end, as in the replica: no OpenMP team stays beside the engine's below
    model_dir, adapters = asyncio.run(in_passing_thread(lambda: save_models(Path(tempfile.mkdtemp(
        prefix="serve-load-")))))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.listen != "proxy":  # the app's ingress replica listens on `port`; Serve's proxy on another, unused
        os.environ.update(local_ray_env(port))
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port if args.listen == "proxy" else free_port()})
    serve.run(build_app(ServeConfig(models={"tiny": str(model_dir)}, adapters=adapters, tokenizer=args.tokenizer,
                                    max_batch_size=32, max_ongoing_requests=64, stream_interval_s=args.stream_interval,
                                    ingress="direct" if args.listen == "direct" else "router")),
              name="bench", route_prefix="/")

    torch.set_num_threads(2)  # as the replica has: it reserves the node's 2 CPUs
    tokenizer = load_tokenizer(args.tokenizer)
    engine = asyncio.run(in_passing_thread(lambda: BatchEngine(prepack(load_model(model_dir)), tokenizer)))
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[0]
    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "router": args.with_adapter,
               "listen": args.listen, "clients": args.clients,
               "duration_s": args.duration, "rounds": args.rounds, "max_tokens": args.max_tokens,
               "stream_interval_s": args.stream_interval, "modes": {}}
    for mode, sampling in (("temperature 1, top_p 0.9", {"temperature": 1.0, "top_p": 0.9}),
                           ("greedy", {"temperature": 0.0})):
        body = {"model": "tiny", "max_tokens": args.max_tokens, **sampling, "stream": False}
        if not args.no_stream:
            body.update(stream=True, stream_options={"include_usage": True})
        results["modes"][mode] = asyncio.run(throughput(url, args.clients, args.duration, args.rounds, body))
        if not args.no_stream:
            cfg = GenerationConfig(max_new_tokens=args.max_tokens, **sampling)
            results["modes"][mode].update(asyncio.run(ttft_pairs(url, engine, tokenizer, cfg, body,
                                                                 args.ttft_repeats)))
    with open("/proc/loadavg") as f:
        results["load_average_before_after"] = [float(load_before), float(f.read().split()[0])]
    serve.shutdown()
    ray.shutdown()

    print(f"\n{results['machine']} (load average {results['load_average_before_after']}); tiny model, "
          f"{args.max_tokens} new tokens per request, "
          f"{'plain' if args.no_stream else f'streamed (interval {args.stream_interval:g} s)'} /v1/completions "
          f"taken by {args.listen}, "
          f"{args.rounds} x {args.duration:g} s per phase")
    print(f"{'mode':<24} {'clients':>7} {'req/s':>7} {'tok/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'TTFT p50':>9}"
          f"{'TTFT p99':>9}")
    for mode, r in results["modes"].items():
        for row in (r["one_at_a_time"], r["concurrent"]):
            ttft = "".join(f"{row[k]:>9.1f}" if k in row else f"{'-':>9}" for k in ("ttft_p50_ms", "ttft_p99_ms"))
            print(f"{mode:<24} {row['clients']:>7} {row['requests_per_s']:>7.1f} {row['tokens_per_s']:>7.0f} "
                  f"{row['latency_p50_ms']:>7.0f} {row['latency_p99_ms']:>7.0f}{ttft}")
    for mode, r in results["modes"].items():
        line = f"{mode}: {args.clients} clients / one at a time = {r['ratio']:.2f}x requests/s"
        if "serve_added_ttft_ms" in r:
            line += (f"; TTFT direct {r['direct_ttft_p50_ms']:.1f} ms, via Serve {r['served_ttft_p50_ms']:.1f} ms "
                     f"(Serve adds {r['serve_added_ttft_ms']:.1f} ms)")
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
