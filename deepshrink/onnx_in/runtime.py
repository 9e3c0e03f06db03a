"""Running ONNX models in ONNX Runtime: outputs over an input set, fidelity
against a reference model, Top-1 accuracy, and the op types ORT actually runs
after its own graph optimisations (to see that QDQ became QLinearConv)."""

import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from deepshrink.core.errors import InputError
from deepshrink.onnx_in.data import NpzInputs

BATCH = 256


def session(
    model: onnx.ModelProto | bytes | str | Path, threads: int | None = None, optimized_path: str | None = None, layout: bool = True
):
    """A CPU session with all graph optimisations; ``optimized_path`` saves the graph ORT runs.
    ``layout=False`` stops before the NCHWc layout pass, which in ORT 1.32 fails to load graphs
    that also return a conv's output feeding a residual add (as calibration does)."""
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
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise InputError(f"ONNX Runtime cannot load the model ({str(exc).strip().splitlines()[0]})") from None


def run_outputs(sess, data: NpzInputs, outputs: list[str] | None = None, batch: int = BATCH) -> list[np.ndarray]:
    """Every requested output (all by default) over the whole input set, concatenated on the sample axis."""
    parts: list[list[np.ndarray]] = []
    for feed in data.batches(batch):
        try:
            result = sess.run(outputs, feed)
        except Exception as exc:  # a wrong feed (dtype, rank) is the user's data
            raise InputError(f"ONNX Runtime failed on the inputs ({str(exc).strip().splitlines()[0]})") from None
        parts.append(result)
    return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]


def first_output(model: onnx.ModelProto | bytes, data: NpzInputs, threads: int | None = None) -> np.ndarray:
    """The model's first output over ``data`` (the logits of a classifier)."""
    sess = session(model, threads)
    return run_outputs(sess, data, [sess.get_outputs()[0].name])[0]


@dataclass(frozen=True)
class Fidelity:
    """How close a compressed model's output is to the reference's, sample by sample."""

    max_abs_diff: float
    mean_abs_diff: float
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None  # % of samples with the same argmax (None for outputs without a class axis)

    def to_dict(self) -> dict:
        return asdict(self)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    if reference.shape != candidate.shape:
        raise InputError(f"output shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    diff = np.abs(ref - cand)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    same = np.all(ref == cand, axis=1)
    cosine = np.where(same, 1.0, np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30))
    agreement = None
    if reference.ndim == 2 and reference.shape[1] > 1:
        agreement = 100.0 * float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    return Fidelity(float(diff.max()), float(diff.mean()), float(cosine.mean()), float(cosine.min()), agreement)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in % of (N, classes) outputs against integer labels."""
    if logits.ndim != 2 or len(logits) != len(labels):
        raise InputError(f"Top-1 needs (N, classes) outputs for {len(labels)} labels, got shape {logits.shape}")
    return 100.0 * float(np.mean(logits.argmax(1) == labels))


def optimized_op_counts(model: onnx.ModelProto | bytes, threads: int | None = 1) -> Counter:
    """Op types of the graph ORT runs after its optimisations (QDQ groups fused into QLinearConv, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        session(model, threads, str(path))
        return Counter(node.op_type for node in onnx.load(str(path)).graph.node)
