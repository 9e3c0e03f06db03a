"""Run a recipe into a run folder, measuring every stage.

The folder holds the resolved recipe, the model after every step
(safetensors), the final ``model.dsz`` and ``model.onnx`` (of the model decoded
from the archive), and ``report.json``/``report.md`` with the per-stage table
(the Deep Compression paper's Table 1 layout). Re-running with the same recipe
resumes after the last finished step.
"""

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from deepshrink.compress.quant.config import PTQ
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data.datasets import DataBundle
from deepshrink.encode.pack import pack, unpack
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.evaluate.environment import environment
from deepshrink.export.onnx import export_onnx, ort_session, verify_onnx
from deepshrink.models.weights import load_weights, save_weights
from deepshrink.pipeline.recipe import Pack, Recipe
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


def _stage_row(label: str, model: nn.Module, data: DataBundle, seconds: float, dsz_bytes: int | None = None) -> StageRow:
    accuracy = evaluate_accuracy(model, data.test)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        fixed = pack(model, Path(tmp) / "stage.dsz").fixed_width_bytes
    return StageRow(
        label,
        accuracy.top1,
        accuracy.top5,
        params,
        sum(int(torch.count_nonzero(p)) for p in model.parameters()),
        fixed,
        dsz_bytes,
        4 * params,
        seconds,
    )


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def _check_resumable(out_dir: Path, recipe: Recipe) -> None:
    resolved = out_dir / "recipe.yaml"
    if resolved.exists():
        if yaml.safe_load(resolved.read_text()) != recipe.source:
            raise InputError(f"{out_dir} holds a run of a different recipe; choose another --out or delete it")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved.write_text(yaml.safe_dump(recipe.source, sort_keys=False))


def run_recipe(
    model: nn.Module, recipe: Recipe, data: DataBundle, out_dir: str | Path, architecture: dict | None = None, progress: bool = True
) -> RunResult:
    """Apply the recipe's steps in order; the caller's model is not modified."""
    _check_torch_steps(recipe)
    out_dir = Path(out_dir)
    _check_resumable(out_dir, recipe)
    result = RunResult(out_dir)
    result.rows.append(_stage_row("original fp32", model, data, 0.0))
    ctx = Context(data=data, progress=progress)
    for i, (kind, cfg) in enumerate(recipe.steps):
        if isinstance(cfg, Pack):
            _pack_stage(model, data, out_dir, architecture, cfg, result)
            continue
        checkpoint = out_dir / f"step{i + 1}_{kind}.safetensors"
        start = time.perf_counter()
        if checkpoint.exists():  # finished in an earlier, interrupted run
            model = load_weights(copy.deepcopy(model), checkpoint, resize=True)
        else:
            model = apply_method(model, cfg, ctx)
            save_weights(model, checkpoint)
        result.rows.append(_stage_row(STAGE_LABELS.get(kind, kind), model, data, time.perf_counter() - start))
    _write_reports(result, recipe)
    return result


def _check_torch_steps(recipe: Recipe) -> None:
    """Quantize steps run on ONNX models here; a PyTorch model is quantized by `deepshrink quantize`."""
    for i, (kind, cfg) in enumerate(recipe.steps):
        if isinstance(cfg, PTQ):
            raise InputError(
                f"steps[{i}].{kind}: recipes quantize .onnx models; for a PyTorch model use `deepshrink quantize` (or export it to ONNX first)"
            )


def _pack_stage(model: nn.Module, data: DataBundle, out_dir: Path, architecture: dict | None, cfg: Pack, result: RunResult) -> None:
    start = time.perf_counter()
    report = pack(model, out_dir / "model.dsz", architecture)
    decoded = unpack(report.path, copy.deepcopy(model))
    restored = decoded.state_dict()
    for name, tensor in model.state_dict().items():
        if not torch.equal(tensor, restored[name]):
            raise RuntimeError(f"pack/unpack round trip changed tensor {name!r}")  # a bug, never user error
    result.dsz_path = report.path
    seconds = time.perf_counter() - start
    result.rows.append(_stage_row("entropy coded .dsz", decoded, data, seconds, dsz_bytes=report.file_bytes))
    _write_json(
        out_dir / "dsz_streams.json",
        {"file_bytes": report.file_bytes, "tensors": [{**asdict(t), "bits_per_weight": t.bits_per_weight} for t in report.tensors]},
    )
    if cfg.onnx:
        shape = tuple(data.test.images.shape[1:])
        result.onnx_path = export_onnx(decoded, out_dir / "model.onnx", shape)
        result.onnx_max_abs_diff = verify_onnx(decoded, ort_session(result.onnx_path), data.test.images[:256])


def _write_reports(result: RunResult, recipe: Recipe) -> None:
    rows = [{**asdict(r), "bytes": r.bytes, "ratio": r.ratio, "bits_per_weight": r.bits_per_weight} for r in result.rows]
    payload = {
        "recipe": recipe.name,
        "stages": rows,
        "dsz": str(result.dsz_path) if result.dsz_path else None,
        "onnx": str(result.onnx_path) if result.onnx_path else None,
        "onnx_max_abs_diff": result.onnx_max_abs_diff,
        "environment": environment(),
    }
    _write_json(result.out_dir / "report.json", payload)
    text = f"# {recipe.name}\n\n{recipe.description}\n\n" + markdown_table(result.rows, STAGE_COLUMNS) + STAGE_NOTES
    (result.out_dir / "report.md").write_text(text)
