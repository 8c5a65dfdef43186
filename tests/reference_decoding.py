"""Decoding written out from the textbook formulas, one full forward pass per token and no decoder: the independent
computation that the engine's and the server's sampled, penalized output is checked against (`generate` runs the
same `Decoder` they do, so comparing with it only shows self-consistency).

Per step, on the checkpoint's fp32 logits of the whole text so far: ids the tokenizer cannot decode are never
drawn; OpenAI's logit_bias is added; HF's repetition penalty divides a seen token's positive logit (multiplies a
negative one) over prompt and output; OpenAI's frequency and presence penalties subtract count x frequency +
presence for each output token; then greedy takes the argmax, and sampling is `test_generation.reference_token`
(temperature, top-k, top-p and the documented inverse-CDF draw) on the row's own stream of draws.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from test_generation import reference_token

from rugpt_ray.generation import GenerationConfig


def row_draws(seed: int, index: int) -> Iterator[float]:
    """The uniform numbers sequence `index` of a request seeded `seed` draws from: its own generator, seeded
    from (seed, index) as the decoder seeds it (the same seed gives the same text alone or batched)."""
    generator = torch.Generator().manual_seed(hash((seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)
    while True:
        yield float(torch.rand(1, generator=generator, dtype=torch.float64))


@dataclass
class Reference:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]
    """The raw model's log-probability of each token of `token_ids`, before every adjustment."""


def adjusted_logits(logits: torch.Tensor, cfg: GenerationConfig, prompt: list[int], output: list[int],
                    vocab: int) -> torch.Tensor:
    """One step's logits after the undecodable-id mask, logit_bias and the three penalties, as the formulas say."""
    x = logits.clone()
    x[vocab:] = float("-inf")
    for token, value in cfg.logit_bias.items():
        x[token] += value
    if cfg.repetition_penalty != 1.0:
        for token in set(prompt + output):
            v = x[token]
            x[token] = v / cfg.repetition_penalty if v > 0 else v * cfg.repetition_penalty
    for token, count in Counter(output).items():
        x[token] -= cfg.frequency_penalty * count + cfg.presence_penalty
    return x


@torch.no_grad()
def reference_decode(model, tokenizer, prompt: list[int], cfg: GenerationConfig, index: int = 0) -> Reference:
    """Sequence `index` of a request with settings `cfg` on `prompt` (token ids): its tokens, its text (cut at
    the first stop string), why it ended, and the raw log-probabilities of its tokens."""
    draws = None if cfg.is_greedy else row_draws(cfg.seed, index)
    output: list[int] = []
    raw: list[float] = []
    vocab = len(tokenizer)
    for _ in range(cfg.max_new_tokens):
        logits = model(torch.tensor([prompt + output]))[0][0, -1].float()
        x = adjusted_logits(logits, cfg, prompt, output, vocab)
        token = int(x.argmax()) if cfg.is_greedy else reference_token(x, cfg, draws)
        if token == tokenizer.eos_id and not cfg.ignore_eos:
            return Reference(output, tokenizer.decode(output), "stop", raw)
        output.append(token)
        masked = logits.clone()
        masked[vocab:] = float("-inf")
        raw.append(float(masked.log_softmax(-1)[token]))
        text = tokenizer.decode(output)
        stops = [(i, s) for s in cfg.stop if (i := text.find(s)) >= 0]
        if stops:
            return Reference(output, text[:min(stops)[0]], "stop", raw)
    return Reference(output, tokenizer.decode(output), "length", raw)
