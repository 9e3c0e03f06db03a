"""Loading, checking and writing ONNX models, and the small graph queries the passes share.

Inputs are validated once (``onnx.checker`` full check with shape inference) so a
corrupt or invalid file fails at the door with one line; every model we write is
checked the same way before it reaches the disk, and written atomically.
"""

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from deepshrink.core.errors import DeepShrinkError, InputError
from deepshrink.export.onnx import write_atomic


class OnnxModelError(DeepShrinkError):
    """A model deepshrink produced failed ONNX validation (a bug, not the user's input)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read and fully check an ONNX file; the file itself is only read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.graph.node:
        raise InputError(f"{path}: not a readable ONNX model (the graph has no nodes)")
    check_onnx(model, str(path))
    return model


def check_onnx(model: onnx.ModelProto, origin: str = "model", error: type[Exception] = InputError) -> None:
    """``onnx.checker`` full check (with strict shape inference); raises ``error`` with one line."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise error(f"{origin}: invalid ONNX model ({_first_line(exc)})") from None


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Check, then write atomically (temp file in the same folder + rename)."""
    check_onnx(model, str(path), OnnxModelError)
    return write_atomic(path, model.SerializeToString())


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (old IRs also list initializers as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output if out}


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def set_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    """Replace an initializer's values in place (same name; dtype and shape from ``array``)."""
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def normalize_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose initializers all keep their bytes in ``raw_data`` (the layout ``unpack_onnx`` writes),
    so a packed and restored model can be compared byte for byte."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.data_type != onnx.TensorProto.STRING:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    return out
