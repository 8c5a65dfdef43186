"""Inference weights: int8 weight-only (the kernel against fp64 arithmetic on the dequantized weights, the model
against fp32 on a trained checkpoint: perplexity on corpus/valid within 1 %) and oneDNN-packed float weights (the
same outputs and greedy tokens as the plain layout), each with LoRA adapters on it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rugpt_ray.config import LoraConfig, ModelConfig, preset
from rugpt_ray.data import iter_documents, resolve_inputs
from rugpt_ray.errors import UserError
from rugpt_ray.evaluation import join_documents, perplexity
from rugpt_ray.generation import GenerationConfig, generate
from rugpt_ray.lora import add_lora
from rugpt_ray.quantization import (
    INT8_ACTIVATIONS,
    Int8Linear,
    PackedLinear,
    packs,
    prepack,
    quantize_int8,
    with_dtype,
)

SMALL = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
WIDE = ModelConfig(n_layer=2, n_embd=512, n_head=8, n_positions=128, vocab_size=50257)  # 512 x 512 = PACK_MIN_WEIGHTS


def test_int8_linear_is_round_to_nearest_per_channel_and_multiplies_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    linear.weight.data[3] *= 50  # an outlier channel gets its own scale
    layer = Int8Linear(linear)
    weight = linear.weight.detach().double()
    scales = weight.abs().amax(1) / 127
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() == 127
    assert torch.allclose(layer.scales.double(), scales)
    assert torch.equal(layer.weight.long(), torch.round(weight / scales[:, None]).long())
    assert ((layer.dequantized().double() - weight).abs() <= scales[:, None] / 2 + 1e-7).all()

    layer = layer.to(INT8_ACTIVATIONS)
    x = torch.randn(5, 7, 96).to(INT8_ACTIVATIONS)
    want = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).T + layer.bias.double()
    got = layer(x)
    assert got.shape == (5, 7, 40) and got.dtype == INT8_ACTIVATIONS
    assert torch.allclose(got.double(), want, rtol=2e-2, atol=2e-2)  # bfloat16's rounding of the result


def test_quantized_model_keeps_embeddings_and_unties_the_output_layer(make_model):
    model = make_model(SMALL)
    quantized = quantize_int8(copy.deepcopy(model))
    linears = [m for m in quantized.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is Int8Linear for m in linears)  # every block layer and the output layer
    assert quantized.lm_head.weight.data_ptr() != quantized.transformer.wte.weight.data_ptr()
    assert torch.allclose(quantized.lm_head.dequantized(), model.transformer.wte.weight, atol=1e-2)
    assert quantized.transformer.wte.weight.dtype == INT8_ACTIVATIONS
    assert not any(p.requires_grad for p in quantized.parameters())


def test_only_cpu_and_known_dtypes(make_model):
    model = make_model(SMALL)
    with pytest.raises(UserError, match="dtype 'int4' is not one of float32, bfloat16, float16, int8"):
        with_dtype(model, "int4")
    assert with_dtype(model, "bfloat16").transformer.wte.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
def test_packed_linear_computes_the_plain_layers_product(dtype, tolerance):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(dtype)
    layer = PackedLinear(linear)
    assert layer.weight.is_mkldnn and (layer.in_features, layer.out_features) == (96, 40)
    for shape in [(1, 96), (16, 96), (5, 7, 96)]:
        x = torch.randn(*shape).to(dtype)
        got, want = layer(x), linear(x)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_model_decodes_the_plain_models_greedy_tokens(make_model, tokenizer, dtype):
    model = make_model(WIDE)
    plain = copy.deepcopy(model).to(getattr(torch, dtype))
    packed = prepack(with_dtype(copy.deepcopy(model), dtype))
    if not packs(plain):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU")  # the plain layout is then what with_dtype keeps
    linears = [m for m in packed.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)  # every block layer and the output layer
    assert torch.equal(packed.transformer.wte.weight, plain.transformer.wte.weight)  # looked up as before
    assert not any(p.requires_grad for p in packed.parameters())
    ids = torch.randint(0, WIDE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(packed(ids)[0].float(), plain(ids)[0].float(), atol=1e-3)  # logits up to ~11 here
    cfg = GenerationConfig(max_new_tokens=24, greedy=True, ignore_eos=True)
    prompts = ["Москва", "Жили-были дед да баба"]
    assert ([c.token_ids for c in generate(packed, tokenizer, prompts, cfg)]
            == [c.token_ids for c in generate(plain, tokenizer, prompts, cfg)])


def test_small_layers_stay_plain(make_model):
    """64-wide layers cost oneDNN's call more than their product; the 50k-row output layer is packed."""
    packed = prepack(make_model(SMALL))
    assert type(packed.lm_head) is PackedLinear
    assert all(type(m) is nn.Linear for m in packed.transformer.h.modules() if isinstance(m, nn.Linear))


def test_only_plain_cpu_float_models_are_packed(make_model):
    int8 = quantize_int8(make_model(SMALL))
    assert not packs(int8) and type(prepack(int8).lm_head) is Int8Linear  # int8 has its own kernel
    assert not packs(make_model(SMALL).half())


def test_lora_adapter_runs_on_a_packed_base(make_model):
    base = prepack(make_model(WIDE))
    ids = torch.randint(0, WIDE.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(ids)[0]
    adapted = add_lora(base, LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc"]))
    assert type(adapted.transformer.h[0].attn.c_attn.get_base_layer()) is PackedLinear
    with torch.no_grad():
        assert torch.equal(adapted(ids)[0], plain)  # B = 0: the base's output
        for module in adapted.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_(0, 0.5)
        assert not torch.allclose(adapted(ids)[0], plain, atol=1e-2)


def _train(model, tokens: torch.Tensor, steps: int, seq_len: int = 64, batch: int = 8) -> None:
    """A short plain-torch run, so that the weights have the spread of a trained model's."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s:s + seq_len + 1] for s in starts])
        logits, _ = model(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def trained(tokenizer, data_dir):
    """A tiny-preset model trained for 60 steps on corpus/train, and corpus/valid's tokens."""
    def tokens(split: str) -> list[int]:
        documents = [doc.text for doc in iter_documents(resolve_inputs(str(data_dir / "corpus" / split)))]
        return join_documents(tokenizer.encode_batch(documents), tokenizer.eos_id)

    torch.manual_seed(0)
    from rugpt_ray.model import GPT

    model = GPT(preset("tiny"))
    _train(model, torch.tensor(tokens("train")[:400_000]), steps=60)
    return model, tokens("valid")


@pytest.mark.slow
def test_int8_perplexity_is_within_one_percent_of_fp32_on_a_trained_model(trained):
    model, valid = trained
    fp32 = perplexity(model, valid, 128, batch_size=16)
    int8 = perplexity(quantize_int8(copy.deepcopy(model)), valid, 128, batch_size=16)
    assert fp32.ppl < 5000  # trained: a random model is near the vocabulary's 50k
    assert int8.ppl != fp32.ppl and abs(int8.ppl / fp32.ppl - 1) < 0.01, (fp32.ppl, int8.ppl)


def test_lora_adapter_runs_on_an_int8_base(make_model):
    """The adapter's A and B, in the activations' dtype, add to the int8 layer's output as on a float base."""
    base = quantize_int8(make_model(SMALL))
    ids = torch.randint(0, SMALL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base(ids)[0].float()
    adapted = add_lora(base, LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc"]))
    layer = adapted.transformer.h[0].attn.c_attn
    assert type(layer.get_base_layer()) is Int8Linear
    assert layer.lora_A["default"].weight.dtype == INT8_ACTIVATIONS  # as on a bfloat16 base
    with torch.no_grad():
        assert torch.equal(adapted(ids)[0].float(), plain)  # B = 0: the base's output
        for module in adapted.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.normal_(0, 0.5)
        assert not torch.allclose(adapted(ids)[0].float(), plain, atol=1e-2)
