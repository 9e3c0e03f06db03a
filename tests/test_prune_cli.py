"""`deepshrink prune` end to end on Fashion-MNIST subsets: the report's numbers, the files, ONNX against torch."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepshrink.cli import main
from deepshrink.compress.prune import satisfies_nm
from deepshrink.export import ort_session, run_ort
from deepshrink.models import create_model, load_weights

SUBSETS = ["--train-subset", "2000", "--test-subset", "500", "--val-size", "1000", "--finetune-epochs", "1", "--threads", "1"]
FAST = [*SUBSETS, "--repeats", "3", "--no-progress"]


pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("load_data_once")]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prune(capsys, tmp_path, *argv: str) -> tuple[dict, str]:
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "prune", *argv, "--out", str(out), *FAST)
    assert code == 0, err
    for name in ("model.safetensors", "model.onnx", "report.json"):
        assert (out / name).is_file(), name
    return json.loads((out / "report.json").read_text()), stdout


def assert_onnx_matches_reloaded_weights(report: dict, name: str, resize: bool = False) -> None:
    """The written ONNX file runs in ORT and agrees with torch on the written safetensors."""
    model = load_weights(create_model(name), report["files"]["weights"], resize=resize).eval()
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(run_ort(ort_session(report["files"]["onnx"], threads=1), x) - expected).max() < 1e-4
    assert report["onnx_max_abs_diff"] < 1e-4


def test_magnitude_lenet300_with_sensitivity(tmp_path, capsys):
    report, stdout = prune(
        capsys, tmp_path, "lenet300", "--method", "magnitude", "--sparsity", "0.8", "--sensitivity", "--sensitivity-subset", "200"
    )
    before, after = report["before"], report["after"]
    assert after["weight_sparsity"] == pytest.approx(0.8, abs=1e-5) and before["weight_sparsity"] == 0.0
    assert after["params"] == before["params"] == 266_610 and after["macs"] == before["macs"]  # zeros in place
    assert after["effective_macs"] == pytest.approx(0.2 * before["macs"], rel=1e-3)
    assert after["nonzero_params"] < 0.21 * before["nonzero_params"]
    assert after["top1"] > 75.0 and before["top1"] > 85.0
    assert after["ort_b64_ms"] > 0 and before["ort_b64_ms"] > 0 and report["latency"]["batch_size"] == 64
    assert "Top-1 %" in stdout and "MACs (effective, zeros skipped)" in stdout
    assert_onnx_matches_reloaded_weights(report, "lenet300")
    files = report["files"]
    assert Path(files["sensitivity_png"]).read_bytes()[:4] == b"\x89PNG"
    sensitivity = json.loads(Path(files["sensitivity_json"]).read_text())
    assert set(sensitivity["layers"]) == {"1", "3", "5"} and sensitivity["samples"] == 200
    assert all(len(layer["points"]) == 9 for layer in sensitivity["layers"].values())
    ratios, params = sensitivity["suggested_layer_sparsity"], {k: v["params"] for k, v in sensitivity["layers"].items()}
    assert sum(ratios[k] * params[k] for k in ratios) / sum(params.values()) == pytest.approx(0.8)


def test_channel_lenet5_is_physically_smaller(tmp_path, capsys):
    report, _ = prune(capsys, tmp_path, "lenet5", "--method", "channel", "--sparsity", "0.5", "--importance", "l2")
    before, after = report["before"], report["after"]
    assert report["config"]["importance"] == "l2" and report["config"]["ratio"] == 0.5
    assert after["params"] < 0.5 * before["params"] and after["macs"] < 0.6 * before["macs"]
    assert after["bytes"] < 0.5 * before["bytes"] and after["onnx_bytes"] < 0.5 * before["onnx_bytes"]
    assert after["weight_sparsity"] == 0.0 and after["effective_macs"] == after["macs"]  # removed, not zeroed
    assert after["top1"] > 60.0
    assert_onnx_matches_reloaded_weights(report, "lenet5", resize=True)


def test_nm_lenet5_keeps_two_of_four(tmp_path, capsys):
    report, _ = prune(capsys, tmp_path, "lenet5", "--method", "nm", "--nm", "2:4", "--exclude", "^(0|3)$")
    model = load_weights(create_model("lenet5"), report["files"]["weights"])
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            assert satisfies_nm(layer.weight, 2, 4) and int((layer.weight == 0).sum()) == layer.weight.numel() // 2, name
    assert int((model[0].weight == 0).sum()) == 0  # excluded
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert report["after"]["weight_sparsity"] == pytest.approx(0.5 * linear / report["after"]["weights"])
    assert report["config"]["n"] == 2 and report["config"]["m"] == 4
    assert_onnx_matches_reloaded_weights(report, "lenet5")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lenet300", "--method", "nm", "--nm", "3:2"], "n must be in [1, m) for N:M sparsity"),
        (["lenet300", "--method", "nm", "--nm", "2-4"], "--nm must look like N:M"),
        (["lenet300", "--method", "magnitude", "--sparsity", "1.2"], "sparsity must be in [0.0, 1.0), got 1.2"),
        (["lenet300", "--method", "channel", "--sparsity", "1.2"], "ratio must be in [0.0, 1.0), got 1.2"),
        (["lenet300", "--method", "magnitude"], "--method magnitude needs --sparsity"),
        (["lenet300", "--method", "magnitude", "--sparsity", "0.5", "--nm", "2:4"], "--method magnitude does not use --nm"),
        (["lenet5", "--method", "nm"], "layer '0' has 25 input weights per output, not divisible by M=4"),
    ],
)
def test_bad_prune_input_is_one_clear_line(tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "prune", *argv, "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("deepshrink: error:")
    assert message in err
    assert not (tmp_path / "run").exists()
