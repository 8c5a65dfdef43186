"""Structured outputs on CPU: what constrained rows cost per decode step, what a grammar costs to compile and keep.

- Per decode step: one `Decoder` of B rows (1 and 16, static shapes: every step decodes all slots over the whole
  context, so that constrained rows, which end sooner, do not attend over fewer positions), every row sampling at
  temperature 1, either all unconstrained or all following one of the test schemas (`tests/schemas.py`, cycled); a
  finished row is replaced at once, and only steps that decode all B rows and prefill none are timed. Phases
  alternate `--rounds` times so that background load hits both alike; each phase's median step is kept, and the
  range over rounds is reported, with each round's overhead of constrained over plain (min, median, max).
  Models: the `tiny` preset and a 6 x 512 dense model, random weights, `--threads` torch threads (default 1: a
  replica of one CPU; `rugpt-ray serve` reserves every core unless told otherwise, so `--threads` the core count
  mirrors its default).
- The grammar mask: the decoder's `GrammarMask` step timed in place (filling the bitmasks, then listing the allowed ids
  of the rows that allow few tokens and masking the others' logits), per constrained row per step; and the share of
  constrained row-steps that drew among their allowed ids alone.
- Compiling: `--schemas` schemas drawn like the test ones (the 24 test schemas first), each compiled cold; p50 /
  p99 / max, the time of a cached compile, and the resident memory the compile cache grew by, per entry.

    python benchmarks/structured_cpu.py [--rounds 3] [--steps 40] [--schemas 200] [--threads 1] [--out r.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from rugpt_ray.config import ModelConfig, data_root, preset
from rugpt_ray.constraints import compile_constraint, token_table
from rugpt_ray.generation import Decoder, GenerationConfig, GrammarMask, Row
from rugpt_ray.model import GPT
from rugpt_ray.tokenizer import RuGPTTokenizer, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from schemas import SCHEMAS, random_schema  # noqa: E402

MODELS = {"tiny": preset("tiny"), "6x512": ModelConfig(n_layer=6, n_embd=512, n_head=8, n_positions=512)}
CFG = GenerationConfig(max_new_tokens=64, temperature=1.0)
PROMPT = "Ответ в формате JSON:"


class TimedGrammarMask(GrammarMask):
    """The decoder's grammar step, timed: seconds per constrained row per step, one figure per step; and how many
    constrained row-steps were narrowed to their allowed ids."""

    def __init__(self):
        self.per_row: list[float] = []
        self.row_steps = self.narrowed = 0

    def apply(self, logits: torch.Tensor, rows: list[Row]) -> None:
        start = time.perf_counter()
        super().apply(logits, rows)
        constrained = [row for row in rows if row.matcher is not None]
        if constrained:
            self.per_row.append((time.perf_counter() - start) / len(constrained))
            self.row_steps += len(constrained)
            self.narrowed += sum(row.allowed is not None for row in constrained)


def step_times(decoder: Decoder, rows: int, constraints: list, steps: int, seed: int) -> list[float]:
    """Seconds of each step that decoded all `rows` rows and prefilled none, over `steps` such steps."""
    prompt, times, added = decoder.tokenizer.encode(PROMPT), [], 0
    while len(times) < steps:
        while decoder.free_slots:
            constraint = constraints[added % len(constraints)] if constraints else None
            decoder.add([prompt], GenerationConfig(**{**CFG.__dict__, "seed": seed + added}), constraint=constraint)
            added += 1
        full = decoder.decoding_rows == rows
        start = time.perf_counter()
        decoder.step()
        if full:
            times.append(time.perf_counter() - start)
    decoder.clear()
    return times


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def compile_figures(tokenizer: RuGPTTokenizer, count: int) -> dict:
    """Cold compile times of `count` schemas (the test ones first), a cached compile, and the cache's memory."""
    rows = MODELS["tiny"].vocab_size
    token_table(tokenizer, rows)
    schemas = SCHEMAS + [random_schema(seed) for seed in range(len(SCHEMAS), count)]
    gc.collect()
    before, cold = rss(), []
    for schema in schemas[:count]:
        start = time.perf_counter()
        compile_constraint("json", schema, tokenizer, rows)
        cold.append(time.perf_counter() - start)
    gc.collect()
    grown = rss() - before
    start = time.perf_counter()
    compile_constraint("json", SCHEMAS[0], tokenizer, rows)
    cached = time.perf_counter() - start
    cold.sort()
    return {"schemas": count, "p50_ms": 1e3 * cold[len(cold) // 2], "p99_ms": 1e3 * cold[int(0.99 * (len(cold) - 1))],
            "max_ms": 1e3 * cold[-1], "test_schemas_p50_ms": 1e3 * statistics.median(cold[:len(SCHEMAS)]),
            "cached_ms": 1e3 * cached, "cache_rss_kib_per_entry": grown / count / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per phase and round")
    parser.add_argument("--schemas", type=int, default=200, help="schemas compiled for the compile figures")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(data_root() / "tokenizer")
    load = [os.getloadavg()[0]]
    results = {"threads": args.threads, "compile": compile_figures(tokenizer, args.schemas), "decode": {}}
    for name, config in MODELS.items():
        torch.manual_seed(0)
        model = GPT(config).eval()
        constraints = [compile_constraint("json", s, tokenizer, config.vocab_size) for s in SCHEMAS]
        for rows in (1, 16):
            decoder = Decoder(model, tokenizer, rows, capacity=96, static_shapes=True)
            mask = TimedGrammarMask()
            decoder.processors = [mask if isinstance(p, GrammarMask) else p for p in decoder.processors]
            step_times(decoder, rows, constraints, 5, seed=0)  # warm-up
            medians = {"plain": [], "constrained": []}
            for r in range(args.rounds):
                for phase, used in (("plain", []), ("constrained", constraints)):
                    medians[phase].append(statistics.median(step_times(decoder, rows, used, args.steps, 100 * r)))
                load.append(os.getloadavg()[0])
            overhead = [c / p - 1 for c, p in zip(medians["constrained"], medians["plain"], strict=True)]
            results["decode"][f"{name}, {rows} rows"] = {
                "plain_step_ms": [1e3 * min(medians["plain"]), 1e3 * max(medians["plain"])],
                "constrained_step_ms": [1e3 * min(medians["constrained"]), 1e3 * max(medians["constrained"])],
                "overhead_pct": [100 * min(overhead), 100 * statistics.median(overhead), 100 * max(overhead)],
                "mask_ms_per_row_step_p50_p99": [1e3 * statistics.median(mask.per_row),
                                                 1e3 * sorted(mask.per_row)[int(0.99 * (len(mask.per_row) - 1))]],
                "narrowed_share": mask.narrowed / mask.row_steps}
    results["load_average_1min"] = [min(load), max(load)]

    c = results["compile"]
    print(f"\n{os.cpu_count()} cores, {args.threads} torch thread(s), load average (1 min) "
          f"{min(load):.1f}-{max(load):.1f}; {args.rounds} rounds x {args.steps} timed steps per phase; ranges are "
          "over rounds")
    print(f"compile ({c['schemas']} schemas): p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms, max "
          f"{c['max_ms']:.2f} ms (test schemas p50 {c['test_schemas_p50_ms']:.2f} ms); cached {c['cached_ms']:.3f} ms; "
          f"cache {c['cache_rss_kib_per_entry']:.0f} KiB resident per entry")
    for case, r in results["decode"].items():
        print(f"{case}: step {r['plain_step_ms'][0]:.2f}-{r['plain_step_ms'][1]:.2f} ms plain, "
              f"{r['constrained_step_ms'][0]:.2f}-{r['constrained_step_ms'][1]:.2f} ms constrained "
              f"(overhead {r['overhead_pct'][0]:+.1f} to {r['overhead_pct'][2]:+.1f} %, median "
              f"{r['overhead_pct'][1]:+.1f} %); grammar mask (fill + apply) "
              f"{r['mask_ms_per_row_step_p50_p99'][0]:.3f} ms per row per step (p99 "
              f"{r['mask_ms_per_row_step_p50_p99'][1]:.3f}); {100 * r['narrowed_share']:.0f} % of constrained "
              "row-steps drew among their allowed ids alone")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
