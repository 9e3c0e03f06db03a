"""How close a compressed model's output stays to the reference's, sample by sample: the one
fidelity measure of the PyTorch, transformer and ONNX-in paths.

Each sample's output is flattened to a vector; the cosine between the reference's and the
candidate's vector is computed in float64. Identical vectors score 1 (zero vectors included),
a zero vector against a non-zero one scores 0.
"""

from dataclasses import asdict, dataclass

import numpy as np

from deepshrink.core.errors import InputError


@dataclass(frozen=True)
class Fidelity:
    cosine_mean: float
    cosine_min: float
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float | None = None  # % of samples with the same argmax; None when the output has no class axis

    def meets(self, mean_target: float, min_target: float) -> bool:
        return self.cosine_mean >= mean_target and self.cosine_min >= min_target

    def to_dict(self) -> dict:
        return asdict(self)


def as_array(values) -> np.ndarray:
    """A numpy view of a numpy array or a (CPU or device) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-sample cosine (float64) of two equally shaped arrays, samples on axis 0."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    same = np.all(ref == cand, axis=1)
    return np.where(same, 1.0, np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-300))


def has_class_axis(output: np.ndarray) -> bool:
    """A (samples, classes) output with more than one class: argmax agreement means something."""
    return output.ndim == 2 and output.shape[1] > 1


def fidelity(reference, candidate, agreement: bool | None = None) -> Fidelity:
    """Fidelity of ``candidate`` to ``reference`` (numpy arrays or torch tensors, samples on axis 0).
    ``agreement``: report top-1 agreement; by default when the output has a class axis."""
    ref, cand = as_array(reference), as_array(candidate)
    if ref.shape != cand.shape or ref.ndim == 0 or len(ref) == 0:
        raise InputError(f"fidelity: need two equal non-empty shapes with samples first, got {ref.shape} and {cand.shape}")
    cos = cosines(ref, cand)
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    agree = None
    if agreement or (agreement is None and has_class_axis(ref)):
        agree = 100.0 * float(np.mean(ref.argmax(1) == cand.argmax(1)))
    return Fidelity(float(cos.mean()), float(cos.min()), len(cos), float(diff.max()), float(diff.mean()), agree)
