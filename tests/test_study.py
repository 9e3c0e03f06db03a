"""The comparative study: budgets, method resolution, one small grid end to end
(metrics measured from the files on disk), resume, and the reports it writes."""

import json

import pytest
import torch

from deepshrink import cli
from deepshrink.core.errors import InputError
from deepshrink.pipeline.recipe import load_recipe
from deepshrink.pipeline.study import (
    BUDGETS,
    STUDY_METHODS,
    Budget,
    StudyResult,
    budgeted_recipe,
    cap_epochs,
    mark_unconverged,
    resolve_methods,
    run_study,
    write_study_reports,
)

unit = pytest.mark.unit
flow = pytest.mark.flow

TINY = Budget("tiny", ("lenet5",), train_images=600, test_images=400, max_epochs=1, latency_repeats=3)


@unit
def test_cap_epochs_caps_every_training_and_keeps_the_rest():
    source = {"steps": [{"prune": {"sparsity": 0.9, "finetune": {"epochs": 8, "lr": 0.02}}}, {"distill": {"train": {"epochs": 1}}}]}
    capped = cap_epochs(source, 2)
    assert capped["steps"][0]["prune"] == {"sparsity": 0.9, "finetune": {"epochs": 2, "lr": 0.02}}
    assert capped["steps"][1]["distill"]["train"]["epochs"] == 1
    assert source["steps"][0]["prune"]["finetune"]["epochs"] == 8  # the recipe itself is untouched
    assert cap_epochs(source, None) is source


@unit
def test_every_study_method_is_a_valid_shipped_recipe_capped_to_the_budget():
    quick = BUDGETS["quick"]
    trained = set()
    for method, recipe in STUDY_METHODS.items():
        written = [v for _, cfg in load_recipe(recipe).steps for v in _epochs(cfg.to_dict())]
        capped = [v for _, cfg in budgeted_recipe(recipe, quick).steps for v in _epochs(cfg.to_dict())]
        assert capped == [min(e, quick.epoch_cap(recipe)) for e in written], method
        trained |= {method} if written else set()
    assert trained == set(STUDY_METHODS) - {"original fp32", "int8 PTQ"}  # every training method is capped, not skipped
    # pruning recovers over a few epochs (its own caps); the rest get one
    assert quick.epoch_cap("prune-unstructured") == 3 and quick.epoch_cap("prune-structured-50") == 5
    assert max(_epochs(budgeted_recipe("prune-unstructured", quick).steps[0][1].to_dict())) == 3
    assert max(_epochs(budgeted_recipe("kd-student", quick).steps[1][1].to_dict())) == 1


def _epochs(tree):
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "epochs":
                yield value
            else:
                yield from _epochs(value)


@unit
def test_resolve_methods():
    assert resolve_methods(None) == STUDY_METHODS
    assert resolve_methods("int8 PTQ,tucker") == {"int8 PTQ": "int8-ptq", "Tucker": "tucker"}
    with pytest.raises(InputError, match="not found; shipped recipes"):
        resolve_methods("no-such-method")


@unit
def test_unknown_model_is_an_error_before_anything_runs(tmp_path):
    with pytest.raises(InputError, match="unknown model"):
        run_study(tmp_path / "s", ("resnet99",), {"int8 PTQ": "int8-ptq"}, TINY, progress=False)
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    methods = {"int8 PTQ": "int8-ptq", "unstructured prune": "prune-unstructured", "structured prune": "prune-structured-50"}
    return run_study(out, ("lenet5",), methods, TINY, threads=1, workers=2, progress=False)


@flow
def test_study_cells_measure_the_files_on_disk(study):
    assert [r["method"] for r in study.rows] == ["int8 PTQ", "unstructured prune", "structured prune"]
    by_method = {r["method"]: r for r in study.rows}
    for row in study.rows:
        assert row["status"] == "ok", row.get("traceback", row["status"])
        archive = study.out_dir / "runs" / f"lenet5-{row['recipe']}" / row["archive"]
        assert row["bytes"] == archive.stat().st_size
        assert row["compression_ratio"] == pytest.approx(4 * 61706 / row["bytes"])  # lenet5: 61,706 fp32 weights
        assert 0 < row["ort_b1_ms"] < row["ort_b64_ms"]
        assert row["effective_macs"] <= row["macs"] and row["seconds"] > 0
        assert abs(row["top1_ort"] - row["top1"]) < 1.5
    assert by_method["int8 PTQ"]["archive"] == "model.qpack.safetensors" and by_method["int8 PTQ"]["compression_ratio"] > 3.5
    assert by_method["unstructured prune"]["nonzero_params"] < 0.2 * by_method["unstructured prune"]["params"]
    assert by_method["structured prune"]["params"] < 0.5 * by_method["int8 PTQ"]["params"]  # channels removed
    assert by_method["structured prune"]["macs"] < by_method["int8 PTQ"]["macs"]


@flow
def test_study_writes_reports(study):
    payload = json.loads((study.out_dir / "study.json").read_text())
    assert payload["budget"]["name"] == "tiny" and len(payload["rows"]) == 3 and "versions" in payload["environment"]
    assert payload["threads_per_cell"] == 1 and payload["workers"] == 2
    text = (study.out_dir / "study.md").read_text()
    assert text.count("| lenet5 |") == 3
    assert "threads: 1;" in text and f"torch {torch.__version__}" in text  # machine and versions recorded
    html = (study.out_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "structured prune" in html


@flow
def test_study_resumes_without_rerunning_finished_cells(study):
    lines = (study.out_dir / "cells.jsonl").read_text().splitlines()
    (study.out_dir / "cells.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # as if killed mid-write
    methods = {"int8 PTQ": "int8-ptq", "unstructured prune": "prune-unstructured", "structured prune": "prune-structured-50"}
    again = run_study(study.out_dir, ("lenet5",), methods, TINY, threads=1, workers=1, progress=False)
    rerun = {r["method"] for r in again.rows if r["wall_s"] != next(x["wall_s"] for x in study.rows if x["method"] == r["method"])}
    finished = {json.loads(line)["method"] for line in lines[:2]}
    assert rerun == {"int8 PTQ", "unstructured prune", "structured prune"} - finished
    assert [r["status"] for r in again.rows] == ["ok"] * 3


@flow
def test_study_cli_reports_a_failed_cell_and_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "nothing.yaml"  # valid YAML, but its scope matches no layer of the model
    bad.write_text("name: nothing\nversion: 1\nsteps:\n  - prune: {sparsity: 0.5, scope: {include: '^no_such_layer$'}}\n")
    out = tmp_path / "s"
    code = cli.main(["study", "--models", "lenet5", "--methods", f"int8-ptq,{bad}", "--out", str(out), "--no-progress", "--workers", "1"])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"lenet5 / {bad}: error:" in printed
    rows = {r["method"]: r for r in json.loads((out / "study.json").read_text())["rows"]}
    assert rows["int8 PTQ"]["status"] == "ok" and rows[str(bad)]["status"].startswith("error:")


@flow
def test_study_marks_a_method_with_nothing_to_do_not_applicable(tmp_path, capsys):
    """Tucker on mobilenetv2-like nets (depthwise 3x3 only) is n/a: in the table, not a failure."""
    recipe = tmp_path / "svd-on-convnet.yaml"  # lenet5 has Linear layers, so restrict the scope to none of them
    recipe.write_text("name: svd-nothing\nversion: 1\nsteps:\n  - decompose: {method: svd, rank: 2, scope: {types: [Conv2d]}}\n")
    out = tmp_path / "s"
    code = cli.main(
        ["study", "--models", "lenet5", "--methods", f"int8-ptq,{recipe}", "--out", str(out), "--no-progress", "--workers", "1"]
    )
    assert code == 0
    rows = {r["method"]: r for r in json.loads((out / "study.json").read_text())["rows"]}
    assert rows[str(recipe)]["status"].startswith("n/a: decompose (svd)")
    assert rows["int8 PTQ"]["status"] == "ok"
    assert "n/a: decompose" in (out / "study.md").read_text()


@unit
def test_a_cell_far_below_its_fp32_start_is_marked_not_converged(tmp_path):
    start = {"model": "resnet20", "status": "ok", "original_top1": 93.55}
    rows = [
        start | {"method": "original fp32", "top1": 93.55},
        start | {"method": "int8 PTQ", "top1": 93.45},
        start | {"method": "structured prune", "top1": 88.6},  # 4.95pp below: a result
        start | {"method": "unstructured prune", "top1": 30.35},  # the quick budget's cut-short training
        {"model": "resnet20", "method": "Tucker", "status": "n/a: decompose (tucker)"},
    ]
    shown = [mark_unconverged(r) for r in rows]
    assert [r["status"] for r in shown[:3]] == ["ok"] * 3 and shown[4] == rows[4]
    assert shown[3]["status"] == "not converged at this budget: Top-1 30.35% vs 93.55% fp32"
    assert rows[3]["status"] == "ok"  # the measured row (study.json, cells.jsonl) is untouched
    result = StudyResult(tmp_path, rows, TINY, 1.0, 1, 1)
    write_study_reports(result)
    table = (tmp_path / "study.md").read_text()
    assert "| resnet20 | unstructured prune (not converged at this budget: Top-1 30.35% vs 93.55% fp32) | 30.35 |" in table
    assert table.count("not converged at this budget") == 2  # the row and the note under the table
    html = (tmp_path / "report.html").read_text()
    assert '<tr class="failed"><td class="text">resnet20</td><td class="text">unstructured prune</td>' in html
    assert "not converged at this budget: Top-1 30.35% vs 93.55% fp32" in html
    assert json.loads((tmp_path / "study.json").read_text())["rows"][3]["status"] == "ok"
