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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

import deepshrink.onnx_in.dynamic
import deepshrink.onnx_in.pack
import deepshrink.onnx_in.quantize
import deepshrink.onnx_in.weights  # noqa: F401  (these attach the ONNX backends to their methods' registrations)
from deepshrink.core.config import Config
from deepshrink.core.errors import InputError
from deepshrink.core.files import write_atomic
from deepshrink.core.methods import Context, registration, registrations
from deepshrink.evaluate.accuracy import top1
from deepshrink.evaluate.environment import environment
from deepshrink.evaluate.fidelity import fidelity
from deepshrink.onnx_in.clean import clean_onnx
from deepshrink.onnx_in.data import NpzInputs, random_inputs, read_npz
from deepshrink.onnx_in.model import OnnxModelError, check_onnx, graph_inputs, load_onnx, normalize_initializers, save_onnx
from deepshrink.onnx_in.outputs import OutputFidelity, check_output_name, compare_outputs, constant_outputs, headline, is_logit_vector
from deepshrink.onnx_in.runtime import all_outputs, optimized_op_counts
from deepshrink.report.tables import Column, markdown_table


class Recipe(Protocol):
    """What this runner reads of a loaded recipe (``pipeline.recipe.Recipe``; onnx_in sits below pipeline)."""

    name: str
    steps: tuple[tuple[str, Config], ...]


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


@dataclass(frozen=True)
class Reference:
    """The original model's outputs on the evaluation inputs, which of them no weight reaches,
    and the output the user named (None: report the worst of the others)."""

    outputs: dict[str, np.ndarray]
    constant: dict[str, str]
    output: str | None = None

    def top1_output(self, labels: np.ndarray | None) -> str | None:
        """The output Top-1 is measured on: the named one, else the first logit vector that depends on weights."""
        names = [self.output] if self.output else [n for n in self.outputs if n not in self.constant]
        return next((n for n in names if is_logit_vector(self.outputs[n], labels)), None)


def _headline_fidelity(rows: list[OutputFidelity], reference: Reference, outputs: dict[str, np.ndarray]) -> tuple[str, dict]:
    head = headline(rows, reference.output)
    measured = head.fidelity or fidelity(reference.outputs[head.name], outputs[head.name])  # only constant outputs: still measure
    return head.name, measured.to_dict()


def measure_stage(label: str, model: onnx.ModelProto, data: NpzInputs, reference: Reference, seconds: float, threads: int | None) -> dict:
    """Sizes, Top-1 (labels and a logit output) and fidelity on every output; the stage's ``fidelity``
    is the named output's, else the worst over the outputs that depend on weights."""
    outputs = all_outputs(model, data, threads)
    rows = compare_outputs(reference.outputs, outputs, reference.constant, data.labels)
    head, head_fidelity = _headline_fidelity(rows, reference, outputs)
    logits = reference.top1_output(data.labels)
    params, nonzero = _initializer_counts(model)
    return {
        "stage": label,
        "onnx_bytes": len(model.SerializeToString()),
        "dsz_bytes": None,
        "initializer_values": params,
        "nonzero_values": nonzero,
        "top1": top1(outputs[logits], data.labels) if logits is not None else None,
        "fidelity": head_fidelity,
        "fidelity_output": head,
        "outputs": [row.to_dict() for row in rows],
        "seconds": seconds,
    }


def _output_stage(
    model: onnx.ModelProto, cfg: Config, tmp: Path, data: NpzInputs, reference: Reference, threads: int | None
) -> tuple[dict, Path]:
    """Run an output step (pack) into ``tmp``; prove the restored model computes what the packed one does, on every output."""
    start = time.perf_counter()
    restored, written = registration(cfg).onnx(model, cfg, Context(progress=False, out_dir=tmp))
    before, after = all_outputs(model, data, threads), all_outputs(restored, data, threads)
    if any(not np.array_equal(before[name], after[name]) for name in before):
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
    recipe: Recipe,
    out_dir: str | Path,
    npz: str | Path | None = None,
    progress: bool = True,
    eval_npz: str | Path | None = None,
    threads: int | None = None,
    output: str | None = None,
) -> dict:
    """Run ``recipe`` on the ONNX file ``path``; ``npz`` holds calibration inputs (and labels),
    ``eval_npz`` the evaluation inputs (default: ``npz``, else seeded random inputs). Fidelity is
    measured on every output; ``output`` names the one the report leads with (default: the worst
    of the outputs that depend on weights). Returns the report."""
    check_steps(recipe)
    path, out_dir = Path(path), Path(out_dir)
    _outputs(out_dir, path.resolve())
    say = _say(progress)
    source = load_onnx(path)
    check_output_name(source, output)
    calib, evaluation = _inputs(source, path, npz, eval_npz)
    if calib is None and any(getattr(c, "activation_bits", None) is not None for _, c in recipe.steps):
        raise InputError("quantize: static quantization (activation_bits set) calibrates on data: pass npz (an .npz of inputs)")
    reference = Reference(all_outputs(source, evaluation, threads), constant_outputs(source), output)
    stages = [measure_stage("original", source, evaluation, reference, 0.0, threads)]
    fold_bn = all(getattr(cfg, "fold_bn", True) for _, cfg in recipe.steps)
    say("clean-up (onnxslim)")
    start = time.perf_counter()
    cleaned = clean_onnx(source, evaluation, fold_bn, reference.outputs)
    model = cleaned.model
    stages.append(measure_stage("cleaned (onnxslim)", model, evaluation, reference, time.perf_counter() - start, threads))
    with tempfile.TemporaryDirectory(dir=_parent(out_dir)) as tmp:
        model, dsz = _run_steps(recipe, model, calib, evaluation, reference, stages, Path(tmp), threads, say)
        report = _report(path, recipe, stages, cleaned, model, calib, evaluation, reference)
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


def _report(path: Path, recipe: Recipe, stages: list[dict], cleaned, model, calib, evaluation, reference: Reference) -> dict:
    return {
        "outputs": {
            "names": list(reference.outputs),
            "constant": reference.constant,
            "fidelity_output": reference.output,  # None: each stage reports its worst weight-dependent output
        },
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
    write_atomic(path, text.encode())


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
    Column("fidelity output", lambda r: r["fidelity_output"]),
    Column("max abs diff", lambda r: r["fidelity"]["max_abs_diff"], "{:.3g}"),
    Column("cosine mean / min", lambda r: f"{r['fidelity']['cosine_mean']:.5f} / {r['fidelity']['cosine_min']:.5f}"),
    Column("top-1 agreement %", lambda r: r["fidelity"]["top1_agreement"], "{:.2f}"),
    Column("time s", lambda r: r["seconds"], "{:.1f}"),
]


OUTPUT_COLUMNS = [
    Column("stage", lambda r: r["stage"]),
    Column("output", lambda r: r["name"]),
    Column("max abs diff", lambda r: r["fidelity"]["max_abs_diff"], "{:.3g}"),
    Column("cosine mean / min", lambda r: f"{r['fidelity']['cosine_mean']:.5f} / {r['fidelity']['cosine_min']:.5f}"),
    Column("top-1 agreement %", lambda r: r["fidelity"]["top1_agreement"], "{:.2f}"),
]


def _output_rows(stages: list[dict]) -> list[dict]:
    """(stage, output) rows for every output that depends on weights, after the original."""
    return [{"stage": s["stage"], **o} for s in stages[1:] for o in s["outputs"] if o["fidelity"] is not None]


def _fidelity_sentence(report: dict, data: str) -> str:
    outputs = report["outputs"]
    constant = "; ".join(f"`{name}` ({why})" for name, why in outputs["constant"].items())
    lead = (
        f"the output `{outputs['fidelity_output']}` (named by the user)"
        if outputs["fidelity_output"]
        else "the worst of the outputs that depend on the weights"
    )
    return (
        f"Fidelity is measured against the original model on every output ({len(outputs['names'])}) on {data}; "
        f"the stage table shows {lead}. "
        + (f"Outputs that no weight reaches, identical whatever the weights, are left out: {constant}. " if constant else "")
    )


def report_markdown(report: dict) -> str:
    clean = report["cleanup"]
    ops = ", ".join(f"{k} {v}" for k, v in sorted(report["ort_optimized_ops"].items()))
    data = f"{report['evaluation_samples']:,} evaluation samples" + (" with labels" if report["evaluation_labels"] else "")
    return (
        f"# {report['recipe']} on {report['source']}\n\n"
        + _fidelity_sentence(report, data)
        + f"Calibration used {report['calibration_samples']:,} samples.\n\n"
        + markdown_table(report["stages"], STAGE_COLUMNS)
        + "\nEvery output that depends on the weights, per stage:\n\n"
        + markdown_table(_output_rows(report["stages"]), OUTPUT_COLUMNS)
        + f"\nClean-up: {'kept' if clean['kept'] else 'not kept'}; ops {clean['ops_before']} -> {clean['ops_after']}; "
        f"max abs diff {clean['max_abs_diff']:.3g}. {clean['note']}\n\n"
        f"ONNX Runtime runs the final model as: {ops}.\n"
    )


def evaluate_onnx(
    path: str | Path, npz: str | Path, reference: str | Path | None = None, threads: int | None = None, output: str | None = None
) -> dict:
    """Top-1 (when the .npz has labels and an output is a logit vector) and, given a reference model,
    fidelity against it on every output: the named ``output``'s, else the worst weight-dependent one's."""
    model = load_onnx(path)
    check_output_name(model, output)
    data = read_npz(npz, model)
    outputs = all_outputs(model, data, threads)
    original = load_onnx(reference) if reference is not None else model
    own = Reference(outputs, constant_outputs(original), output)  # the original graph says which outputs the weights reach
    result: dict = {"model": str(path), "samples": len(data)}
    logits = own.top1_output(data.labels)
    if logits is not None:
        result["top1"] = top1(outputs[logits], data.labels)
        result["top1_output"] = logits
    if reference is not None:
        ref = Reference(all_outputs(original, data, threads), own.constant, output)
        rows = compare_outputs(ref.outputs, outputs, ref.constant, data.labels)
        result["fidelity_output"], result["fidelity"] = _headline_fidelity(rows, ref, outputs)
        result["outputs"] = [row.to_dict() for row in rows]
    return result
