"""Recipe steps that only make sense inside a recipe, and how the runner restores
any step's result from its checkpoint.

``student`` swaps the model for a smaller untrained architecture (a following
``distill`` step trains it from the original); ``finetune`` trains the current
model, keeping pruned weights at zero; ``export`` writes the final ONNX.

Restoring: a checkpoint holds a state dict, so resuming needs a model of the
right structure to load it into. Each registration knows how to rebuild the
structure its step gives a model (``Method.structure_after``), from the model
before the step and the metadata the step saved with its checkpoint.
"""

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from deepshrink.compress.prune.masks import MaskHook, zero_masks
from deepshrink.compress.prune.regularizers import Regularize
from deepshrink.compress.quant.dynamic import dynamic_quant_layers
from deepshrink.compress.quant.modules import fake_quant_layers
from deepshrink.compress.quant.onnx_dynamic import dynamic_onnx_bytes
from deepshrink.compress.quant.onnx_qdq import quantized_onnx_bytes
from deepshrink.core.config import Config
from deepshrink.core.errors import InputError
from deepshrink.core.files import write_atomic
from deepshrink.core.methods import Context, Written, method, registration
from deepshrink.evaluate.accuracy import ort_top1
from deepshrink.export.onnx import onnx_bytes, ort_session, verify_onnx
from deepshrink.models.weights import load_weights
from deepshrink.train import TrainConfig, Trainer


@dataclass(frozen=True)
class Student(Config):
    """Replace the model by an untrained zoo architecture: ``auto`` picks the zoo's
    student for the input model (resnet20 -> resnet8, vgg -> vgg_small, ...)."""

    model: str = "auto"


@dataclass(frozen=True)
class Finetune(Config):
    """Train the current model with labels; weights that are exactly zero stay zero.
    ``regularize`` adds a sparsity penalty (L1, group lasso, BN-scale L1) that drives
    what a following prune step removes towards zero first."""

    train: TrainConfig = TrainConfig(epochs=2, lr=0.01, schedule="cosine", weight_decay=0.0)
    regularize: Regularize | None = None


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


@method("student", Student)
class StudentMethod:
    def torch(self, model: nn.Module, cfg: Student, ctx: Context) -> nn.Module:
        from deepshrink.models import create_model

        return create_model(student_name(cfg, ctx))

    def restore(self, model: nn.Module, cfg: Student, ctx: Context, saved: dict) -> nn.Module:
        return self.torch(model, cfg, ctx)

    def check(self, cfg: Student, ctx: Context) -> None:
        student_name(cfg, ctx)


@method("finetune", Finetune, needs=("data",), trains=True)
class FinetuneMethod:
    def torch(self, model: nn.Module, cfg: Finetune, ctx: Context) -> nn.Module:
        hook = MaskHook(model, zero_masks(model))
        hooks = [hook] if cfg.regularize is None else [hook, cfg.regularize.hook(model)]
        Trainer(model, cfg.train, ctx.data.train, ctx.data.val, hooks=hooks, progress=ctx.progress).fit()
        return hook.finalize()


@method("export", Export, needs=("data", "out_dir"), output=True)
class ExportMethod:
    """Writes ``model.onnx`` of the model (QDQ for a fake-quant model, integer ops for a
    dynamically quantized one), checked in ONNX Runtime against PyTorch, with its Top-1 there."""

    def torch(self, model: nn.Module, cfg: Export, ctx: Context) -> Written:
        path = write_atomic(ctx.out_dir / "model.onnx", model_onnx_bytes(model, tuple(ctx.data.test.images.shape[1:])))
        session = ort_session(path)
        checks = {
            "onnx_max_abs_diff": verify_onnx(model, session, ctx.data.test.images[: cfg.check_images]),
            "onnx_top1": ort_top1(session, ctx.data.test),
        }
        return Written({"onnx": path}, checks=checks)


def model_onnx_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """ONNX of any model a recipe leaves: float, fake-quant (QDQ) or dynamically quantized."""
    if fake_quant_layers(model):
        return quantized_onnx_bytes(model, input_shape)
    if dynamic_quant_layers(model):
        return dynamic_onnx_bytes(model, input_shape)
    return onnx_bytes(model, input_shape)


def restore_step(model: nn.Module, cfg: Config, ctx: Context, checkpoint: Path) -> nn.Module:
    """The model after a step that finished in an earlier run, from its checkpoint."""
    try:
        restored = registration(cfg).structure_after(model, cfg, ctx, _metadata(checkpoint))
    except InputError as exc:
        raise InputError(f"{checkpoint}: {exc}") from None
    return load_weights(restored, checkpoint, resize=True)


def checkpoint_metadata(model: nn.Module, cfg: Config) -> dict[str, str] | None:
    """What restoring ``cfg``'s step needs beyond the config (a mixed-precision model's bit plan)."""
    return registration(cfg).checkpoint_metadata(model)


def _metadata(checkpoint: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as handle:
        return dict(handle.metadata() or {})
