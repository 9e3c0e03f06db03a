"""Recipe steps that only make sense inside a recipe, and how the runner restores
any step's result from its checkpoint.

``student`` swaps the model for a smaller untrained architecture (a following
``distill`` step trains it from the original); ``finetune`` trains the current
model, keeping pruned weights at zero; ``export`` writes the final ONNX.

Restoring: a checkpoint holds a state dict, so resuming needs a model of the
right structure to load it into. Most steps keep the structure (or only drop
channels, which ``load_weights(resize=True)`` rebuilds); steps that change it
rebuild it from the model before the step, cheaply and deterministically.
"""

import copy
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from deepshrink.compress.lowrank.decompose import Decompose, decompose_model
from deepshrink.compress.prune.masks import MaskHook, zero_masks
from deepshrink.compress.quant.config import PTQ, QAT, MixedPrecision
from deepshrink.compress.quant.ptq import calibration_batches
from deepshrink.compress.quant.qat import prepare_qat
from deepshrink.compress.structure.separable import Separable, substitute_separable
from deepshrink.core.config import Config
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method, register
from deepshrink.models.weights import load_weights
from deepshrink.train import TrainConfig, Trainer

LAYER_BITS_KEY = "layer_bits"  # safetensors metadata of a mixed-precision checkpoint


@dataclass(frozen=True)
class Student(Config):
    """Replace the model by an untrained zoo architecture: ``auto`` picks the zoo's
    student for the input model (resnet20 -> resnet8, vgg -> vgg_small, ...)."""

    model: str = "auto"


@dataclass(frozen=True)
class Finetune(Config):
    """Train the current model with labels; weights that are exactly zero stay zero."""

    train: TrainConfig = TrainConfig(epochs=2, lr=0.01, schedule="cosine", weight_decay=0.0)


@dataclass(frozen=True)
class Export(Config):
    """Write the final model as ONNX (QDQ with int8 weights for a quantized model) and
    check ONNX Runtime against PyTorch on ``check_images`` test images."""

    check_images: int = 256

    def __post_init__(self) -> None:
        if self.check_images < 1:
            raise InputError(f"check_images must be >= 1, got {self.check_images}")


def student_name(cfg: Student, ctx: Context) -> str:
    from deepshrink.models.zoo import MODELS, STUDENTS

    if cfg.model != "auto":
        if cfg.model not in MODELS.names():
            raise InputError(f"student.model: unknown zoo model {cfg.model!r}; known: {', '.join(MODELS.names())}")
        return cfg.model
    if ctx.model_name not in STUDENTS:
        raise InputError(f"student.model: auto needs a zoo model with a known student ({', '.join(STUDENTS)}); name one instead")
    return STUDENTS[ctx.model_name]


@register(Student)
def _apply_student(model: nn.Module, cfg: Student, ctx: Context) -> nn.Module:
    from deepshrink.models import create_model

    return create_model(student_name(cfg, ctx))


@register(Finetune)
def _apply_finetune(model: nn.Module, cfg: Finetune, ctx: Context) -> nn.Module:
    if ctx.data is None:
        raise InputError("finetune needs data: pass data= (a DataBundle)")
    hook = MaskHook(model, zero_masks(model))
    Trainer(model, cfg.train, ctx.data.train, ctx.data.val, hooks=[hook], progress=ctx.progress).fit()
    return hook.finalize()


@register(Export)
def _apply_export(model: nn.Module, cfg: Export, ctx: Context) -> nn.Module:
    return model  # the runner writes the files: an export changes no weights


def structure_after(model: nn.Module, cfg: Config, ctx: Context, checkpoint: Path) -> nn.Module:
    """A model with the structure ``cfg`` gives ``model``, ready to load the step's checkpoint."""
    if isinstance(cfg, PTQ):
        return apply_method(model, cfg, ctx)  # calibration only: cheap and deterministic
    if isinstance(cfg, QAT):
        return prepare_qat(copy.deepcopy(model), cfg, calibration_batches(ctx, cfg.calib_samples, ctx.calib))
    if isinstance(cfg, MixedPrecision):
        plan = _layer_bits(checkpoint)
        qat_cfg = replace(cfg.qat, layer_bits=plan, keep_first_last=False)
        return prepare_qat(copy.deepcopy(model), qat_cfg, calibration_batches(ctx, qat_cfg.calib_samples, ctx.calib))
    if isinstance(cfg, Decompose):
        return decompose_model(copy.deepcopy(model), cfg)[0]
    if isinstance(cfg, Separable):
        return substitute_separable(copy.deepcopy(model), cfg)[0]
    if isinstance(cfg, Student):
        return _apply_student(model, cfg, ctx)
    return copy.deepcopy(model)


def restore_step(model: nn.Module, cfg: Config, ctx: Context, checkpoint: Path) -> nn.Module:
    """The model after a step that finished in an earlier run, from its checkpoint."""
    restored = structure_after(model, cfg, ctx, checkpoint)
    return load_weights(restored, checkpoint, resize=True)


def checkpoint_metadata(model: nn.Module) -> dict[str, str] | None:
    """What ``structure_after`` needs beyond the config: a mixed-precision model's bit plan."""
    plan = getattr(model, "bit_plan", None)
    return {LAYER_BITS_KEY: ",".join(f"{name}={bits}" for name, bits in plan.items())} if plan else None


def _layer_bits(checkpoint: Path) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as handle:
        text = (handle.metadata() or {}).get(LAYER_BITS_KEY)
    if not text:
        raise InputError(f"{checkpoint}: mixed-precision checkpoint without its bit plan; delete it to re-run the step")
    return {name: int(bits) for name, bits in (item.split("=") for item in text.split(","))}
