"""`deepshrink quantize` end to end on Fashion-MNIST subsets: the report's numbers,
the packed weights on disk, and the QDQ ONNX file in ONNX Runtime."""

import json

import onnx
import pytest
import torch

from deepshrink.cli import main
from deepshrink.compress.quant import QAT, load_quantized_model
from deepshrink.compress.quant.config import resolve_reduce_range
from deepshrink.compress.quant.prepare import prepare
from deepshrink.compress.quant.qat import layer_plan
from deepshrink.export import ort_session, run_ort
from deepshrink.models import create_model

FAST = ["--train-subset", "2000", "--test-subset", "500", "--val-size", "500", "--threads", "1", "--repeats", "2", "--no-progress"]


pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("load_data_once")]


def quantize(capsys, tmp_path, *argv: str) -> dict:
    out = tmp_path / "run"
    code = main(["quantize", *argv, "--out", str(out), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("model.safetensors", "model.onnx", "report.json", "report.md"):
        assert (out / name).is_file(), name
    return json.loads((out / "report.json").read_text())


def test_ptq_int8_lenet5_report_files_and_onnx(capsys, tmp_path):
    report = quantize(capsys, tmp_path, "lenet5", "--calib-samples", "256")
    fp32, int8 = report["before"], report["after"]
    assert int8["top1"] >= fp32["top1"] - 1.0
    assert abs(int8["top1_ort"] - int8["top1"]) <= 0.4  # 500 images: at most two predictions apart
    assert int8["bytes"] < fp32["bytes"] / 3  # packed int8 codes + fp32 scales and biases
    assert int8["onnx_bytes"] < fp32["onnx_bytes"] / 2.5
    graph = onnx.load(report["files"]["onnx"]).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert len(report["layers"]) == 5 and all(r["output_sqnr_db"] > 20 for r in report["layers"])


def test_qat_4bit_writes_half_byte_weights_that_reload(capsys, tmp_path):
    report = quantize(capsys, tmp_path, "lenet5", "--scheme", "qat", "--bits", "4", "--epochs", "1", "--calib-samples", "256")
    fp32, w4 = report["before"], report["after"]
    assert w4["top1"] >= fp32["top1"] - 3.0
    weights = sum(m.weight.numel() for m in create_model("lenet5").modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert w4["bytes"] < weights * 0.75  # most weights take half a byte (first and last layers 8-bit)
    model = create_model("lenet5", pretrained=True)
    bits, quantizer = layer_plan(model, QAT(weight_bits=4))
    fresh = load_quantized_model(
        prepare(model, bits, 8, quantizer=quantizer, reduce_range=resolve_reduce_range(None)), report["files"]["weights"]
    )
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = fresh(x).numpy()
    agree = (run_ort(ort_session(report["files"]["onnx"], threads=1), x).argmax(1) == logits.argmax(1)).mean()
    assert agree >= 7 / 8


def test_mixed_with_zero_epochs_is_post_training_within_its_budget(capsys, tmp_path):
    report = quantize(capsys, tmp_path, "lenet5", "--scheme", "mixed", "--epochs", "0", "--calib-samples", "256")
    assert report["config"]["train"] is False and len(set(report["bit_plan"].values())) > 1
    assert report["after"]["bytes"] <= report["before"]["bytes"] / 6
    assert report["after"]["top1"] >= report["before"]["top1"] - 1.0  # Fisher-planned bits hold lenet5 without any training


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "9"], "weight_bits"),
        (["--scheme", "qat", "--epochs", "0"], "--epochs"),
        (["--calib-samples", "0"], "calib_samples"),
    ],
)
def test_bad_flags_fail_with_one_line(capsys, tmp_path, argv, message):
    code = main(["quantize", "lenet5", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
