"""deepshrink: make trained neural networks smaller and faster, and measure it.

The public API, one verb per family::

    import deepshrink as ds
    model = ds.create_model("lenet300", pretrained=True)
    data = ds.load_data()                       # Fashion-MNIST by default
    pruned = ds.prune(model, ds.MagnitudePrune(sparsity=0.9), data=data)
    shared = ds.share(pruned, ds.KMeansShare(linear_bits=5))
    int8 = ds.quantize(model, ds.PTQ(), data=data)  # then ds.export_quantized_onnx(int8, "int8.onnx", (1, 28, 28))
    ds.pack(shared, "model.dsz", {"zoo": "lenet300"})
    restored = ds.unpack("model.dsz")
    print(ds.evaluate(restored, data.test).accuracy)
"""

from torch import nn

from deepshrink.compress.distill import Distill
from deepshrink.compress.lowrank import Decompose
from deepshrink.compress.prune import MagnitudePrune
from deepshrink.compress.quant import PTQ, QAT, MixedPrecision, load_quantized_model, save_quantized_model
from deepshrink.compress.quant.dynamic import DynamicQuant
from deepshrink.compress.quant.onnx_qdq import export_quantized_onnx
from deepshrink.compress.share import KMeansShare
from deepshrink.core.errors import DeepShrinkError, InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import CalibrationSet, load_data
from deepshrink.encode.pack import pack, unpack
from deepshrink.evaluate import evaluate
from deepshrink.export import export_onnx
from deepshrink.models import create_model, list_models, load_user_model
from deepshrink.pipeline.auto import AutoOptions, auto_compress
from deepshrink.pipeline.recipe import load_recipe
from deepshrink.pipeline.runner import run_recipe
from deepshrink.pipeline.study import run_study
from deepshrink.train import TrainConfig, train

__version__ = "0.1.0"


def prune(model: nn.Module, config: MagnitudePrune, data=None, progress: bool = True) -> nn.Module:
    """A pruned copy of ``model``; ``data`` (a DataBundle) is needed when the config fine-tunes."""
    return apply_method(model, config, Context(data, progress))


def share(model: nn.Module, config: KMeansShare, data=None, progress: bool = True) -> nn.Module:
    """A weight-shared copy of ``model``; ``data`` is needed when the config fine-tunes the codebooks."""
    return apply_method(model, config, Context(data, progress))


def quantize(
    model: nn.Module, config: PTQ | QAT | MixedPrecision | DynamicQuant, calib=None, data=None, progress: bool = True
) -> nn.Module:
    """A fake-quant copy of ``model``. PTQ calibrates on ``calib`` (any iterable of
    input batches, tuples or dicts) or on ``data``'s training images; QAT and
    mixed precision also train on ``data``; DynamicQuant needs neither."""
    return apply_method(model, config, Context(data, progress, calib))


def distill(model: nn.Module, config: Distill, teacher: nn.Module, data, progress: bool = True) -> nn.Module:
    """A copy of ``model`` (the student) trained with knowledge distillation from ``teacher``."""
    return apply_method(model, config, Context(data, progress, teacher=teacher))


def decompose(model: nn.Module, config: Decompose, data=None, progress: bool = True) -> nn.Module:
    """A low-rank (SVD / Tucker-2 / CP) copy of ``model``; ``data`` is needed when the config fine-tunes."""
    return apply_method(model, config, Context(data, progress))


__all__ = [
    "AutoOptions",
    "CalibrationSet",
    "Decompose",
    "Distill",
    "DeepShrinkError",
    "DynamicQuant",
    "InputError",
    "KMeansShare",
    "MagnitudePrune",
    "MixedPrecision",
    "PTQ",
    "QAT",
    "TrainConfig",
    "auto_compress",
    "create_model",
    "decompose",
    "distill",
    "evaluate",
    "export_onnx",
    "export_quantized_onnx",
    "list_models",
    "load_data",
    "load_recipe",
    "load_quantized_model",
    "load_user_model",
    "pack",
    "prune",
    "quantize",
    "run_recipe",
    "run_study",
    "save_quantized_model",
    "share",
    "train",
    "unpack",
]
