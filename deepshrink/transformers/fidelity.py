"""How close a compressed encoder stays to the original: cosine similarity of
mean-pooled embeddings per text, and task accuracy where labels exist.

Mean pooling over the attention mask is what sentence-embedding models use, so
the cosine between the original's and the compressed model's pooled vectors is
the number a retrieval user sees change.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from deepshrink.core.errors import InputError
from deepshrink.transformers.load import Batch, check_batches


@dataclass(frozen=True)
class Fidelity:
    """Cosine similarity per sample between two sets of vectors: mean, min and count."""

    mean: float
    min: float
    samples: int

    def meets(self, mean_target: float, min_target: float) -> bool:
        return self.mean >= mean_target and self.min >= min_target

    def to_dict(self) -> dict:
        return asdict(self)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the hidden states of the real (unpadded) tokens, per sequence."""
    if hidden.dim() != 3 or hidden.shape[:2] != attention_mask.shape:
        raise InputError(f"mean_pool: hidden {tuple(hidden.shape)} does not match attention_mask {tuple(attention_mask.shape)}")
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def cosine_fidelity(reference: Tensor, candidate: Tensor) -> Fidelity:
    """Per-row cosine between ``reference`` and ``candidate`` (in float64); a zero row scores 0."""
    if reference.shape != candidate.shape or reference.dim() != 2 or reference.shape[0] == 0:
        raise InputError(f"cosine_fidelity: need two equal non-empty 2-d shapes, got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    a, b = reference.double(), candidate.double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    cos = torch.where(norms > 0, (a * b).sum(dim=1) / norms.clamp(min=1e-300), torch.zeros_like(norms))
    return Fidelity(float(cos.mean()), float(cos.min()), int(cos.numel()))


def encoder_outputs(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor | None]:
    """(last hidden state, logits or None) of a Hugging Face encoder, base or with a task head."""
    with_head = hasattr(model, "base_model") and model.base_model is not model
    with torch.inference_mode():
        out = model(**batch, output_hidden_states=True) if with_head else model(**batch)
    if with_head:
        return out.hidden_states[-1], out.logits
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]), None


def pooled_embeddings(model: nn.Module, batches: Sequence[Batch]) -> Tensor:
    """Mean-pooled last hidden states for every sequence in ``batches``, in order."""
    model.eval()
    pooled = [mean_pool(encoder_outputs(model, b)[0], b["attention_mask"]) for b in check_batches(batches)]
    return torch.cat(pooled).float()


def logits_of(model: nn.Module, batches: Sequence[Batch]) -> Tensor:
    model.eval()
    logits = [encoder_outputs(model, b)[1] for b in check_batches(batches)]
    if any(x is None for x in logits):
        raise InputError("the model has no task head (no logits); load it with num_labels")
    return torch.cat(logits).float()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    labels = torch.as_tensor(labels).reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != labels.numel():
        raise InputError(f"accuracy: {logits.shape[0] if logits.dim() else 0} predictions for {labels.numel()} labels")
    return float((logits.argmax(dim=1) == labels).double().mean() * 100)


def task_accuracy(model: nn.Module, batches: Sequence[Batch], labels: Tensor) -> float:
    """Top-1 percent of a classification model on labelled token batches."""
    return accuracy(logits_of(model, batches), labels)
