"""Parameter counts and sizes, keeping zeroed and removed parameters apart and
bytes on disk apart from bytes in memory."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepshrink.models.weights import save_weights


@dataclass(frozen=True)
class SizeReport:
    params: int  # all parameters (a removed channel is gone from this count)
    nonzero_params: int  # parameters that are not exactly zero (a zeroed weight still counts in `params`)
    layers: int  # weight layers: conv + linear
    dense_fp32_bytes: int  # params x 4: the uncompressed in-memory size
    state_bytes: int  # parameters + buffers, in their actual dtypes
    disk_bytes: int  # safetensors file of the state dict, as written
    onnx_bytes: int | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0


def fp32_param_bytes(model: nn.Module) -> int:
    """The parameters' size as dense float32 (params x 4): the base compression ratios divide."""
    return 4 * sum(p.numel() for p in model.parameters())


def measure_size(model: nn.Module, onnx_bytes: int | None = None) -> SizeReport:
    params = list(model.parameters())
    state = model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        disk = save_weights(model, Path(tmp) / "weights.safetensors").stat().st_size
    return SizeReport(
        params=sum(p.numel() for p in params),
        nonzero_params=sum(int(torch.count_nonzero(p)) for p in params),
        layers=sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()),
        dense_fp32_bytes=fp32_param_bytes(model),
        state_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        disk_bytes=disk,
        onnx_bytes=onnx_bytes,
    )
