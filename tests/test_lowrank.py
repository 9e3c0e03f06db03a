"""Low-rank factorisation: SVD/Tucker-2/CP against closed forms, rank selection, the Decompose method, ONNX, the CLI."""

import json

import pytest
import torch
from torch import nn

from deepshrink.cli import main
from deepshrink.compress.distill import KD
from deepshrink.compress.lowrank import (
    CPConv2d,
    Decompose,
    LowRankLinear,
    TuckerConv2d,
    cp_conv,
    cp_rank_for,
    decompose_model,
    energy_rank,
    exact_cp_rank,
    svd_linear,
    svd_rank_for,
    tucker2_factors,
    tucker_conv,
    tucker_ranks_for,
    vbmf_rank,
)
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError, NotApplicable
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle, ImageSet
from deepshrink.evaluate import count_compute, evaluate_accuracy
from deepshrink.export import onnx_bytes, ort_session, verify_onnx
from deepshrink.train import TrainConfig, Trainer
from tests.conftest import make_learnable_set

G = torch.Generator().manual_seed(0)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((7, 1)),  # keeps which rows are bright: the learnable set's label
        nn.Flatten(),
        nn.Linear(112, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def conv_macs(model: nn.Module) -> int:
    return sum(layer.macs for layer in count_compute(model, (1, 28, 28)).layers if layer.kind == "Conv2d")


# -- SVD ------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("rank", [1, 3, 7, 12])
def test_svd_error_is_the_discarded_energy(rank):
    layer = nn.Linear(20, 12)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    factorised = svd_linear(layer, rank)
    approx = factorised[1].weight.double() @ factorised[0].weight.double()
    error = (approx - layer.weight.double()).norm() ** 2
    assert error.item() == pytest.approx((s[rank:] ** 2).sum().item(), abs=1e-9, rel=1e-5)
    x = torch.randn(5, 20, generator=G)
    with torch.no_grad():
        assert torch.allclose(factorised(x), x @ approx.float().T + layer.bias, atol=1e-5)
    assert sum(p.numel() for p in factorised.parameters()) == rank * 32 + 12


@pytest.mark.unit
def test_energy_rank_closed_form_and_vbmf_finds_a_planted_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # squares 9, 4, 1, 1 of 15
    assert [energy_rank(s, e) for e in (0.5, 0.6, 0.61, 13 / 15, 14 / 15, 0.95, 1.0)] == [1, 1, 2, 2, 3, 4, 4]
    g = torch.Generator().manual_seed(3)
    for planted in (1, 4, 9):
        low = torch.randn(60, planted, generator=g) @ torch.randn(planted, 90, generator=g)
        assert vbmf_rank(low + 0.05 * torch.randn(60, 90, generator=g)) == planted
    assert vbmf_rank(0.05 * torch.randn(60, 90, generator=g)) == 1  # pure noise: nothing above the threshold


# -- Tucker-2 and CP -----------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    "conv", [nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.Conv2d(6, 4, (3, 5), padding=(2, 1), dilation=(2, 1), bias=False)]
)
def test_tucker_and_cp_at_full_rank_reproduce_the_conv(conv):
    x = torch.randn(2, conv.in_channels, 11, 13, generator=G)
    tucker = tucker_conv(conv, (conv.out_channels, conv.in_channels))
    cp = cp_conv(conv, exact_cp_rank(tuple(conv.weight.shape)))
    with torch.no_grad():
        expected = conv(x)
        assert torch.allclose(tucker(x), expected, atol=1e-5)
        assert torch.allclose(cp(x), expected, atol=1e-5)
    assert isinstance(tucker, TuckerConv2d) and isinstance(cp, CPConv2d)
    assert cp[1].groups == cp[1].out_channels and cp[1].kernel_size == (conv.kernel_size[0], 1)


@pytest.mark.unit
def test_tucker_hooi_never_worse_than_hosvd_and_core_holds_the_kept_energy():
    w = torch.randn(16, 12, 3, 3, generator=G).double()
    errors = []
    for iters in (0, 3):
        core, u_out, u_in = tucker2_factors(w, (6, 5), iters)
        approx = torch.einsum("srhw,os,ir->oihw", core, u_out, u_in)
        errors.append((approx - w).norm() ** 2)
        # orthonormal factors: the residual is what the core does not hold
        assert errors[-1].item() == pytest.approx((w.norm() ** 2 - core.norm() ** 2).item(), rel=1e-9)
    assert errors[1] <= errors[0] + 1e-12


@pytest.mark.unit
def test_cp_recovers_an_exactly_low_rank_kernel():
    g = torch.Generator().manual_seed(5)
    factors = [torch.randn(n, 3, generator=g) for n in (8, 6, 3, 3)]
    conv = nn.Conv2d(6, 8, 3, padding=1)
    conv.weight.data = torch.einsum("or,ir,hr,wr->oihw", *factors)
    cp = cp_conv(conv, 3, iters=500)
    x = torch.randn(2, 6, 9, 9, generator=g)
    with torch.no_grad():
        assert ((cp(x) - conv(x)).norm() / conv(x).norm()).item() < 1e-3


# -- rank for a target reduction ----------------------------------------------------------
@pytest.mark.unit
def test_svd_compression_target():
    model = conv_net()
    out, records = decompose_model(conv_net(), Decompose(method="svd", compression=2.0, round_to=1))
    assert [r.ranks for r in records] == [(svd_rank_for(32, 112, 2.0),), (1,)] == [(12,), (1,)]
    assert all(r.replaced and r.params_before / r.params_after >= 2.0 for r in records)
    assert isinstance(out[9], LowRankLinear) and isinstance(out[11], LowRankLinear)
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.unit
@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_conv_compression_target_is_met_as_counted_by_count_compute(method):
    """The target is in MACs over the whole forward pass: a strided conv's input 1x1 runs at 4x the positions.
    The 1-input-channel conv "0" is not a target (its kxk kernel is already as cheap as a 1x1 projection)."""
    model = conv_net()
    out, records = decompose_model(conv_net(), Decompose(method=method, compression=2.0, round_to=1))
    assert [r.name for r in records] == ["2", "5"] and all(r.replaced for r in records)
    first = count_compute(model, (1, 28, 28)).layers[0].macs  # conv "0", untouched
    assert (conv_macs(model) - first) / (conv_macs(out) - first) >= 2.0
    for record in records:
        assert record.macs_before / record.macs_after >= 2.0
    expected = tucker_ranks_for(16, 8, (3, 3), (2, 2), 2.0) if method == "tucker" else (cp_rank_for(16, 8, (3, 3), (2, 2), 2.0),)
    assert records[0].ranks == expected  # the strided conv "2"


@pytest.mark.unit
def test_unprofitable_layers_are_left_alone_and_layer_ranks_apply():
    out, records = decompose_model(conv_net(), Decompose(method="tucker", rank=100))
    assert not any(r.replaced for r in records)  # full rank costs more than the conv
    assert all(isinstance(m, nn.Conv2d) for m in out if isinstance(m, (nn.Conv2d, TuckerConv2d)))
    out, records = decompose_model(conv_net(), Decompose(method="tucker", rank=100, layer_ranks={"5": 4}))
    assert [r.ranks for r in records if r.replaced] == [(4, 4)] and isinstance(out[5], TuckerConv2d)
    again, more = decompose_model(out, Decompose(method="tucker", rank=2))
    assert "5.1" not in [r.name for r in more]  # layers inside a factorised block are not factorised again


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of rank, energy, compression"),
        ({"rank": 4, "energy": 0.9}, "exactly one"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"energy": 1.5}, "energy must be in"),
        ({"compression": 1.0}, "compression must be > 1"),
        ({"method": "cp", "energy": 0.9}, "cp: choose ranks"),
        ({"rank": 2, "layer_ranks": {"a": 0}}, "layer_ranks.a"),
        ({"rank": 2, "distill": KD()}, "set finetune"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(InputError, match=match):
        Decompose(**kwargs)


@pytest.mark.unit
def test_bad_ranks_for_the_model_raise():
    with pytest.raises(InputError, match=r"layer_ranks: no tucker-decomposable layer named \['9'\]"):
        decompose_model(conv_net(), Decompose(method="tucker", rank=2, layer_ranks={"9": 2}))
    with pytest.raises(InputError, match="layer_ranks.9: rank 33 exceeds the layer's largest possible rank 32"):
        decompose_model(conv_net(), Decompose(method="svd", rank=2, layer_ranks={"9": 33}))
    with pytest.raises(InputError, match=r"SVD rank must be in \[1, 4\]"):
        svd_linear(nn.Linear(4, 6), 5)
    with pytest.raises(InputError, match=r"Decompose: unknown key\(s\) \['ranks'\]"):
        Decompose.from_dict({"ranks": 3})
    assert Decompose.from_dict({"method": "tucker", "rank": "auto"}).rank == "auto"
    with pytest.raises(InputError, match="Decompose.rank"):
        Decompose.from_dict({"rank": "most"})


@pytest.mark.unit
@pytest.mark.parametrize("cfg", [Decompose(method="svd", rank=3), Decompose(method="tucker", energy=0.8), Decompose(method="cp", rank=6)])
def test_decomposed_models_export_and_ort_agrees(cfg):
    model = conv_net().eval()
    model[3].running_mean.uniform_(-0.5, 0.5, generator=G)
    model[11].weight.data *= 50  # distinguishable outputs, so the comparison means something
    out, records = decompose_model(model, cfg)
    assert any(r.replaced for r in records)
    x = torch.randn(8, 1, 28, 28, generator=G)
    with torch.no_grad():
        assert out(x).std(0).max() > 1e-3
    assert verify_onnx(out, ort_session(onnx_bytes(out, (1, 28, 28)), threads=1), x) < 1e-4


# -- the registered method with fine-tuning ---------------------------------------------------
@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    data = make_learnable_set(384, seed=11)

    def part(a: int, b: int) -> ImageSet:
        return ImageSet(data.images[a:b], data.labels[a:b])

    return DataBundle("synthetic", part(0, 256), part(256, 320), part(320, 384), 4, (0.0,), (1.0,))


@pytest.mark.unit
@pytest.mark.parametrize("distill", [None, KD(temperature=2.0, alpha=0.5)])
def test_decompose_with_finetune_recovers_accuracy(bundle, distill):
    model = conv_net()
    Trainer(model, TrainConfig(epochs=4, batch_size=32, lr=0.05), bundle.train, progress=False).fit()
    base = evaluate_accuracy(model, bundle.test).top1
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = Decompose(  # forced rank-2 factors: the test is about recovering accuracy, not about speed
        method="tucker", rank=2, round_to=1, latency_check=False, finetune=TrainConfig(epochs=3, batch_size=32, lr=0.02), distill=distill
    )
    out = apply_method(model, cfg, Context(bundle, progress=False))
    assert base >= 90.0 and evaluate_accuracy(out, bundle.test).top1 >= base - 5.0
    assert conv_macs(out) < 0.5 * conv_macs(model)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched


@pytest.mark.unit
def test_decompose_refuses_a_model_with_nothing_to_factorise(bundle):
    """Only 1x1 and depthwise convolutions: Tucker has nothing to do, and says so instead of
    fine-tuning the original and calling it decomposed."""
    model = nn.Sequential(nn.Conv2d(1, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.LazyLinear(4))
    model(bundle.train.images[:2])
    with pytest.raises(NotApplicable, match=r"decompose \(tucker\): no layer to factorise"):
        apply_method(model, Decompose(method="tucker", rank=2, finetune=TrainConfig(epochs=1)), Context(bundle, progress=False))


# -- CLI -----------------------------------------------------------------------------------
@pytest.mark.flow
def test_cli_decompose_lenet300_svd(tmp_path, capsys, load_data_once):
    out = tmp_path / "svd"
    # --force: every layer is asserted factorised below; the latency gate's timing has its own tests
    argv = ["decompose", "lenet300", "--method", "svd", "--compression", "3", "--exclude", "^5$", "--epochs", "1", "--kd", "--force"]
    argv += ["--train-subset", "2000", "--test-subset", "500", "--val-size", "200", "--threads", "1", "--repeats", "3", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(layers) == {"1", "3"} and all(layer["replaced"] for layer in layers.values())
    assert sum(v["params_before"] for v in layers.values()) / sum(v["params_after"] for v in layers.values()) >= 3.0
    assert after["params"] < 0.4 * before["params"] and before["top1"] >= 85.0
    assert after["top1"] >= before["top1"] - 3.0 and after["ort_b64_ms"] > 0
    assert report["files"]["onnx_max_abs_diff"] < 1e-4 and report["config"]["distill"]["temperature"] == 4.0
    assert "decomposed" in capsys.readouterr().out


@pytest.mark.flow
def test_cli_decompose_rejects_bad_ranks(capsys):
    assert main(["decompose", "lenet300", "--method", "svd", "--rank", "two"]) == 2
    assert "--rank must be a positive integer or 'auto'" in capsys.readouterr().err
    assert main(["decompose", "lenet300", "--method", "cp", "--energy", "0.9"]) == 2
    assert "cp: choose ranks" in capsys.readouterr().err
    assert main(["decompose", "lenet300", "--method", "svd", "--rank", "4", "--layer-rank", "1=x"]) == 2
    assert "--layer-rank '1=x'" in capsys.readouterr().err


@pytest.mark.unit
def test_round_to_keeps_ranks_on_block_multiples():
    _, plain = decompose_model(conv_net(), Decompose(method="tucker", compression=2.0, round_to=1))
    _, rounded = decompose_model(conv_net(), Decompose(method="tucker", compression=2.0, round_to=4))
    _, default = decompose_model(conv_net(), Decompose(method="tucker", compression=1.2))
    assert [r.ranks for r in plain] == [(8, 4), (9, 9)]
    assert [r.ranks for r in rounded] == [(8, 4), (8, 8)]  # down to a multiple, never below it nor above the mode
    assert Decompose(rank=2).round_to == 8 and all(r % 8 == 0 for record in default for r in record.ranks)
    with pytest.raises(InputError, match="round_to must be >= 1"):
        Decompose(rank=2, round_to=0)


# -- never slower by default: per-layer ORT latency gate, rank rounding, the slower flag ------
@pytest.mark.unit
def test_latency_gate_keeps_a_layer_whose_factorised_form_is_slower(monkeypatch):
    """The gate trusts the measurement over the MACs: layer "5" saves MACs but (as timed) runs slower."""
    import deepshrink.compress.lowrank.decompose as decompose

    timed = {}

    def fake_latency(original, factorised, shape, batch):
        timed[original.out_channels, original.in_channels] = (shape, batch)
        return (1.0, 1.5) if original.in_channels == 16 else (1.0, 0.5)

    monkeypatch.setattr(decompose, "layer_latency", fake_latency)
    cfg = Decompose(method="tucker", compression=2.0, round_to=1, latency_batch=32)
    out, records = decompose_model(conv_net(), cfg, input_shape=(1, 28, 28))
    assert timed == {(16, 8): ((8, 28, 28), 32), (16, 16): ((16, 14, 14), 32)}  # each layer at its own input shape
    kept, factorised = records[1], records[0]
    assert not kept.replaced and isinstance(out[5], nn.Conv2d) and kept.params_after == kept.params_before
    assert (kept.ort_ms_before, kept.ort_ms_after) == (1.0, 1.5) and "kept" in kept.note
    assert factorised.replaced and isinstance(out[2], TuckerConv2d) and factorised.note == ""
    # within the 5% margin is noise, not a speedup; forcing (latency_check false) skips the timing
    assert not decompose.latency_gate(factorised, 1.0, 0.96).replaced and decompose.latency_gate(factorised, 1.0, 0.94).replaced
    forced, records = decompose_model(conv_net(), Decompose(method="tucker", compression=2.0, latency_check=False), input_shape=(1, 28, 28))
    assert all(r.replaced and r.ort_ms_after is None for r in records) and len(timed) == 2


@pytest.mark.unit
def test_latency_gate_measures_a_profitable_layer_as_faster():
    """Really timed in ONNX Runtime: a 64-channel 3x3 conv at Tucker ranks (8, 8) does ~9x fewer MACs and runs faster."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    out, records = decompose_model(model, Decompose(method="tucker", rank=8, scope=Scope(include="^2$")), input_shape=(3, 14, 14))
    (record,) = records
    assert record.replaced and isinstance(out[2], TuckerConv2d) and record.ranks == (8, 8)
    assert record.ort_ms_after < 0.95 * record.ort_ms_before


@pytest.mark.unit
def test_one_input_channel_convs_are_not_factorised():
    model = nn.Sequential(nn.Conv2d(1, 64, 5), nn.ReLU(), nn.Conv2d(64, 64, 3))
    _, records = decompose_model(model, Decompose(method="cp", compression=2.0, latency_check=False))
    assert [r.name for r in records] == ["2"]


@pytest.mark.unit
def test_slower_than_original_flag():
    from deepshrink.commands.distill import _slower_batches

    before = {"ort_b64_ms": 10.0, "ort_b1_ms": 0.5}
    assert _slower_batches(before, {"ort_b64_ms": 12.0, "ort_b1_ms": 0.4}) == [64]
    assert _slower_batches(before, {"ort_b64_ms": 9.0, "ort_b1_ms": 0.6}) == [1]
    assert _slower_batches(before, {"ort_b64_ms": 9.0, "ort_b1_ms": 0.4}) == []
    assert _slower_batches(before, {"top1": 90.0}) == []  # not timed: nothing to flag
