"""The distillation task: train a student against a teacher in the shared loop.

``distill`` is the Python verb; ``finetune_with_kd`` is what other methods call
to make their fine-tuning step distillation (the compressed model is the
student, the original the teacher).
"""

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from deepshrink.compress.distill.hook import KD, KDHook, TeacherCache
from deepshrink.compress.prune.masks import MaskHook, zero_masks
from deepshrink.core.config import Config
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.train import TrainConfig, Trainer, TrainHook, TrainResult


@dataclass(frozen=True)
class Distill(Config):
    """Train the model (the student) with ``kd`` against a teacher for ``train``'s epochs.

    ``teacher`` names a pretrained zoo model (or ``module:function``) for recipes;
    without it the step uses the context's teacher (the model before compression).
    """

    teacher: str | None = None
    kd: KD = KD()
    train: TrainConfig = TrainConfig(epochs=10, lr=0.05, schedule="onecycle")


def finetune_with_kd(
    model: nn.Module,
    train_config: TrainConfig,
    data,
    teacher: nn.Module | None = None,
    kd: KD | None = None,
    hooks: Sequence[TrainHook] = (),
    progress: bool = True,
    checkpoint: str | Path | None = None,
    cache: TeacherCache | None = None,
) -> TrainResult:
    """Train ``model`` in place; with ``teacher`` and ``kd`` the loss is the distillation loss.

    The other ``hooks`` (masks, regularisers, ...) run after the KD hook, as in a plain fine-tune.
    """
    if data is None:
        raise InputError("fine-tuning needs data: pass data= (a DataBundle)")
    if (teacher is None) != (kd is None):
        raise InputError("distillation needs both a teacher and KD settings")
    if teacher is None:
        return Trainer(model, train_config, data.train, data.val, hooks=list(hooks), checkpoint=checkpoint, progress=progress).fit()
    hook = KDHook(teacher, kd, cache)
    with hook.attached(model, tuple(data.train.images.shape[1:])) as trainee:
        trainer = Trainer(trainee, train_config, data.train, data.val, hooks=[hook, *hooks], checkpoint=checkpoint, progress=progress)
        return trainer.fit()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data,
    config: Distill = Distill(),
    progress: bool = True,
    checkpoint: str | Path | None = None,
    cache: TeacherCache | None = None,
) -> nn.Module:
    """A copy of ``student`` trained with knowledge distillation from ``teacher`` (left unchanged)."""
    student = copy.deepcopy(student)
    finetune_with_kd(student, config.train, data, copy.deepcopy(teacher), config.kd, progress=progress, checkpoint=checkpoint, cache=cache)
    return student


def restructure_and_finetune(
    model: nn.Module, restructure: Callable[[nn.Module], nn.Module], finetune: TrainConfig | None, kd: KD | None, ctx: Context
) -> nn.Module:
    """``restructure`` the model (factorise, substitute layers), then fine-tune it; with
    ``kd`` the teacher is the model as it was before restructuring."""
    teacher = copy.deepcopy(model) if kd is not None else None
    model = restructure(model)
    if finetune is not None:
        finetune_with_kd(model, finetune, ctx.data, teacher, kd, progress=ctx.progress)
    return model


def resolve_teacher(name: str | None, ctx: Context) -> nn.Module:
    """The teacher a recipe step names, else the context's (the model before compression)."""
    if name is not None:
        from deepshrink.models import resolve_model

        return resolve_model(name)
    teacher = getattr(ctx, "teacher", None)
    if teacher is None:
        raise InputError("distill: no teacher; set teacher (a zoo name or module:function)")
    return copy.deepcopy(teacher)


@method("distill", Distill, needs=("data", "teacher?"), trains=True)
class DistillMethod:
    def torch(self, model: nn.Module, cfg: Distill, ctx: Context) -> nn.Module:
        masks = zero_masks(model)  # a pruned student stays pruned
        hooks = [MaskHook(model, masks)] if masks else []
        finetune_with_kd(model, cfg.train, ctx.data, resolve_teacher(cfg.teacher, ctx), cfg.kd, hooks=hooks, progress=ctx.progress)
        for hook in hooks:
            hook.finalize()
        return model
