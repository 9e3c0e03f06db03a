"""Run a recipe into a run folder, measuring every stage.

The folder holds the resolved recipe, the model after every step
(safetensors), the final ``model.dsz`` and ``model.onnx`` (of the model decoded
from the archive), and ``report.json``/``report.md``/``report.html`` with the per-stage table
(the Deep Compression paper's Table 1 layout). Re-running with the same recipe
resumes after the last finished step.
"""

import copy
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml
from torch import nn

from deepshrink.compress.quant.dynamic import dynamic_quant_layers, quantized_bytes
from deepshrink.compress.quant.modules import fake_quant_layers
from deepshrink.compress.quant.storage import save_quantized_model
from deepshrink.core.config import Config, Scope
from deepshrink.core.determinism import determinism_record, deterministic
from deepshrink.core.errors import DeepShrinkError, InputError
from deepshrink.core.methods import Context, apply_method, registration, write_output
from deepshrink.data.datasets import DataBundle
from deepshrink.distributed import on_placement_device
from deepshrink.encode.pack import pack
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.evaluate.environment import environment
from deepshrink.export.onnx import write_atomic
from deepshrink.models import resolve_model
from deepshrink.models.weights import save_weights
from deepshrink.pipeline.recipe import Recipe
from deepshrink.pipeline.steps import Export, checkpoint_metadata, restore_step
from deepshrink.report import write_html_report
from deepshrink.report.tables import Column, markdown_table


@dataclass
class StageRow:
    stage: str
    top1: float
    top5: float
    params: int
    nonzero_params: int
    fixed_width_bytes: float  # the stage's storage layout with fixed-width fields
    dsz_bytes: int | None  # bytes on disk of the entropy-coded archive (final stage only)
    fp32_bytes: int
    seconds: float = 0.0

    @property
    def bytes(self) -> float:
        return self.dsz_bytes if self.dsz_bytes is not None else self.fixed_width_bytes

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params


@dataclass
class RunResult:
    out_dir: Path
    rows: list[StageRow] = field(default_factory=list)
    dsz_path: Path | None = None
    onnx_path: Path | None = None
    onnx_max_abs_diff: float | None = None
    onnx_top1: float | None = None  # the final ONNX file's Top-1 in ONNX Runtime
    model: nn.Module | None = None  # the final model
    last_checkpoint: Path | None = None

    @property
    def archive_path(self) -> Path:
        """The file that stores the compressed model: the packed archive, else the last step's safetensors."""
        return self.dsz_path or self.last_checkpoint


STAGE_COLUMNS = [
    Column("stage", lambda r: r.stage),
    Column("Top-1 %", lambda r: r.top1, "{:.2f}"),
    Column("Top-5 %", lambda r: r.top5, "{:.2f}"),
    Column("non-zero weights", lambda r: f"{r.nonzero_params:,} ({100 * r.nonzero_params / r.params:.1f}%)"),
    Column("bits/weight", lambda r: r.bits_per_weight, "{:.2f}"),
    Column("bytes", lambda r: r.bytes, "{:,.0f}"),
    Column("ratio", lambda r: r.ratio, "{:.1f}x"),
    Column("time s", lambda r: r.seconds, "{:.0f}"),
]
STAGE_NOTES = """
Bytes per stage: *original* is dense fp32; *pruned* stores the non-zero fp32 values
with fixed-width relative position indices; *k-means shared* stores fixed-width
cluster indices and position indices plus the fp32 codebooks; *entropy coded* is the
.dsz file on disk, everything included (manifest, checksums, biases, BN). Top-1 of
the last row is measured on the model decoded from that file.
"""
STAGE_LABELS = {"prune": "pruned", "share": "k-means shared"}


def is_quantized(model: nn.Module) -> bool:
    return bool(fake_quant_layers(model))


def stored_bytes(model: nn.Module) -> float:
    """The stage's storage: bit-packed integer weights for a quantized model, else the
    .dsz layout with fixed-width fields (see STAGE_NOTES)."""
    with tempfile.TemporaryDirectory() as tmp:
        if is_quantized(model):
            return save_quantized_model(model, Path(tmp) / "stage.safetensors")
        if dynamic_quant_layers(model):  # dynamic int8: the codes at one byte each, as the ONNX file stores them
            return quantized_bytes(model)
        return pack(model, Path(tmp) / "stage.dsz").fixed_width_bytes


def weight_count(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), quantizer steps left out."""
    tensors = [p for name, p in model.named_parameters() if not name.endswith(".scale")]
    for layer in dynamic_quant_layers(model).values():  # dynamic int8 layers hold their weights as buffers
        tensors += [t for t in (layer.qweight, getattr(layer, "bias", None)) if t is not None]
    return sum(p.numel() for p in tensors), sum(int(torch.count_nonzero(p)) for p in tensors)


def _stage_row(label: str, model: nn.Module, data: DataBundle, seconds: float, dsz_bytes: int | None = None) -> StageRow:
    with on_placement_device(model):
        accuracy = evaluate_accuracy(model, data.test)
    params, nonzero = weight_count(model)
    return StageRow(label, accuracy.top1, accuracy.top5, params, nonzero, stored_bytes(model), dsz_bytes, 4 * params, seconds)


def _write_json(path: Path, payload: dict) -> None:
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def _check_resumable(out_dir: Path, recipe: Recipe) -> None:
    resolved = out_dir / "recipe.yaml"
    if resolved.exists():
        if yaml.safe_load(resolved.read_text()) != recipe.source:
            raise InputError(f"{out_dir} holds a run of a different recipe; choose another --out or delete it")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(resolved, yaml.safe_dump(recipe.source, sort_keys=False).encode())


def run_recipe(
    model: nn.Module,
    recipe: Recipe,
    data: DataBundle,
    out_dir: str | Path,
    architecture: dict | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> RunResult:
    """Apply the recipe's steps in order; the caller's model is not modified.

    Every step starts from the same seed (the recipe's plus its index), so a run that
    resumes after an interruption ends where an uninterrupted one does."""
    out_dir = Path(out_dir)
    ctx = Context(data=data, progress=progress, teacher=copy.deepcopy(model).eval(), model_name=model_name)
    check_preconditions(recipe, ctx)
    fresh = not out_dir.exists()
    _check_resumable(out_dir, recipe)
    try:
        with deterministic():  # same seed, same bytes (see deepshrink.core.determinism)
            return _run_steps(model, recipe, data, out_dir, architecture, ctx)
    except BaseException:
        if fresh and not any(out_dir.glob("step*.safetensors")):  # nothing finished: leave no half-made run folder
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def check_preconditions(recipe: Recipe, ctx: Context) -> None:
    """What a step names outside the recipe (a teacher, a student) must exist before a folder is made."""
    for i, (kind, cfg) in enumerate(recipe.steps):
        try:
            registration(cfg).check_context(cfg, ctx)
            if getattr(cfg, "teacher", None) is not None:
                resolve_model(cfg.teacher)
        except DeepShrinkError as exc:
            raise InputError(f"steps[{i}].{kind}: {exc}") from None


def _run_steps(model: nn.Module, recipe: Recipe, data: DataBundle, out_dir: Path, architecture: dict | None, ctx: Context) -> RunResult:
    result = RunResult(out_dir)
    result.rows.append(_stage_row("original fp32", model, data, 0.0))
    ctx = replace(ctx, out_dir=out_dir, architecture=architecture)
    wrote_files = False
    for i, (kind, cfg) in enumerate(recipe.steps):
        if registration(cfg).output:  # writes the final files; the model stays as it is
            _output_stage(model, cfg, ctx, result)
            wrote_files = True
            continue
        checkpoint = out_dir / f"step{i + 1}_{kind}.safetensors"
        torch.manual_seed(recipe.seed + i)
        start = time.perf_counter()
        if checkpoint.exists():  # finished in an earlier, interrupted run
            model = restore_step(model, cfg, ctx, checkpoint)
        else:
            model = apply_method(model, cfg, ctx)
            save_weights(model, checkpoint, checkpoint_metadata(model, cfg))
        result.rows.append(_stage_row(STAGE_LABELS.get(kind, kind), model, data, time.perf_counter() - start))
        result.last_checkpoint = checkpoint
    result.model = model
    if result.archive_path is None:  # no step changed the model: store it as it is
        result.last_checkpoint = save_weights(model, out_dir / "model.safetensors")
    if not wrote_files:  # a run ends with an ONNX file of its final model (``pack: {onnx: false}`` opts out)
        _output_stage(model, Export(), ctx, result)
    _write_reports(result, recipe)
    return result


def _output_stage(model: nn.Module, cfg: Config, ctx: Context, result: RunResult) -> None:
    """Run an output step; an archive's decoded model is measured as a stage, and gets its ONNX file when asked."""
    start = time.perf_counter()
    written = write_output(model, cfg, ctx)
    if written.model is not None:
        seconds = time.perf_counter() - start
        result.rows.append(_stage_row(written.label, written.model, ctx.data, seconds, dsz_bytes=written.file_bytes))
    result.dsz_path = written.files.get("archive", result.dsz_path)
    result.onnx_path = written.files.get("onnx", result.onnx_path)
    result.onnx_max_abs_diff = written.checks.get("onnx_max_abs_diff", result.onnx_max_abs_diff)
    result.onnx_top1 = written.checks.get("onnx_top1", result.onnx_top1)
    if written.export:
        _output_stage(written.model, Export(), ctx, result)


def _write_reports(result: RunResult, recipe: Recipe) -> None:
    rows = [{**asdict(r), "bytes": r.bytes, "ratio": r.ratio, "bits_per_weight": r.bits_per_weight} for r in result.rows]
    payload = {
        "recipe": recipe.name,
        "stages": rows,
        "dsz": str(result.dsz_path) if result.dsz_path else None,
        "onnx": str(result.onnx_path) if result.onnx_path else None,
        "onnx_max_abs_diff": result.onnx_max_abs_diff,
        "onnx_top1": result.onnx_top1,
        "environment": environment(),
        "determinism": determinism_record(recipe.seed),
    }
    if result.model is not None:
        payload["layers"] = layer_plan(result.model)
    _write_json(result.out_dir / "report.json", payload)
    text = f"# {recipe.name}\n\n{recipe.description}\n\n" + markdown_table(result.rows, STAGE_COLUMNS) + STAGE_NOTES
    write_atomic(result.out_dir / "report.md", text.encode())
    write_html_report(
        result.out_dir / "report.html",
        f"{recipe.name}: per-stage report",
        stage_rows=rows,
        layer_plans={recipe.name: payload["layers"]} if payload.get("layers") else None,
        notes_markdown=recipe.description + "\n\n" + STAGE_NOTES,
        environment=payload["environment"],
    )


def layer_plan(model: nn.Module) -> dict[str, dict]:
    """Per weight layer: the fraction of zero weights, and the weight bits of a quantized layer."""
    plan = {}
    for name, layer in Scope().layers(model):
        entry = {"sparsity": 1.0 - float(torch.count_nonzero(layer.weight)) / layer.weight.numel()}
        if hasattr(layer, "weight_quant"):
            entry["bits"] = layer.weight_quant.spec.bits
        plan[name] = entry
    return plan
