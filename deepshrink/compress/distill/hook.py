"""Knowledge distillation as a hook in the shared training loop.

``KDHook`` adds the soft-target term (and FitNets hints) to the Trainer's
cross-entropy, so any method's fine-tuning becomes distillation by passing the
hook. Hint adapters are trainable: ``KDHook.attached(student, ...)`` builds them
and yields the module to give the Trainer, which holds the student and the
adapters side by side (the student's own forward and state dict are untouched),
so its optimizer and checkpoints see both.
"""

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.compress.distill.losses import hint_loss, make_adapter, soft_target_loss
from deepshrink.core.config import Config, check_range
from deepshrink.core.errors import InputError
from deepshrink.train import Trainer, TrainHook


class WithAdapters(nn.Module):
    """The student plus the hint adapters: trains both, forwards the student only."""

    def __init__(self, student: nn.Module, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.student, self.adapters = student, adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


@dataclass(frozen=True)
class KD(Config):
    """How to distill: Hinton's soft targets at ``temperature`` weighted by ``alpha``
    against the labels, plus ``hint_weight`` x FitNets hints on ``hints`` (student
    layer name -> teacher layer name). ``cache_teacher`` computes the teacher's
    logits once per image when training sees the same images every epoch (no
    augmentation, no hints): the same numbers as re-running the frozen teacher."""

    temperature: float = 4.0
    alpha: float = 0.9
    hints: dict[str, str] | None = None
    hint_weight: float = 1.0
    cache_teacher: bool = True

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"temperature must be positive, got {self.temperature}")
        check_range("alpha", self.alpha, 0.0, 1.0, high_inclusive=True)
        if self.hint_weight < 0:
            raise InputError(f"hint_weight must be >= 0, got {self.hint_weight}")


class TeacherCache:
    """Teacher logits keyed by a digest of each input image; share one across runs with the same teacher."""

    def __init__(self) -> None:
        self.logits: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def keys(inputs: torch.Tensor) -> list[bytes]:
        rows = np.ascontiguousarray(inputs.detach().cpu().contiguous().reshape(len(inputs), -1).numpy())
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]

    def lookup(self, teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        keys = self.keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self.logits]
        if missing:
            with torch.no_grad():
                fresh = teacher(inputs[missing]).float()
            for i, row in zip(missing, fresh, strict=True):
                self.logits[keys[i]] = row.clone()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self.logits[k] for k in keys])


class KDHook(TrainHook):
    """Adds ``alpha·(soft-target loss − CE) + hint_weight·Σ hints`` to the Trainer's CE, which
    makes the total Hinton's ``alpha·soft + (1 − alpha)·CE``. The teacher runs in eval mode
    without gradients."""

    def __init__(self, teacher: nn.Module, config: KD = KD(), cache: TeacherCache | None = None) -> None:
        self.teacher = teacher.eval()
        self.config = config
        self.cache = cache if cache is not None else TeacherCache()
        self.adapters = nn.ModuleList()
        self._pairs: list[tuple[str, str]] = list((config.hints or {}).items())
        self._student_features: dict[str, torch.Tensor] = {}
        self._teacher_features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    # -- hints -------------------------------------------------------------------------
    @contextmanager
    def attached(self, student: nn.Module, input_shape: tuple[int, ...]) -> Iterator[nn.Module]:
        """Capture hint features; yields what to train: ``student`` itself, or with hints, student + adapters."""
        if not self._pairs:
            yield student
            return
        try:
            self._register(student)
            if not len(self.adapters):
                self._build_adapters(student, input_shape)
            yield WithAdapters(student, self.adapters)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._student_features.clear()
            self._teacher_features.clear()

    def _register(self, student: nn.Module) -> None:
        for side, model, store in (("student", student, self._student_features), ("teacher", self.teacher, self._teacher_features)):
            modules = dict(model.named_modules())
            for pair in self._pairs:
                name = pair[0] if side == "student" else pair[1]
                if name not in modules:
                    raise InputError(f"hints: {side} has no layer {name!r}")
                self._handles.append(modules[name].register_forward_hook(_capture(store, name)))

    def _build_adapters(self, student: nn.Module, input_shape: tuple[int, ...]) -> None:
        was_training = student.training
        probe = torch.zeros(2, *input_shape)
        with torch.no_grad():
            student.eval()(probe)
            self.teacher(probe)
        student.train(was_training)
        rng_state = torch.get_rng_state()
        torch.manual_seed(0)  # adapters start the same for every run
        for s_name, t_name in self._pairs:
            self.adapters.append(make_adapter(self._student_features[s_name], self._teacher_features[t_name]))
        torch.set_rng_state(rng_state)

    # -- the loss ----------------------------------------------------------------------
    def teacher_logits(self, trainer: Trainer | None, inputs: torch.Tensor) -> torch.Tensor:
        augment = trainer is not None and trainer.config.augment
        if self.config.cache_teacher and not self._pairs and not augment:
            return self.cache.lookup(self.teacher, inputs)
        with torch.no_grad():
            return self.teacher(inputs)

    def extra_loss(self, trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self._pairs and not self._handles:
            raise InputError("hints need the student attached: train inside `with hook.attached(student, input_shape) as model:`")
        self.teacher.eval()
        c = self.config
        teacher = self.teacher_logits(trainer, inputs)
        hard = F.cross_entropy(logits, targets, label_smoothing=trainer.config.label_smoothing)
        loss = c.alpha * (soft_target_loss(logits, teacher, c.temperature) - hard)
        for adapter, (s_name, t_name) in zip(self.adapters, self._pairs, strict=True):
            loss = loss + c.hint_weight * hint_loss(self._student_features[s_name], self._teacher_features[t_name], adapter)
        return loss


def _capture(store: dict[str, torch.Tensor], name: str):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        store[name] = output

    return hook
