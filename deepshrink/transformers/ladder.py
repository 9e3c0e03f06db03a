"""A 4 / 8 / 32-bit ladder for the sensitivity fallback of 4-bit weights.

Every Linear starts at 4-bit (block-wise, weight-only). Each layer's damage is
measured with only that layer at 4-bit; then, while the cosine targets are
missed, layers climb one rung at a time in order of damage: first to dynamic
int8, and only when every layer is at int8 or above, to fp32. The result is
a ``serving_int4`` model, exported by ``serving_quantized_onnx``.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from deepshrink.compress.quant.blockwise4 import Blockwise4, blockwise4_targets, quantize_layers_4bit
from deepshrink.compress.quant.dynamic import DynamicQuantLinear
from deepshrink.core.modules import replace_module
from deepshrink.evaluate.fidelity import Fidelity, fidelity
from deepshrink.transformers.fallback import MEAN_TARGET, MIN_TARGET, _damage
from deepshrink.transformers.fidelity import pooled_embeddings
from deepshrink.transformers.load import Batch, check_batches
from deepshrink.transformers.serving import serving_int4

RUNGS = ("int4", "int8", "fp32")


@dataclass
class LadderResult:
    levels: dict[str, str]  # layer -> int4 | int8 | fp32
    sensitivity: dict[str, Fidelity]  # with only that layer at 4-bit
    fidelity: Fidelity
    all_int4: Fidelity
    steps: list[tuple[str, str, Fidelity]] = field(default_factory=list)  # (layer, new rung, fidelity after)

    def counts(self) -> dict[str, int]:
        return {rung: sum(v == rung for v in self.levels.values()) for rung in RUNGS}

    def to_dict(self) -> dict:
        return {
            "levels": self.levels,
            "counts": self.counts(),
            "sensitivity": {k: v.to_dict() for k, v in self.sensitivity.items()},
            "fidelity": self.fidelity.to_dict(),
            "all_int4": self.all_int4.to_dict(),
            "steps": [{"layer": n, "rung": r, **f.to_dict()} for n, r, f in self.steps],
        }


def quantize_with_ladder(
    model: nn.Module,
    batches: Sequence[Batch],
    config: Blockwise4 | None = None,
    mean_target: float = MEAN_TARGET,
    min_target: float = MIN_TARGET,
) -> tuple[nn.Module, LadderResult]:
    """A ``serving_int4`` copy of ``model`` whose pooled-embedding cosine meets the targets on ``batches``."""
    config = config or Blockwise4()
    batches = check_batches(batches)
    model = copy.deepcopy(model).eval()
    names = blockwise4_targets(model, config)
    reference = pooled_embeddings(model, batches)

    def measure(m: nn.Module) -> Fidelity:
        return fidelity(reference, pooled_embeddings(m, batches), agreement=False)

    sensitivity = {}
    for name in names:
        original = model.get_submodule(name)
        quantize_layers_4bit(model, [name], config)
        sensitivity[name] = measure(model)
        replace_module(model, name, original)
    order = sorted(names, key=lambda n: _damage(sensitivity[n], mean_target, min_target), reverse=True)
    working = quantize_layers_4bit(copy.deepcopy(model), names, config)
    first = current = measure(working)
    levels, steps = dict.fromkeys(names, "int4"), []
    for rung in RUNGS[1:]:
        for name in order:
            if current.meets(mean_target, min_target):
                break
            original = model.get_submodule(name)
            replace_module(working, name, DynamicQuantLinear.from_linear(original) if rung == "int8" else copy.deepcopy(original))
            levels[name] = rung
            current = measure(working)
            steps.append((name, rung, current))
    int8 = tuple(n for n, level in levels.items() if level == "int8")
    fp32 = tuple(n for n, level in levels.items() if level == "fp32")
    final = serving_int4(model, Blockwise4(config.scope, config.block_size, config.symmetric, config.search, config.fallback + int8), fp32)
    return final, LadderResult(levels, sensitivity, measure(final), first, steps)
