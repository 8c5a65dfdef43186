"""The engine when requests arrive at different steps: new prompts ride in the decode step's pass (`GPT.infer`).

A ruGPT3Small-shaped model (12 x 768, 50264 rows; random weights), packed as `rugpt-ray serve` lays it out, on
`--threads` threads, greedy, in this process (no Ray, no HTTP). Per round, alternated:

- same work: 16 sequences of 32 new tokens started together (one prefill, then 32 decode steps), as
  benchmarks/peers_cpu.py's baseline;
- staggered: a `Decoder` of 32 slots kept at 16 live rows for `--duration` seconds; a finished row is replaced at
  once by a request of 16-48 new tokens (seeded), cycling over four prompts, so that new prompts join some decode
  steps, as over HTTP when requests differ in length.

Reported: tokens/s of each, their ratio per round, and the share of steps that took new prompts. To compare
two checkouts, run this file with `PYTHONPATH` set to each (the README gives the figures before and after).

    python benchmarks/staggered_cpu.py [--rounds 3] [--duration 6] [--threads 2] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_cpu import SMALL, ours_engine  # noqa: E402
from serve_load import PROMPTS  # noqa: E402

from rugpt_ray.config import data_root  # noqa: E402
from rugpt_ray.generation import Decoder, GenerationConfig  # noqa: E402
from rugpt_ray.model import GPT  # noqa: E402
from rugpt_ray.quantization import prepack  # noqa: E402
from rugpt_ray.tokenizer import load_tokenizer  # noqa: E402

LIVE, SLOTS = 16, 32


def staggered(model: GPT, tokenizer, duration: float, seed: int) -> tuple[float, float]:
    """Tokens/s of LIVE rows whose requests (16-48 new tokens) replace each other as they finish, and the share of
    steps that took new prompts."""
    decoder, rng = Decoder(model, tokenizer, SLOTS, capacity=256), random.Random(seed)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    made = steps = prefills = added = 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        prefills += decoder.free_slots > SLOTS - LIVE
        while decoder.free_slots > SLOTS - LIVE:
            cfg = GenerationConfig(max_new_tokens=rng.randint(16, 48), greedy=True, ignore_eos=True)
            decoder.add([prompts[added % len(prompts)]], cfg)
            added += 1
        made += sum(event.token_id is not None for _, event in decoder.step())
        steps += 1
    return made / (time.perf_counter() - start), prefills / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of staggered arrivals per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(data_root() / "tokenizer"))
    model = prepack(GPT(SMALL).eval())
    rounds, load = [], [os.getloadavg()[0]]
    with torch.inference_mode():
        ours_engine(model, tokenizer, LIVE, 32)  # warm-up
        for r in range(args.rounds):
            together = ours_engine(model, tokenizer, LIVE, 32)
            apart, prefilled = staggered(model, tokenizer, args.duration, seed=r)
            rounds.append({"same_work": together, "staggered": apart, "ratio": apart / together,
                           "steps_with_prompts": prefilled})
            load.append(os.getloadavg()[0])
    print(f"\n{os.cpu_count()} cores, {args.threads} torch thread(s), load average (1 min) {min(load):.1f}-"
          f"{max(load):.1f}; {args.rounds} rounds")
    for r in rounds:
        print(f"same work {r['same_work']:.0f} tokens/s, staggered {r['staggered']:.0f} ({r['ratio']:.2f}); "
              f"{r['steps_with_prompts']:.2f} of the steps took new prompts")
    print(f"median ratio {statistics.median(r['ratio'] for r in rounds):.2f}")
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "rounds": rounds, "load": load}, indent=2) + "\n")


if __name__ == "__main__":
    main()
