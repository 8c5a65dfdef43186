"""The model against stock transformers, and the sparse layers against an independent masked computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from rugpt_ray.attention import sdpa
from rugpt_ray.checkpoints import export_hf, load_model
from rugpt_ray.config import ModelConfig, preset
from rugpt_ray.model import GPT, Decoding, KVCache, Prefilling

DENSE = ModelConfig(n_layer=3, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)


def shifted(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)


def hf_random(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=128, vocab_size=50257, activation_function="gelu_new")
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_logits_and_loss_equal_stock_gpt2(tmp_path):
    hf = hf_random()
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    ids = torch.randint(0, 50257, (2, 100))
    with torch.no_grad():
        ours, loss = model(ids, targets=shifted(ids))
        theirs = hf(ids, labels=ids)
    assert (ours - theirs.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - theirs.loss.item()) <= 1e-5


def test_hf_round_trip_gives_same_logits(tmp_path, make_model):
    model = make_model(DENSE)
    export_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    back = load_model(tmp_path / "hf")
    ids = torch.randint(0, 50257, (2, 77))
    with torch.no_grad():
        ref = model(ids)[0]
        assert (hf(ids).logits - ref).abs().max().item() <= 1e-4
        assert torch.equal(back(ids)[0], ref)
    assert {k for k, _ in model.named_parameters()} <= {k for k, _ in hf.named_parameters()}


def test_parameter_count_matches_seed_small():
    # The seed's notebook prints 125231616 for ruGPT3Small (tied output, 50264 rows).
    assert preset("small").num_params() == 125_231_616


def test_alternating_makes_even_layers_sparse():
    cfg = preset("xl")
    assert [i for i in range(24) if cfg.is_sparse_layer(i)] == list(range(0, 24, 2))
    assert [i for i in range(24) if preset("xl", sparse_mode="top_bottom").is_sparse_layer(i)] == list(range(12))
    assert all(preset("xl", sparse_mode="all").is_sparse_layer(i) for i in range(24))


def fixed_allowed(h: int, q: int, k: int, block: int, window: int, patterns: int) -> bool:
    """The XL rule written out: causal, same local window, or the head's global block of an earlier window."""
    qb, kb = q // block, k // block
    if k > q:
        return False
    return qb // window == kb // window or kb % window == window - 1 - h % patterns


def naive_forward(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Independent reference: explicit softmax attention with masks built token by token from the rule above."""
    cfg = model.config
    sa = cfg.sparse_attention
    s = ids.shape[1]
    sparse_mask = torch.tensor([[[fixed_allowed(h, q, k, sa["block"], sa["num_local_blocks"],
                                                sa["num_different_global_patterns"]) for k in range(s)]
                                 for q in range(s)] for h in range(cfg.n_head)])
    causal = torch.ones(s, s).tril().bool()
    sd = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    x = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][:s]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (cfg.n_embd,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        q, k, v = (h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]).split(cfg.n_embd, -1)
        q, k, v = (t.view(1, s, cfg.n_head, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        mask = sparse_mask if cfg.is_sparse_layer(i) else causal
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + att.transpose(1, 2).reshape(1, s, -1) @ sd[p + "attn.c_proj.weight"].T + sd[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (cfg.n_embd,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        g = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        g = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        x = x + g @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (cfg.n_embd,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], 1e-5)
    return x @ sd["transformer.wte.weight"].T


@pytest.mark.parametrize("seq_len", [160, 100])  # 100: not a multiple of the 16-token block
def test_sparse_model_equals_independent_masked_computation(make_model, seq_len):
    model = make_model(preset("tiny"))  # 4-block (64-token) windows, so 160 tokens span three windows
    ids = torch.randint(0, 50257, (1, seq_len))
    with torch.no_grad():
        ours = model(ids)[0].double()
    ref = naive_forward(model, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    # and the sparsity matters: the same weights with dense attention give other logits
    dense = GPT(preset("tiny", sparse_mode="none", sparse_attention=None)).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k != "sparse_layout"}, strict=False)
    with torch.no_grad():
        assert (dense(ids)[0].double() - ref).abs().max().item() > 1e-2


def test_fast_path_equals_reference_path(make_model):
    model = make_model(preset("tiny"))
    fast = GPT(model.config, attn_impl="flex").eval()
    fast.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50257, (2, 192))
    with torch.no_grad():
        assert (fast(ids)[0] - model(ids)[0]).abs().max().item() <= 1e-4


def test_sparse_training_backward_runs_on_cpu(make_model):
    model = make_model(preset("tiny")).train()
    ids = torch.randint(0, 50257, (2, 130))
    _, loss = model(ids, targets=shifted(ids))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_left_padding_does_not_change_real_logits(make_model):
    model = make_model(preset("tiny"))
    ids = torch.randint(5, 50257, (1, 90))
    padded = torch.cat([torch.zeros(1, 10, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 10), torch.ones(1, 90)], 1)
    with torch.no_grad():
        plain = model(ids)[0]
        with_pad = model(padded, attention_mask=mask)[0][:, 10:]
    assert (plain - with_pad).abs().max().item() <= 1e-4


def test_too_long_input_is_refused(make_model):
    model = make_model(preset("tiny"))
    with pytest.raises(ValueError, match="256 positions"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_a_decode_step_and_new_prompts_in_one_pass_equal_two_passes(make_model):
    """`infer` runs a decode step and new prompts through every layer once (attention per part) and gives the logits
    and KV cache of the two passes apart; the tiny preset's sparse layers included."""
    model = make_model(preset("tiny"))
    assert any(block.attn.sparse for block in model.transformer.h)
    caches = [KVCache.allocate(model.config, 4, 64, torch.device("cpu"), torch.float32) for _ in range(2)]
    first = Prefilling(torch.randint(5, 50257, (2, 12)), torch.tensor([12, 9]), torch.tensor([0, 1]))
    step = Decoding(torch.tensor([7, 8]), torch.tensor([12, 9]), kv_len=13)
    new = Prefilling(torch.randint(5, 50257, (2, 7)), torch.tensor([7, 5]), torch.tensor([2, 3]))
    passes = []
    model.lm_head.register_forward_hook(lambda *_: passes.append(1))
    with torch.no_grad():
        for cache in caches:
            model.infer(cache, prefilling=first)
        apart = model.infer(caches[0], step)[0], model.infer(caches[0], prefilling=new)[1]
        passes.clear()
        together = model.infer(caches[1], step, new)
    assert len(passes) == 1 and together[0].shape == together[1].shape == (2, model.config.vocab_size)
    for a, b in [*zip(apart, together, strict=True), *zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v,
                                                           strict=True)]:
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_decode_step_attends_in_float32_on_cpu(dtype):
    """One query per row over cached half-precision keys: SDPA over the keys in float32 (torch's CPU kernel is
    1.5-5x slower over half-precision ones), the result in the model's dtype and within its rounding of exact."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, width, 16, generator=generator).to(dtype) for width in (1, 40, 40))
    mask = (torch.arange(40) <= torch.tensor([[5], [20], [39]]))[:, None, None, :]
    got = sdpa(q, k, v, mask, 0.0)
    assert got.dtype == dtype
    assert torch.equal(got, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(dtype))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert (got.double() - exact).abs().max().item() <= 4 * torch.finfo(dtype).eps


def test_a_bfloat16_decode_step_through_the_cache_equals_the_full_pass(make_model):
    """A bfloat16 model's decode step over its KV cache gives the logits of the whole sequence's pass, within
    bfloat16's rounding, dense and sparse layers alike."""
    model = make_model(preset("tiny")).to(torch.bfloat16)
    ids = torch.randint(5, 50257, (2, 30), generator=torch.Generator().manual_seed(3))
    cache = KVCache.allocate(model.config, 2, 64, torch.device("cpu"), torch.bfloat16)
    with torch.no_grad():
        model.infer(cache, prefilling=Prefilling(ids[:, :29], torch.tensor([29, 29]), torch.tensor([0, 1])))
        stepped = model.infer(cache, Decoding(ids[:, 29], torch.tensor([29, 29]), kv_len=30))[0]
        full = model(ids)[0][:, -1]
    assert (stepped.float() - full.float()).abs().max().item() <= 0.05 * full.float().abs().max().item()
