import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from deepshrink.data import ImageSet
from deepshrink.evaluate import count_compute, evaluate, evaluate_accuracy, measure_size
from deepshrink.evaluate.environment import describe_environment
from deepshrink.evaluate.flops import flop_counter_flops
from deepshrink.evaluate.latency import time_callable
from deepshrink.models import create_model, list_models

pytestmark = pytest.mark.unit


@pytest.fixture
def tiny_images() -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    return ImageSet(torch.randn(40, 1, 28, 28, generator=generator), torch.randint(0, 10, (40,), generator=generator))


@pytest.mark.parametrize("name", list_models())
def test_dense_macs_match_flop_counter_mode(name):
    model = create_model(name)
    report = count_compute(model, (1, 28, 28), batch_size=2)
    assert report.conv_linear_flops == flop_counter_flops(model, (1, 28, 28), batch_size=2)
    assert report.macs * 2 == report.conv_linear_flops
    assert report.effective_macs == report.macs  # a fresh model has no zero weights
    assert report.flops > report.conv_linear_flops  # BN, activations, pooling, adds come on top


def test_macs_closed_form_for_conv_linear_and_grouped_conv():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 out: 64 * 8 * 3 * 9
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 64 * 8 * 1 * 9
        nn.Conv2d(8, 4, 1, stride=2),  # 4x4 out: 16 * 4 * 8
        nn.Flatten(),
        nn.Linear(64, 10),  # 64 * 10
    )
    report = count_compute(model, (3, 8, 8))
    assert [layer.macs for layer in report.layers] == [64 * 8 * 27, 64 * 8 * 9, 16 * 4 * 8, 640]


def test_effective_macs_skip_zero_weights():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 5))
    with torch.no_grad():
        model[0].weight[:2] = 0  # half the filters
        model[2].weight[:, ::4] = 0  # a quarter of the linear weights
    report = count_compute(model, (1, 6, 6))
    conv, linear = report.layers[0], report.layers[1]
    assert conv.effective_macs * 2 == conv.macs
    assert linear.effective_macs * 4 == linear.macs * 3


def test_residual_adds_are_counted_once_per_element():
    model = create_model("resnet20")
    adds = [layer for layer in count_compute(model, (1, 28, 28)).layers if layer.kind == "add"]
    # 9 blocks; stage outputs are 16x28x28, 32x14x14, 64x7x7, 3 blocks each.
    assert len(adds) == 9
    assert sum(a.flops for a in adds) == 3 * (16 * 28 * 28 + 32 * 14 * 14 + 64 * 7 * 7)


def test_size_keeps_zeroed_and_removed_params_apart():
    model = nn.Linear(10, 10)
    with torch.no_grad():
        model.weight[:5] = 0
    size = measure_size(model)
    assert size.params == 110
    assert size.nonzero_params == 110 - 50
    assert size.dense_fp32_bytes == 440
    assert size.disk_bytes > 440  # safetensors header on top of the raw floats
    assert size.sparsity == pytest.approx(50 / 110)


def test_accuracy_on_known_predictions():
    class Ranked(nn.Module):  # class 0 scores highest, class 9 lowest
        def forward(self, x):
            return -torch.arange(10.0).expand(len(x), 10)

    labels = torch.tensor([0, 4, 5, 9])
    result = evaluate_accuracy(Ranked(), ImageSet(torch.zeros(4, 1, 2, 2), labels), batch_size=3)
    assert result.top1 == 25.0
    assert result.top5 == 50.0
    assert result.samples == 4
    expected_loss = torch.nn.functional.cross_entropy(-torch.arange(10.0).expand(4, 10), labels).item()
    assert result.loss == pytest.approx(expected_loss)


def test_timing_and_memory_measure_real_work():
    # one warm-up call, then nine 2 ms runs and one 30 ms run: the median is a fast run, p90 the slow one, in ms
    sleeps = iter([0.0] + [0.002] * 9 + [0.030])
    median, p90 = time_callable(lambda: time.sleep(next(sleeps)), repeats=10, warmup=1)
    assert 2.0 <= median < 15.0 and p90 >= 30.0
    # In a fresh process: inside the test session, memory freed by earlier tests is reused without growing RSS.
    code = "import torch; from deepshrink.evaluate.latency import peak_rss_delta; print(peak_rss_delta(lambda: torch.ones(64 * 2**20 // 4).add_(1).sum()))"
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown >= 32 * 2**20  # a 64 MiB tensor


def test_evaluate_report_is_complete_and_onnx_agrees(tiny_images):
    torch.manual_seed(0)
    model = create_model("lenet5")
    report = evaluate(model, tiny_images, "lenet5", reference=create_model("lenet300"), batch_sizes=(1, 4), repeats=3, threads=1)
    assert report.accuracy.samples == len(tiny_images)
    assert report.onnx is not None and report.onnx.max_abs_diff < 1e-4 and report.onnx.top1_agreement == 100.0
    assert {(r.backend, r.batch_size) for r in report.latency} == {("torch", 1), ("torch", 4), ("onnxruntime", 1), ("onnxruntime", 4)}
    assert report.flop_counter_flops == report.compute.conv_linear_flops
    assert report.compression_ratio == pytest.approx(measure_size(create_model("lenet300")).disk_bytes / report.size.disk_bytes)
    assert report.to_dict()["environment"]["versions"]["torch"].startswith("2.13.0")


def test_results_header_names_machine_threads_and_every_version():
    env = {
        "cpu": "Some CPU",
        "cpu_flags": ["avx2"],
        "cores": 2,
        "date": "2026-01-01T00:00:00Z",
        "versions": {"torch": "2.13.0", "onnxruntime": "1.32.0"},
    }
    text = describe_environment(env, 2, shared=True, extra_versions={"torch-pruning": "1.6"})
    machine, versions = text.splitlines()
    assert machine == "Machine: Some CPU (avx2), 2 cores, shared with other jobs; threads: 2; date: 2026-01-01T00:00:00Z."
    assert versions == "Versions: torch 2.13.0, onnxruntime 1.32.0, torch-pruning 1.6."
    assert describe_environment({**env, "cpu_flags": []}, 1).startswith("Machine: Some CPU, 2 cores; threads: 1;")
