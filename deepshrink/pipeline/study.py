"""The comparative study: every model x every method (each method is a shipped
recipe), measured the same way, side by side.

Each cell runs in its own worker process (a fresh process per cell, so its peak
memory and time are its own) and appends one JSON line to ``cells.jsonl`` in the
study folder; a re-run skips the cells already there, so a stopped study resumes.
The end writes ``study.json``, ``study.md`` and a self-contained ``report.html``.
"""

import json
import multiprocessing
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from deepshrink.core.errors import DeepShrinkError, InputError, NotApplicable
from deepshrink.pipeline.recipe import Recipe, load_recipe, parse_recipe

STUDY_MODELS = ("lenet5", "resnet20", "vgg", "mobilenetv2")
# study method name -> shipped recipe
STUDY_METHODS = {
    "original fp32": "baseline",
    "unstructured prune": "prune-unstructured",
    "structured prune": "prune-structured-50",
    "int8 PTQ": "int8-ptq",
    "4-bit QAT": "qat-4bit",
    "KD student": "kd-student",
    "Tucker": "tucker",
    "k-means share + Huffman": "kmeans-huffman",
    "combined prune+KD+int8": "combined",
}


@dataclass(frozen=True)
class Budget:
    """How much of each recipe a study runs: training images, epochs per training, test images."""

    name: str
    models: tuple[str, ...]
    train_images: int | None  # None: the whole training split
    test_images: int | None  # None: the whole test set
    max_epochs: int | None  # caps every ``epochs`` in a recipe; None: as written
    latency_repeats: int
    # (recipe name, epoch cap) for recipes that need more than ``max_epochs`` to recover at this budget
    recipe_epochs: tuple[tuple[str, int], ...] = ()

    def epoch_cap(self, recipe: str) -> int | None:
        return dict(self.recipe_epochs).get(recipe, self.max_epochs)


BUDGETS = {
    # Pruning from a trained model needs a few epochs to recover: at one epoch on 2,000 images resnet20
    # ended at 30.6% (90% unstructured) and 56.6% (50% of channels) Top-1; at 3 and 5 epochs at 90.4%
    # and 89.2% (fp32 93.6%). KD students trained from scratch stay "not converged" at this budget.
    "quick": Budget(
        "quick",
        ("lenet5", "resnet20"),
        train_images=2000,
        test_images=2000,
        max_epochs=1,
        latency_repeats=10,
        recipe_epochs=(("prune-unstructured", 3), ("prune-structured-50", 5), ("combined", 5)),
    ),
    "full": Budget("full", STUDY_MODELS, train_images=20000, test_images=None, max_epochs=3, latency_repeats=30),
}


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    recipe: str  # a shipped recipe name or a YAML path
    budget: Budget
    out_dir: str
    threads: int
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    device: str | None = None  # where the cell trains (None: each recipe's own, auto)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.method}"


def cap_epochs(source: dict, max_epochs: int | None) -> dict:
    """A copy of a recipe's YAML with every ``epochs`` value capped (the study's time budget)."""
    if max_epochs is None:
        return source
    if isinstance(source, dict):
        return {k: (min(v, max_epochs) if k == "epochs" and isinstance(v, int) else cap_epochs(v, max_epochs)) for k, v in source.items()}
    if isinstance(source, list):
        return [cap_epochs(v, max_epochs) for v in source]
    return source


def budgeted_recipe(name_or_path: str, budget: Budget) -> Recipe:
    recipe = load_recipe(name_or_path)
    return parse_recipe(cap_epochs(recipe.source, budget.epoch_cap(recipe.name)), recipe.name)


def resolve_methods(spec: str | None) -> dict[str, str]:
    """``--methods``: study method names or recipe names/paths, comma-separated; default all."""
    if not spec:
        return dict(STUDY_METHODS)
    by_recipe = {recipe: method for method, recipe in STUDY_METHODS.items()}
    chosen = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in STUDY_METHODS:
            chosen[item] = STUDY_METHODS[item]
        else:
            load_recipe(item)  # fails with the list of shipped recipes
            chosen[by_recipe.get(item, item)] = item
    return chosen


# -- one cell, in a worker process ------------------------------------------------


def finished(row: dict) -> bool:
    """Measured, or found not applicable: either way re-running it would give the same row."""
    return row.get("status") == "ok" or str(row.get("status", "")).startswith("n/a")


def run_cell(cell: Cell) -> dict:
    """Run one model x method and measure it; never raises (a failure is the row's status)."""
    start = time.perf_counter()
    row = _row_of(cell)
    try:
        row.update(_measure_cell(cell))
        row["status"] = "ok"
    except NotApplicable as exc:  # reported in the table, not counted as a failure
        row["status"] = f"n/a: {exc}"
    except DeepShrinkError as exc:
        row["status"] = f"error: {exc}"
    except Exception as exc:  # a bug in one cell must not lose the others; keep the trace for the log
        row["status"] = f"error: {type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc()
    row["wall_s"] = time.perf_counter() - start
    return row


def _row_of(cell: Cell) -> dict:
    return {"model": cell.model, "method": cell.method, "recipe": cell.recipe, "budget": cell.budget.name}


def failed_row(cell: Cell, status: str) -> dict:
    """The row of a cell whose process died before it could answer (its error is the status)."""
    return {**_row_of(cell), "status": f"error: {status}", "wall_s": None}


def _measure_cell(cell: Cell) -> dict:
    from deepshrink.data.datasets import load_data
    from deepshrink.distributed import launch
    from deepshrink.evaluate.memory import PeakRSS
    from deepshrink.models import architecture_of, create_model
    from deepshrink.pipeline.runner import run_recipe

    torch.set_num_threads(cell.threads)
    data = load_data(cell.dataset, cell.data_dir, train_subset=cell.budget.train_images, test_subset=cell.budget.test_images)
    recipe = budgeted_recipe(cell.recipe, cell.budget)
    model = create_model(cell.model, pretrained=True)
    run_dir = Path(cell.out_dir) / "runs" / f"{cell.model}-{recipe.name}"
    with launch(cell.device), PeakRSS() as steps_peak:  # peak above torch + dataset + model: what the steps add
        result = run_recipe(model, recipe, data, run_dir, architecture_of(cell.model), progress=False, model_name=cell.model)
    return _cell_metrics(model, result, data, cell) | {"steps_peak_mb": steps_peak.mb}


def _cell_metrics(original: nn.Module, result, data, cell: Cell) -> dict:
    """The final model's side of the ``evaluate.compare`` record (the original: its Top-1 and fp32 bytes),
    flattened into the cell's row with the ratio and the original's Top-1."""
    from deepshrink.evaluate.compare import compare, measure_ort_latency
    from deepshrink.evaluate.flops import count_compute
    from deepshrink.evaluate.memory import ort_memory
    from deepshrink.evaluate.size import fp32_param_bytes
    from deepshrink.export.onnx import ort_session

    final = result.rows[-1]
    shape = tuple(data.test.images.shape[1:])
    archive = result.archive_path
    compute = count_compute(result.model, shape)
    session = ort_session(result.onnx_path, cell.threads)
    latency = measure_ort_latency({"final": session}, shape, (1, 64), cell.budget.latency_repeats, rounds=1)["final"]
    memory = ort_memory(result.onnx_path, shape, 64, cell.threads)
    after = {
        "top1": final.top1,
        "top5": final.top5,
        "top1_ort": result.onnx_top1,
        "params": final.params,
        "nonzero_params": final.nonzero_params,
        "bytes": archive.stat().st_size,
        "macs": compute.macs,
        "effective_macs": compute.effective_macs,
        "flops": compute.flops,
        **latency,
        "ort_session_mb": memory and memory.session_mb,
        "ort_b64_peak_mb": memory and memory.run_peak_mb,
        "seconds": sum(r.seconds for r in result.rows),
        "onnx_bytes": result.onnx_path.stat().st_size,
    }
    comparison = compare({"top1": result.rows[0].top1, "bytes": fp32_param_bytes(original)}, after, ("original fp32", cell.method))
    return {
        **comparison.after,
        "original_top1": comparison.before["top1"],
        "compression_ratio": comparison.before["bytes"] / comparison.after["bytes"],
        "archive": archive.name,
        "run_dir": str(result.out_dir),
    }


# -- the grid -------------------------------------------------------------------


@dataclass
class StudyResult:
    out_dir: Path
    rows: list[dict]
    budget: Budget
    wall_s: float
    threads: int  # per cell
    workers: int  # cells run at once (by this call; a resumed study keeps earlier cells' rows)


def read_cells(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: that cell runs again
    return rows


def default_workers(threads: int) -> int:
    """Parallel cells where cores allow: one per ``threads`` cores."""
    return max(1, (os.cpu_count() or 1) // threads)


def run_study(
    out_dir: str | Path,
    models: tuple[str, ...] | None = None,
    methods: dict[str, str] | None = None,
    budget: Budget = BUDGETS["quick"],
    threads: int = 2,
    workers: int | None = None,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    progress: bool = True,
    executor: str = "process",
    address: str | None = None,
    device: str | None = None,
) -> StudyResult:
    """``executor``: ``process`` (a local pool, the default) or ``ray`` (tasks on a local Ray, or
    on the cluster at ``address``). Either way each finished cell is one line of ``cells.jsonl``."""
    from deepshrink.distributed import check_device_name
    from deepshrink.models import list_models

    models = models or budget.models
    unknown = [m for m in models if m not in list_models()]
    if unknown:
        raise InputError(f"--models: unknown model(s) {unknown}; known: {', '.join(list_models())}")
    methods = methods or dict(STUDY_METHODS)
    for recipe in methods.values():
        budgeted_recipe(recipe, budget)  # every recipe validates before any cell starts
    if executor not in EXECUTORS:
        raise InputError(f"--executor {executor!r}: use {' or '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise InputError("--address names a Ray cluster: use it with --executor ray")
    if device is not None:
        check_device_name(device)
    if executor == "ray":  # launch problems end here, before the study folder exists
        from deepshrink.pipeline.ray_executor import check_address, check_device, import_ray

        import_ray()
        check_device(device)
        if address is not None:
            check_address(address)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells_path = out_dir / "cells.jsonl"
    done = {f"{r['model']}/{r['method']}": r for r in read_cells(cells_path) if r.get("budget") == budget.name and finished(r)}
    todo = [
        Cell(m, method, recipe, budget, str(out_dir), threads, dataset, data_dir, device)
        for m in models
        for method, recipe in methods.items()
        if f"{m}/{method}" not in done
    ]
    workers = workers or default_workers(threads)
    start = time.perf_counter()
    for row in _run_cells(todo, workers, progress, executor, address):
        with cells_path.open("a") as handle:  # one line per finished cell: the resume point
            handle.write(json.dumps(row) + "\n")
        done[f"{row['model']}/{row['method']}"] = row
    ordered = [done[f"{m}/{method}"] for m in models for method in methods if f"{m}/{method}" in done]
    result = StudyResult(out_dir, ordered, budget, time.perf_counter() - start, threads, workers)
    write_study_reports(result)
    return result


EXECUTORS = ("process", "ray")


def _run_cells(cells: list[Cell], workers: int, progress: bool, executor: str = "process", address: str | None = None):
    """Yield each cell's row as it finishes, from the chosen executor."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not cells:
        return
    columns = (TextColumn("study"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    rows = _ray_rows(cells, workers, address) if executor == "ray" else _pool_rows(cells, workers)
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("", total=len(cells))
        for row in rows:
            bar.update(task, advance=1, description=f"{row['model']} / {row['method']}: {row['status'][:60]}")
            yield row


def _pool_rows(cells: list[Cell], workers: int):
    """A fresh spawned process per cell, ``workers`` at once."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_cell, cell): cell for cell in cells}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # the worker process died (killed, out of memory): that cell failed, the rest go on
                yield failed_row(futures[future], f"{type(exc).__name__}: {exc}")


def _ray_rows(cells: list[Cell], workers: int, address: str | None):
    """Each cell a Ray task with its CPUs (threads) and GPUs (one on --device cuda)."""
    from deepshrink.pipeline.ray_executor import RayCells

    cells = [replace(c, out_dir=str(Path(c.out_dir).resolve())) for c in cells]  # a task's cwd is its node's, not ours
    ray = RayCells(address, num_cpus=workers * max(c.threads for c in cells))
    try:
        yield from ray.run(cells, run_cell, failed_row, lambda c: int(bool(c.device) and c.device.startswith("cuda")))
    finally:
        ray.close()


# -- reports --------------------------------------------------------------------


def write_study_reports(result: StudyResult) -> None:
    from deepshrink.evaluate.environment import describe_environment, environment
    from deepshrink.export.onnx import write_atomic
    from deepshrink.report import write_html_report
    from deepshrink.report.tables import markdown_table

    env = environment()
    payload = {
        "budget": asdict(result.budget),
        "environment": env,
        "threads_per_cell": result.threads,
        "workers": result.workers,
        "wall_s": result.wall_s,
        "rows": result.rows,
    }
    write_atomic(result.out_dir / "study.json", (json.dumps(payload, indent=2, default=str) + "\n").encode())
    shown = [mark_unconverged(r) for r in result.rows]
    text = f"# Comparative study ({result.budget.name} budget)\n\n" + describe_environment(env, result.threads)  # threads per cell
    text += "\n" + _budget_note(result.budget) + "\n\n"
    text += markdown_table(shown, STUDY_COLUMNS) + STUDY_NOTES
    write_atomic(result.out_dir / "study.md", text.encode())
    clean = [{k: v for k, v in r.items() if k != "traceback"} for r in shown]
    write_html_report(
        result.out_dir / "report.html",
        f"deepshrink study ({result.budget.name})",
        study_rows=clean,
        notes_markdown=_budget_note(result.budget) + "\n\n" + STUDY_NOTES,
        environment=env,
    )


NOT_CONVERGED_PP = 5.0  # a cell this far below its own fp32 start did not finish training at the budget


def mark_unconverged(row: dict) -> dict:
    """The row as the tables show it: a measured cell more than ``NOT_CONVERGED_PP`` below
    the fp32 model it started from gets the status "not converged at this budget", so it
    reads as unfinished (and stays off the plots), not as the method's result."""
    top1, start = row.get("top1"), row.get("original_top1")
    if row.get("status") != "ok" or top1 is None or start is None or top1 >= start - NOT_CONVERGED_PP:
        return row
    return row | {"status": f"not converged at this budget: Top-1 {top1:.2f}% vs {start:.2f}% fp32"}


def _budget_note(budget: Budget) -> str:
    train = f"{budget.train_images:,} training images" if budget.train_images else "the whole training split"
    test = f"{budget.test_images:,} test images" if budget.test_images else "the whole test set"
    epochs = f"every training capped at {budget.max_epochs} epoch(s)" if budget.max_epochs else "epochs as the recipes set them"
    if budget.recipe_epochs:
        epochs += " (" + ", ".join(f"{recipe}: {cap}" for recipe, cap in budget.recipe_epochs) + ")"
    return f"Budget `{budget.name}`: {train}, {epochs}, Top-1 on {test}; ORT latency median of {budget.latency_repeats} runs."


def _study_columns():
    from deepshrink.report.tables import Column

    return [
        Column("model", lambda r: r["model"]),
        Column("method", lambda r: r["method"] if r["status"] == "ok" else f"{r['method']} ({r['status'][:120]})"),
        Column("Top-1 %", lambda r: r.get("top1"), "{:.2f}"),
        Column("Top-5 %", lambda r: r.get("top5"), "{:.2f}"),
        Column("params", lambda r: r.get("params"), "{:,}"),
        Column("non-zero", lambda r: r.get("nonzero_params"), "{:,}"),
        Column("bytes", lambda r: r.get("bytes"), "{:,}"),
        Column("ratio", lambda r: r.get("compression_ratio"), "{:.1f}x"),
        Column("MMACs", lambda r: None if r.get("macs") is None else r["macs"] / 1e6, "{:.2f}"),
        Column("eff. MMACs", lambda r: None if r.get("effective_macs") is None else r["effective_macs"] / 1e6, "{:.2f}"),
        Column("ORT b1 ms", lambda r: r.get("ort_b1_ms"), "{:.3f}"),
        Column("ORT b64 ms", lambda r: r.get("ort_b64_ms"), "{:.2f}"),
        Column("ORT MB", lambda r: r.get("ort_session_mb"), "{:.2f}"),
        Column("ORT b64 peak MB", lambda r: r.get("ort_b64_peak_mb"), "{:.2f}"),
        Column("steps peak MB", lambda r: r.get("steps_peak_mb"), "{:.0f}"),
        Column("time s", lambda r: r.get("seconds"), "{:.0f}"),
    ]


STUDY_COLUMNS = _study_columns()
STUDY_NOTES = """
Bytes are the file on disk that stores the compressed model: the `.dsz` archive
(pruned/shared models), bit-packed integer weights (quantized models) or the fp32
safetensors (structure-changing methods: fewer channels, factorised layers, a student).
The ratio divides the original's fp32 weight bytes by it. Top-1 is PyTorch's on the
final model (for `.dsz` runs, the model decoded from the file); ORT latency is the
final ONNX file in ONNX Runtime (QDQ int8 for quantized models). Memory is the model's
own, measured as resident memory above a baseline, never the process's ~1.1 GB of torch
and data: ORT MB is what an ONNX Runtime session of the final file holds once created
(initializers, pre-packed weights), ORT b64 peak MB the most it holds through creation
and one batch-64 inference (intermediate tensors included; CPU arena off, measured in a
fresh process, see `deepshrink.evaluate.memory`); steps peak MB is the peak above the
cell's baseline (torch, dataset, model loaded) while the recipe's steps ran: training
for the methods that train. Time is the compression and fine-tuning time of the recipe's steps. A cell more than 5pp below its
fp32 start is marked "not converged at this budget": its training was cut short by the
budget, so its Top-1 is not the method's result (the full budget's is).
"""
