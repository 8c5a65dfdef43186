"""Weights for inference in a `DTYPES` name: a float dtype, or int8 weight-only for CPU serving.

On the CPU, float32 and bfloat16 weights are laid out once in oneDNN's blocked format (`PackedLinear`): decoding one
sequence is a matrix-vector product per layer, bound by how fast the weights are read, and MKL's on the plain
layout read them at 15 GB/s here where this machine streams 30 GB/s and the packed product reads 27 (ruGPT3Small
shape, 2 threads: 27 -> 45 tokens/s at batch 1 in fp32, 200 -> 305-335 at 16 rows; bf16 49 -> 60 and 445 -> 600).

int8 stores every `nn.Linear` of the blocks and the output layer as int8 with one symmetric scale per output
channel (round(w / s), s = max|w| / 127) and multiplies with torch's own `_weight_int8pack_mm` kernel; embeddings,
LayerNorms, biases and activations stay in bfloat16. The output layer is untied from the token embedding for this:
it is a third of ruGPT3Small's bytes, and the embedding is only looked up, one row per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rugpt_ray.config import DTYPES
from rugpt_ray.errors import UserError
from rugpt_ray.model import GPT

PACK_MIN_WEIGHTS = 1 << 18
"""A Linear with fewer weights stays plain when a model is packed: oneDNN's call then costs more than the product
(the tiny preset's 64-wide layers decoded one sequence at 0.75-0.9x packed; its output layer gains, and 512-wide
layers have this many)."""
INT8_ACTIVATIONS = torch.bfloat16
"""The activations' dtype of an int8 model: the int8 kernel's fast path on CPU (with fp32 inputs it is several
times slower than an fp32 matmul)."""


class Int8Linear(nn.Linear):
    """A frozen `nn.Linear` with int8 weights and per-output-channel scales. It stays an `nn.Linear` (with
    `in_features`, `out_features` and `bias`) so that LoRA adapters wrap it as they wrap the float layer."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight,
                                                 self.scales.to(x.dtype))
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: peft gives a LoRA adapter on this layer that dtype (as on a bitsandbytes layer),
        so it runs as on a float base of that dtype, in the server's mixed batches and alone alike."""
        return self.scales.dtype

    def dequantized(self) -> Tensor:
        """The fp32 weight this layer multiplies by."""
        return self.weight.float() * self.scales.float()[:, None]


class PackedLinear(nn.Linear):
    """A frozen float `nn.Linear` on the CPU whose weight oneDNN has reordered into its blocked layout once (the
    layout PyTorch's inductor gives frozen CPU weights), multiplied by oneDNN's kernel for it. It stays an
    `nn.Linear` so that LoRA adapters wrap it as they wrap the plain layer."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()))
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packs(model: GPT) -> bool:
    """Whether oneDNN can pack `model`'s Linears: plain ones (not int8), on the CPU, in float32, or in bfloat16
    where the CPU runs it."""
    weight = model.lm_head.weight
    return (type(model.lm_head) is nn.Linear and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and (weight.dtype == torch.float32
                 or weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def quantize_int8(model: GPT) -> GPT:
    """`model` (fp32 weights, on the CPU) with int8 Linears and bfloat16 for the rest, in place."""
    return _swap_linears(model, Int8Linear).to(INT8_ACTIVATIONS)


def prepack(model: GPT) -> GPT:
    """`model` laid out for inference, in place: its Linears of at least `PACK_MIN_WEIGHTS` weights made
    `PackedLinear`s where oneDNN can (`packs`); any other model (on a GPU, float16, int8) as it is. Not for a model
    that will be trained or saved."""
    if not packs(model):
        return model
    return _swap_linears(model, lambda linear: PackedLinear(linear) if linear.weight.numel() >= PACK_MIN_WEIGHTS
                         else linear)


def _swap_linears(model: GPT, layer: Callable[[nn.Linear], nn.Linear]) -> GPT:
    """`model`, frozen, with every plain `nn.Linear` of its blocks and its output layer replaced by `layer(it)`. An
    output layer replaced is untied from the token embedding, which stays as it is: it is only looked up, one row
    per token."""
    for name, module in list(model.transformer.h.named_modules()):
        if type(module) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.transformer.h.get_submodule(parent), child, layer(module))
    model.lm_head = layer(model.lm_head)
    return model.requires_grad_(False)


def with_dtype(model: GPT, dtype: str) -> GPT:
    """`model` (fp32, as `load_model` returns it) with its weights in `dtype`, one of `DTYPES`."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype != "int8":
        return model.to(getattr(torch, dtype))
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"dtype int8 runs on the CPU only (torch's int8 weight kernel); the model is on {device}")
    return quantize_int8(model)
