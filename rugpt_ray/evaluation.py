"""Perplexity as a token mean: every token after the first is predicted exactly once.

The documents are joined with EOS between them (as the data pipeline packs them), cut into non-overlapping
windows of `seq_len` inputs, and the summed negative log-likelihood is divided by the number of predicted
tokens. This differs from the seed's `evaluate()` (a mean of per-batch means over a fixed number of batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rugpt_ray.model import GPT


@dataclass
class Perplexity:
    loss: float
    """Mean negative log-likelihood per predicted token (nats)."""
    ppl: float
    tokens: int
    """Tokens predicted."""
    windows: int
    seq_len: int

    def describe(self) -> str:
        return (f"perplexity {self.ppl:.3f} (loss {self.loss:.4f}): token mean over {self.tokens} tokens "
                f"in {self.windows} non-overlapping windows of {self.seq_len}")


def join_documents(documents: list[list[int]], eos_id: int) -> list[int]:
    joined: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            joined.append(eos_id)
        joined.extend(doc)
    return joined


@torch.inference_mode()
def perplexity(model: GPT, token_ids: list[int], seq_len: int, batch_size: int = 8) -> Perplexity:
    """Token-mean perplexity of `model` over one token stream."""
    if seq_len > model.config.n_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {model.config.n_positions} positions")
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, dtype=torch.long)
    starts = list(range(0, len(ids) - 1, seq_len))
    full = [s for s in starts if s + seq_len + 1 <= len(ids)]
    total, count = 0.0, 0
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts[len(full):]]  # the last, shorter window
    for batch in batches:
        length = min(seq_len, len(ids) - 1 - batch[0])
        x = torch.stack([ids[s:s + length] for s in batch]).to(device)
        y = torch.stack([ids[s + 1:s + length + 1] for s in batch]).to(device)
        logits, _ = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    loss = total / count
    return Perplexity(loss=loss, ppl=math.exp(min(loss, 50.0)), tokens=count, windows=len(starts), seq_len=seq_len)
