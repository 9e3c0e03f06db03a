"""Gradual pruning (Zhu & Gupta 2017): sparsity rises along a cubic curve,
s_t = s_f * (1 - (1 - p)^3) for training progress p in [0, 1], fast at first
while the network has redundancy to spare and slowly near the target."""

from collections.abc import Callable

from deepshrink.compress.prune.masks import MaskHook, Masks


def agp_fraction(step: int, start: int, end: int) -> float:
    """Fraction of the final sparsity reached at ``step`` on the cubic schedule."""
    if step <= start:
        return 0.0
    if step >= end:
        return 1.0
    return 1.0 - (1.0 - (step - start) / (end - start)) ** 3


class GradualPruningHook(MaskHook):
    """Recomputes masks every ``frequency`` steps at the AGP sparsity fraction, then holds them."""

    def __init__(self, model, make_masks: Callable[[float], Masks], start: int, end: int, frequency: int) -> None:
        self.make_masks = make_masks
        self.start, self.end, self.frequency = start, end, max(1, frequency)
        # No step falls inside an empty ramp (end <= start, e.g. one batch): prune to the target at once.
        super().__init__(model, make_masks(1.0 if self.end <= self.start else 0.0))

    def after_step(self, trainer) -> None:
        step = trainer.step
        if self.start <= step <= self.end and (step - self.start) % self.frequency == 0 or step == self.end:
            self.update(self.make_masks(agp_fraction(step, self.start, self.end)))
        else:
            super().after_step(trainer)
