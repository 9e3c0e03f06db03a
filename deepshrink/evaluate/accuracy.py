"""Top-k accuracy and loss over a labelled image set; top-1 predictions of a model or an ONNX Runtime session."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepshrink.core.errors import InputError
from deepshrink.data.datasets import ImageSet, iterate_batches
from deepshrink.evaluate.fidelity import as_array
from deepshrink.export.onnx import run_ort

Predict = Callable[[torch.Tensor], torch.Tensor]  # images -> logits: a PyTorch model or an ONNX Runtime session
BATCH = 500


@dataclass(frozen=True)
class AccuracyResult:
    top1: float  # percent
    top5: float  # percent
    loss: float
    samples: int


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: ImageSet, batch_size: int = 500) -> AccuracyResult:
    """Top-1/Top-5 accuracy (percent) and mean cross-entropy, in eval mode; restores the mode."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    device = next(model.parameters(), torch.empty(0)).device  # a model on a GPU is measured there
    for x, y in iterate_batches(data, batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
    model.train(was_training)
    n = len(data)
    return AccuracyResult(100.0 * correct1 / n, 100.0 * correct5 / n, loss_sum / n, n)


def torch_predict(model: nn.Module) -> Predict:
    """Logits in eval mode without gradients; the model's own mode is restored after each call."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(x)
        finally:
            model.train(was_training)

    return predict


def ort_predict(session) -> Predict:
    return lambda x: torch.from_numpy(run_ort(session, x))


def predictions(predict: Predict, data: ImageSet, sigma: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The top-1 class of every image, with Gaussian noise of ``sigma`` added first when it is non-zero
    (one generator drawn in batch order, so every model sees the same noisy images)."""
    generator = torch.Generator().manual_seed(seed)
    classes = []
    for images, _ in iterate_batches(data, BATCH):
        noisy = images + sigma * torch.randn(images.shape, generator=generator) if sigma else images
        classes.append(predict(noisy).argmax(1))
    return torch.cat(classes)


def ort_predictions(session, data: ImageSet) -> torch.Tensor:
    """Top-1 class of every image from an ONNX Runtime session."""
    return predictions(ort_predict(session), data)


def top1(logits, labels) -> float:
    """Top-1 accuracy in % of (N, classes) logits (numpy or torch) against N integer labels."""
    logits, labels = as_array(logits), as_array(labels).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise InputError(f"Top-1 needs (N, classes) outputs for {len(labels)} labels, got shape {logits.shape}")
    return 100.0 * float(np.mean(logits.argmax(1) == labels))


def ort_top1(session, data: ImageSet) -> float:
    """Top-1 (percent) of an ONNX Runtime session on a labelled image set."""
    return 100.0 * float((ort_predictions(session, data) == data.labels).float().mean())
