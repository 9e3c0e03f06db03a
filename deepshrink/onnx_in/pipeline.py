"""``compress_onnx``: a recipe run on an ONNX file with no PyTorch source.

Every recipe step whose method registration has an ``onnx`` backend runs
here: ``prune`` (MagnitudePrune, one-shot), ``share`` (KMeansShare),
``quantize`` (PTQ: weight-only or static QDQ), ``pack`` (.dsz of the
initializers, restored and compared bit for bit). Each stage is measured on
the evaluation inputs against the original model (fidelity; Top-1 where
labels exist). The output folder gets ``model.onnx`` (the final graph, before
packing), ``model.dsz`` when packed, and ``report.json``/``report.md``; every
file is written atomically and the input file is only read.
"""

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import deepshrink.onnx_in.pack
import deepshrink.onnx_in.quantize
import deepshrink.onnx_in.weights  # noqa: F401  (these attach the ONNX backends to their methods' registrations)
from deepshrink.core.config import Config
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, registration, registrations
from deepshrink.evaluate.environment import environment
from deepshrink.onnx_in.clean import clean_onnx
from deepshrink.onnx_in.data import NpzInputs, random_inputs, read_npz
from deepshrink.onnx_in.model import OnnxModelError, check_onnx, graph_inputs, load_onnx, normalize_initializers, save_onnx
from deepshrink.onnx_in.runtime import fidelity, first_output, optimized_op_counts, top1_accuracy
from deepshrink.pipeline.recipe import Recipe, load_recipe
from deepshrink.report.tables import Column, markdown_table


def onnx_steps() -> list[str]:
    """The recipe steps that have an ONNX backend."""
    return [r.step for r in registrations() if r.onnx is not None]


def check_steps(recipe: Recipe) -> None:
    """Fail before any work when a step cannot run on an ONNX graph."""
    quantized = False
    for i, (kind, cfg) in enumerate(recipe.steps):
        where = f"steps[{i}].{kind}"
        record = registration(cfg)
        if record.onnx is None:
            raise InputError(f"{where}: {type(cfg).__name__} needs the PyTorch model; on ONNX input use {', '.join(onnx_steps())}")
        if quantized and not record.output:
            raise InputError(f"{where}: {kind} works on float weights; put it before the quantize step")
        quantized = quantized or record.quantizes
        if getattr(cfg, "activation_bits", None) not in (None, 8):
            raise InputError(f"{where}.activation_bits: ONNX Runtime's integer kernels take 8-bit activations, got {cfg.activation_bits}")
        if getattr(cfg, "finetune", None) is not None or getattr(cfg, "schedule", "oneshot") != "oneshot":
            raise InputError(f"{where}: an ONNX model cannot be fine-tuned here; use schedule 'oneshot' (if any) without finetune")


def apply_step(model: onnx.ModelProto, cfg: Config, calib: NpzInputs | None) -> tuple[onnx.ModelProto, dict]:
    """One recipe step on an ONNX graph: the new model (a copy) and what the step did."""
    record = registration(cfg)
    if record.onnx is None or record.output:
        raise InputError(f"{type(cfg).__name__} is not an ONNX step")
    return record.onnx(model, cfg, Context(calib=calib, progress=False))


# -- measurements -----------------------------------------------------------------------------
def _initializer_counts(model: onnx.ModelProto) -> tuple[int, int]:
    """(values, non-zero values) over all initializers: weights, biases, scales, codes."""
    total = nonzero = 0
    for tensor in model.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        if array.dtype.kind in "biuf":
            total += array.size
            nonzero += int(np.count_nonzero(array))
    return total, nonzero


def measure_stage(label: str, model: onnx.ModelProto, data: NpzInputs, reference: np.ndarray, seconds: float, threads: int | None) -> dict:
    outputs = first_output(model, data, threads)
    params, nonzero = _initializer_counts(model)
    return {
        "stage": label,
        "onnx_bytes": len(model.SerializeToString()),
        "dsz_bytes": None,
        "initializer_values": params,
        "nonzero_values": nonzero,
        "top1": top1_accuracy(outputs, data.labels) if data.labels is not None and outputs.ndim == 2 else None,
        "fidelity": fidelity(reference, outputs).to_dict(),
        "seconds": seconds,
    }


def _output_stage(
    model: onnx.ModelProto, cfg: Config, tmp: Path, data: NpzInputs, reference: np.ndarray, threads: int | None
) -> tuple[dict, Path]:
    """Run an output step (pack) into ``tmp``; prove the restored model computes what the packed one does."""
    start = time.perf_counter()
    restored, written = registration(cfg).onnx(model, cfg, Context(progress=False, out_dir=tmp))
    if not np.array_equal(first_output(model, data, threads), first_output(restored, data, threads)):
        raise OnnxModelError("the restored model's ONNX Runtime outputs differ from the packed model's")
    row = measure_stage("packed .dsz (restored)", restored, data, reference, time.perf_counter() - start, threads)
    row["dsz_bytes"] = written["file_bytes"]
    row["details"] = written["details"]
    return row, written["archive"]


# -- the run -------------------------------------------------------------------------------------
def _say(progress: bool) -> Callable[[str], None]:
    return (lambda text: print(text, flush=True)) if progress else (lambda text: None)


def _outputs(out_dir: Path, source: Path) -> None:
    for name in ("model.onnx", "model.dsz", "report.json", "report.md"):
        if (out_dir / name).resolve() == source:
            raise InputError(f"{source}: the output folder would overwrite the input file; choose another out_dir")


def _inputs(source: onnx.ModelProto, path: Path, npz: str | Path | None, eval_npz: str | Path | None) -> tuple[NpzInputs | None, NpzInputs]:
    if not graph_inputs(source):
        raise InputError(f"{path}: the model has no inputs to feed")
    calib = read_npz(npz, source) if npz is not None else None
    evaluation = read_npz(eval_npz, source) if eval_npz is not None else calib
    return calib, evaluation if evaluation is not None else random_inputs(source)


def compress_onnx(
    path: str | Path,
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    npz: str | Path | None = None,
    progress: bool = True,
    eval_npz: str | Path | None = None,
    threads: int | None = None,
) -> dict:
    """Run ``recipe`` on the ONNX file ``path``; ``npz`` holds calibration inputs (and labels),
    ``eval_npz`` the evaluation inputs (default: ``npz``, else seeded random inputs). Returns the report."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_steps(recipe)
    path, out_dir = Path(path), Path(out_dir)
    _outputs(out_dir, path.resolve())
    say = _say(progress)
    source = load_onnx(path)
    calib, evaluation = _inputs(source, path, npz, eval_npz)
    if calib is None and any(getattr(c, "activation_bits", None) is not None for _, c in recipe.steps):
        raise InputError("quantize: static quantization (activation_bits set) calibrates on data: pass npz (an .npz of inputs)")
    reference = first_output(source, evaluation, threads)
    stages = [measure_stage("original", source, evaluation, reference, 0.0, threads)]
    fold_bn = all(getattr(cfg, "fold_bn", True) for _, cfg in recipe.steps)
    say("clean-up (onnxslim)")
    start = time.perf_counter()
    cleaned = clean_onnx(source, evaluation, fold_bn, reference)
    model = cleaned.model
    stages.append(measure_stage("cleaned (onnxslim)", model, evaluation, reference, time.perf_counter() - start, threads))
    with tempfile.TemporaryDirectory(dir=_parent(out_dir)) as tmp:
        model, dsz = _run_steps(recipe, model, calib, evaluation, reference, stages, Path(tmp), threads, say)
        report = _report(path, recipe, stages, cleaned, model, calib, evaluation)
        _finish(out_dir, model, dsz, report)
    say(f"wrote {out_dir / 'model.onnx'}" + (f" and {out_dir / 'model.dsz'}" if dsz else ""))
    return report


def _parent(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _run_steps(recipe, model, calib, evaluation, reference, stages, tmp: Path, threads, say) -> tuple[onnx.ModelProto, Path | None]:
    dsz = None
    for i, (kind, cfg) in enumerate(recipe.steps):
        say(f"[{i + 1}/{len(recipe.steps)}] {kind}")
        if registration(cfg).output:  # writes the archive; the final graph stays as it is
            row, dsz = _output_stage(model, cfg, tmp, evaluation, reference, threads)
            stages.append(row)
            continue
        start = time.perf_counter()
        model, details = apply_step(model, cfg, calib)
        check_onnx(model, f"after step {kind}", OnnxModelError)
        row = measure_stage(kind, model, evaluation, reference, time.perf_counter() - start, threads)
        row["details"] = details
        stages.append(row)
    return model, dsz


def _report(path: Path, recipe: Recipe, stages: list[dict], cleaned, model, calib, evaluation) -> dict:
    return {
        "source": str(path),
        "recipe": recipe.name,
        "steps": [{"kind": kind, "config": cfg.to_dict()} for kind, cfg in recipe.steps],
        "calibration_samples": len(calib) if calib is not None else 0,
        "evaluation_samples": len(evaluation),
        "evaluation_labels": evaluation.labels is not None,
        "cleanup": {
            "kept": cleaned.kept,
            "ops_before": cleaned.ops_before,
            "ops_after": cleaned.ops_after,
            "max_abs_diff": cleaned.max_abs_diff,
            "note": cleaned.note,
        },
        "stages": stages,
        "ort_optimized_ops": dict(optimized_op_counts(model)),
        "environment": environment(),
    }


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finish(out_dir: Path, model: onnx.ModelProto, dsz: Path | None, report: dict) -> None:
    save_onnx(normalize_initializers(model), out_dir / "model.onnx")
    if dsz is not None:
        os.replace(dsz, out_dir / "model.dsz")
    report["files"] = {"onnx": str(out_dir / "model.onnx"), "dsz": str(out_dir / "model.dsz") if dsz else None}
    _atomic_text(out_dir / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    _atomic_text(out_dir / "report.md", report_markdown(report))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


STAGE_COLUMNS = [
    Column("stage", lambda r: r["stage"]),
    Column("ONNX bytes", lambda r: r["onnx_bytes"], "{:,}"),
    Column(".dsz bytes", lambda r: r["dsz_bytes"], "{:,}"),
    Column("non-zero values", lambda r: f"{r['nonzero_values']:,} / {r['initializer_values']:,}"),
    Column("Top-1 %", lambda r: r["top1"], "{:.2f}"),
    Column("max abs diff", lambda r: r["fidelity"]["max_abs_diff"], "{:.3g}"),
    Column("cosine mean / min", lambda r: f"{r['fidelity']['cosine_mean']:.5f} / {r['fidelity']['cosine_min']:.5f}"),
    Column("top-1 agreement %", lambda r: r["fidelity"]["top1_agreement"], "{:.2f}"),
    Column("time s", lambda r: r["seconds"], "{:.1f}"),
]


def report_markdown(report: dict) -> str:
    clean = report["cleanup"]
    ops = ", ".join(f"{k} {v}" for k, v in sorted(report["ort_optimized_ops"].items()))
    data = f"{report['evaluation_samples']:,} evaluation samples" + (" with labels" if report["evaluation_labels"] else "")
    return (
        f"# {report['recipe']} on {report['source']}\n\n"
        f"Fidelity is measured against the original model's first output on {data}; "
        f"calibration used {report['calibration_samples']:,} samples.\n\n"
        + markdown_table(report["stages"], STAGE_COLUMNS)
        + f"\nClean-up: {'kept' if clean['kept'] else 'not kept'}; ops {clean['ops_before']} -> {clean['ops_after']}; "
        f"max abs diff {clean['max_abs_diff']:.3g}. {clean['note']}\n\n"
        f"ONNX Runtime runs the final model as: {ops}.\n"
    )


def evaluate_onnx(path: str | Path, npz: str | Path, reference: str | Path | None = None, threads: int | None = None) -> dict:
    """Top-1 (when the .npz has labels) and, given a reference model, fidelity against it."""
    model = load_onnx(path)
    data = read_npz(npz, model)
    outputs = first_output(model, data, threads)
    result: dict = {"model": str(path), "samples": len(data)}
    if data.labels is not None and outputs.ndim == 2:
        result["top1"] = top1_accuracy(outputs, data.labels)
    if reference is not None:
        result["fidelity"] = fidelity(first_output(load_onnx(reference), data, threads), outputs).to_dict()
    return result
