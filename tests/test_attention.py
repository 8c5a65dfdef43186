"""Which attention each layer takes (`attn_impl`), and the model through the Triton kernel against the reference.

The kernel runs in Triton's interpreter on CPU tensors (rugpt_ray.sparse_kernel picks it itself), so the models
here are toy-sized: 2 layers of 32 dims, 2 heads, 16-token blocks in 4-block windows, layout built at 256 tokens.
"""

from __future__ import annotations

import pytest
import torch

from rugpt_ray import sparse_kernel
from rugpt_ray.attention import resolve_attn_impl
from rugpt_ray.config import preset
from rugpt_ray.errors import UserError
from rugpt_ray.model import GPT

pytestmark = pytest.mark.skipif(not sparse_kernel.HAS_TRITON, reason="needs Triton")

VOCAB = 512
NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def toy(sparse_mode: str, seed: int = 0) -> GPT:
    """A training-mode toy model with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    cfg = preset("tiny", n_embd=32, n_head=2, vocab_size=VOCAB, sparse_mode=sparse_mode, **NO_DROPOUT)
    model = GPT(cfg).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if "wte" not in name else 0.1)
    return model


def logits_and_grads(model: GPT, ids: torch.Tensor, impl: str, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.attn_impl = impl
    model.zero_grad(set_to_none=True)
    targets = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)
    logits, loss = model(ids, targets=targets, **kw)
    loss.backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        assert g.abs().max() > 0, name  # every parameter takes part, so a zero gradient would be a bug
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("sparse_mode", ["alternating", "all"])
@pytest.mark.parametrize("seq_len", [80, 71])  # 71: not a multiple of the 16-token block nor of the 32-token tile
def test_triton_kernel_model_equals_reference(sparse_mode, seq_len):
    """Logits and every parameter's gradient of a sparse model through the kernel equal the reference path."""
    model = toy(sparse_mode)
    ids = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(seq_len))
    want = logits_and_grads(model, ids, "reference")
    sparse_kernel._INDEX_CACHE.clear()
    got = logits_and_grads(model, ids, "triton")
    assert_same(got, want)
    # the kernel ran, on the master layout (built once at n_positions = 256 tokens) cut to this length
    (index,) = [entry[2] for key, entry in sparse_kernel._INDEX_CACHE.items() if key[0] == id(model.sparse_layout)]
    assert model.sparse_layout.shape[-1] == 256 // 16
    assert index.layout.shape[-1] == -(-seq_len // 16) and index.seq_len == seq_len
    # and sparsity matters here: causal SDPA in every layer gives other logits
    dense = GPT(preset("tiny", n_embd=32, n_head=2, vocab_size=VOCAB, sparse_mode="none", sparse_attention=None,
                       **NO_DROPOUT)).train()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k != "sparse_layout"})
    assert (logits_and_grads(dense, ids, "sdpa")[0] - want[0]).abs().max() > 1e-2


def test_padded_pass_with_kernel_forced_still_uses_masks():
    """Left padding (or a KV cache) needs true positions: such passes take the boolean masks whatever attn_impl."""
    model = toy("alternating").eval()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.zeros(1, 8, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 8), torch.ones(1, 40)], 1)
    with torch.no_grad():
        model.attn_impl = "reference"
        plain = model(ids)[0]
        model.attn_impl = "triton"
        kernel = model(ids)[0]
        with_pad = model(padded, attention_mask=mask)[0][:, 8:]
    torch.testing.assert_close(kernel, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_pad, plain, rtol=1e-4, atol=1e-4)


def test_dense_causal_kernel_equals_materialised_mask():
    """Dense layers: SDPA's causal kernel (no mask tensor) equals SDPA with the boolean causal mask, with grads."""
    torch.manual_seed(0)
    model = GPT(preset("small", n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=VOCAB,
                       **NO_DROPOUT)).train()
    ids = torch.randint(0, VOCAB, (2, 50), generator=torch.Generator().manual_seed(2))
    assert model.attention_impl(torch.device("cpu")) == "sdpa"
    assert_same(logits_and_grads(model, ids, "sdpa"), logits_and_grads(model, ids, "reference"))


def test_auto_picks_per_device_and_block():
    assert resolve_attn_impl("auto", torch.device("cuda"), 16) == "triton"
    assert resolve_attn_impl("auto", torch.device("cuda"), None) == "triton"  # dense: causal SDPA either way
    assert resolve_attn_impl("auto", torch.device("cuda"), 8) == "sdpa"  # the kernel needs blocks >= 16
    assert resolve_attn_impl("auto", torch.device("cpu"), 16) == "sdpa"
    for forced in ("reference", "sdpa", "triton", "flex"):
        assert resolve_attn_impl(forced, torch.device("cpu"), 16) == forced
    model = toy("alternating")
    assert model.attention_impl(torch.device("cuda")) == "triton"
    assert GPT(model.config, attn_impl="flex").attention_impl(torch.device("cuda")) == "flex"
    with pytest.raises(UserError, match="not one of"):
        model.attn_impl = "flash3"
    with pytest.raises(UserError, match="not one of"):
        GPT(model.config, attn_impl="xformers")
