"""The plan path: per layer the lower convex hull of (bytes, cost), merged across layers by cost per byte
saved (a Lagrangian sweep), and what a plan looks like measured on a model."""

import torch
from torch import nn

from deepshrink.pipeline.auto.options import FP32_BITS, Option, Plan


def hull_path(options: list[Option]) -> list[Option]:
    """From the cheapest option toward fewer bytes, each step the least cost per byte saved (lower convex hull;
    points on a hull edge are kept, so the path moves in small steps)."""
    current = min(options, key=lambda o: (o.cost, o.bytes))
    path = [current]
    while smaller := [o for o in options if o.bytes < current.bytes]:
        slopes = {o: (o.cost - current.cost) / (current.bytes - o.bytes) for o in smaller}
        least = min(slopes.values())
        current = max((o for o in smaller if slopes[o] <= least + 1e-9 * abs(least) + 1e-15), key=lambda o: o.bytes)
        path.append(current)
    return path


def plan_path(options: dict[str, list[Option]]) -> list[Plan]:
    """Plans from least to most aggressive: merge every layer's hull moves by cost per byte saved."""
    hulls = {name: hull_path(opts) for name, opts in options.items()}
    moves = []
    for name, hull in hulls.items():
        for k in range(1, len(hull)):
            slope = (hull[k].cost - hull[k - 1].cost) / (hull[k - 1].bytes - hull[k].bytes)
            moves.append((slope, k, name))
    plan = {name: hull[0] for name, hull in hulls.items()}
    plans = [dict(plan)]
    for _, k, name in sorted(moves):
        plan[name] = hulls[name][k]
        plans.append(dict(plan))
    return plans


def plan_bytes(plan: Plan, fixed: int) -> int:
    return fixed + sum(o.bytes for o in plan.values())


def plan_dict(plan: Plan) -> dict[str, dict]:
    return {name: {"sparsity": o.sparsity, "bits": o.bits} for name, o in plan.items()}


def measured_plan(model: nn.Module, names: list[str], bits: dict[str, int] | None = None) -> dict[str, dict]:
    """The plan as the model really is: zero fraction per layer (and the bits it was shared at)."""
    return {n: {"sparsity": s, "bits": (bits or {}).get(n, FP32_BITS)} for n, s in zero_fractions(model, names).items()}


def plan_summary(model: nn.Module, names: list[str], bits: dict[str, int]) -> tuple[float, float]:
    """(sparsity over the layers' weights, mean bits over their non-zero weights)."""
    modules = dict(model.named_modules())
    total = sum(modules[n].weight.numel() for n in names)
    nonzero = {n: int(torch.count_nonzero(modules[n].weight)) for n in names}
    kept = sum(nonzero.values())
    mean_bits = sum(nonzero[n] * bits.get(n, FP32_BITS) for n in names) / kept if kept else 0.0
    return 1.0 - kept / total, mean_bits


def zero_fractions(model: nn.Module, names: list[str]) -> dict[str, float]:
    modules = dict(model.named_modules())
    return {n: float((modules[n].weight == 0).float().mean()) for n in names}


def sparsities(plan: dict[str, dict]) -> dict[str, float]:
    return {n: v["sparsity"] for n, v in plan.items()}


def planned_sparsity(plan: Plan, params: dict[str, int]) -> float:
    """The plan's sparsity over all its layers' weights."""
    return sum(o.sparsity * params[n] for n, o in plan.items()) / sum(params[n] for n in plan)
