"""Knowledge distillation: soft targets (Hinton), FitNets hints, a KD training hook and the distill task."""

from deepshrink.compress.distill.distill import Distill, distill, finetune_with_kd, resolve_teacher, restructure_and_finetune
from deepshrink.compress.distill.hook import KD, KDHook, TeacherCache
from deepshrink.compress.distill.losses import hint_loss, kd_loss, make_adapter, soft_target_loss

__all__ = [
    "KD",
    "Distill",
    "KDHook",
    "TeacherCache",
    "distill",
    "finetune_with_kd",
    "hint_loss",
    "kd_loss",
    "make_adapter",
    "resolve_teacher",
    "restructure_and_finetune",
    "soft_target_loss",
]
