"""The ``Decompose`` method: factorise layers in scope, then optionally fine-tune (with KD).

``svd`` factorises Linear layers, ``tucker`` and ``cp`` factorise kxk Conv2d
layers (groups 1, more than one input channel). A layer whose factorisation
would not cut its MACs is left as it is, and so, by default, is a layer whose
factorised form ONNX Runtime does not run faster (timed alone, at the target
batch): fewer MACs in three thin convolutions can take longer than one wide
one. The per-layer record says which and why.
"""

import copy
import functools
import statistics
import time
from dataclasses import dataclass, replace
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
from deepshrink.export.onnx import onnx_bytes, ort_session, run_ort
from deepshrink.train import TrainConfig

LATENCY_MARGIN = 0.95  # a factorised layer must save 5% of the layer's time: less is timing noise, paid for in accuracy
LATENCY_PAIRS = 30  # alternating (original, factorised) runs per layer timing, after 3 warm-up pairs
DECOMPOSED_KEY = "decomposed_layers"  # checkpoint metadata: the layers the latency check kept factorised


@dataclass(frozen=True)
class Decompose(Config):
    """Low-rank factorisation. Pick ranks with exactly one of: ``rank`` (a number, or
    ``"auto"`` for VBMF), ``energy`` (keep that fraction of the squared singular
    values, per unfolding for Tucker) or ``compression`` (cut each layer's MACs by
    that factor). ``layer_ranks`` fixes ranks of named layers on top. ``round_to``
    rounds chosen ranks down to a multiple (not below it): ONNX Runtime's CPU
    convolutions work in blocks of 8 channels, so other counts save MACs but no
    time. ``latency_check`` keeps a layer factorised only where ONNX Runtime
    runs the factorised layer faster than the original one at ``latency_batch``
    (needs data, for the input shape); ``latency_check: false`` forces every
    layer that saves MACs. ``finetune`` trains after factorising; ``distill``
    makes that training KD from the original."""

    method: Literal["svd", "tucker", "cp"] = "svd"
    rank: int | Literal["auto"] | None = None
    energy: float | None = None
    compression: float | None = None
    layer_ranks: dict[str, int] | None = None
    round_to: int = 8
    latency_check: bool = True
    latency_batch: int = 64
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
        if self.latency_batch < 1:
            raise InputError(f"latency_batch must be >= 1, got {self.latency_batch}")
        if self.hooi_iters < 0 or self.cp_iters < 1:
            raise InputError(f"hooi_iters must be >= 0 and cp_iters >= 1, got {self.hooi_iters} and {self.cp_iters}")
        if self.distill is not None and self.finetune is None:
            raise InputError("distill sets how to fine-tune: set finetune too")


@dataclass
class LayerDecomposition:
    """What happened to one layer: ranks, MACs per output position before/after, relative weight
    error, and (when measured) the layer's ONNX Runtime milliseconds at the target batch before/after."""

    name: str
    method: str
    ranks: tuple[int, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    relative_error: float
    replaced: bool
    ort_ms_before: float | None = None
    ort_ms_after: float | None = None
    note: str = ""


def _targets(model: nn.Module, cfg: Decompose) -> list[tuple[str, nn.Module]]:
    inside = [name for name, m in model.named_modules() if isinstance(m, FACTORISED)]
    wanted = nn.Linear if cfg.method == "svd" else nn.Conv2d
    layers = []
    for name, module in cfg.scope.layers(model):
        if not isinstance(module, wanted) or any(name.startswith(f"{p}.") for p in inside):
            continue
        if isinstance(module, nn.Conv2d) and (module.kernel_size == (1, 1) or module.groups != 1 or module.in_channels == 1):
            continue  # a 1x1 conv is a matrix (svd it as a Linear); depthwise and 1-input-channel convs are already cheap
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
        return LayerDecomposition(name, cfg.method, ranks, before, after, params, params, float("nan"), False, note="no fewer MACs"), None
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


def layer_input_shapes(model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Each named layer's input shape (without the batch axis), from one eval-mode pass of zeros."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's return value replaces the inputs
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(record(name)) for name in names]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return shapes


def layer_latency(original: nn.Module, factorised: nn.Module, shape: tuple[int, ...], batch: int) -> tuple[float, float]:
    """ONNX Runtime ms of each layer alone on a ``batch`` of ``shape`` inputs: the original's median,
    and that times the median ratio of back-to-back runs. On a shared machine two consecutive runs
    see the same load, so their ratio holds where two separately taken medians do not."""
    runs = [
        functools.partial(run_ort, ort_session(onnx_bytes(layer.eval(), shape)), torch.randn(batch, *shape))
        for layer in (original, factorised)
    ]
    times = []
    for i in range(LATENCY_PAIRS + 3):
        pair = []
        for run in runs:
            start = time.perf_counter()
            run()
            pair.append((time.perf_counter() - start) * 1000.0)
        if i >= 3:
            times.append(pair)
    before = statistics.median(t[0] for t in times)
    return before, before * statistics.median(t[1] / t[0] for t in times)


def latency_gate(record: LayerDecomposition, before_ms: float, after_ms: float) -> LayerDecomposition:
    """The record with its timings; still replaced only if the factorised layer saves LATENCY_MARGIN of the time."""
    faster = after_ms < LATENCY_MARGIN * before_ms
    note = "" if faster else f"kept: factorised {after_ms:.3f} ms vs {before_ms:.3f} ms in ONNX Runtime"
    params = record.params_after if faster else record.params_before
    return replace(record, replaced=faster, params_after=params, ort_ms_before=before_ms, ort_ms_after=after_ms, note=note)


def decompose_model(
    model: nn.Module, cfg: Decompose, input_shape: tuple[int, ...] | None = None, only: set[str] | None = None
) -> tuple[nn.Module, list[LayerDecomposition]]:
    """Factorise ``model``'s layers in place (no fine-tuning); returns the model and one record per layer.

    With ``input_shape`` and ``cfg.latency_check``, each factorised layer is timed
    against the original and kept only if faster; ``only`` limits the work to
    named layers (a resumed run rebuilding what the check kept)."""
    targets = [(name, layer) for name, layer in _targets(model, cfg) if only is None or name in only]
    gated = cfg.latency_check and input_shape is not None and only is None
    shapes = layer_input_shapes(model, [name for name, _ in targets], input_shape) if gated else {}
    records = []
    for name, layer in targets:
        record, new = _factorise(name, layer, cfg)
        if new is not None and name in shapes:
            record = latency_gate(record, *layer_latency(layer, new, shapes[name], cfg.latency_batch))
        records.append(record)
        if record.replaced:
            model = replace_module(model, name, new)
    return model, records


def decompose_required(
    model: nn.Module, cfg: Decompose, input_shape: tuple[int, ...] | None = None
) -> tuple[nn.Module, list[LayerDecomposition]]:
    """decompose_model, refusing a model in which no layer would be factorised (fine-tuning
    it anyway would pass the original off as a decomposed model)."""
    model, records = decompose_model(model, cfg, input_shape)
    if not any(record.replaced for record in records):
        skipped = "1x1, depthwise and 1-input-channel convs are skipped" if cfg.method != "svd" else "only Linear layers are factorised"
        if any(record.ort_ms_after is not None for record in records):
            skipped += "; no factorised layer ran faster in ONNX Runtime (latency_check: false forces them)"
        raise NotApplicable(f"decompose ({cfg.method}): no layer to factorise ({len(records)} tried; {skipped})")
    model.decomposed_layers = [record.name for record in records if record.replaced]
    return model, records


@method("decompose", Decompose, needs=("data?", "teacher?"))
class DecomposeMethod:
    def torch(self, model: nn.Module, cfg: Decompose, ctx: Context) -> nn.Module:
        shape = ctx.data.input_shape if ctx.data is not None else None
        return restructure_and_finetune(model, lambda m: decompose_required(m, cfg, shape)[0], cfg.finetune, cfg.distill, ctx)

    def saved(self, model: nn.Module) -> dict[str, str] | None:
        """The layers kept factorised: the latency check's timings should not be re-measured on resume."""
        names = getattr(model, "decomposed_layers", None)
        return {DECOMPOSED_KEY: ",".join(names)} if names is not None else None

    def restore(self, model: nn.Module, cfg: Decompose, ctx: Context, saved: dict) -> nn.Module:
        only = set(saved[DECOMPOSED_KEY].split(",")) if saved.get(DECOMPOSED_KEY) else None
        return decompose_model(copy.deepcopy(model), cfg, only=only)[0]
