"""Quantized models: quantizer placement, PTQ, QAT, binary/ternary, mixed precision,
packed storage, and the QDQ ONNX that ONNX Runtime runs on integer kernels."""

import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deepshrink.compress.quant import (
    PTQ,
    QAT,
    ActQuant,
    MixedPrecision,
    allocate_bits,
    fake_quant_layers,
    load_quantized_model,
    prepare,
    save_quantized_model,
)
from deepshrink.compress.quant.config import resolve_reduce_range
from deepshrink.compress.quant.mixed import plan_fraction, weight_budget_bits
from deepshrink.compress.quant.onnx_qdq import quantized_onnx_bytes
from deepshrink.compress.quant.qat import layer_plan
from deepshrink.compress.structure.fold import fold_batchnorm
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle
from deepshrink.export.onnx import ort_session, run_ort
from deepshrink.models import create_model
from deepshrink.models.zoo import BasicBlock
from deepshrink.onnx_in.runtime import optimized_op_counts
from deepshrink.train import TrainConfig, train
from tests.conftest import make_learnable_set

pytestmark = pytest.mark.unit
SHAPE = (1, 28, 28)


class TinyResNet(nn.Module):
    """Stem conv + one residual block with a projection shortcut + pooling + linear: every placement case."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


@pytest.fixture(scope="module")
def trained():
    """A TinyResNet trained for a few epochs on the learnable set, and the data."""
    torch.manual_seed(0)
    data = make_learnable_set(512)
    bundle = DataBundle("learnable", data, make_learnable_set(128, seed=7), make_learnable_set(256, seed=9), 4, (0.0,), (1.0,))
    model = TinyResNet()
    train(model, bundle.train, TrainConfig(epochs=3, lr=0.05, batch_size=64, channels_last=False), progress=False)
    return model.eval(), bundle


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def test_placement_quantizes_every_conv_input_and_output(trained):
    model, _ = trained
    qmodel = prepare(model, 8, 8)
    graph = list(qmodel.graph.nodes)
    quant_nodes = [n for n in graph if n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), ActQuant)]
    # input, stem relu, conv1 relu, conv2 out, shortcut out, add->relu, average pool: 7 quantizers ...
    assert len({n.target for n in quant_nodes}) == 7
    # ... and the pool's quantizer once more after the flatten, so fc's input is a DQ in ONNX
    (requant,) = [n for n in quant_nodes if n.kwargs.get("requant")]
    assert requant.args[0].target is torch.flatten and requant.args[0].args[0].args[0].target == "pool"
    assert requant.target == requant.args[0].args[0].target
    for node in graph:
        if node.op == "call_module" and isinstance(qmodel.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            producer = node.args[0]
            assert isinstance(qmodel.get_submodule(producer.target), ActQuant), f"{node.target} input is not quantized"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules()), "BN should be folded before quantizing"


def test_ptq_int8_keeps_accuracy_and_reports_layers(trained):
    model, data = trained
    qmodel = apply_method(model, PTQ(calib_samples=128), Context(data, progress=False))
    fp32, int8 = (accuracy(m, data.test.images, data.test.labels) for m in (model, qmodel))
    assert fp32 > 0.9
    assert int8 >= fp32 - 0.02
    report = qmodel.quant_report
    assert [r["layer"] for r in report] == [name for name, _ in fake_quant_layers(qmodel)]
    assert all(r["weight_sqnr_db"] > 30 and r["output_sqnr_db"] > 15 for r in report)


def test_bias_correction_removes_mean_output_error(trained):
    model, data = trained
    calib = [data.train.images[:128]]
    plain = apply_method(model, PTQ(weight_bits=3, bias_correction=False), Context(data, progress=False, calib=calib))
    corrected = apply_method(model, PTQ(weight_bits=3, bias_correction=True), Context(data, progress=False, calib=calib))

    def mean_logit_error(q):
        with torch.no_grad():
            return (q(calib[0]) - model(calib[0])).mean(0).abs().max().item()

    assert mean_logit_error(corrected) < 0.5 * mean_logit_error(plain)


def test_qdq_onnx_runs_integer_kernels_and_agrees_with_torch(trained, tmp_path):
    model, data = trained
    qmodel = apply_method(model, PTQ(calib_samples=128), Context(data, progress=False))
    proto = quantized_onnx_bytes(qmodel, SHAPE)
    graph = onnx.load_from_string(proto).graph
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == len(fake_quant_layers(qmodel))
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in {i.name for i in graph.initializer} for n in graph.node)
    ops = optimized_op_counts(proto)
    assert ops["QLinearConv"] == 4 and ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1
    assert not {"Conv", "Gemm", "GlobalAveragePool", "DequantizeLinear"} & set(ops), ops
    images = data.test.images
    with torch.no_grad():
        expected = qmodel(images).numpy()
    got = run_ort(ort_session(proto, 1), images)
    assert (expected.argmax(1) == got.argmax(1)).mean() >= 0.99
    assert np.abs(expected - got).max() < 0.25 * np.abs(expected).max()


def test_low_bit_weights_pack_into_fewer_bytes_and_reload_exactly(trained, tmp_path):
    model, data = trained
    calib = [data.train.images[:128]]
    qmodel = apply_method(model, PTQ(weight_bits=4), Context(data, progress=False, calib=calib))
    for _, layer in fake_quant_layers(qmodel):
        codes, _, _ = layer.weight_quant.codes(layer.weight)
        assert codes.abs().max() <= 7
    weights = sum(layer.weight.numel() for _, layer in fake_quant_layers(qmodel))
    size4 = save_quantized_model(qmodel, tmp_path / "w4.safetensors")
    qmodel8 = apply_method(model, PTQ(weight_bits=8, reduce_range=False), Context(data, progress=False, calib=calib))
    size8 = save_quantized_model(qmodel8, tmp_path / "w8.safetensors")
    assert size8 - size4 == pytest.approx(weights / 2, abs=64)  # 4 bits saved per weight, up to per-tensor padding
    fresh = prepare(model, 4, 8)
    load_quantized_model(fresh, tmp_path / "w4.safetensors")
    images = data.test.images[:64]
    with torch.no_grad():
        assert torch.equal(fresh(images), qmodel(images))


@pytest.mark.parametrize("quantizer, levels", [("binary", 2), ("ternary", 3)])
def test_binary_and_ternary_weights_take_two_or_three_values_per_channel(trained, quantizer, levels):
    model, data = trained
    cfg = QAT(weight_quantizer=quantizer, calib_samples=128, finetune=TrainConfig(epochs=2, lr=0.01, batch_size=64, channels_last=False))
    qmodel = apply_method(model, cfg, Context(data, progress=False))
    inner = fake_quant_layers(qmodel)[1:-1]  # the first and last layers stay 8-bit
    assert {layer.weight_quant.quantizer for _, layer in inner} == {quantizer}
    for _, layer in inner:
        values = layer.weight_quant(layer.weight).detach().flatten(1)
        for row in values:
            assert len(torch.unique(row)) <= levels
    assert accuracy(qmodel, data.test.images, data.test.labels) > 0.5


def test_lsq_qat_learns_step_sizes_and_recovers_low_bit_accuracy(trained):
    model, data = trained
    calib = [data.train.images[:128]]
    ptq2 = apply_method(model, PTQ(weight_bits=2), Context(data, progress=False, calib=calib))
    cfg = QAT(  # LSQ for weights and activations (the activation default keeps calibrated steps)
        weight_bits=2,
        keep_first_last=False,
        calib_samples=128,
        activation_steps="lsq",
        finetune=TrainConfig(epochs=3, lr=0.02, channels_last=False, batch_size=64),
    )
    qat2 = apply_method(model, cfg, Context(data, progress=False))
    before = [layer.weight_quant.scale.detach().clone() for _, layer in fake_quant_layers(ptq2)]
    after = [layer.weight_quant.scale.detach() for _, layer in fake_quant_layers(qat2)]
    assert any(not torch.allclose(b, a) for b, a in zip(before, after, strict=True))
    assert accuracy(qat2, data.test.images, data.test.labels) >= accuracy(ptq2, data.test.images, data.test.labels)
    assert accuracy(qat2, data.test.images, data.test.labels) > 0.85


def test_keep_first_last_holds_edges_at_8_bits():
    model = TinyResNet()
    bits, quantizer = layer_plan(model, QAT(weight_bits=2))
    names = list(bits)
    assert bits[names[0]] == bits[names[-1]] == 8
    assert set(bits[n] for n in names[1:-1]) == {2}
    assert quantizer[names[0]] == "fixed" and quantizer[names[1]] == "lsq"


def brute_force(sensitivity, sizes, budget):
    names = list(sensitivity)
    best = (math.inf, None)
    for combo in itertools.product(*(sorted(sensitivity[n]) for n in names)):
        if sum(sizes[n] * b for n, b in zip(names, combo, strict=True)) <= budget:
            cost = sum(sensitivity[n][b] for n, b in zip(names, combo, strict=True))
            best = min(best, (cost, combo), key=lambda t: t[0])
    return best


def test_knapsack_allocation_matches_brute_force_and_fits_budget():
    rng = np.random.default_rng(0)
    for trial in range(20):
        names = [f"l{i}" for i in range(4)]
        sizes = {n: int(rng.integers(10, 1000)) for n in names}
        sensitivity = {n: {b: float(rng.random() * (9 - b) ** 2) for b in (2, 4, 8)} for n in names}
        budget = sum(sizes.values()) * float(rng.uniform(2.5, 7))
        plan = allocate_bits(sensitivity, sizes, budget)
        assert sum(sizes[n] * b for n, b in plan.items()) <= budget
        cost = sum(sensitivity[n][b] for n, b in plan.items())
        optimum, _ = brute_force(sensitivity, sizes, budget)
        assert cost <= optimum + 1e-9, f"trial {trial}: {cost} vs optimum {optimum}"


def test_budget_accounting_and_too_small_budget():
    model = TinyResNet()
    cfg = MixedPrecision(size_fraction=0.5)
    budget, sizes = weight_budget_bits(model, cfg)
    plan = {name: 8 for name in sizes}
    assert plan_fraction(model, plan, cfg.qat.scope) > 0.25
    sensitivity = {name: {2: 1.0, 8: 0.0} for name in sizes}
    with pytest.raises(InputError, match="budget"):
        allocate_bits(sensitivity, sizes, 1.0)
    assert budget > 0


def test_mixed_precision_gives_sensitive_layers_more_bits(trained):
    model, data = trained
    cfg = MixedPrecision(  # TinyResNet packs to 0.34 of fp32 at 2 bits, 0.50 at 8 (a 4.3 KB header on 15 KB)
        size_fraction=0.42,
        candidate_bits=(2, 4, 8),
        sensitivity_samples=128,
        qat=QAT(calib_samples=128, finetune=TrainConfig(epochs=1, lr=0.01, channels_last=False)),
    )
    qmodel = apply_method(model, cfg, Context(data, progress=False))
    plan = qmodel.bit_plan
    assert set(plan) == {name for name, _ in fake_quant_layers(qmodel)}
    assert len(set(plan.values())) > 1
    with tempfile.TemporaryDirectory() as tmp:  # the budget holds for the bytes on disk, header included
        assert save_quantized_model(qmodel, Path(tmp) / "m.safetensors") <= 0.42 * 4 * sum(p.numel() for p in model.parameters())
    most = max(plan, key=lambda n: qmodel.bit_sensitivity[n][2])
    assert plan[most] >= min(plan.values())
    for name, by_bits in qmodel.bit_sensitivity.items():  # Fisher-weighted noise shrinks as bits grow
        assert by_bits[2] > by_bits[4] > by_bits[8] >= 0, name


def test_post_training_mixed_precision_keeps_the_folded_weights_and_fits_the_budget(trained):
    """``train: false`` stops at the calibrated plan: no weight moves, the file still fits."""
    model, data = trained
    cfg = MixedPrecision(size_fraction=0.42, candidate_bits=(2, 4, 8), sensitivity_samples=128, qat=QAT(calib_samples=128), train=False)
    qmodel = apply_method(model, cfg, Context(data, progress=False))
    assert len(set(qmodel.bit_plan.values())) > 1
    folded = dict(fold_batchnorm(model).named_modules())
    for name, layer in fake_quant_layers(qmodel):
        assert torch.equal(layer.weight, folded[name].weight), name
        bits = qmodel.bit_plan[name]
        assert layer.weight_quant.spec.bits == (min(bits, 7) if resolve_reduce_range(None) else bits)  # 8-bit on 7 without VNNI
    with tempfile.TemporaryDirectory() as tmp:
        assert save_quantized_model(qmodel, Path(tmp) / "m.safetensors") <= 0.42 * 4 * sum(p.numel() for p in model.parameters())
    assert accuracy(qmodel, data.test.images, data.test.labels) >= accuracy(model, data.test.images, data.test.labels) - 0.1


@pytest.mark.parametrize("observer", ["mse", "entropy", "percentile", "minmax"])
def test_pretrained_lenet5_int8_ptq_within_half_a_point(observer):
    """Every activation observer, with bias correction on. KL (entropy) ranges once clipped the
    input at the background level and bias correction then folded that clipping into the biases."""
    from deepshrink.data import load_data

    data = load_data("fashion-mnist", test_subset=2000)
    model = create_model("lenet5", pretrained=True).eval()
    qmodel = apply_method(model, PTQ(calib_samples=256, activation_observer=observer), Context(data, progress=False))
    fp32, int8 = (accuracy(m, data.test.images, data.test.labels) for m in (model, qmodel))
    assert int8 >= fp32 - 0.005
    proto = quantized_onnx_bytes(qmodel, SHAPE)
    got = run_ort(ort_session(proto, 1), data.test.images).argmax(1)
    assert (got == data.test.labels.numpy()).mean() >= fp32 - 0.005
    # max pool -> flatten -> Linear stays on the integers: all three Linears run as QGemm
    ops = optimized_op_counts(proto)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 3 and not {"Conv", "Gemm"} & set(ops), ops


@pytest.mark.parametrize(
    "options, message",
    [
        ({"weight_bits": 9}, "weight_bits"),
        ({"activation_bits": 1}, "activation_bits"),
        ({"calib_samples": 0}, "calib_samples"),
        ({"activation_observer": "median"}, "activation_observer"),
    ],
)
def test_bad_ptq_configs_name_the_field(options, message):
    with pytest.raises(InputError, match=message):
        PTQ.from_dict(options)


def test_empty_calibration_set_and_empty_scope_fail_clearly(trained):
    model, data = trained
    with pytest.raises(InputError, match="empty"):
        apply_method(model, PTQ(), Context(data, progress=False, calib=[]))
    with pytest.raises(InputError, match="scope"):
        prepare(model, 8, 8, Scope(include="no_such_layer"))
