"""Batch-1 greedy decode on CPU with the weights in fp32, bf16 and int8 (weight-only): tokens/s and weight bytes.

A ruGPT3Small-shaped model (12 x 768, 50264 rows) with random weights, laid out as serving lays it out (`with_dtype`,
then `prepack`: the float dtypes in oneDNN's packed layout, with an untied output layer); each dtype decodes the same
prompt for `--tokens` new tokens through the shared `Decoder` (`generate`), phases interleaved `--rounds` times so that
background load hits them alike. Reported per dtype: the range of tokens/s over rounds, and each round's ratio
against bf16 (the int8 target is >= 1.6x).

    python benchmarks/int8_cpu.py [--rounds 3] [--tokens 64] [--threads 2] [--out r.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from rugpt_ray.config import ModelConfig, data_root
from rugpt_ray.generation import GenerationConfig, generate
from rugpt_ray.model import GPT
from rugpt_ray.quantization import prepack, with_dtype
from rugpt_ray.tokenizer import load_tokenizer

SMALL = ModelConfig(n_layer=12, n_embd=768, n_head=12, n_positions=2048, vocab_size=50264)
DTYPES = ("float32", "bfloat16", "int8")
PROMPT = "Александр Сергеевич Пушкин родился в"


def weight_bytes(model: GPT) -> int:
    """Bytes of every tensor the model holds (`parameters()` yields a tied one once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def tokens_per_s(model: GPT, tokenizer, tokens: int) -> float:
    cfg = GenerationConfig(max_new_tokens=tokens, greedy=True, ignore_eos=True)
    generate(model, tokenizer, [PROMPT], GenerationConfig(max_new_tokens=4, greedy=True))  # warm-up
    start = time.perf_counter()
    (completion,) = generate(model, tokenizer, [PROMPT], cfg)
    return len(completion.token_ids) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(data_root() / "tokenizer"))
    base = GPT(SMALL).eval()
    models = {dtype: prepack(with_dtype(copy.deepcopy(base), dtype)) for dtype in DTYPES}
    rates: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for dtype, model in models.items():
                rates[dtype].append(tokens_per_s(model, tokenizer, args.tokens))
    report = {"threads": args.threads, "tokens": args.tokens, "dtypes": {
        dtype: {"tokens_per_s": [round(r, 1) for r in rates[dtype]], "weight_mb": round(weight_bytes(m) / 2**20, 1),
                "vs_bf16": [round(r / b, 2) for r, b in zip(rates[dtype], rates["bfloat16"], strict=True)]}
        for dtype, m in models.items()}}
    for dtype, row in report["dtypes"].items():
        print(f"{dtype:9} {min(row['tokens_per_s']):7.1f}-{max(row['tokens_per_s']):7.1f} tokens/s  "
              f"{row['weight_mb']:7.1f} MB  vs bf16 {row['vs_bf16']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
