"""Dynamic int8 quantization of Linear (and Embedding) layers.

Weights are int8, symmetric, one scale per output channel (per row for
embedding tables). Activations are quantized per tensor at run time, to uint8
with an asymmetric range that always contains zero: exactly ONNX's
``DynamicQuantizeLinear`` (scale ``(max - min) / 255``, zero point rounded half
to even, ``x / scale`` rounded half to even). The integer product is exact and
is rescaled by ``activation_scale * weight_scale`` as ONNX Runtime's fused
``DynamicQuantizeMatMul`` does, so the fidelity measured on the torch model is
the fidelity ONNX Runtime delivers (see ``deepshrink.compress.quant.onnx_dynamic``).

The arithmetic lives here rather than in ``primitives`` on purpose: it must
match ORT's rounding (division by the scale, not multiplication by its
reciprocal), which is what makes torch and ORT agree to float rounding.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method, method
from deepshrink.core.modules import check_layer_names, replace_module

ACT_QMAX = 255  # uint8 activations
_EXACT_FLOAT32 = 2**24  # integer sums below this are exact in float32


@dataclass(frozen=True)
class DynamicQuant(Config):
    """Int8 weights (per output channel), uint8 activations quantized at run time.

    ``fallback`` names layers kept in fp32 (exact module names, e.g. from a
    sensitivity analysis); ``embeddings`` also stores ``nn.Embedding`` tables as
    int8 with a scale per row, which matters for transformers, whose vocabulary
    table is often the largest tensor. ``reduce_range`` uses 7-bit weights
    (ORT's option of that name): on x86 CPUs without VNNI, ORT's u8 x s8 kernels
    sum pairs of products in 16 bits and can saturate with full-range weights.
    """

    scope: Scope = Scope(types=("Linear",))
    embeddings: bool = True
    fallback: tuple[str, ...] = ()
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if "Conv2d" in self.scope.types:
            raise InputError("scope.types: dynamic quantization covers Linear layers only, not Conv2d")


# -- the arithmetic ------------------------------------------------------------------
def weight_qmax(reduce_range: bool = False) -> int:
    return 63 if reduce_range else 127


def quantize_per_channel(weight: Tensor, reduce_range: bool = False) -> tuple[Tensor, Tensor]:
    """(int8 codes, fp32 scale per row) of a 2-d weight, symmetric: ``w ~= q * scale[:, None]``.

    Rows are output channels of a Linear (``[out, in]``) or entries of an
    embedding table; an all-zero row gets scale 1 so that it stays exactly zero.
    """
    if weight.dim() != 2:
        raise InputError(f"per-channel weight quantization needs a 2-d weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    qmax = weight_qmax(reduce_range)
    scale = w.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(codes as float, scale, zero point) of ONNX ``DynamicQuantizeLinear`` over the whole tensor."""
    x = x.detach().float()
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = (high - low) / ACT_QMAX
    scale = torch.where(high > low, scale, torch.ones_like(scale))
    zero_point = torch.round(torch.clamp(-low / scale, 0, ACT_QMAX))
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, ACT_QMAX)
    return q, scale, zero_point


def int_matmul(centered: Tensor, qweight: Tensor) -> Tensor:
    """``centered @ qweight.T`` exactly (integer-valued floats), as float32 like ORT's Cast(int32)."""
    bound = ACT_QMAX * int(qweight.abs().max().item() if qweight.numel() else 0) * qweight.shape[1]
    dtype = torch.float32 if bound < _EXACT_FLOAT32 else torch.float64
    return (centered.to(dtype) @ qweight.to(dtype).T).float()


def dynamic_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """What ORT's DynamicQuantizeMatMul computes: quantize x, integer matmul, rescale, add bias."""
    q, x_scale, zero_point = quantize_activation(x)
    y = int_matmul(q - zero_point, qweight) * (x_scale * scale)
    return y if bias is None else y + bias


# -- modules ---------------------------------------------------------------------------
class DynamicQuantLinear(nn.Module):
    """An ``nn.Linear`` with int8 weights and run-time uint8 activations (inference only)."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, reduce_range: bool = False) -> "DynamicQuantLinear":
        q, scale = quantize_per_channel(linear.weight, reduce_range)
        return cls(q, scale, linear.bias)

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return dynamic_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class DynamicQuantEmbedding(nn.Module):
    """An ``nn.Embedding`` stored as int8 rows with one fp32 scale each."""

    def __init__(self, qweight: Tensor, scale: Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight.to(torch.int8))
        self.register_buffer("scale", scale.float())

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "DynamicQuantEmbedding":
        if embedding.max_norm is not None:
            raise InputError("embeddings with max_norm cannot be quantized: their rows change at run time")
        q, scale = quantize_per_channel(embedding.weight)
        return cls(q, scale, embedding.padding_idx)

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.qweight).float() * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


QUANTIZED_TYPES = (DynamicQuantLinear, DynamicQuantEmbedding)


# -- model surgery ----------------------------------------------------------------------
def dynamic_targets(model: nn.Module, cfg: DynamicQuant) -> list[str]:
    """Names of the layers ``cfg`` quantizes, in model order (fallback layers left out)."""
    names = []
    for name, module in model.named_modules():
        in_scope = cfg.scope.matches(name, module) or (cfg.embeddings and type(module) is nn.Embedding)
        if in_scope and name not in cfg.fallback and name:
            names.append(name)
    return names


def quantize_layers(model: nn.Module, names: list[str], reduce_range: bool = False) -> nn.Module:
    """Swap the named Linear/Embedding layers of ``model`` (in place) for their int8 versions."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            replace_module(model, name, DynamicQuantLinear.from_linear(module, reduce_range))
        elif isinstance(module, nn.Embedding):
            replace_module(model, name, DynamicQuantEmbedding.from_embedding(module))
        else:
            raise InputError(f"layer {name!r} is a {type(module).__name__}; dynamic quantization takes Linear or Embedding")
    return model


@method("dynamic_quant", DynamicQuant, quantizes=True)
class DynamicQuantMethod:
    def torch(self, model: nn.Module, cfg: DynamicQuant, ctx: Context) -> nn.Module:
        check_layer_names(model, cfg.fallback, "fallback")
        return quantize_layers(model.eval(), dynamic_targets(model, cfg), cfg.reduce_range)

    def restore(self, model: nn.Module, cfg: DynamicQuant, ctx: Context, saved: dict) -> nn.Module:
        return self.torch(copy.deepcopy(model), cfg, ctx)  # no data: deterministic from the weights


def quantize_dynamic(model: nn.Module, cfg: DynamicQuant | None = None) -> nn.Module:
    """A dynamically quantized copy of ``model``; the caller's model is untouched."""
    return apply_method(model, cfg or DynamicQuant())


def dynamic_quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A float copy whose Linear/Embedding weights equal the int8 codes times their scales.

    It is what gets exported to ONNX before the graph is rewritten with the very
    same codes and scales (``deepshrink.compress.quant.onnx_dynamic``).
    """
    proxy = copy.deepcopy(model)
    for name, module in dynamic_quant_layers(proxy).items():
        replace_module(proxy, name, _float_layer(module))
    return proxy


def _float_layer(module: nn.Module) -> nn.Module:
    weight = module.dequantized_weight()
    if isinstance(module, DynamicQuantEmbedding):
        layer = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
    else:
        layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias)
    layer.weight.data.copy_(weight)
    return layer.eval()


def parameter_count(model: nn.Module) -> int:
    """Parameters, counting an int8 layer's codes and bias as the parameters they replace (not its scales)."""
    count = sum(p.numel() for p in model.parameters())
    for layer in dynamic_quant_layers(model).values():
        count += layer.qweight.numel() + (layer.bias.numel() if getattr(layer, "bias", None) is not None else 0)
    return count


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as stored: int8 codes at 1 byte, everything else at its dtype."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
