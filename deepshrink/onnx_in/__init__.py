"""ONNX-in: compress an ONNX file with no PyTorch source (prune, k-means share, weight-only or
static int8 QDQ quantization, .dsz packing with exact restore), evaluated in ONNX Runtime."""

from deepshrink.onnx_in.clean import CleanResult, clean_onnx
from deepshrink.onnx_in.data import NpzInputs, random_inputs, read_npz
from deepshrink.onnx_in.model import OnnxModelError, check_onnx, load_onnx, normalize_initializers, save_onnx
from deepshrink.onnx_in.pack import OnnxPackReport, pack_onnx, unpack_onnx
from deepshrink.onnx_in.pipeline import apply_step, compress_onnx, evaluate_onnx
from deepshrink.onnx_in.quantize import quantize_onnx
from deepshrink.onnx_in.runtime import first_output, optimized_op_counts
from deepshrink.onnx_in.weights import prune_initializers, share_initializers, weight_refs

__all__ = [
    "CleanResult",
    "NpzInputs",
    "OnnxModelError",
    "OnnxPackReport",
    "apply_step",
    "check_onnx",
    "clean_onnx",
    "compress_onnx",
    "evaluate_onnx",
    "first_output",
    "load_onnx",
    "normalize_initializers",
    "optimized_op_counts",
    "pack_onnx",
    "prune_initializers",
    "quantize_onnx",
    "random_inputs",
    "read_npz",
    "save_onnx",
    "share_initializers",
    "unpack_onnx",
    "weight_refs",
]
