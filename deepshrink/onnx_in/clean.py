"""Graph clean-up with onnxslim: constant folding, dead-node and common-subexpression
removal, Conv+BatchNorm (and Conv+Add/Mul) folding. The result is only kept when
ONNX Runtime gives the same outputs as before (to float32 rounding) on the given inputs."""

import contextlib
import io
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxslim

from deepshrink.onnx_in.data import NpzInputs
from deepshrink.onnx_in.model import check_onnx
from deepshrink.onnx_in.runtime import all_outputs

# Folding BN into a conv reorders float sums: allow a few ulps of the output's scale.
RELATIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CleanResult:
    model: onnx.ModelProto
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    max_abs_diff: float
    kept: bool  # False: onnxslim changed the outputs (or failed) and the input graph was kept
    note: str = ""


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph.node))


def _slim(model: onnx.ModelProto, fold_bn: bool) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnxslim may edit the proto it is given
    skip = [] if fold_bn else ["FusionConvBN", "FusionConvTransposeBN"]
    with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table
        return onnxslim.slim(copy, skip_fusion_patterns=skip or None)


def _largest_change(reference: dict[str, np.ndarray], cleaned: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max |change| over every output, the bound it must stay under: a few ulps of the largest output)."""
    if reference.keys() != cleaned.keys() or any(reference[k].shape != cleaned[k].shape for k in reference):
        return float("inf"), 0.0
    diff = max(float(np.abs(reference[k].astype(np.float64) - cleaned[k]).max(initial=0.0)) for k in reference)
    scale = max(float(np.abs(v.astype(np.float64)).max(initial=0.0)) for v in reference.values())
    return diff, RELATIVE_TOLERANCE * max(1.0, scale)


def clean_onnx(
    model: onnx.ModelProto, data: NpzInputs, fold_bn: bool = True, reference: dict[str, np.ndarray] | None = None
) -> CleanResult:
    """Slim ``model``; verify on ``data`` that none of the outputs changed (``reference``: the
    model's outputs on ``data`` by name, when the caller already has them)."""
    before = _ops(model)
    try:
        slim = _slim(model, fold_bn)
        check_onnx(slim, "onnxslim output")
    except Exception as exc:  # a library failing on an exotic graph must not stop compression
        return CleanResult(model, before, before, 0.0, False, f"onnxslim failed ({type(exc).__name__}: {str(exc)[:120]}); graph kept")
    reference = all_outputs(model, data) if reference is None else reference
    cleaned = all_outputs(slim, data)
    diff, bound = _largest_change(reference, cleaned)
    if diff > bound:
        return CleanResult(model, before, before, diff, False, f"onnxslim changed the outputs by {diff:.3g} (> {bound:.3g}); graph kept")
    return CleanResult(slim, before, _ops(slim), diff, True)
