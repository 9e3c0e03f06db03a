"""ONNX-in: compress ONNX files with no PyTorch source, checked numerically in ONNX Runtime."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from deepshrink.cli import main
from deepshrink.compress.prune import ChannelPrune, MagnitudePrune
from deepshrink.compress.quant.config import PTQ
from deepshrink.compress.share import KMeansShare
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.encode.container import DszError
from deepshrink.encode.step import Pack
from deepshrink.evaluate.fidelity import fidelity
from deepshrink.export import export_onnx
from deepshrink.models import create_model
from deepshrink.onnx_in import (
    check_onnx,
    clean_onnx,
    compress_onnx,
    evaluate_onnx,
    first_output,
    load_onnx,
    normalize_initializers,
    optimized_op_counts,
    pack_onnx,
    prune_initializers,
    quantize_onnx,
    read_npz,
    share_initializers,
    unpack_onnx,
    weight_refs,
)
from deepshrink.pipeline.recipe import Recipe

pytestmark = pytest.mark.unit
SHAPE = (1, 12, 12)


class TinyResNet(nn.Module):
    """Stem conv, one residual block (the Add ORT fuses into QLinearAdd), pooling, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(x + y), 1), 1))


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet()
    for bn in (model.stem[1], model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def write_npz(path: Path, n: int, shape: tuple[int, ...], seed: int, classes: int | None = None, key: str = "x") -> Path:
    rng = np.random.default_rng(seed)
    arrays = {key: rng.standard_normal((n, *shape)).astype(np.float32)}
    if classes:
        arrays["y"] = rng.integers(0, classes, n)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx_in")
    return {
        "tiny": export_onnx(tiny_resnet(), root / "tiny.onnx", SHAPE),
        "lenet5": export_onnx(create_model("lenet5", pretrained=True), root / "lenet5.onnx", (1, 28, 28)),
        "tiny_npz": write_npz(root / "tiny.npz", 96, SHAPE, seed=1, classes=4),
        "lenet5_npz": write_npz(root / "lenet5.npz", 64, (1, 28, 28), seed=2, classes=10),
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


# -- loading, data, clean-up ----------------------------------------------------------------
def test_bad_model_files_are_one_line_input_errors(tmp_path, files):
    with pytest.raises(InputError, match="file not found"):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07 this is not protobuf \xff\xff")
    with pytest.raises(InputError, match="junk.onnx"):
        load_onnx(tmp_path / "junk.onnx")
    broken = onnx.load(str(files["tiny"]))
    broken.graph.node[0].input[0] = "no_such_tensor"
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(InputError, match="invalid ONNX model") as info:
        load_onnx(tmp_path / "broken.onnx")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 1, 12, 12), np.float32)}, "expected key"),
        ({"x": np.zeros((4, 1, 10, 12), np.float32)}, "axis 2"),
        ({"x": np.zeros((0, 1, 12, 12), np.float32)}, "no samples"),
        ({"x": np.zeros((4, 12, 12), np.float32)}, "4 axes"),
        ({"x": np.zeros((4, 1, 12, 12), np.float32), "y": np.zeros(3, np.int64)}, "4 integers"),
    ],
)
def test_bad_npz_is_an_input_error(tmp_path, files, arrays, message):
    model = load_onnx(files["tiny"])
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message):
        read_npz(tmp_path / "bad.npz", model)


def test_npz_accepts_the_input_name_and_rejects_non_npz(tmp_path, files):
    model = load_onnx(files["tiny"])
    data = read_npz(write_npz(tmp_path / "named.npz", 5, SHAPE, seed=0, key="input"), model)
    assert len(data) == 5 and data.inputs["input"].dtype == np.float32 and data.labels is None
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        read_npz(tmp_path / "text.npz", model)


def test_cleanup_folds_batchnorm_without_changing_outputs(tmp_path, files):
    path = tmp_path / "bn.onnx"
    torch.onnx.export(
        tiny_resnet(),
        (torch.zeros(1, *SHAPE),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    model = load_onnx(path)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 3
    result = clean_onnx(model, read_npz(files["tiny_npz"], model))
    assert result.kept and "BatchNormalization" not in result.ops_after
    assert result.max_abs_diff < 1e-5
    check_onnx(result.model)


# -- pruning and sharing ----------------------------------------------------------------------
def test_layer_pruning_zeroes_exact_counts_and_leaves_biases(files):
    model = load_onnx(files["lenet5"])
    pruned, sparsity = prune_initializers(model, MagnitudePrune(sparsity=0.7))
    refs = weight_refs(model)
    assert [r.op for r in refs] == ["Conv", "Conv", "Gemm", "Gemm", "Gemm"]
    for ref in refs:
        before, after = initializer(model, ref.initializer), initializer(pruned, ref.initializer)
        assert int((after == 0).sum()) == round(0.7 * before.size)
        kept = after != 0
        assert np.array_equal(after[kept], before[kept])  # survivors untouched
        assert np.abs(before[~kept]).max() <= np.abs(before[kept]).min()  # the smallest went
        assert sparsity[ref.node] == pytest.approx(0.7, abs=1 / before.size)
    weights = {r.initializer for r in refs}
    for tensor in model.graph.initializer:
        if tensor.name not in weights:
            assert np.array_equal(initializer(pruned, tensor.name), numpy_helper.to_array(tensor))


def test_global_pruning_and_scope_and_bad_configs(files):
    model = load_onnx(files["lenet5"])
    pruned, _ = prune_initializers(model, MagnitudePrune(sparsity=0.8, granularity="global"))
    weights = [initializer(pruned, r.initializer) for r in weight_refs(model)]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights) == pytest.approx(0.8, abs=1e-3)
    conv_only, sparsity = prune_initializers(model, MagnitudePrune(sparsity=0.5, scope=Scope(types=("Conv2d",))))
    assert len(sparsity) == 2 and all(node.endswith("Conv") for node in sparsity)
    with pytest.raises(InputError, match="fine-tuned"):
        prune_initializers(model, MagnitudePrune(sparsity=0.5, schedule="agp", finetune={"epochs": 1}))
    with pytest.raises(InputError, match="not in scope"):
        prune_initializers(model, MagnitudePrune(sparsity=0.5, layer_sparsity={"/nope/Conv": 0.1}))
    with pytest.raises(InputError, match="no Conv/Gemm/MatMul"):
        prune_initializers(model, MagnitudePrune(sparsity=0.5, scope=Scope(include="nothing-matches")))


def test_kmeans_sharing_keeps_at_most_2_to_the_bits_values(files):
    model = load_onnx(files["lenet5"])
    pruned, _ = prune_initializers(model, MagnitudePrune(sparsity=0.6))
    shared, sizes = share_initializers(pruned, KMeansShare(conv_bits=3, linear_bits=2))
    for ref in weight_refs(model):
        before, after = initializer(pruned, ref.initializer), initializer(shared, ref.initializer)
        distinct = np.unique(after[after != 0])
        assert len(distinct) <= (8 if ref.op == "Conv" else 4) and sizes[ref.node] == len(distinct)
        assert np.array_equal(after == 0, before == 0)  # pruned zeros stay zero, nothing else becomes zero
    data = read_npz(files["lenet5_npz"], model)
    fine, _ = share_initializers(pruned, KMeansShare(conv_bits=6, linear_bits=5))  # the paper's widths keep the outputs
    assert fidelity(first_output(pruned, data), first_output(fine, data)).cosine_mean > 0.99


# -- quantization -----------------------------------------------------------------------------
def test_static_int8_runs_as_qlinear_kernels_with_bounded_error(files):
    model = load_onnx(files["tiny"])
    data = read_npz(files["tiny_npz"], model)
    qmodel, summary = quantize_onnx(model, PTQ(weight_bits=7, calib_samples=64), data)
    check_onnx(qmodel)
    ops = optimized_op_counts(qmodel)
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1
    assert not {"Conv", "Gemm", "GlobalAveragePool", "DequantizeLinear"} & set(ops)  # integers from the first Q to the float logits
    assert summary["layers"] == 4 and summary["qdq_pairs"] == 7  # input, stem, conv1, conv2 (before the add), add, pool, flatten
    for ref_name in (r.initializer for r in weight_refs(model)):
        codes = initializer(qmodel, f"{ref_name}_quantized")
        assert codes.dtype == np.int8 and np.abs(codes).max() <= 63  # 7-bit symmetric narrow range
    f = fidelity(first_output(model, data), first_output(qmodel, data))
    assert f.cosine_mean > 0.999 and f.cosine_min > 0.99 and f.top1_agreement >= 95.0


def test_static_int8_on_lenet5_keeps_pooling_on_the_grid(files):
    model = load_onnx(files["lenet5"])
    data = read_npz(files["lenet5_npz"], model)
    qmodel, summary = quantize_onnx(model, PTQ(weight_bits=8, activation_observer="minmax"), data)
    ops = optimized_op_counts(qmodel)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 3 and "Conv" not in ops and "Gemm" not in ops
    assert summary["qdq_pairs"] == 7  # input, 2 conv outputs, 2 max-pooled (their input's scale), 2 fc outputs
    f = fidelity(first_output(model, data), first_output(qmodel, data))  # random inputs, far from Fashion-MNIST
    assert f.cosine_mean > 0.995 and f.top1_agreement >= 90.0


def test_bias_correction_reduces_the_mean_output_error(files):
    model = load_onnx(files["lenet5"])
    data = read_npz(files["lenet5_npz"], model)
    reference = first_output(model, data)
    errors = {}
    for correct in (False, True):
        qmodel, _ = quantize_onnx(model, PTQ(weight_bits=3, activation_bits=None, bias_correction=correct), data)
        errors[correct] = float(np.abs((first_output(qmodel, data) - reference).mean(0)).mean())
    assert errors[True] < 0.5 * errors[False]


def test_weight_only_int8_and_int4(files):
    model = load_onnx(files["lenet5"])
    data = read_npz(files["lenet5_npz"], model)
    reference = first_output(model, data)
    int8, summary8 = quantize_onnx(model, PTQ(activation_bits=None), data)
    int4, summary4 = quantize_onnx(model, PTQ(weight_bits=4, activation_bits=None), data)
    assert summary8["weight_storage"] == "int8" and summary4["weight_storage"] == "int4" and summary4["opset"] == 21
    assert "QuantizeLinear" not in {n.op_type for n in int8.graph.node}
    int4_types = [t.data_type for t in int4.graph.initializer if t.name.endswith("_quantized")]
    assert len(int4_types) == 5 and set(int4_types) == {onnx.TensorProto.INT4}
    for qmodel, bound in ((int8, 0.9995), (int4, 0.93)):
        check_onnx(qmodel)
        assert fidelity(reference, first_output(qmodel, data)).cosine_mean > bound
    sizes = [len(m.SerializeToString()) for m in (model, int8, int4)]
    assert sizes[1] < 0.3 * sizes[0] and sizes[2] < 0.6 * sizes[1]


def test_static_quantization_needs_calibration_data_and_8_bit_activations(files):
    with pytest.raises(InputError, match="calibrates on data"):
        quantize_onnx(load_onnx(files["tiny"]), PTQ(), None)
    model = load_onnx(files["tiny"])
    with pytest.raises(InputError, match="8-bit activations"):
        quantize_onnx(model, PTQ(activation_bits=6), read_npz(files["tiny_npz"], model))


def test_an_old_opset_is_converted_for_per_channel_qdq(tmp_path, files):
    model = load_onnx(export_onnx(tiny_resnet(), tmp_path / "opset11.onnx", SHAPE, opset=11))
    data = read_npz(files["tiny_npz"], model).subset(32)
    qmodel, summary = quantize_onnx(model, PTQ(weight_bits=7, calib_samples=32), data)
    assert summary["opset"] == 13 and optimized_op_counts(qmodel)["QLinearConv"] == 3
    assert fidelity(first_output(model, data), first_output(qmodel, data)).cosine_min > 0.999


# -- packing ------------------------------------------------------------------------------------
def test_pack_restores_the_model_bit_for_bit(tmp_path, files):
    model = load_onnx(files["lenet5"])
    data = read_npz(files["lenet5_npz"], model)
    pruned, _ = prune_initializers(model, MagnitudePrune(sparsity=0.8))
    shared, _ = share_initializers(pruned, KMeansShare(conv_bits=4, linear_bits=4))
    static, _ = quantize_onnx(shared, PTQ(weight_bits=7, calib_samples=32), data)
    int4, _ = quantize_onnx(model, PTQ(weight_bits=4, activation_bits=None, bias_correction=False))
    for name, candidate in {"shared": shared, "static": static, "int4": int4}.items():
        expected = normalize_initializers(candidate)
        report = pack_onnx(expected, tmp_path / f"{name}.dsz")
        restored = unpack_onnx(report.path)
        assert restored.SerializeToString() == expected.SerializeToString()
        for tensor in candidate.graph.initializer:  # the values, whatever field they were stored in
            assert initializer(restored, tensor.name).tobytes() == numpy_helper.to_array(tensor).tobytes()
        assert np.array_equal(first_output(restored, data), first_output(candidate, data))
        assert report.file_bytes < len(expected.SerializeToString())
    shared_bytes = pack_onnx(normalize_initializers(shared), tmp_path / "s.dsz").file_bytes
    assert shared_bytes < 0.2 * len(model.SerializeToString())  # 80% zeros + 4-bit codebooks, entropy coded
    damaged = bytearray((tmp_path / "static.dsz").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "damaged.dsz").write_bytes(bytes(damaged))
    with pytest.raises(DszError, match="checksum"):
        unpack_onnx(tmp_path / "damaged.dsz")


# -- the recipe run, evaluation and the CLI -------------------------------------------------------
def test_compress_onnx_runs_a_recipe_and_leaves_the_input_alone(tmp_path, files):
    before = digest(files["lenet5"])
    recipe = Recipe(
        "onnx-dc", (("prune", MagnitudePrune(sparsity=0.75)), ("share", KMeansShare(conv_bits=5, linear_bits=4)), ("pack", Pack()))
    )
    report = compress_onnx(files["lenet5"], recipe, tmp_path / "run", npz=files["lenet5_npz"], progress=False)
    assert digest(files["lenet5"]) == before
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["model.dsz", "model.onnx", "report.json", "report.md"]
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["original", "cleaned (onnxslim)", "prune", "share", "packed .dsz (restored)"]
    assert stages["cleaned (onnxslim)"]["fidelity"]["max_abs_diff"] < 1e-5
    packed = stages["packed .dsz (restored)"]
    assert packed["dsz_bytes"] == (out / "model.dsz").stat().st_size < 0.25 * stages["original"]["onnx_bytes"]
    assert packed["fidelity"] == stages["share"]["fidelity"]  # the restored model is the shared one
    restored = unpack_onnx(out / "model.dsz")
    assert restored.SerializeToString() == load_onnx(out / "model.onnx").SerializeToString()
    assert json.loads((out / "report.json").read_text())["stages"][-1]["dsz_bytes"] == packed["dsz_bytes"]
    assert "packed .dsz" in (out / "report.md").read_text()


def test_compress_onnx_static_int8_report(tmp_path, files):
    recipe = Recipe("int8", (("quantize", PTQ(weight_bits=7, calib_samples=64)),))
    report = compress_onnx(files["tiny"], recipe, tmp_path / "q", npz=files["tiny_npz"], progress=False)
    assert report["ort_optimized_ops"]["QLinearConv"] == 3
    assert report["stages"][-1]["fidelity"]["cosine_mean"] > 0.999
    check_onnx(load_onnx(tmp_path / "q" / "model.onnx"))


@pytest.mark.parametrize(
    ("recipe", "npz", "message"),
    [
        (Recipe("c", (("channel_prune", ChannelPrune(ratio=0.5)),)), None, "needs the PyTorch model"),
        (Recipe("q", (("quantize", PTQ()),)), None, "pass npz"),
        (Recipe("p", (("prune", MagnitudePrune(sparsity=0.5, schedule="agp", finetune={"epochs": 1})),)), None, "fine-tuned"),
        (Recipe("qp", (("quantize", PTQ(activation_bits=None)), ("prune", MagnitudePrune(sparsity=0.5)))), None, "before the quantize"),
    ],
)
def test_compress_onnx_rejects_what_it_cannot_do(tmp_path, files, recipe, npz, message):
    with pytest.raises(InputError, match=message):
        compress_onnx(files["tiny"], recipe, tmp_path / "out", npz=npz, progress=False)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_compress_onnx_refuses_to_overwrite_its_input(tmp_path, files):
    source = tmp_path / "model.onnx"
    source.write_bytes(files["tiny"].read_bytes())
    with pytest.raises(InputError, match="overwrite the input"):
        compress_onnx(source, Recipe("p", (("prune", MagnitudePrune(sparsity=0.5)),)), tmp_path, progress=False)


def test_evaluate_and_cli(tmp_path, files, capsys):
    model = load_onnx(files["tiny"])
    data = read_npz(files["tiny_npz"], model)
    expected = 100.0 * float(np.mean(first_output(model, data).argmax(1) == data.labels))
    result = evaluate_onnx(files["tiny"], files["tiny_npz"], reference=files["tiny"])
    assert result["top1"] == pytest.approx(expected) and result["fidelity"]["max_abs_diff"] == 0.0
    assert main(["onnx-eval", str(files["tiny"]), "--npz", str(files["tiny_npz"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(expected)
    pack_onnx(normalize_initializers(model), tmp_path / "m.dsz")
    assert main(["onnx-unpack", str(tmp_path / "m.dsz"), "--out", str(tmp_path / "m.onnx")]) == 0
    assert load_onnx(tmp_path / "m.onnx").SerializeToString() == normalize_initializers(model).SerializeToString()
    assert main(["onnx-eval", str(tmp_path / "missing.onnx"), "--npz", str(files["tiny_npz"])]) == 2
    assert "file not found" in capsys.readouterr().err


def test_matmul_weights_quantize_along_their_output_axis(tmp_path):
    """A hand-built MatMul graph (weights [in, out]): per-channel scales run along axis 1."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 3)).astype(np.float32) * np.array([0.01, 1.0, 100.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    qmodel, _ = quantize_onnx(model, PTQ(activation_bits=None, bias_correction=False))
    scale = initializer(qmodel, "w_scale")
    assert scale.shape == (3,) and np.allclose(scale, np.abs(weight).max(0) / 127, rtol=1e-6)
    np.savez(tmp_path / "mm.npz", x=rng.standard_normal((8, 6)).astype(np.float32))
    data = read_npz(tmp_path / "mm.npz", model)
    assert fidelity(first_output(model, data), first_output(qmodel, data)).cosine_min > 0.9999


def test_cli_compress_runs_quantize_recipes_on_onnx_files_and_torch_models(tmp_path, files, capsys):
    recipe = tmp_path / "int8.yaml"
    recipe.write_text("name: int8\nversion: 1\nsteps:\n  - quantize: {weight_bits: 7, calib_samples: 64}\n")
    out = tmp_path / "run"
    code = main(
        ["compress", str(files["tiny"]), "--recipe", str(recipe), "--npz", str(files["tiny_npz"]), "--out", str(out), "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    assert optimized_op_counts(load_onnx(out / "model.onnx"))["QLinearConv"] == 3
    assert json.loads((out / "report.json").read_text())["stages"][-1]["fidelity"]["cosine_mean"] > 0.999
    torch_run = ["compress", "lenet5", "--recipe", str(recipe), "--out", str(tmp_path / "torch"), "--test-subset", "100"]
    code = main([*torch_run, "--train-subset", "200", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    ops = {node.op_type for node in load_onnx(tmp_path / "torch" / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # the PyTorch path quantizes too, into QDQ ONNX
