"""Short distillation from the original encoder: hidden-state MSE (over real tokens)
plus, for models with a task head, KL on temperature-softened logits.

Runs in the shared Trainer with a token batch source and this loss, so devices
and torchrun apply here as everywhere. The student stays in eval mode (no
dropout): a few hundred steps of repair after pruning, deterministic for a seed.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.config import Config
from deepshrink.core.errors import InputError
from deepshrink.train import StepOutput, TrainConfig, Trainer, TrainHook
from deepshrink.transformers.load import Batch, check_batches


@dataclass(frozen=True)
class TransformerDistill(Config):
    steps: int = 100
    lr: float = 1e-4
    hidden_weight: float = 1.0
    logit_weight: float = 1.0
    temperature: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0 or not self.temperature > 0:
            raise InputError(f"lr and temperature must be positive, got {self.lr} and {self.temperature}")
        if self.hidden_weight < 0 or self.logit_weight < 0 or self.hidden_weight + self.logit_weight == 0:
            raise InputError("hidden_weight and logit_weight must be >= 0 and not both 0")


def _outputs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if hasattr(model, "base_model") and model.base_model is not model:
        out = model(**batch, output_hidden_states=True)
        return out.hidden_states[-1], out.logits
    return model(**batch).last_hidden_state, None


def distill_loss(student_out, teacher_out, mask: torch.Tensor, cfg: TransformerDistill) -> torch.Tensor:
    """Masked hidden-state MSE (normalised by the teacher's mean square) + T^2-scaled KL on logits."""
    (hs, ls), (ht, lt) = student_out, teacher_out
    m = mask.unsqueeze(-1).to(hs.dtype)
    scale = (ht.pow(2) * m).sum().clamp(min=1e-12)
    loss = cfg.hidden_weight * ((hs - ht).pow(2) * m).sum() / scale
    if ls is not None and lt is not None and cfg.logit_weight > 0:
        t = cfg.temperature
        kl = F.kl_div(F.log_softmax(ls / t, dim=-1), F.log_softmax(lt / t, dim=-1), log_target=True, reduction="batchmean")
        loss = loss + cfg.logit_weight * t * t * kl
    return loss


class _TokenSteps:
    """``steps`` (batch, teacher outputs) pairs per epoch: a seeded permutation of the batches,
    drawn from its end and redrawn when used up."""

    def __init__(self, items: list, steps: int) -> None:
        self.items, self.steps = items, steps

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterator:
        order: list[int] = []
        for _ in range(self.steps):
            if not order:
                order = torch.randperm(len(self.items), generator=generator).tolist()
            yield self.items[order.pop()]


class _StepLosses(TrainHook):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def after_step(self, trainer: Trainer) -> None:
        self.losses.append(trainer.last_loss)


def distill(student: nn.Module, teacher: nn.Module, batches: Sequence[Batch], cfg: TransformerDistill) -> list[float]:
    """Train ``student`` (in place) towards ``teacher`` on ``batches``; returns the loss per step."""
    batches = check_batches(batches)
    teacher.eval()
    with torch.inference_mode():
        targets = [_outputs(teacher, b) for b in batches]
    targets = [(h.clone(), None if lg is None else lg.clone()) for h, lg in targets]  # leave inference mode

    def loss(model: nn.Module, item: tuple, config: TrainConfig) -> StepOutput:
        batch, target = item
        return StepOutput(distill_loss(_outputs(model, batch), target, batch["attention_mask"], cfg), len(batch["input_ids"]))

    config = TrainConfig(epochs=1, optimizer="adam", lr=cfg.lr, weight_decay=0.0, schedule="constant", seed=cfg.seed, channels_last=False)
    record = _StepLosses()
    source = _TokenSteps(list(zip(batches, targets, strict=True)), cfg.steps)
    Trainer(student, config, source, hooks=[record], progress=False, loss=loss, train_mode=False).fit()
    return record.losses
