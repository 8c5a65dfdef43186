"""In-process serving engine throughput: one client at a time vs N concurrent clients, no Ray, no HTTP.

The same `BatchEngine` the Serve replica runs, on the same freshly initialised `tiny` model as
`serve_load.py`, packed and on every core (as the replica runs it), so the ratio shows what batching itself buys
without the proxy and the load generator competing for the cores. Each client is a closed loop of requests
for `--duration` seconds; phases alternate `--rounds` times so that background load hits both alike.
Modes: sampled (temperature 1, top_p 0.9) and greedy.

    python benchmarks/decode_cpu.py [--clients 16] [--duration 5] [--rounds 3] [--max-tokens 32] [--out r.json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import torch

from rugpt_ray.config import data_root, preset
from rugpt_ray.generation import GenerationConfig
from rugpt_ray.model import GPT
from rugpt_ray.quantization import prepack
from rugpt_ray.serving.engine import BatchEngine, in_passing_thread
from rugpt_ray.tokenizer import load_tokenizer

PROMPTS = ["Александр Сергеевич Пушкин родился в", "Москва — столица", "Однажды весною, в час небывало жаркого",
           "Искусственный интеллект"]
MODES = {"sampled (temperature 1, top_p 0.9)": GenerationConfig(temperature=1.0, top_p=0.9),
         "greedy": GenerationConfig(greedy=True)}


async def load(engine: BatchEngine, prompts: list[list[int]], cfg: GenerationConfig, clients: int,
               duration: float) -> tuple[int, int, float]:
    """`clients` closed loops that start requests for `duration` s: the requests, their tokens, and the time until
    the last one finished (see serve_load.load)."""
    done, tokens = 0, 0
    start = time.perf_counter()
    end = start + duration

    async def client(i: int) -> None:
        nonlocal done, tokens
        n = 0
        while time.perf_counter() < end:
            count = 0
            async for events in engine.generate([prompts[(i + n) % len(prompts)]], cfg):
                count += len(events)
            done, tokens = done + 1, tokens + count
            n += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return done, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, choices=range(2, 65), metavar="2..64")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase and round")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(data_root() / "tokenizer")
    # built on a thread that ends, as the replica builds it: no OpenMP team stays beside the engine's
    engine = asyncio.run(in_passing_thread(lambda: BatchEngine(prepack(GPT(preset("tiny"))), tokenizer,
                                                                max_batch_size=32)))
    prompts = tokenizer.encode_batch(PROMPTS)
    with open("/proc/loadavg") as f:
        load_before = float(f.read().split()[0])
    results = {"threads": threads, "clients": args.clients, "max_tokens": args.max_tokens, "modes": {}}
    for mode, base in MODES.items():
        cfg = dataclasses.replace(base, max_new_tokens=args.max_tokens)
        asyncio.run(load(engine, prompts, cfg, 2, 1.0))  # warm-up
        runs = {1: [0, 0, 0.0], args.clients: [0, 0, 0.0]}
        for _ in range(args.rounds):
            for n in runs:
                before = engine.stats.decoded_rows, engine.stats.decode_steps
                for i, value in enumerate(asyncio.run(load(engine, prompts, cfg, n, args.duration))):
                    runs[n][i] += value
        row = {n: {"requests_per_s": r[0] / r[2], "tokens_per_s": r[1] / r[2]} for n, r in runs.items()}
        row["ratio"] = row[args.clients]["requests_per_s"] / max(row[1]["requests_per_s"], 1e-9)
        row["mean_batch_rows_last_phase"] = ((engine.stats.decoded_rows - before[0])
                                             / max(1, engine.stats.decode_steps - before[1]))
        results["modes"][mode] = row
    while any(thread.name == "rugpt-engine" for thread in threading.enumerate()):
        time.sleep(0.01)  # the engine's worker leaves once idle: let it, before the interpreter goes
    with open("/proc/loadavg") as f:
        results["load_average_before_after"] = [load_before, float(f.read().split()[0])]

    print(f"\n{os.cpu_count()} cores, load average {results['load_average_before_after']}; tiny model, "
          f"{threads} threads, {args.max_tokens} new tokens, {args.rounds} x {args.duration:g} s per phase")
    for mode, r in results["modes"].items():
        print(f"{mode}: 1 client {r[1]['requests_per_s']:.1f} req/s ({r[1]['tokens_per_s']:.0f} tok/s), "
              f"{args.clients} clients {r[args.clients]['requests_per_s']:.1f} req/s "
              f"({r[args.clients]['tokens_per_s']:.0f} tok/s): {r['ratio']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
