"""The CLI end to end on data subsets, asserting real outcomes."""

import json
import subprocess
import sys

import pytest

from deepshrink.cli import main
from deepshrink.data import load_data
from deepshrink.evaluate import evaluate_accuracy
from deepshrink.models import create_model
from deepshrink.models.weights import read_manifest

pytestmark = pytest.mark.flow
MANIFEST = read_manifest()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_eval_round_trip(tmp_path, capsys):
    weights = tmp_path / "lenet300.safetensors"
    code, out, _ = run_cli(
        capsys,
        "train",
        "lenet300",
        "--epochs",
        "2",
        "--train-subset",
        "3000",
        "--test-subset",
        "500",
        "--lr",
        "0.05",
        "--out",
        str(weights),
        "--no-progress",
    )
    assert code == 0 and weights.is_file()
    code, out, _ = run_cli(
        capsys,
        *("eval", "lenet300", "--weights", str(weights), "--reference", "lenet300", "--test-subset", "500", "--json"),
        *("--repeats", "3", "--threads", "1"),
    )
    report = json.loads(out)
    assert code == 0
    assert 70.0 < report["robustness"]["agreement"] < 100.0  # a different training run than the zoo's
    assert report["compression_ratio"] == 1.0
    assert report["accuracy"]["top1"] > 70.0  # 2 epochs on 3,000 images; chance is 10%
    assert report["accuracy"]["samples"] == 500
    assert report["onnx"]["top1_agreement"] == 100.0 and report["onnx"]["max_abs_diff"] < 1e-4
    assert report["size"]["params"] == 266_610
    assert report["compute"]["conv_linear_flops"] == report["flop_counter_flops"]
    assert report["manifest_top1"] is None  # user weights, not the zoo's


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "nosuch"], "unknown model 'nosuch'"),
        (["eval", "lenet300", "--weights", "/no/such.safetensors"], "weights file not found"),
        (["eval", "lenet300", "--dataset", "mnist"], "needs a directory"),
        (["eval", "lenet300", "--dataset", "mnist", "--data-dir", "/no/such/dir"], "not found at /no/such/dir"),
        (["train", "lenet300", "--publish", "--train-subset", "10"], "full Fashion-MNIST"),
        (["train", "lenet300", "--epochs", "0", "--train-subset", "10"], "epochs and batch_size must be >= 1"),
        (["eval", "os:getcwd"], "not a torch.nn.Module"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("deepshrink: error:")
    assert message in err


def test_corrupt_weights_file_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, _, err = run_cli(capsys, "eval", "lenet300", "--weights", str(bad))
    assert code == 2 and "not a readable safetensors file" in err


def test_console_script_lists_the_zoo():
    result = subprocess.run([sys.executable, "-m", "deepshrink.cli", "models", "--json"], capture_output=True, text=True, check=True)
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert {name for name, row in rows.items() if row["pretrained"]} == {
        "lenet300",
        "lenet5",
        "lenet5_caffe",
        "resnet20",
        "vgg",
        "mobilenetv2",
    }
    assert {"resnet8", "resnet20_thin", "lenet_small"} <= set(rows)  # distillation students, trained by distilling
    assert rows["lenet5_caffe"]["params"] == 431_080
    assert rows["resnet20"]["macs"] > 30e6


TARGETS = {"lenet300": 89.0, "lenet5": 90.0, "lenet5_caffe": 91.0, "resnet20": 92.5, "vgg": 92.5, "mobilenetv2": 92.0}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_pretrained_weights_meet_targets_and_reproduce_manifest(name):
    if name not in MANIFEST:
        pytest.fail(f"{name} has no pretrained weights in the manifest")
    test = load_data().test
    top1 = evaluate_accuracy(create_model(name, pretrained=True), test).top1
    assert abs(top1 - MANIFEST[name]["test_top1"]) <= 0.1
    assert top1 >= TARGETS[name]


def test_eval_resnet20_acceptance(capsys):
    """The issue's acceptance line: Top-1 within 0.1pp of the manifest, MACs equal FlopCounterMode's, ORT agrees."""
    code, out, _ = run_cli(capsys, "eval", "resnet20", "--json", "--repeats", "5", "--threads", "2")
    report = json.loads(out)
    assert code == 0
    assert abs(report["accuracy"]["top1"] - report["manifest_top1"]) <= 0.1
    assert 2 * report["compute"]["macs"] == report["flop_counter_flops"]
    assert report["onnx"]["max_abs_diff"] < 1e-3 and report["onnx"]["top1_agreement"] >= 99.9


def test_compress_dry_run_prints_the_validated_plan(capsys):
    code, out, _ = run_cli(capsys, "compress", "lenet300", "--recipe", "deep-compression", "--dry-run")
    assert code == 0
    assert "1. prune:" in out and "2. share:" in out and "3. pack:" in out


def test_compress_dry_run_resolves_the_model_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "compress", "resnet99", "--recipe", "deep-compression", "--dry-run")
    assert code == 2 and err.startswith("deepshrink: error: unknown model 'resnet99'") and err.count("\n") == 1
    code, _, err = run_cli(capsys, "compress", "missing.onnx", "--recipe", "int8-ptq", "--dry-run")
    assert code == 2 and "missing.onnx: no such ONNX file" in err
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_compress_rejects_a_bad_recipe_with_the_key_path(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nversion: 1\nsteps:\n  - prune: {sparsity: 1.5}\n")
    code, _, err = run_cli(capsys, "compress", "lenet300", "--recipe", str(recipe), "--dry-run")
    assert code == 2 and "steps[0].prune.sparsity must be in [0.0, 1.0)" in err


def test_compress_end_to_end_on_a_subset(tmp_path, capsys):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(
        "name: small\nversion: 1\nsteps:\n"
        "  - prune: {sparsity: 0.9, granularity: global, finetune: {epochs: 1, lr: 0.01, weight_decay: 0.0}}\n"
        "  - share: {linear_bits: 4}\n"
        "  - pack: {}\n"
    )
    out_dir = tmp_path / "run"
    args = [
        "compress",
        "lenet300",
        "--recipe",
        str(recipe),
        "--out",
        str(out_dir),
        "--test-subset",
        "1000",
        "--no-progress",
        "--threads",
        "1",
    ]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    report = json.loads((out_dir / "report.json").read_text())
    original, final = report["stages"][0], report["stages"][-1]
    assert final["dsz_bytes"] == (out_dir / "model.dsz").stat().st_size
    assert original["fp32_bytes"] / final["dsz_bytes"] > 25  # 90% zeros, 4-bit indices, entropy coded
    assert final["top1"] > original["top1"] - 3.0  # 1 epoch of fine-tuning on the pretrained model
    assert report["onnx_max_abs_diff"] < 1e-4
