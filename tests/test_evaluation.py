"""Perplexity is a token mean: every token after the first predicted once, whatever the batching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rugpt_ray.config import ModelConfig
from rugpt_ray.evaluation import join_documents, perplexity

CFG = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=300)


def direct_nll(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Summed NLL over non-overlapping windows, one window at a time: the definition, written out."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):
            window = torch.tensor(ids[start:start + seq_len + 1])
            logits, _ = model(window[None, :-1])
            total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
            count += len(window) - 1
    return total, count


@pytest.mark.parametrize("length, seq_len, batch_size", [(200, 32, 3), (129, 64, 8), (65, 64, 1)])
def test_perplexity_equals_the_token_mean_over_windows(make_model, length, seq_len, batch_size):
    model = make_model(CFG)
    ids = torch.randint(0, CFG.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    total, count = direct_nll(model, ids, seq_len)
    result = perplexity(model, ids, seq_len, batch_size=batch_size)
    assert result.tokens == count == length - 1  # the last, shorter window counted too
    assert result.windows == math.ceil((length - 1) / seq_len)
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert perplexity(model, ids, seq_len, batch_size=1).loss == pytest.approx(result.loss, rel=1e-5)
    assert f"over {count} tokens in {result.windows} non-overlapping windows of {seq_len}" in result.describe()


def test_documents_are_joined_with_eos_between_them():
    assert join_documents([[5, 6], [7], [8, 9]], eos_id=2) == [5, 6, 2, 7, 2, 8, 9]
    assert join_documents([[5]], eos_id=2) == [5]


def test_bad_lengths_are_refused(make_model):
    model = make_model(CFG)
    with pytest.raises(ValueError, match="seq_len 65 exceeds the model's 64 positions"):
        perplexity(model, list(range(100)), 65)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [1], 8)
