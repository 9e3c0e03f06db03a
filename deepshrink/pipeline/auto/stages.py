"""The steps a trial is made of: prune along the AGP curve, k-means share, fine-tune with KD from the
original; channel removal and ORT timing for a latency target."""

import copy
from dataclasses import dataclass, field, replace

from torch import nn

from deepshrink.compress.distill.distill import finetune_with_kd
from deepshrink.compress.distill.hook import KD, TeacherCache
from deepshrink.compress.prune.masks import magnitude_masks
from deepshrink.compress.prune.schedules import GradualPruningHook
from deepshrink.compress.prune.structured import ChannelPrune
from deepshrink.compress.share.shared import untie
from deepshrink.core.config import Scope
from deepshrink.core.methods import Context, apply_method
from deepshrink.data.datasets import DataBundle
from deepshrink.evaluate.latency import ort_latency
from deepshrink.export.onnx import onnx_bytes, ort_session
from deepshrink.pipeline.auto.costs import tie_plan_bits
from deepshrink.pipeline.auto.options import AGP_FRACTION, AutoOptions
from deepshrink.pipeline.auto.plan import zero_fractions
from deepshrink.train import TrainConfig, TrainHook


@dataclass
class Teacher:
    """The original model, distilled from in every fine-tune of a search; its logits are computed once per image."""

    model: nn.Module
    kd: KD = field(default_factory=KD)
    cache: TeacherCache = field(default_factory=TeacherCache)


def fine_tune(
    model: nn.Module, train: TrainConfig, data: DataBundle, teacher: Teacher | None, progress: bool, hooks: tuple[TrainHook, ...] = ()
) -> None:
    """Train in place, with KD when there is a teacher; no validation pass (the search measures its gate set itself)."""
    quiet = replace(data, val=data.val.subset(0))
    if teacher is None:
        finetune_with_kd(model, train, quiet, hooks=hooks, progress=progress)
    else:
        finetune_with_kd(model, train, quiet, teacher.model, teacher.kd, hooks=hooks, progress=progress, cache=teacher.cache)


def prune_stage(
    model: nn.Module, target: dict[str, float], train: TrainConfig, data: DataBundle, scope: Scope, teacher: Teacher | None, progress: bool
) -> nn.Module:
    """Prune each layer from its present zero fraction to ``target`` along the AGP curve while fine-tuning."""
    start = zero_fractions(model, list(target))

    def masks_at(fraction: float):
        layers = {n: start[n] + fraction * (target[n] - start[n]) for n in target}
        return magnitude_masks(model, 0.0, scope, "layer", layers)

    steps = train.epochs * -(-len(data.train) // train.batch_size)
    end = int(AGP_FRACTION * steps)
    hook = GradualPruningHook(model, masks_at, start=0, end=end, frequency=max(1, end // 50))
    fine_tune(model, train, data, teacher, progress, hooks=(hook,))
    return hook.finalize()


def share_stage(
    model: nn.Module, bits: dict[str, int], train: TrainConfig, data: DataBundle, scope: Scope, teacher: Teacher | None, progress: bool
) -> nn.Module:
    """k-means share each layer at its bits (zeros stay zero), fine-tune the codebooks, untie."""
    shared = copy.deepcopy(model)
    tie_plan_bits(shared, bits, scope)
    fine_tune(shared, train, data, teacher, progress)
    return untie(shared)


def channel_candidate(model: nn.Module, ratio: float, options: AutoOptions) -> nn.Module:
    """Channels removed by L1 norm, no fine-tuning yet (timed before any training is spent)."""
    return apply_method(model, ChannelPrune(ratio=ratio, round_to=options.round_to, scope=options.scope), Context(progress=False))


def ort_latency_ms(model: nn.Module, input_shape: tuple[int, ...], options: AutoOptions) -> float:
    """Median ONNX Runtime latency at ``options.latency_batch``: what a deployment of the dense model sees."""
    session = ort_session(onnx_bytes(model, input_shape), options.threads)
    return ort_latency(session, input_shape, options.latency_batch, options.latency_repeats).median_ms
