"""Mixed precision: per-layer weight bits from measured sensitivity under a size budget.

Sensitivity of layer l at b bits is either

- ``loss``: the validation-loss increase when only that layer's weights drop from
  8 to b bits (all activations at 8 bits), or
- ``fisher``: the second-order estimate 1/2 sum_i F_ii (Q_b(w_i) - w_i)^2 with F
  the empirical Fisher diagonal of the validation loss (HAWQ-style). It is
  additive over layers, which the knapsack assumes, and it does not saturate at
  the loss noise floor the way one-layer-at-a-time loss deltas do.

Bits are then allocated by an exact multiple-choice knapsack: minimise the summed
sensitivity subject to the weight bits fitting the budget.
"""

import copy
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepshrink.compress.quant.calibration import weight_spec
from deepshrink.compress.quant.config import MixedPrecision, resolve_reduce_range
from deepshrink.compress.quant.modules import fake_quant_layers
from deepshrink.compress.quant.prepare import calibrate, prepare
from deepshrink.compress.quant.ptq import calibration_batches
from deepshrink.compress.quant.qat import prepare_qat, qat
from deepshrink.compress.quant.storage import save_quantized_model
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.data.datasets import ImageSet, iterate_batches
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.evaluate.size import fp32_param_bytes

LAYER_BITS_KEY = "layer_bits"  # checkpoint metadata of a mixed-precision step: its bit plan

MAX_BUDGET_PASSES = 4  # re-plans after packing for real; the file overhead is nearly constant, so 1-2 suffice
MAX_DP_CELLS = 1 << 22  # exact for weight budgets up to 4 Mbit (resnet20 at 1/6 of fp32: 1.4 Mbit)


FISHER_BATCH = 32  # small batches: the squared batch gradient then approximates the per-sample Fisher better


def fisher_diagonal(qmodel: nn.Module, val: ImageSet) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the validation loss w.r.t. each quantized layer's weight."""
    layers = dict(fake_quant_layers(qmodel))
    weights = [layer.weight for layer in layers.values()]
    totals = [torch.zeros_like(w) for w in weights]
    batches = 0
    qmodel.eval()
    with torch.enable_grad():
        for images, labels in iterate_batches(val, FISHER_BATCH):
            grads = torch.autograd.grad(nn.functional.cross_entropy(qmodel(images), labels), weights)
            for total, grad in zip(totals, grads, strict=True):
                total += grad**2
            batches += 1
    return {name: total / max(batches, 1) for name, total in zip(layers, totals, strict=True)}


@torch.no_grad()
def bit_sensitivity(
    model: nn.Module,
    batches,
    val: ImageSet,
    candidate_bits: tuple[int, ...],
    scope,
    reduce_range: bool = False,
    measure: str = "fisher",
) -> dict[str, dict[int, float]]:
    """Sensitivity per (layer, bits) with every other layer at 8 bits (see the module docstring)."""
    qmodel = prepare(model, 8, 8, scope, reduce_range=reduce_range)
    calibrate(qmodel, batches)
    if measure == "fisher":
        fisher = fisher_diagonal(qmodel, val)

        def score(name: str, layer: nn.Module) -> float:
            return 0.5 * float((fisher[name] * (layer.weight_quant(layer.weight) - layer.weight) ** 2).sum())
    else:
        base = evaluate_accuracy(qmodel, val).loss

        def score(name: str, layer: nn.Module) -> float:
            return max(0.0, evaluate_accuracy(qmodel, val).loss - base)

    result: dict[str, dict[int, float]] = {}
    for name, layer in fake_quant_layers(qmodel):
        quant = layer.weight_quant
        saved = (quant.spec, quant.scale.detach().clone())
        result[name] = {}
        for bits in candidate_bits:
            quant.spec = weight_spec(min(bits, 7) if reduce_range else bits)
            quant.calibrate(layer.weight, "mse")
            result[name][bits] = score(name, layer)
        quant.spec = saved[0]
        quant.scale.copy_(saved[1])
    return result


def allocate_bits(sensitivity: dict[str, dict[int, float]], sizes: dict[str, int], budget_bits: float) -> dict[str, int]:
    """The per-layer bits with the least summed sensitivity whose weights fit ``budget_bits``.

    Exact multiple-choice knapsack by dynamic programming over the budget in bits
    (vectorised per option). Budgets above ``MAX_DP_CELLS`` bits are counted in
    coarser units with costs rounded up, so a plan always fits."""
    smallest = sum(sizes[n] * min(o) for n, o in sensitivity.items())
    if budget_bits < smallest:
        raise InputError(f"size budget of {budget_bits / 8:.0f} bytes of weights is below the smallest plan ({smallest / 8:.0f} bytes)")
    unit = max(1.0, budget_bits / MAX_DP_CELLS)
    capacity = int(budget_bits // unit)
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0  # best[c]: least summed sensitivity with exactly c units used
    picks = []
    for name, options in sensitivity.items():
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int8)
        for bits, cost in sorted(options.items()):
            units = math.ceil(sizes[name] * bits / unit)
            if units > capacity:
                continue
            candidate = best[: capacity + 1 - units] + cost
            better = candidate < new[units:]
            new[units:][better] = candidate[better]
            pick[units:][better] = bits
        best = new
        picks.append(pick)
    end = int(np.argmin(best))
    if math.isinf(best[end]):  # costs rounded up to coarse units can overshoot a budget that fits exactly
        raise InputError(f"size budget of {budget_bits / 8:.0f} bytes of weights is below the smallest plan ({smallest / 8:.0f} bytes)")
    plan: dict[str, int] = {}
    for name, pick in zip(reversed(list(sensitivity)), reversed(picks), strict=True):
        plan[name] = int(pick[end])
        end -= math.ceil(sizes[name] * plan[name] / unit)
    return dict(reversed(list(plan.items())))


def _size_accounting(model: nn.Module, scope) -> tuple[dict[str, int], int, int]:
    """Weights per layer in scope, the fp32 model's bits, and the bits of everything
    that stays fp32 (other parameters, biases, one scale per output channel)."""
    layers = dict(scope.layers(model))
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}
    total_bits = 8 * fp32_param_bytes(model)
    overhead_bits = total_bits - 32 * sum(sizes.values()) + 32 * sum(layer.weight.shape[0] for layer in layers.values())
    return sizes, total_bits, overhead_bits


def weight_budget_bits(model: nn.Module, cfg: MixedPrecision) -> tuple[float, dict[str, int]]:
    """Bits left for quantized weights once the fp32 remainder is paid from ``size_fraction`` of the fp32 size."""
    sizes, total_bits, overhead_bits = _size_accounting(model, cfg.qat.scope)
    return cfg.size_fraction * total_bits - overhead_bits, sizes


def plan_fraction(model: nn.Module, bits: dict[str, int], scope) -> float:
    """A bit plan's size as a fraction of the fp32 model, by the accounting the budget uses."""
    sizes, total_bits, overhead_bits = _size_accounting(model, scope)
    return (sum(sizes[name] * b for name, b in bits.items()) + overhead_bits) / total_bits


def packed_plan_bytes(model: nn.Module, plan: dict[str, int], cfg: MixedPrecision, batches) -> int:
    """Bytes on disk of the bit-packed file this plan produces (quantizers calibrated, not trained)."""
    qmodel = prepare_qat(model, replace(cfg.qat, layer_bits=plan, keep_first_last=False), batches)
    with tempfile.TemporaryDirectory() as tmp:
        return save_quantized_model(qmodel, Path(tmp) / "plan.safetensors")


def plan_bits(model: nn.Module, cfg: MixedPrecision, ctx: Context) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
    """The knapsack plan whose packed file fits ``size_fraction`` of the fp32 parameter bytes.

    The knapsack counts weight bits plus an estimate of the rest; the file also holds
    zero points and a header, so the plan is packed for real and, while the file is
    too big, re-planned with its own weight bits less the excess."""
    if ctx.data is None:
        raise InputError("mixed precision needs data for its sensitivity analysis: pass data= (a DataBundle)")
    batches = calibration_batches(ctx, cfg.qat.calib_samples, ctx.calib)
    val = ctx.data.val.subset(cfg.sensitivity_samples)
    reduce_range = resolve_reduce_range(cfg.qat.reduce_range)
    sensitivity = bit_sensitivity(model, batches, val, cfg.candidate_bits, cfg.qat.scope, reduce_range, cfg.sensitivity)
    budget, sizes = weight_budget_bits(model, cfg)
    target_bytes = cfg.size_fraction * fp32_param_bytes(model)
    for _ in range(MAX_BUDGET_PASSES):
        plan = allocate_bits(sensitivity, sizes, budget)
        excess = packed_plan_bytes(model, plan, cfg, batches) - target_bytes
        if excess <= 0:
            return plan, sensitivity
        budget = sum(sizes[name] * bits for name, bits in plan.items()) - 8 * excess
    raise InputError(f"no bit plan packs into {cfg.size_fraction:.4f} of the fp32 size ({target_bytes:,.0f} bytes)")


@method("mixed_precision", MixedPrecision, needs=("data", "calib?"), quantizes=True)
class MixedPrecisionMethod:
    def torch(self, model: nn.Module, cfg: MixedPrecision, ctx: Context) -> nn.Module:
        plan, sensitivity = plan_bits(model, cfg, ctx)
        planned = replace(cfg.qat, layer_bits=plan, keep_first_last=False)
        if cfg.train:
            qmodel = qat(model, planned, ctx)
        else:
            qmodel = prepare_qat(model, planned, calibration_batches(ctx, planned.calib_samples, ctx.calib)).eval()
        qmodel.bit_plan = plan
        qmodel.bit_sensitivity = sensitivity
        return qmodel

    def saved(self, model: nn.Module) -> dict[str, str] | None:
        """The bit plan, which depends on data the resumed run should not re-measure."""
        plan = getattr(model, "bit_plan", None)
        return {LAYER_BITS_KEY: ",".join(f"{name}={bits}" for name, bits in plan.items())} if plan else None

    def restore(self, model: nn.Module, cfg: MixedPrecision, ctx: Context, saved: dict[str, str]) -> nn.Module:
        text = saved.get(LAYER_BITS_KEY)
        if not text:
            raise InputError("mixed-precision checkpoint without its bit plan; delete it to re-run the step")
        plan = {name: int(bits) for name, bits in (item.split("=") for item in text.split(","))}
        qat_cfg = replace(cfg.qat, layer_bits=plan, keep_first_last=False)
        return prepare_qat(copy.deepcopy(model), qat_cfg, calibration_batches(ctx, qat_cfg.calib_samples, ctx.calib))
