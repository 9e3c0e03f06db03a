"""ONNX export and ONNX Runtime sessions.

Exports go through ``onnx.checker`` (full check, with shape inference) and are
written atomically; ``verify_onnx`` compares ORT's output with torch's.
"""

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from deepshrink.core.errors import DeepShrinkError, InputError
from deepshrink.core.files import write_atomic  # noqa: F401  (re-exported: callers import it from here)

OPSET = 17


class ExportError(DeepShrinkError):
    """The model could not be exported to a valid ONNX graph."""


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], opset: int = OPSET) -> Path:
    """Export ``model`` (eval mode) with a dynamic batch axis; returns the path written."""
    return write_atomic(path, onnx_bytes(model, input_shape, opset))


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], opset: int = OPSET, constant_folding: bool = True) -> bytes:
    """The checked ONNX model as bytes (input ``input``, output ``logits``, batch axis dynamic).

    ``constant_folding=False`` keeps ops on constants, e.g. the weights' QuantizeLinear in a QDQ export."""
    return export_checked(
        model,
        (torch.zeros(1, *input_shape),),
        "ONNX",
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        do_constant_folding=constant_folding,
    )


def export_checked(module: nn.Module, example: tuple, what: str, **options) -> bytes:
    """``torch.onnx.export`` (TorchScript exporter) in eval mode to bytes, then ``onnx.checker``'s full
    check; a failure of either is one ``ExportError`` line naming ``what``. The module's mode is restored.
    A module on a GPU exports from a CPU copy: the file never depends on where the model trained."""
    if any(t.device.type != "cpu" for t in (*module.parameters(), *module.buffers())):
        module = copy.deepcopy(module).cpu()
    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, buffer, dynamo=False, **options)
    except Exception as exc:  # torch raises many types here; the user needs one line
        raise ExportError(f"{what} export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        module.train(was_training)
    check_exported(onnx.load_from_string(buffer.getvalue()), what)
    return buffer.getvalue()


def check_exported(proto: onnx.ModelProto, what: str) -> None:
    """``onnx.checker``'s full check (shape inference included) as one ``ExportError`` line."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported {what} model is invalid: {str(exc).splitlines()[0]}") from exc


def ort_session(
    model: onnx.ModelProto | bytes | str | Path, threads: int | None = None, optimized_path: str | None = None, layout: bool = True
) -> ort.InferenceSession:
    """The one ONNX Runtime session factory: CPU, all graph optimisations, fixed thread counts.

    ``optimized_path`` saves the graph ORT runs. ``layout=False`` stops before the NCHWc layout pass,
    which in ORT 1.32 fails to load graphs that also return a conv's output feeding a residual add
    (as calibration does). A model ORT cannot load is one ``InputError`` line."""
    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if layout else level.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3  # the NCHWc "hardware specific" notice is expected when saving the optimised graph
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    source = source if isinstance(source, bytes) else str(source)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
        raise InputError(f"ONNX Runtime cannot load the model ({str(exc).strip().splitlines()[0]})") from None


def run_ort(session: ort.InferenceSession, inputs: torch.Tensor) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: inputs.detach().cpu().numpy().astype(np.float32)})[0]


def verify_onnx(model: nn.Module, session: ort.InferenceSession, inputs: torch.Tensor) -> float:
    """Max absolute difference between torch's and ORT's outputs on ``inputs``."""
    with torch.no_grad():
        expected = model.eval()(inputs).numpy()
    return float(np.abs(run_ort(session, inputs) - expected).max())
