"""Top-k accuracy and loss over a labelled image set."""

from dataclasses import dataclass

import torch
from torch import nn

from deepshrink.data.datasets import ImageSet, iterate_batches


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
    for x, y in iterate_batches(data, batch_size):
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
    model.train(was_training)
    n = len(data)
    return AccuracyResult(100.0 * correct1 / n, 100.0 * correct5 / n, loss_sum / n, n)


def ort_predictions(session, data: ImageSet, batch_size: int = 500) -> torch.Tensor:
    """Top-1 class of every image from an ONNX Runtime session."""
    name = session.get_inputs()[0].name
    batches = [session.run(None, {name: data.images[i : i + batch_size].numpy()})[0] for i in range(0, len(data), batch_size)]
    return torch.cat([torch.from_numpy(logits).argmax(1) for logits in batches])


def ort_top1(session, data: ImageSet) -> float:
    """Top-1 (percent) of an ONNX Runtime session on a labelled image set."""
    return 100.0 * float((ort_predictions(session, data) == data.labels).float().mean())
