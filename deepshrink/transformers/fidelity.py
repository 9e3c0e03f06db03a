"""How close a compressed encoder stays to the original: cosine similarity of
mean-pooled embeddings per text, and task accuracy where labels exist.

Mean pooling over the attention mask is what sentence-embedding models use, so
the cosine between the original's and the compressed model's pooled vectors is
the number a retrieval user sees change. The measure itself is ``evaluate.fidelity``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deepshrink.core.errors import InputError
from deepshrink.evaluate.accuracy import top1
from deepshrink.transformers.load import Batch, check_batches


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the hidden states of the real (unpadded) tokens, per sequence."""
    if hidden.dim() != 3 or hidden.shape[:2] != attention_mask.shape:
        raise InputError(f"mean_pool: hidden {tuple(hidden.shape)} does not match attention_mask {tuple(attention_mask.shape)}")
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


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


def task_accuracy(model: nn.Module, batches: Sequence[Batch], labels: Tensor) -> float:
    """Top-1 percent of a classification model on labelled token batches."""
    return top1(logits_of(model, batches), labels)
