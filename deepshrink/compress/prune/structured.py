"""Structured pruning: remove whole channels (or whole blocks) physically.

Unlike masks, the layers are rebuilt smaller (fewer conv filters, BN features,
linear inputs), so the pruned model is an ordinary ``nn.Module`` that is faster
and smaller everywhere, ONNX included. Which layers must shrink together comes
from :func:`channel_groups`; which channels go from :func:`channel_scores`.
"""

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from deepshrink.compress.prune.dependency import ChannelGroup, channel_groups, eval_mode
from deepshrink.compress.prune.importance import CRITERIA, GRADIENT_CRITERIA, channel_scores
from deepshrink.core.config import Config, Scope, check_range
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.core.modules import replace_module
from deepshrink.data.datasets import iterate_batches
from deepshrink.train import TrainConfig, Trainer

GRADIENT_BATCHES = 8  # training batches averaged by the gradient criteria
GRADIENT_BATCH_SIZE = 64
KeepIndices = Mapping[int, Sequence[int] | torch.Tensor | None] | Sequence[Sequence[int] | torch.Tensor | None]


@dataclass(frozen=True)
class ChannelPrune(Config):
    """Remove ``ratio`` of each channel group's channels, ranked by ``importance``.

    ``granularity="global"`` ranks all groups' mean-normalised scores together, so
    redundant groups give up more. ``round_to`` rounds kept counts up to a multiple
    (a group smaller than ``round_to`` is left whole); no group is pruned to zero.
    A group is in ``scope`` when one of its producing layers matches it and none of
    its layers matches ``scope.exclude``. ``iterative`` prunes in ``iterations``
    rounds of rising ratio, re-scoring (and fine-tuning, if set) between them.
    """

    ratio: float
    importance: Literal["l1", "l2", "bn_scale", "taylor", "hessian", "random"] = "l1"
    granularity: Literal["layer", "global"] = "layer"
    round_to: int = 1
    scope: Scope = Scope()
    schedule: Literal["oneshot", "iterative"] = "oneshot"
    iterations: int = 3
    seed: int = 0
    finetune: TrainConfig | None = None

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0)
        for key, allowed in (("importance", CRITERIA), ("granularity", ("layer", "global")), ("schedule", ("oneshot", "iterative"))):
            if getattr(self, key) not in allowed:
                raise InputError(f"{key}: {getattr(self, key)!r} is not one of {list(allowed)}")
        if self.round_to < 1:
            raise InputError(f"round_to must be >= 1, got {self.round_to}")
        if self.iterations < 1:
            raise InputError(f"iterations must be >= 1, got {self.iterations}")


# -- choosing channels ------------------------------------------------------------------
def select_channels(
    scores: list[torch.Tensor],
    ratio: float,
    granularity: str = "layer",
    round_to: int = 1,
    original_sizes: list[int] | None = None,
) -> list[torch.Tensor]:
    """Sorted indices of the channels to keep per group: the highest scores.

    ``ratio`` is relative to ``original_sizes`` (the sizes before any pruning
    round; default: the current sizes), so iterative rounds reach the same
    final counts as one shot.
    """
    check_range("ratio", ratio, 0.0, 1.0)
    sizes = [len(s) for s in scores]
    original = original_sizes or sizes
    if granularity == "global":
        counts = _global_counts(scores, ratio, original)
    else:
        counts = [min(n, n0 - math.floor(ratio * n0)) for n, n0 in zip(sizes, original, strict=True)]
    counts = [min(n, math.ceil(k / round_to) * round_to) for k, n in zip(counts, sizes, strict=True)]
    return [s.argsort(descending=True, stable=True)[:k].sort().values for s, k in zip(scores, counts, strict=True)]


def _global_counts(scores: list[torch.Tensor], ratio: float, original: list[int]) -> list[int]:
    """Kept counts under one threshold over mean-normalised scores, never emptying a group."""
    sizes = [len(s) for s in scores]
    to_remove = math.floor(ratio * sum(original)) - (sum(original) - sum(sizes))
    flat = torch.cat([s / s.mean() if s.mean() > 0 else s for s in scores])
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    counts = list(sizes)
    for i in owner[flat.argsort(stable=True)].tolist():
        if to_remove <= 0:
            break
        if counts[i] > 1:
            counts[i] -= 1
            to_remove -= 1
    return counts


# -- surgery ----------------------------------------------------------------------------
def prune_channels(model: nn.Module, groups: list[ChannelGroup], keep_indices: KeepIndices) -> nn.Module:
    """Rebuild every layer of the pruned groups with only the kept channels, in place.

    ``keep_indices`` maps a group's position in ``groups`` to the channels to keep
    (a list aligned with ``groups`` works too; ``None`` keeps all). Returns the model
    (a new object only if the model itself is a single pruned layer).
    """
    masks = _keep_masks(dict(model.named_modules()), groups, keep_indices)
    for name, axes in masks.items():
        model = replace_module(model, name, _rebuild(name, model.get_submodule(name), axes))
    return model


def _keep_masks(modules: dict[str, nn.Module], groups: list[ChannelGroup], keep_indices: KeepIndices) -> dict[str, dict[str, torch.Tensor]]:
    """Per module and axis ('out' = weight dim 0 / BN features, 'in' = weight dim 1): a bool keep mask."""
    items = keep_indices.items() if isinstance(keep_indices, Mapping) else enumerate(keep_indices)
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for i, keep in items:
        if keep is None:
            continue
        if not 0 <= i < len(groups):
            raise InputError(f"keep_indices names group {i}, but there are {len(groups)} groups")
        group = groups[i]
        removed = _removed_channels(i, group, keep)
        if len(removed) == 0:
            continue
        if not group.prunable:
            raise InputError(f"group {i} cannot be pruned: {group}")
        for member in group.members:
            axis = "in" if member.kind == "in" else "out"
            if member.module not in modules:
                raise InputError(f"group {i} names layer {member.module!r}, which the model does not have; recompute channel_groups")
            mask = masks.setdefault(member.module, {}).setdefault(axis, torch.ones(_width(modules[member.module], axis), dtype=torch.bool))
            index = member.indices(removed)
            if index.max() >= len(mask):
                raise InputError(f"group {i} does not fit layer {member.module!r} ({axis} width {len(mask)}); recompute channel_groups")
            mask[index] = False
    return masks


def _removed_channels(i: int, group: ChannelGroup, keep: Sequence[int] | torch.Tensor) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().unique()
    if len(keep) == 0:
        raise InputError(f"group {i} would lose all {group.size} channels; keep at least one")
    if keep.min() < 0 or keep.max() >= group.size:
        raise InputError(f"group {i} has channels 0..{group.size - 1}; keep_indices holds {keep.min()}..{keep.max()}")
    mask = torch.ones(group.size, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def _width(module: nn.Module, axis: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if axis == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if axis == "out" else module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and axis == "out":
        return module.num_features
    raise InputError(f"cannot prune the {axis} channels of a {type(module).__name__}")


def _kept(indices: torch.Tensor | None, width: int) -> torch.Tensor:
    return torch.arange(width) if indices is None else indices


def _rebuild(name: str, old: nn.Module, axes: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh layer of the same type holding the kept slices (boolean masks ``axes``) of the old one's tensors."""
    return slice_layer(old, *(None if axes.get(a) is None else axes[a].nonzero().flatten() for a in ("out", "in")), name=name)


def slice_layer(old: nn.Module, out: torch.Tensor | None = None, inp: torch.Tensor | None = None, name: str = "layer") -> nn.Module:
    """A fresh Conv2d/Linear/BatchNorm of ``old``'s type, mode, device and dtype holding only the output
    channels ``out`` and input channels ``inp`` (index tensors; None keeps them all): the one channel
    slicer of structured pruning and transformer head/neuron pruning."""
    if type(old) is nn.Conv2d:
        new = _rebuild_conv(name, old, out, inp)
    elif type(old) is nn.Linear:
        out, inp = _kept(out, old.out_features), _kept(inp, old.in_features)
        new = nn.Linear(len(inp), len(out), old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        _copy(new, old, out, inp)
    elif type(old) in (nn.BatchNorm1d, nn.BatchNorm2d):
        new = _rebuild_bn(old, _kept(out, old.num_features))
    else:
        raise InputError(f"cannot rebuild layer {name!r} of type {type(old).__name__}")
    return new.train(old.training)


def _rebuild_conv(name: str, old: nn.Conv2d, out: torch.Tensor | None, inp: torch.Tensor | None) -> nn.Conv2d:
    depthwise = old.groups > 1 and old.groups == old.in_channels == old.out_channels
    if old.groups > 1 and not depthwise:
        raise InputError(f"{name}: grouped conv (groups={old.groups}) cannot be pruned")
    out = _kept(out, old.out_channels)
    if depthwise and inp is not None:
        raise InputError(f"{name}: a depthwise conv's input channels follow its output channels")
    inp = out if depthwise else _kept(inp, old.in_channels)
    new = nn.Conv2d(
        len(inp),
        len(out),
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        groups=len(out) if depthwise else 1,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    _copy(new, old, out, None if depthwise else inp)
    return new


@torch.no_grad()
def _copy(new: nn.Module, old: nn.Module, out: torch.Tensor, inp: torch.Tensor | None) -> None:
    """Copy the kept rows (and columns) of weight and bias, keeping requires_grad."""
    weight = old.weight[out] if inp is None else old.weight[out][:, inp]
    new.weight.copy_(weight)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias.copy_(old.bias[out])
        new.bias.requires_grad_(old.bias.requires_grad)


@torch.no_grad()
def _rebuild_bn(old: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    reference = old.weight if old.affine else old.running_mean
    kwargs = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    new = type(old)(len(keep), old.eps, old.momentum, old.affine, old.track_running_stats, **kwargs)
    for key in ("weight", "bias", "running_mean", "running_var"):
        source = getattr(old, key)
        if source is not None:
            getattr(new, key).copy_(source[keep])
    if old.affine:
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
    if old.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    return new


# -- block removal ----------------------------------------------------------------------
def remove_blocks(model: nn.Module, names: str | Sequence[str], example_input: torch.Tensor | None = None) -> nn.Module:
    """Replace blocks whose output has their input's shape (e.g. residual blocks with an
    identity shortcut) by ``nn.Identity``, in place: depth pruning. Returns the model."""
    names = [names] if isinstance(names, str) else list(names)
    modules = dict(model.named_modules())
    unknown = [n for n in names if not n or n not in modules]
    if unknown:
        raise InputError(f"no block named {unknown}; blocks are submodule names such as {[n for n in modules if n][:5]}")
    shapes = _block_shapes(model, names, example_input if example_input is not None else example_input_for(model))
    for name in names:
        seen = shapes[name]
        if not seen:
            raise InputError(f"block {name!r} is not used in the forward pass")
        if any(i != o for i, o in seen):
            i, o = next((i, o) for i, o in seen if i != o)
            raise InputError(f"block {name!r} maps shape {i} to {o}; only blocks whose input and output shapes match can be removed")
    for name in names:
        if not any(name.startswith(other + ".") for other in names):  # an enclosing block already goes
            model = replace_module(model, name, nn.Identity())
    return model


@torch.no_grad()
def _block_shapes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, list[tuple]]:
    """(input shape, output shape) of every call of each named block."""
    shapes: dict[str, list[tuple]] = {n: [] for n in names}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            tensor_in = len(args) == 1 and isinstance(args[0], torch.Tensor)
            shape_in = tuple(args[0].shape) if tensor_in else ("non-tensor or several inputs",)
            shape_out = tuple(output.shape) if isinstance(output, torch.Tensor) else ("non-tensor output",)
            shapes[name].append((shape_in, shape_out))

        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        with eval_mode(model):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


# -- the registered method --------------------------------------------------------------
def example_input_for(model: nn.Module, data=None) -> torch.Tensor:
    """Two inputs for tracing: from the data if given, else guessed from the first layer (28, 32, 224 px)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if data is not None:
        return data.train.images[:2].to(dtype)
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        raise InputError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    shapes = [(first.in_features,)] if isinstance(first, nn.Linear) else [(first.in_channels, s, s) for s in (28, 32, 224)]
    for shape in shapes:
        x = torch.zeros(2, *shape, dtype=dtype)
        try:
            with eval_mode(model), torch.no_grad():
                model(x)
            return x
        except RuntimeError:
            continue
    raise InputError(f"cannot guess the input shape of {type(model).__name__} (tried {shapes}); pass data= (a DataBundle)")


def groups_in_scope(model: nn.Module, groups: list[ChannelGroup], scope: Scope) -> list[int]:
    """Positions of prunable groups with a producer in scope and no layer excluded by it."""
    modules = dict(model.named_modules())
    chosen = []
    for i, group in enumerate(groups):
        touched = {m.module for m in group.members}
        if scope.exclude is not None and any(re.search(scope.exclude, name) for name in touched):
            continue
        if group.prunable and any(scope.matches(p, modules[p]) for p in group.producers):
            chosen.append(i)
    return chosen


def _gradient_batches(cfg: ChannelPrune, ctx: Context) -> list | None:
    if cfg.importance not in GRADIENT_CRITERIA:
        return None
    if ctx.data is None:
        raise InputError(f"importance {cfg.importance!r} needs gradients from training data: pass data= (a DataBundle)")
    return list(itertools.islice(iterate_batches(ctx.data.train, GRADIENT_BATCH_SIZE), GRADIENT_BATCHES))


@method("channel_prune", ChannelPrune, needs=("data?",))
class ChannelPruneMethod:
    def torch(self, model: nn.Module, cfg: ChannelPrune, ctx: Context) -> nn.Module:
        if cfg.finetune is not None and ctx.data is None:
            raise InputError("fine-tuning needs data: pass data= (a DataBundle)")
        batches = _gradient_batches(cfg, ctx)
        example = example_input_for(model, ctx.data)
        rounds = cfg.iterations if cfg.schedule == "iterative" else 1
        original: dict[frozenset, int] = {}
        for i in range(1, rounds + 1):
            groups = channel_groups(model, example)
            chosen = groups_in_scope(model, groups, cfg.scope)
            if not chosen:
                fixed = "; ".join(str(g) for g in groups if not g.prunable)
                raise InputError(f"nothing prunable in scope {cfg.scope} ({len(groups)} channel groups; fixed: {fixed or 'none'})")
            selected = [groups[j] for j in chosen]
            sizes = [original.setdefault(g.key, g.size) for g in selected]
            scores = channel_scores(model, selected, cfg.importance, batches, cfg.seed + i - 1)
            keep = select_channels(scores, cfg.ratio * i / rounds, cfg.granularity, cfg.round_to, sizes)
            model = prune_channels(model, groups, dict(zip(chosen, keep, strict=True)))
            if cfg.finetune is not None:
                Trainer(
                    model, replace(cfg.finetune, seed=cfg.finetune.seed + i - 1), ctx.data.train, ctx.data.val, progress=ctx.progress
                ).fit()
        return model
