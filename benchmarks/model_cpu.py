"""CPU benchmark: this model vs stock `GPT2LMHeadModel` on the same config, weights and batch.

Measures (1) a forward+backward training step and (2) greedy generation ms/token (ours: KV cache through
`rugpt_ray.generate`, on the weights as `rugpt-ray generate` lays them out: `prepack`; HF: `generate` in eager
mode). Runs alternate between the two so that load on the machine hits both alike; the medians' ratio is what is
reported. Prints a table last and writes JSON.

    python benchmarks/model_cpu.py [--out bench.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from rugpt_ray.checkpoints import export_hf
from rugpt_ray.config import ModelConfig, data_root
from rugpt_ray.generation import GenerationConfig, stream
from rugpt_ray.model import GPT
from rugpt_ray.quantization import prepack
from rugpt_ray.tokenizer import load_tokenizer


def interleaved(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="toy sizes (used by the test suite)")
    args = parser.parse_args()

    if args.quick:
        cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
        batch, seq, prompt_len, new_tokens, repeats = 2, 64, 8, 8, 2
    else:
        cfg = ModelConfig(n_layer=6, n_embd=512, n_head=8, n_positions=1024, vocab_size=50257)
        batch, seq, prompt_len, new_tokens, repeats = 4, 256, 32, 64, 7
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, Path(tmp) / "hf")
        hf = GPT2LMHeadModel.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa").eval()
    for m in (ours, hf):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # same math in both; dropout RNG costs differ between the two implementations

    ids = torch.randint(5, cfg.vocab_size, (batch, seq))

    def step_ours():
        ours.zero_grad(set_to_none=True)
        _, loss = ours(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()

    def step_hf():
        hf.zero_grad(set_to_none=True)
        hf(ids, labels=ids).loss.backward()

    ours.train()
    hf.train()
    step = interleaved({"ours": step_ours, "hf": step_hf}, repeats)
    ours = prepack(ours.eval())  # its training steps are done
    hf.eval()

    prompt = ids[:1, :prompt_len]
    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, greedy=True)

    tokenizer = load_tokenizer(data_root() / "tokenizer")
    generated = []

    def gen_ours():
        generated.append(sum(1 for _ in stream(ours, tokenizer, [prompt[0].tolist()], gen_cfg)))

    def gen_hf():
        with torch.inference_mode():
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=0)

    gen = interleaved({"ours": gen_ours, "hf": gen_hf}, repeats)
    tokens_per_step = batch * (seq - 1)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "config": cfg.to_dict(),
        "batch": batch, "seq_len": seq, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "step_s": step, "step_speed_ratio": step["hf"] / step["ours"],
        "train_tokens_per_s": {k: tokens_per_step / v for k, v in step.items()},
        "gen_ms_per_token": {"ours": 1000 * gen["ours"] / min(generated), "hf": 1000 * gen["hf"] / new_tokens},
        "gen_speed_ratio": (gen["hf"] / new_tokens) / (gen["ours"] / min(generated)),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"config: {cfg.n_layer} layers × {cfg.n_embd}, batch {batch} × {seq} tokens, {result['machine']}")
    print(f"{'metric':34} {'rugpt-ray':>12} {'HF GPT-2':>12} {'ratio':>8}")
    print(f"{'train step fwd+bwd (s)':34} {step['ours']:12.4f} {step['hf']:12.4f} {result['step_speed_ratio']:7.2f}x")
    g = result["gen_ms_per_token"]
    print(f"{'greedy generate (ms/token)':34} {g['ours']:12.2f} {g['hf']:12.2f} {result['gen_speed_ratio']:7.2f}x")


if __name__ == "__main__":
    main()
