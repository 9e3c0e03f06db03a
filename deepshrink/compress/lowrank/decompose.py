"""The ``Decompose`` method: factorise layers in scope, then optionally fine-tune (with KD).

``svd`` factorises Linear layers, ``tucker`` and ``cp`` factorise kxk Conv2d
layers (groups 1). A layer whose factorisation would not cut its MACs is left
as it is, and says so in the per-layer record.
"""

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deepshrink.compress.distill import KD, restructure_and_finetune
from deepshrink.compress.lowrank.layers import (
    FACTORISED,
    LowRankLinear,
    TuckerConv2d,
    cp_conv,
    cp_reconstruct,
    exact_cp_rank,
    linear_singular_values,
    svd_linear,
    tucker_conv,
    unfold,
)
from deepshrink.compress.lowrank.rank import (
    cp_macs,
    cp_rank_for,
    energy_rank,
    svd_rank_for,
    tucker_macs,
    tucker_ranks_for,
    vbmf_rank,
)
from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError, NotApplicable
from deepshrink.core.methods import Context, method
from deepshrink.core.modules import replace_module
from deepshrink.train import TrainConfig


@dataclass(frozen=True)
class Decompose(Config):
    """Low-rank factorisation. Pick ranks with exactly one of: ``rank`` (a number, or
    ``"auto"`` for VBMF), ``energy`` (keep that fraction of the squared singular
    values, per unfolding for Tucker) or ``compression`` (cut each layer's MACs by
    that factor). ``layer_ranks`` fixes ranks of named layers on top. ``round_to``
    rounds chosen ranks down to a multiple (not below it): ONNX Runtime's CPU
    convolutions work in blocks of 8 channels, so other counts save MACs but no
    time. ``finetune`` trains after factorising; ``distill`` makes that training
    KD from the original."""

    method: Literal["svd", "tucker", "cp"] = "svd"
    rank: int | Literal["auto"] | None = None
    energy: float | None = None
    compression: float | None = None
    layer_ranks: dict[str, int] | None = None
    round_to: int = 1
    scope: Scope = Scope()
    hooi_iters: int = 2
    cp_iters: int = 200
    seed: int = 0
    finetune: TrainConfig | None = None
    distill: KD | None = None

    def __post_init__(self) -> None:
        chosen = [k for k in ("rank", "energy", "compression") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise InputError(f"set exactly one of rank, energy, compression (got {chosen or 'none'})")
        if isinstance(self.rank, int) and self.rank < 1:
            raise InputError(f"rank must be >= 1 or 'auto', got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise InputError(f"energy must be in (0, 1], got {self.energy}")
        if self.compression is not None and not self.compression > 1:
            raise InputError(f"compression must be > 1, got {self.compression}")
        for name, value in (self.layer_ranks or {}).items():
            if value < 1:
                raise InputError(f"layer_ranks.{name} must be >= 1, got {value}")
        if self.method == "cp" and (self.energy is not None or self.rank == "auto"):
            raise InputError("cp: choose ranks with rank (a number) or compression; energy and auto are for svd and tucker")
        if self.round_to < 1:
            raise InputError(f"round_to must be >= 1, got {self.round_to}")
        if self.hooi_iters < 0 or self.cp_iters < 1:
            raise InputError(f"hooi_iters must be >= 0 and cp_iters >= 1, got {self.hooi_iters} and {self.cp_iters}")
        if self.distill is not None and self.finetune is None:
            raise InputError("distill sets how to fine-tune: set finetune too")


@dataclass
class LayerDecomposition:
    """What happened to one layer: ranks, MACs per output position before/after, relative weight error."""

    name: str
    method: str
    ranks: tuple[int, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    relative_error: float
    replaced: bool


def _targets(model: nn.Module, cfg: Decompose) -> list[tuple[str, nn.Module]]:
    inside = [name for name, m in model.named_modules() if isinstance(m, FACTORISED)]
    wanted = nn.Linear if cfg.method == "svd" else nn.Conv2d
    layers = []
    for name, module in cfg.scope.layers(model):
        if not isinstance(module, wanted) or any(name.startswith(f"{p}.") for p in inside):
            continue
        if isinstance(module, nn.Conv2d) and (module.kernel_size == (1, 1) or module.groups != 1):
            continue  # a 1x1 conv is a matrix (use svd on it as a Linear); depthwise convs are already cheap
        layers.append((name, module))
    unknown = sorted(set(cfg.layer_ranks or {}) - {name for name, _ in layers})
    if unknown:
        raise InputError(f"layer_ranks: no {cfg.method}-decomposable layer named {unknown} in scope")
    return layers


def _layer_rank(name: str, limits: tuple[int, ...], cfg: Decompose) -> tuple[int, ...] | None:
    """A fixed rank per mode: ``layer_ranks`` must fit the layer; a global ``rank`` is capped at each mode's size."""
    if cfg.layer_ranks and name in cfg.layer_ranks:
        rank = cfg.layer_ranks[name]
        if rank > min(limits):
            raise InputError(f"layer_ranks.{name}: rank {rank} exceeds the layer's largest possible rank {min(limits)}")
        return (rank,) * len(limits)
    if isinstance(cfg.rank, int):
        return tuple(min(cfg.rank, limit) for limit in limits)
    return None


def _svd_plan(name: str, layer: nn.Linear, cfg: Decompose) -> tuple[int, ...]:
    out_f, in_f = layer.weight.shape
    fixed = _layer_rank(name, (min(out_f, in_f),), cfg)
    if fixed is not None:
        return fixed
    if cfg.compression is not None:
        return (svd_rank_for(out_f, in_f, cfg.compression),)
    if cfg.energy is not None:
        return (energy_rank(linear_singular_values(layer), cfg.energy),)
    return (vbmf_rank(layer.weight),)


def _tucker_plan(name: str, conv: nn.Conv2d, cfg: Decompose) -> tuple[int, ...]:
    out_c, in_c = conv.weight.shape[:2]
    fixed = _layer_rank(name, (out_c, in_c), cfg)
    if fixed is not None:
        return fixed
    if cfg.compression is not None:
        return tucker_ranks_for(out_c, in_c, conv.kernel_size, conv.stride, cfg.compression)
    w = conv.weight.detach().double()
    if cfg.energy is not None:
        return tuple(energy_rank(torch.linalg.svdvals(unfold(w, mode)), cfg.energy) for mode in (0, 1))
    return tuple(vbmf_rank(unfold(w, mode)) for mode in (0, 1))


def _cp_plan(name: str, conv: nn.Conv2d, cfg: Decompose) -> tuple[int, ...]:
    fixed = _layer_rank(name, (exact_cp_rank(tuple(conv.weight.shape)),), cfg)
    if fixed is not None:
        return fixed
    out_c, in_c = conv.weight.shape[:2]
    return (cp_rank_for(out_c, in_c, conv.kernel_size, conv.stride, cfg.compression),)


def _rounded(ranks: tuple[int, ...], limits: tuple[int, ...], multiple: int) -> tuple[int, ...]:
    """Each rank down to a multiple of ``multiple``, but at least ``multiple`` and at most the mode's size."""
    return tuple(min(limit, max(multiple, r // multiple * multiple)) for r, limit in zip(ranks, limits, strict=True))


def _plan(name: str, layer: nn.Module, cfg: Decompose) -> tuple[int, ...]:
    """The layer's ranks: ``layer_ranks`` as given, otherwise the selection rounded by ``round_to``."""
    plan = {"svd": _svd_plan, "tucker": _tucker_plan, "cp": _cp_plan}[cfg.method]
    ranks = plan(name, layer, cfg)
    if cfg.round_to == 1 or (cfg.layer_ranks and name in cfg.layer_ranks):
        return ranks
    w = layer.weight
    limits = {"svd": (min(w.shape),), "tucker": tuple(w.shape[:2]), "cp": (exact_cp_rank(tuple(w.shape)),)}[cfg.method]
    return _rounded(ranks, limits, cfg.round_to)


def _costs(layer: nn.Module, ranks: tuple[int, ...], method: str) -> tuple[int, int]:
    """MACs per output position before and after (for Linear: the weight counts)."""
    if method == "svd":
        out_f, in_f = layer.weight.shape
        return out_f * in_f, ranks[0] * (out_f + in_f)
    out_c, in_c, kh, kw = layer.weight.shape
    if method == "tucker":
        return out_c * in_c * kh * kw, tucker_macs(out_c, in_c, ranks, layer.kernel_size, layer.stride)
    return out_c * in_c * kh * kw, cp_macs(out_c, in_c, ranks[0], layer.kernel_size, layer.stride)


def _build(name: str, layer: nn.Module, ranks: tuple[int, ...], cfg: Decompose) -> nn.Module:
    if cfg.method == "svd":
        return svd_linear(layer, ranks[0], name)
    if cfg.method == "tucker":
        return tucker_conv(layer, ranks, cfg.hooi_iters, name)
    return cp_conv(layer, ranks[0], cfg.cp_iters, cfg.seed, name)


def _factorise(name: str, layer: nn.Module, cfg: Decompose) -> tuple[LayerDecomposition, nn.Module | None]:
    """Pick ranks, build the factorised layer, and record the cost; no layer when it would not save MACs."""
    ranks = _plan(name, layer, cfg)
    before, after = _costs(layer, ranks, cfg.method)
    params = layer.weight.numel()
    if after >= before:
        return LayerDecomposition(name, cfg.method, ranks, before, after, params, params, float("nan"), False), None
    new = _build(name, layer, ranks, cfg)
    w = layer.weight.detach().double()
    error = float((dense_weight(new) - w).norm() / w.norm().clamp_min(1e-300))
    new_params = sum(p.numel() for n, p in new.named_parameters() if n.endswith("weight"))
    return LayerDecomposition(name, cfg.method, ranks, before, after, params, new_params, error, True), new


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight a factorised layer computes (float64), to measure the approximation."""
    weights = [m.weight.detach().double() for m in layer]
    if isinstance(layer, LowRankLinear):
        return weights[1] @ weights[0]
    if isinstance(layer, TuckerConv2d):
        return _tucker_weight(*weights)
    return _cp_weight(*weights)


def _tucker_weight(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    return torch.einsum("os,srhw,ri->oihw", last[:, :, 0, 0], core, first[:, :, 0, 0])


def _cp_weight(first: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    return cp_reconstruct([last[:, :, 0, 0], first[:, :, 0, 0].T, vertical[:, 0, :, 0].T, horizontal[:, 0, 0, :].T])


def decompose_model(model: nn.Module, cfg: Decompose) -> tuple[nn.Module, list[LayerDecomposition]]:
    """Factorise ``model``'s layers in place (no fine-tuning); returns the model and one record per layer."""
    records = []
    for name, layer in _targets(model, cfg):
        record, new = _factorise(name, layer, cfg)
        records.append(record)
        if new is not None:
            model = replace_module(model, name, new)
    return model, records


def decompose_required(model: nn.Module, cfg: Decompose) -> tuple[nn.Module, list[LayerDecomposition]]:
    """decompose_model, refusing a model in which no layer would be factorised (fine-tuning
    it anyway would pass the original off as a decomposed model)."""
    model, records = decompose_model(model, cfg)
    if not any(record.replaced for record in records):
        skipped = "1x1 and depthwise convs are skipped" if cfg.method != "svd" else "only Linear layers are factorised"
        raise NotApplicable(f"decompose ({cfg.method}): no layer to factorise ({len(records)} tried; {skipped})")
    return model, records


@method("decompose", Decompose, needs=("data?", "teacher?"))
class DecomposeMethod:
    def torch(self, model: nn.Module, cfg: Decompose, ctx: Context) -> nn.Module:
        return restructure_and_finetune(model, lambda m: decompose_required(m, cfg)[0], cfg.finetune, cfg.distill, ctx)

    def restore(self, model: nn.Module, cfg: Decompose, ctx: Context, saved: dict) -> nn.Module:
        return decompose_model(copy.deepcopy(model), cfg)[0]
