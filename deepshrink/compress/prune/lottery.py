"""Lottery tickets (Frankle & Carbin 2019): iterative magnitude pruning with
weight rewinding.

Train, prune the smallest surviving weights, reset the survivors to an early
point of training, repeat; the final sparse network ("winning ticket") is then
trained with its mask held. Rewinding to the initial weights (``rewind_epoch=0``)
is the original recipe; rewinding to the weights after a few epochs (Frankle et
al. 2019, "Stabilizing the Lottery Ticket Hypothesis") is what makes it work
for deeper networks.

Each round removes the fraction ``1 - (1 - s)^(1/rounds)`` of the weights still
alive, so after ``rounds`` rounds the sparsity is exactly ``s``; already pruned
weights always rank lowest, so masks only ever lose entries.
"""

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from deepshrink.compress.prune.masks import MaskHook, Masks, apply_masks, sparsity_of
from deepshrink.core.config import Config, Scope, check_range
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.data.datasets import DataBundle
from deepshrink.train import TrainConfig, Trainer, TrainHook

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LotteryTicket(Config):
    """Reach ``sparsity`` in ``rounds`` train -> prune -> rewind rounds, then retrain the ticket.

    ``rewind_epoch`` 0 rewinds to the weights given; k > 0 to those after k epochs of
    the first training run (k <= ``train.epochs``). ``train`` is used for every run
    (``rounds + 1`` in all), with the seed advanced per run.
    """

    sparsity: float
    rounds: int = 3
    rewind_epoch: int = 0
    granularity: Literal["layer", "global"] = "layer"
    scope: Scope = Scope()
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0)
        if self.rounds < 1:
            raise InputError(f"rounds must be >= 1, got {self.rounds}")
        if not 0 <= self.rewind_epoch <= self.train.epochs:
            raise InputError(f"rewind_epoch must be in [0, train.epochs={self.train.epochs}], got {self.rewind_epoch}")
        if self.granularity not in ("layer", "global"):
            raise InputError(f"granularity: {self.granularity!r} is not one of ['layer', 'global']")


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """Cumulative sparsity after each round: 1 - (1 - s)^(r / rounds), the last exactly ``s``."""
    return [1.0 - (1.0 - sparsity) ** (r / rounds) for r in range(1, rounds)] + [sparsity]


def snapshot(model: nn.Module) -> State:
    """A detached copy of every parameter and buffer: a rewind point."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def rewind(model: nn.Module, state: State, masks: Masks) -> None:
    """Reset every parameter and buffer to ``state``, then zero the pruned weights, in place."""
    model.load_state_dict(state)
    apply_masks(model, masks)


def _prune_order(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask removing the ``count`` lowest scores, ties by position."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if count:
        keep[scores.flatten().argsort(stable=True)[:count]] = False
    return keep


def surviving_magnitude_masks(
    model: nn.Module, previous: Masks | None, sparsity: float, scope: Scope | None = None, granularity: str = "layer"
) -> Masks:
    """Masks at cumulative ``sparsity`` that prune only among weights ``previous`` keeps.

    Pruned weights score -1 (below any magnitude), so they stay pruned even if training
    left a surviving weight at exactly zero; the counts are exact (round(s * n)).
    """
    check_range("sparsity", sparsity, 0.0, 1.0)
    layers = dict((scope or Scope()).layers(model))
    if not layers:
        raise InputError(f"no layers in scope {scope or Scope()}")
    scores = {}
    for name, module in layers.items():
        score = module.weight.detach().abs().clone()
        if previous is not None and name in previous:
            score[~previous[name]] = -1.0
        scores[name] = score
    if granularity == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = _prune_order(flat, int(round(sparsity * flat.numel())))
        sizes = [s.numel() for s in scores.values()]
        return {name: k.view_as(s) for (name, s), k in zip(scores.items(), keep.split(sizes), strict=True)}
    return {name: _prune_order(s, int(round(sparsity * s.numel()))).view_as(s) for name, s in scores.items()}


class _RewindPoint(TrainHook):
    """Snapshots the model at the end of epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.state = epoch, None

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.epoch == self.epoch:
            self.state = snapshot(trainer.model)


@dataclass
class LotteryResult:
    model: nn.Module
    masks: list[Masks] = field(default_factory=list)  # after each round, monotone
    sparsities: list[float] = field(default_factory=list)
    history: list[list[dict[str, float]]] = field(default_factory=list)  # per training run


def find_ticket(model: nn.Module, cfg: LotteryTicket, data: DataBundle | None, progress: bool = True) -> LotteryResult:
    """Run the lottery-ticket procedure on ``model`` in place; returns it with the masks of every round."""
    if data is None:
        raise InputError("lottery tickets are found by training: pass data= (a DataBundle)")
    result = LotteryResult(model)
    rewind_to = snapshot(model) if cfg.rewind_epoch == 0 else None
    masks: Masks | None = None
    for run, target in enumerate([*round_sparsities(cfg.sparsity, cfg.rounds), None]):
        hold = MaskHook(model, masks) if masks is not None else None
        point = _RewindPoint(cfg.rewind_epoch) if rewind_to is None else None
        hooks = [h for h in (hold, point) if h is not None]
        train_cfg = replace(cfg.train, seed=cfg.train.seed + run)
        result.history.append(Trainer(model, train_cfg, data.train, data.val, hooks=hooks, progress=progress).fit().history)
        if hold is not None:
            hold.finalize()
        if point is not None:
            rewind_to = point.state
        if target is None:
            break
        masks = surviving_magnitude_masks(model, masks, target, cfg.scope, cfg.granularity)
        result.masks.append(masks)
        result.sparsities.append(sparsity_of(masks))
        rewind(model, rewind_to, masks)
    return result


@method("lottery", LotteryTicket, needs=("data",))
class LotteryTicketMethod:
    def torch(self, model: nn.Module, cfg: LotteryTicket, ctx: Context) -> nn.Module:
        return find_ticket(model, cfg, ctx.data, ctx.progress).model
