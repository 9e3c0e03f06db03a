"""Inputs (and labels) for an ONNX model from an ``.npz`` file.

Keys: one array per graph input, named like the input; a model with a single
input may use ``x`` instead. Optional ``y``: integer labels, one per sample
(for Top-1 accuracy). Every array's first axis is the sample axis; the other
axes must match the graph input's fixed dimensions. Values are fed as they are
(cast to the input's dtype): normalise images before saving them. Loaded with
``allow_pickle=False``.
"""

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from deepshrink.core.errors import InputError
from deepshrink.onnx_in.model import graph_inputs

LABEL_KEY = "y"
SINGLE_INPUT_KEY = "x"


@dataclass(frozen=True)
class NpzInputs:
    """Model inputs by graph input name (sample axis first) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    batch: int | None = None  # the graph's fixed batch size, when it has one

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, n: int | None) -> "NpzInputs":
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return NpzInputs({k: v[:n] for k, v in self.inputs.items()}, labels, self.batch)

    def batches(self, size: int = 256) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``size`` samples (the graph's own batch size when it is fixed)."""
        size = self.batch or size
        for start in range(0, len(self), size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}


def _input_spec(value: onnx.ValueInfoProto) -> tuple[np.dtype, list[int | None]]:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor.elem_type == 0:
        raise InputError(f"graph input {value.name!r} is not a typed tensor; cannot feed it from an .npz")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims


def _check_array(path: Path, key: str, array: np.ndarray, dims: list[int | None]) -> None:
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path}: array {key!r} has dtype {array.dtype}; expected numbers")
    if array.ndim != len(dims) or array.ndim == 0:
        raise InputError(f"{path}: array {key!r} has shape {array.shape}; the model input needs {len(dims)} axes {_dims_text(dims)}")
    for axis, (have, want) in enumerate(zip(array.shape[1:], dims[1:], strict=True), start=1):
        if want is not None and have != want:
            raise InputError(f"{path}: array {key!r} has shape {array.shape}; the model input needs {_dims_text(dims)} (axis {axis})")
    if len(array) == 0:
        raise InputError(f"{path}: array {key!r} holds no samples")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{path}: array {key!r} has NaN or infinite values")


def _dims_text(dims: list[int | None]) -> str:
    return "(" + ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(dims)) + ")"


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (ValueError, OSError, TypeError, zlib.error, EOFError) as exc:  # TypeError: a plain .npy is no context manager
        raise InputError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _labels(path: Path, arrays: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    if LABEL_KEY not in arrays:
        return None
    y = arrays[LABEL_KEY]
    if y.ndim != 1 or y.dtype.kind not in "biu" or len(y) != n:
        raise InputError(f"{path}: labels {LABEL_KEY!r} must be {n} integers (one per sample), got dtype {y.dtype} shape {y.shape}")
    return y.astype(np.int64)


def read_npz(path: str | Path, model: onnx.ModelProto) -> NpzInputs:
    """The model's inputs and optional labels from ``path``, checked against the graph's inputs."""
    path = Path(path)
    arrays = _read(path)
    specs = graph_inputs(model)
    inputs: dict[str, np.ndarray] = {}
    for value in specs:
        key = value.name if value.name in arrays else (SINGLE_INPUT_KEY if len(specs) == 1 and SINGLE_INPUT_KEY in arrays else None)
        if key is None:
            wanted = [v.name for v in specs] + ([SINGLE_INPUT_KEY] if len(specs) == 1 else [])
            raise InputError(f"{path}: no array for model input {value.name!r}; expected key(s) {wanted}, found {sorted(arrays)}")
        dtype, dims = _input_spec(value)
        _check_array(path, key, arrays[key], dims)
        inputs[value.name] = np.ascontiguousarray(arrays[key].astype(dtype, copy=False))
    counts = {k: len(v) for k, v in inputs.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"{path}: inputs hold different numbers of samples {counts}")
    n = next(iter(counts.values()))
    batch = _fixed_batch(path, specs, n)
    return NpzInputs(inputs, _labels(path, arrays, n), batch)


def _fixed_batch(path: Path, specs: list[onnx.ValueInfoProto], n: int) -> int | None:
    first = _input_spec(specs[0])[1]
    batch = first[0] if first else None
    if batch and n % batch:
        raise InputError(f"{path}: the model has a fixed batch size {batch}; {n} samples is not a multiple of it")
    return batch


def random_inputs(model: onnx.ModelProto, n: int = 16, seed: int = 0) -> NpzInputs:
    """Seeded standard-normal inputs of the graph's shapes (for fidelity checks without data)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for value in graph_inputs(model):
        dtype, dims = _input_spec(value)
        if any(d is None for d in dims[1:]):
            raise InputError(f"model input {value.name!r} has dynamic dimensions {_dims_text(dims)}; pass an .npz of inputs")
        batch = dims[0] if dims and dims[0] else n
        shape = (batch, *dims[1:])
        inputs[value.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    first = _input_spec(graph_inputs(model)[0])[1]
    return NpzInputs(inputs, None, first[0] if first and first[0] else None)
