"""GPU memory of a LoRA recipe, estimated term by term (no GPU needed): the README's figures for lora-large.yaml
and lora-xl.yaml on one 24 GB card come from here.

Terms (bytes): the frozen base in bf16 (2 per parameter); the adapters' fp32 master weights, bf16 copies,
gradients and AdamW moments (20 per adapter parameter); with activation checkpointing, each block's bf16 input
kept for backward (L x b x s x h x 2) plus one block recomputed at a time (34 x b x s x h, Korthikanti et al. 2022,
without the s^2 attention term: SDPA's flash kernel on dense layers, the block-sparse kernel on sparse ones);
the logits, which dominate (b x s x V x 16: bf16 logits, their fp32 copy for the loss, the saved log-softmax and
the fp32 gradient); and 1.5 GB for the CUDA context and allocator slack.

    python benchmarks/lora_memory.py [jobs/configs/lora-large.yaml=large ...]
"""

from __future__ import annotations

import sys

from rugpt_ray.config import load_train_config, preset

RECIPES = {"jobs/configs/lora-large.yaml": "large", "jobs/configs/lora-xl.yaml": "xl"}
CUDA_CONTEXT = 1.5e9


def adapter_params(h: int, layers: int, r: int, targets: list[str]) -> int:
    """A and B of every adapted Linear: r x (in + out)."""
    per_layer = {"c_attn": h + 3 * h, "c_proj": (h + h) + (4 * h + h), "c_fc": h + 4 * h}
    return layers * r * sum(per_layer[t] for t in targets)


def estimate(recipe: str, model_preset: str) -> dict[str, float]:
    cfg = load_train_config(recipe)
    model, lora = preset(model_preset), cfg.lora_config()
    b, s, h, layers = cfg.micro_batch, cfg.seq_len, model.n_embd, model.n_layer
    adapters = adapter_params(h, layers, lora.r, lora.targets)
    terms = {
        "base weights (bf16)": 2 * model.num_params(),
        "adapters + AdamW": 20 * adapters,
        "checkpointed block inputs": layers * b * s * h * 2 if cfg.activation_checkpointing else 0,
        "activations (blocks in flight)": 34 * b * s * h * (1 if cfg.activation_checkpointing else layers),
        "logits and loss": b * s * model.vocab_size * 16,
        "CUDA context, slack": CUDA_CONTEXT,
    }
    return {"adapter_params": adapters, **terms, "total": sum(terms.values())}


def main() -> None:
    pairs = dict(arg.split("=") for arg in sys.argv[1:]) or RECIPES
    for recipe, model_preset in pairs.items():
        cfg = load_train_config(recipe)
        result = estimate(recipe, model_preset)
        print(f"{recipe} ({model_preset}, micro-batch {cfg.micro_batch} x {cfg.seq_len} tokens, "
              f"{result['adapter_params'] / 1e6:.1f}M adapter parameters)")
        for term, value in result.items():
            if term != "adapter_params":
                print(f"  {term:32} {value / 2**30:6.2f} GiB")


if __name__ == "__main__":
    main()
