"""The model's own memory: ONNX Runtime session memory measured in a fresh process, and
the peak above a baseline. Smaller models (channel-pruned, int8) must measure smaller."""

import sys

import pytest
import torch

from deepshrink import PTQ, create_model, export_onnx, export_quantized_onnx, quantize
from deepshrink.compress.prune import ChannelPrune
from deepshrink.core.methods import apply_method
from deepshrink.evaluate.memory import PeakRSS, ort_memory

pytestmark = [pytest.mark.flow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures /proc")]
SHAPE = (1, 28, 28)
MIB = 2**20


def _variants(name: str, folder) -> dict[str, object]:
    """fp32, 50% channel-pruned and int8 QDQ ONNX files of one zoo model."""
    torch.manual_seed(0)
    model = create_model(name, pretrained=True).eval()
    calib = [torch.randn(32, *SHAPE) for _ in range(2)]
    return {
        "fp32": export_onnx(model, folder / "fp32.onnx", SHAPE),
        "pruned": export_onnx(apply_method(model, ChannelPrune(ratio=0.5)).eval(), folder / "pruned.onnx", SHAPE),
        "int8": export_quantized_onnx(quantize(model, PTQ(), calib=calib, progress=False), folder / "int8.onnx", SHAPE),
    }


@pytest.fixture(scope="module", params=["resnet20", "vgg"])
def measured(request, tmp_path_factory):
    files = _variants(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, {kind: ort_memory(path, SHAPE, batch=64, threads=1) for kind, path in files.items()}


def test_pruned_and_int8_sessions_hold_less_than_fp32(measured):
    name, memory = measured
    fp32, pruned, int8 = (memory[k] for k in ("fp32", "pruned", "int8"))
    # Measured (MiB, session / batch-64 peak): resnet20 fp32 2.2-2.4 / 8.5-8.7, pruned 1.4-1.6 / 9.1-9.5,
    # int8 2.0-2.1 / 8.2-8.3; vgg fp32 9.7 / 25.0, pruned 2.9 / 6.7-6.9, int8 3.5 / 6.0.
    assert pruned.session_bytes < 0.8 * fp32.session_bytes
    assert int8.session_bytes < fp32.session_bytes
    if name == "vgg":  # weights and wide activations dominate: both shrink well past noise
        assert pruned.session_bytes < 0.5 * fp32.session_bytes and int8.session_bytes < 0.5 * fp32.session_bytes
        assert pruned.run_peak_bytes < 0.5 * fp32.run_peak_bytes and int8.run_peak_bytes < 0.5 * fp32.run_peak_bytes


def test_a_batch_64_run_counts_its_intermediate_tensors(measured):
    name, memory = measured
    fp32 = memory["fp32"]
    first_activation = 64 * 16 * 28 * 28 * 4  # both nets' first conv: 16 channels at 28x28, fp32
    assert fp32.run_peak_bytes >= fp32.session_bytes + first_activation
    assert fp32.session_bytes >= 0.9 * (1.09e6 if name == "resnet20" else 9.4e6)  # at least the fp32 initializers


def test_peak_rss_sees_a_tensor_freed_inside_the_block():
    with PeakRSS() as idle:
        pass
    with PeakRSS() as peak:
        torch.ones(64 * MIB // 4).add_(1).sum()  # 64 MiB, freed before the block ends
    assert peak.bytes >= 60 * MIB
    assert idle.bytes < 4 * MIB
