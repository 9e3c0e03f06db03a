"""Accuracy-aware automatic compression: budget parsing, the plan path, and lenet300
searches on Fashion-MNIST subsets that must meet a size target measured on disk
within the Top-1 drop bound (and say so clearly when they cannot)."""

import json
import math
from dataclasses import replace

import pytest
import torch

import deepshrink.data
from deepshrink.cli import main
from deepshrink.core.errors import InputError
from deepshrink.encode.pack import unpack
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.export import ort_session, run_ort
from deepshrink.models import create_model
from deepshrink.pipeline.auto import (
    AutoOptions,
    Option,
    Teacher,
    auto_compress,
    check_max_drop,
    hull_path,
    interpolated_cost,
    parse_latency,
    parse_size,
    plan_bytes,
    plan_path,
    prune_stage,
)
from tests.conftest import cached_load_data

FP32_BYTES = 1_066_440  # lenet300: 266,610 fp32 parameters
TARGET = 100_000  # about a tenth of fp32
LEVELS = {"prune_levels": (0.5, 0.7, 0.85, 0.93), "probed_levels": (0.5, 0.7, 0.85, 0.93), "bit_levels": (2, 3, 4, 6)}
FAST = AutoOptions(epochs=1, share_epochs=1, max_trials=2, sensitivity_samples=256, threads=1, **LEVELS)  # 20 byte-table packs, not 55


# -- budgets ---------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [("200KB", 200_000), ("196KiB", 200_704), ("1.5MB", 1_500_000), ("2 MiB", 2_097_152), ("150000", 150_000), ("512b", 512)],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "big", "12XB", "0", "0.0001KB", "-5KB", "KB"])
def test_parse_size_rejects_with_one_line_naming_the_flag(text):
    with pytest.raises(InputError, match="--target-size") as info:
        parse_size(text)
    assert "\n" not in str(info.value)


@pytest.mark.unit
@pytest.mark.parametrize(("text", "expected"), [("5ms", 5.0), ("800us", 0.8), ("0.01s", 10.0), ("2.5", 2.5), ("250µs", 0.25)])
def test_parse_latency_units(text, expected):
    assert parse_latency(text) == pytest.approx(expected)


@pytest.mark.unit
@pytest.mark.parametrize("text", ["fast", "0ms", "5min", ""])
def test_parse_latency_rejects(text):
    with pytest.raises(InputError, match="--target-latency"):
        parse_latency(text)


@pytest.mark.unit
@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_max_drop_must_be_a_finite_non_negative_number(value):
    with pytest.raises(InputError, match="--max-drop"):
        check_max_drop(value)
    assert check_max_drop(0) == 0.0


# -- the plan path ---------------------------------------------------------------------------------
def options(points: list[tuple[int, float]]) -> list[Option]:
    return [Option(0.1 * i, 8, size, cost) for i, (size, cost) in enumerate(points)]


@pytest.mark.unit
def test_hull_path_starts_cheapest_and_skips_dominated_options():
    # (bytes, cost): 60/5.0 lies above the line from 80/0.1 to 40/1.0, so the hull skips it.
    path = hull_path(options([(100, 0.0), (80, 0.1), (60, 5.0), (40, 1.0), (120, 0.0)]))
    assert [o.bytes for o in path] == [100, 80, 40]
    slopes = [(b.cost - a.cost) / (a.bytes - b.bytes) for a, b in zip(path, path[1:], strict=False)]
    assert slopes == sorted(slopes)


@pytest.mark.unit
def test_plan_path_spends_accuracy_where_bytes_are_cheapest():
    layers = {
        "robust": options([(1000, 0.0), (200, 0.01)]),  # saves 800 bytes for almost nothing
        "fragile": options([(100, 0.0), (50, 1.0)]),  # saves 50 bytes at a high cost
    }
    plans = plan_path(layers)
    sizes = [plan_bytes(p, 10) for p in plans]
    assert sizes == [1110, 310, 260]  # least to most aggressive, the robust layer first
    assert plans[1]["robust"].bytes == 200 and plans[1]["fragile"].bytes == 100


# -- searches on lenet300 --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return cached_load_data(train_subset=3000, val_size=1000, test_subset=1000)


@pytest.fixture(scope="module")
def size_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "size"
    model = create_model("lenet300", pretrained=True)
    return auto_compress(model, data, 1.0, target_bytes=TARGET, out_dir=out, progress=False, architecture={"zoo": "lenet300"}, options=FAST)


@pytest.mark.flow
def test_prune_stage_distills_from_the_original_and_reaches_each_layer_sparsity(data):
    """The teacher's logits are computed once per training image (and shared by later trials);
    distilling recovers more of a hard prune than the labels alone, with the same seed."""
    teacher = Teacher(create_model("lenet300", pretrained=True))
    target = {"1": 0.9, "3": 0.8, "5": 0.5}
    train = replace(FAST.prune_train(), epochs=1)
    distilled, labels_only = (
        prune_stage(create_model("lenet300", pretrained=True), target, train, data, FAST.scope, t, progress=False) for t in (teacher, None)
    )
    for name, sparsity in target.items():
        zeros = float((distilled.get_submodule(name).weight == 0).float().mean())
        assert zeros == pytest.approx(sparsity, abs=0.01), name
    assert len(teacher.cache.logits) == len(data.train)
    assert evaluate_accuracy(distilled, data.test).top1 > evaluate_accuracy(labels_only, data.test).top1


@pytest.mark.flow
def test_size_target_is_met_on_disk_within_the_drop(size_run, data):
    r = size_run
    assert r.fp32_bytes == FP32_BYTES > TARGET  # plain fp32 does not fit
    assert r.met, r.reason
    assert r.bytes == r.paths["dsz"].stat().st_size <= TARGET
    assert r.baseline_gate_top1 - r.gate_top1 <= 1.0  # the bound holds on the gate (validation) set
    model = unpack(r.paths["dsz"])  # decoded from the file alone, through its architecture entry
    assert evaluate_accuracy(model, data.val).top1 == pytest.approx(r.gate_top1)
    assert evaluate_accuracy(model, data.test).top1 == pytest.approx(r.top1)
    assert r.drop < 3.0  # the test set, which the search never saw, stays close


@pytest.mark.flow
def test_plan_is_per_layer_sparsity_and_bits_as_measured(size_run):
    plan = json.loads(size_run.paths["plan"].read_text())
    assert list(plan) == ["1", "3", "5"]
    assert all(set(v) == {"sparsity", "bits"} and 0 <= v["sparsity"] < 1 and 1 <= v["bits"] <= 8 for v in plan.values())
    model = unpack(size_run.paths["dsz"])
    for name, setting in plan.items():
        weight = model.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(setting["sparsity"])
        assert weight[weight != 0].unique().numel() <= 2 ** setting["bits"]


@pytest.mark.flow
def test_every_trial_is_recorded_with_its_measurements(size_run):
    report = json.loads(size_run.paths["report_json"].read_text())
    assert report["met"] and report["bytes"] <= TARGET
    assert 1 <= len(report["trials"]) <= FAST.max_trials
    chosen = [t for t in report["trials"] if t["bytes"] == report["bytes"]]
    assert chosen and chosen[-1]["feasible"]
    for t in report["trials"]:
        assert t["est_bytes"] > 0 and t["gate_top1_pruned"] is not None
        if t["bytes"] is not None:
            assert abs(t["bytes"] - t["est_bytes"]) < 0.15 * t["est_bytes"]  # the byte table predicts the file
    assert set(report["sensitivity"]["1"]) == {"prune", "bits"}
    text = size_run.paths["report_md"].read_text()
    assert "## Trials" in text and "## Chosen plan" in text and "met" in text


@pytest.mark.flow
def test_without_a_target_the_smallest_plan_within_the_drop(data, tmp_path):
    model = create_model("lenet300", pretrained=True)
    r = auto_compress(model, data, 1.0, out_dir=tmp_path / "min", progress=False, options=replace(FAST, max_trials=3))
    assert r.met, r.reason
    assert r.baseline_gate_top1 - r.gate_top1 <= 1.0
    assert r.bytes < FP32_BYTES / 7  # 6-bit codebooks alone, the safest plan, give 7x
    feasible = [t for t in r.trials if t.feasible]
    assert feasible and r.bytes == min(t.bytes for t in feasible)  # the smallest good trial is the one kept
    assert all(t.drop > 1.0 for t in r.trials if not t.feasible)


@pytest.mark.flow
def test_out_of_reach_size_fails_before_training_and_writes_nothing(data, tmp_path):
    model = create_model("lenet300", pretrained=True)
    with pytest.raises(InputError, match=r"--target-size 2,000 bytes is out of reach.*about [\d,]+ bytes") as info:
        auto_compress(model, data, 1.0, target_bytes=2000, out_dir=tmp_path / "never", progress=False, options=FAST)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "never").exists()


@pytest.mark.flow
def test_a_reachable_size_the_drop_bound_rules_out_is_reported_not_met(data, tmp_path):
    """A drop of 0.0 with a 15x smaller archive and one short trial: the search says so and keeps the closest result."""
    model = create_model("lenet300", pretrained=True)
    opts = replace(FAST, max_trials=1)
    r = auto_compress(model, data, 0.0, target_bytes=70_000, out_dir=tmp_path / "tight", progress=False, options=opts)
    assert not r.met and r.reason.startswith("not met")
    # the size fits (68,488 bytes on this seed); the accuracy bound is what fails, and the reason names only that
    drop = r.baseline_gate_top1 - r.gate_top1
    assert r.bytes <= 70_000 and drop > 0.0
    assert r.reason == f"not met: val Top-1 drop {drop:.2f} > 0"
    assert r.paths["dsz"].is_file() and json.loads(r.paths["report_json"].read_text())["met"] is False


# -- the command -------------------------------------------------------------------------------------
CLI_FAST = ["--train-subset", "3000", "--val-size", "1000", "--test-subset", "1000", "--epochs", "1", "--max-trials", "2"]
CLI_FAST += ["--sensitivity-samples", "256", "--threads", "1", "--no-progress"]


@pytest.mark.flow
def test_cli_writes_the_archive_onnx_plan_and_reports(capsys, tmp_path, load_data_once):
    out = tmp_path / "run"
    code = main(["auto", "lenet300", "--max-drop", "1.0", "--target-size", "100KB", "--out", str(out), *CLI_FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("model.dsz", "model.onnx", "plan.json", "report.json", "report.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["met"] and (out / "model.dsz").stat().st_size == report["bytes"] <= 100_000
    assert json.loads((out / "plan.json").read_text()) == report["plan"]
    assert "chosen plan" in captured.out and "met" in captured.out
    model = unpack(out / "model.dsz")
    images = deepshrink.data.load_data(train_subset=3000, val_size=1000, test_subset=1000).test.images[:256]
    with torch.no_grad():
        expected = model(images).numpy()
    assert math.isclose(float(abs(run_ort(ort_session(out / "model.onnx"), images) - expected).max()), 0.0, abs_tol=1e-4)


@pytest.mark.flow
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-size", "12XB"], "--target-size: unknown unit 'xb'"),
        (["--target-latency", "fast"], "--target-latency: cannot read 'fast'"),
        (["--max-drop", "-1"], "--max-drop"),
    ],
)
def test_cli_bad_budget_is_one_line_before_loading(capsys, tmp_path, flags, message):
    code = main(["auto", "lenet300", *flags, "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.flow
def test_cli_unreachable_latency_is_a_clear_error(capsys, tmp_path, load_data_once):
    code = main(["auto", "lenet300", "--target-latency", "1us", "--latency-batch", "64", "--out", str(tmp_path / "x"), *CLI_FAST])
    err = capsys.readouterr().err
    assert code == 2 and "--target-latency 0.001 ms is out of reach" in err and "channels removed" in err


@pytest.mark.unit
def test_unprobed_levels_are_interpolated():
    probed = {0.5: 0.1, 0.9: 0.5}
    assert interpolated_cost(probed, 0.0) == 0.0
    assert interpolated_cost(probed, 0.25) == pytest.approx(0.05)
    assert interpolated_cost(probed, 0.7) == pytest.approx(0.3)
    assert interpolated_cost(probed, 0.95) == pytest.approx(0.55)  # beyond the last probe: its slope continues
