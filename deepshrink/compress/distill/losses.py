"""Distillation losses: Hinton's soft targets and FitNets hints.

Pure functions of tensors, so they can be checked against closed forms; the
training hook in ``hook.py`` only wires them to the shared loop.
"""

import torch
import torch.nn.functional as F
from torch import nn

from deepshrink.core.errors import InputError


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T² factor keeps the soft-target gradients on the scale of the hard-label
    ones when T changes (Hinton et al. 2015, section 2).
    """
    if not temperature > 0:
        raise InputError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton's loss: alpha · soft-target loss + (1 - alpha) · cross-entropy with the labels."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * soft_target_loss(student_logits, teacher_logits, temperature) + (1.0 - alpha) * hard


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Average-pool the student's feature map down to the teacher's size (they may differ by strides)."""
    if student.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
        return F.adaptive_avg_pool2d(student, teacher.shape[-2:])
    return student


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """FitNets hint: mean squared error between the adapted student feature and the teacher's."""
    adapted = match_spatial(adapter(student_feature), teacher_feature)
    if adapted.shape != teacher_feature.shape:
        raise InputError(f"adapted student feature {tuple(adapted.shape)} does not match the teacher's {tuple(teacher_feature.shape)}")
    return F.mse_loss(adapted, teacher_feature)


def make_adapter(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> nn.Module:
    """A learned regressor from the student's channels to the teacher's: 1x1 conv for maps, linear for vectors."""
    if student_feature.dim() == 4 and teacher_feature.dim() == 4:
        return nn.Conv2d(student_feature.shape[1], teacher_feature.shape[1], 1, bias=False)
    if student_feature.dim() == 2 and teacher_feature.dim() == 2:
        return nn.Linear(student_feature.shape[1], teacher_feature.shape[1], bias=False)
    raise InputError(
        f"hint layers must both give feature maps or both vectors, got {student_feature.dim()}-d and {teacher_feature.dim()}-d outputs"
    )
