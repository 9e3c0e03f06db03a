"""``auto_compress``: the latency stage (channels), the size stage (the search), then pack, check and measure."""

import copy
import math
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from torch import nn

from deepshrink.core.errors import InputError
from deepshrink.data.datasets import DataBundle
from deepshrink.encode.pack import pack_verified
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.evaluate.size import fp32_param_bytes
from deepshrink.export.onnx import export_onnx
from deepshrink.pipeline.auto.budget import check_max_drop
from deepshrink.pipeline.auto.costs import layer_names, uniform_bytes
from deepshrink.pipeline.auto.options import LATENCY_HEADROOM, AutoOptions, AutoResult, Trial
from deepshrink.pipeline.auto.plan import measured_plan
from deepshrink.pipeline.auto.report import write_json, write_reports
from deepshrink.pipeline.auto.search import Search
from deepshrink.pipeline.auto.stages import Teacher, channel_candidate, fine_tune, ort_latency_ms


def auto_compress(
    model: nn.Module,
    data: DataBundle,
    max_drop: float,
    target_bytes: int | None = None,
    target_latency_ms: float | None = None,
    out_dir: str | Path = "runs/auto",
    epochs: int | None = None,
    progress: bool = True,
    architecture: dict | None = None,
    options: AutoOptions | None = None,
) -> AutoResult:
    """Search per-layer compression for the smallest accuracy loss within the budget; write the result to ``out_dir``.

    ``target_bytes``: the .dsz file must fit; ``target_latency_ms``: ONNX Runtime median at
    ``options.latency_batch`` must fit; neither: the smallest .dsz within ``max_drop`` (Top-1
    points, checked on ``options.gate``). The caller's model is not modified.
    """
    options = replace(options or AutoOptions(), **({"epochs": epochs} if epochs is not None else {}))
    max_drop = check_max_drop(max_drop)
    if target_bytes is not None and target_bytes < 1:
        raise InputError(f"target_bytes must be >= 1, got {target_bytes}")
    if target_latency_ms is not None and not target_latency_ms > 0:
        raise InputError(f"target_latency_ms must be positive, got {target_latency_ms}")
    gate = data.val if options.gate == "val" else data.test
    if not len(gate) or not len(data.val):
        raise InputError("the search needs validation images for its sensitivity analysis and gate: use a val_size > 0")
    began = time.perf_counter()
    console = Console(quiet=not progress)
    model = copy.deepcopy(model).eval()
    teacher = Teacher(copy.deepcopy(model)) if options.distill else None
    result = AutoResult(
        max_drop,
        options.gate,
        baseline_top1=evaluate_accuracy(model, data.test).top1,
        baseline_gate_top1=evaluate_accuracy(model, gate).top1,
        fp32_bytes=fp32_param_bytes(model),
        target_bytes=target_bytes,
        target_latency_ms=target_latency_ms,
    )
    console.print(
        f"baseline: {options.gate} Top-1 {result.baseline_gate_top1:.2f}%, test Top-1 {result.baseline_top1:.2f}%, fp32 {result.fp32_bytes:,} bytes"
    )
    if target_latency_ms is not None:
        model = _latency_stage(model, data, gate, result, options, teacher, progress, console)
    channels_ok = all(t.feasible for t in result.trials[-1:])  # a channel stage too inaccurate ends the search
    final, bits, sensitivity, searched = model, {}, None, channels_ok and (target_bytes is not None or target_latency_ms is None)
    if searched:
        final, bits, sensitivity = _size_stage(model, data, gate, result, architecture, options, teacher, progress, target_bytes)
    _finish(final, bits, data, gate, result, Path(out_dir), architecture, options)
    if searched and not bits:
        result.met, result.reason = False, "not met: no trial finished within the drop; wrote the model unshared"
    result.seconds = time.perf_counter() - began
    write_reports(result, Path(out_dir), sensitivity)
    return result


def _latency_stage(
    model, data, gate, result: AutoResult, options: AutoOptions, teacher: Teacher | None, progress: bool, console: Console
) -> nn.Module:
    """Remove the fewest channels that meet the latency target, then fine-tune; a trial like the others."""
    shape = data.input_shape
    result.baseline_latency_ms = ort_latency_ms(model, shape, options)
    console.print(f"ONNX Runtime latency at batch {options.latency_batch}: {result.baseline_latency_ms:.3f} ms")
    if result.baseline_latency_ms <= result.target_latency_ms:
        return model
    began = time.perf_counter()
    for ratio in options.channel_ratios:
        candidate = channel_candidate(model, ratio, options)
        ms = ort_latency_ms(candidate, shape, options)
        console.print(f"  {100 * ratio:.0f}% of channels removed: {ms:.3f} ms")
        if ms <= LATENCY_HEADROOM * result.target_latency_ms:
            break
    else:
        raise InputError(
            f"--target-latency {result.target_latency_ms:g} ms is out of reach: with {100 * ratio:.0f}% of the channels removed "
            f"the model still takes {ms:.3f} ms at batch {options.latency_batch}"
        )
    result.channel_ratio = ratio
    _finetune_channels(candidate, data, gate, result, options, teacher, progress, console, ms, time.perf_counter() - began)
    return candidate


def _finetune_channels(
    model, data, gate, result: AutoResult, options: AutoOptions, teacher: Teacher | None, progress, console, ms: float, spent: float
) -> None:
    """Fine-tune the channel-pruned model, again while it is too inaccurate and still gaining 0.1 point a round
    (the back-off here: removing fewer channels would miss the latency target)."""
    rounds = options.max_trials if result.target_bytes is None else max(1, options.max_trials // 2)  # leave trials for the size search
    for attempt in range(rounds):
        began = time.perf_counter()
        fine_tune(model, replace(options.prune_train(), seed=options.seed + attempt), data, teacher, progress)
        top1 = evaluate_accuracy(model, gate).top1
        drop = result.baseline_gate_top1 - top1
        start = "original" if attempt == 0 else f"trial {len(result.trials)}, fine-tuned longer"
        trial = Trial(len(result.trials) + 1, "channel", start, gate_top1=top1, drop=drop, latency_ms=ms, feasible=drop <= result.max_drop)
        trial.note = f"{100 * result.channel_ratio:.0f}% of channels removed (L1), {ms:.3f} ms"
        trial.seconds = time.perf_counter() - began + (spent if attempt == 0 else 0.0)
        result.trials.append(trial)
        console.print(f"  fine-tuned: {options.gate} Top-1 {top1:.2f} (drop {drop:.2f})")
        previous = result.trials[-2].drop if attempt else math.inf
        if trial.feasible or drop > previous - 0.1:
            return


def _size_stage(model, data, gate, result: AutoResult, architecture, options: AutoOptions, teacher: Teacher | None, progress: bool, target):
    """The prune + share search; returns (final model, its bits per layer, the sensitivity measured)."""
    search = Search(model, data, gate, result, architecture, options, teacher, progress)
    if target is not None:
        _check_reachable(model, search.names, target, options)
    search.measure_bytes()
    search.build_path()
    search.trials = list(result.trials)  # numbering continues after a latency stage
    chosen = search.least_aggressive_within(target) if target is not None else search.smallest_within_drop()
    result.trials = search.trials
    pick = chosen or search.closest(target)
    if pick is None:
        return model, {}, search.sensitivity
    return search.shared[pick.number], {n: v["bits"] for n, v in pick.plan.items()}, search.sensitivity


def _check_reachable(model: nn.Module, names: list[str], target: int, options: AutoOptions) -> None:
    """One pack of the most aggressive plan: a target below it fails at once, before any measuring or training."""
    sparsity, bits = max(options.prune_levels), min(options.bit_levels)
    smallest, per_layer = uniform_bytes(model, names, sparsity, bits, options.scope)
    if target < smallest:
        raise InputError(
            f"--target-size {target:,} bytes is out of reach: the most aggressive plan ({sparsity:.0%} sparse, {bits} bits per layer) "
            f"takes about {smallest:,} bytes, {smallest - sum(per_layer.values()):,} of them biases, BN and archive overhead"
        )


def _finish(final, bits, data, gate, result: AutoResult, out_dir: Path, architecture, options: AutoOptions) -> None:
    """Pack, check the round trip, export ONNX of the decoded model, measure; then decide whether the budget is met."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report, decoded = pack_verified(final, out_dir / "model.dsz", architecture)
    onnx_path = export_onnx(decoded, out_dir / "model.onnx", data.input_shape)
    result.paths = {"dsz": report.path, "onnx": onnx_path, "plan": out_dir / "plan.json"}
    result.bytes = report.file_bytes
    result.top1 = evaluate_accuracy(decoded, data.test).top1
    result.gate_top1 = evaluate_accuracy(decoded, gate).top1
    result.plan = measured_plan(decoded, layer_names(decoded, options.scope), bits)
    if result.target_latency_ms is not None:
        result.latency_ms = ort_latency_ms(decoded, data.input_shape, options)
    result.met, result.reason = _verdict(result)
    write_json(result.paths["plan"], result.plan)


def _verdict(r: AutoResult) -> tuple[bool, str]:
    misses = []
    gate_drop = r.baseline_gate_top1 - r.gate_top1
    if gate_drop > r.max_drop:
        misses.append(f"{r.gate} Top-1 drop {gate_drop:.2f} > {r.max_drop:g}")
    if r.target_bytes is not None and r.bytes > r.target_bytes:
        misses.append(f"{r.bytes:,} bytes > target {r.target_bytes:,}")
    if r.target_latency_ms is not None and r.latency_ms > r.target_latency_ms:
        misses.append(f"{r.latency_ms:.3f} ms > target {r.target_latency_ms:g} ms")
    return (not misses, "met" if not misses else "not met: " + ", ".join(misses))
