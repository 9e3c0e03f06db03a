"""ONNX-in static int8, side by side with ONNX Runtime's own quantize_static, in one run.

    .venv/bin/python benchmarks/onnx_in_compare.py [--threads 2] [--runs 150] [--no-torch-ptq]

* resnet20 (pretrained, Fashion-MNIST) exported to ONNX is the only input: the
  ONNX-in path never sees the PyTorch model. Calibration: the first 512 training
  images (after the seeded validation split), saved as an .npz; evaluation: the
  10,000 test images.
* ours: ``compress_onnx`` with a ``quantize`` step (PTQ: weight_bits 7, uint8
  activations, MSE observer, bias correction), plus placement variants measured
  the same way (8-bit weights; stem conv kept in fp32).
* peer: ``onnxruntime.quantization.quantize_static`` (QDQ, per channel, uint8
  activations, int8 weights, MinMax calibration on the same 512 images), with
  and without ``reduce_range`` (7-bit weights).
* the PyTorch int8 path (``deepshrink.compress.quant`` PTQ, same config) for the
  Top-1 acceptance line, unless ``--no-torch-ptq``.
* ORT latency with ``--threads`` intra-op threads at batch 64 and 1: the models
  take turns run by run after warm-up; medians over all runs, plus the paired
  speedup (median of fp32/int8 time ratios of neighbouring runs), which a
  shared machine's load swings distort least. ORT's profiler gives the per-op
  split at batch 64.

Writes benchmarks/results/onnx_in_compare.{md,json}.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from peers import ort_quantize_static

from deepshrink.compress.quant.config import PTQ
from deepshrink.core.config import Scope
from deepshrink.data import load_data
from deepshrink.evaluate.accuracy import top1
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.export import export_onnx
from deepshrink.models import create_model
from deepshrink.onnx_in import (
    compress_onnx,
    first_output,
    load_onnx,
    optimized_op_counts,
    quantize_onnx,
    read_npz,
    save_onnx,
)
from deepshrink.pipeline.recipe import Recipe
from deepshrink.report import Column, markdown_table, print_table

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)
CALIB = 512
FP32_TOP1 = 93.25  # the zoo manifest's Top-1 of pretrained resnet20, re-measured below


# -- data and models ------------------------------------------------------------------------
def write_npz(folder: Path) -> tuple[Path, Path]:
    data = load_data("fashion-mnist")
    calib, test = folder / "calib.npz", folder / "test.npz"
    np.savez(calib, x=data.train.images[:CALIB].numpy(), y=data.train.labels[:CALIB].numpy())
    np.savez(test, x=data.test.images.numpy(), y=data.test.labels.numpy())
    return calib, test


def ours(source: Path, calib: Path, test: Path, folder: Path) -> tuple[Path, dict]:
    """The public entry point, as ``deepshrink compress model.onnx --recipe`` runs it."""
    recipe = Recipe("onnx-int8", (("quantize", PTQ(weight_bits=7)),))
    start = time.perf_counter()
    report = compress_onnx(source, recipe, folder / "ours", npz=calib, eval_npz=test, progress=False)
    return folder / "ours" / "model.onnx", {"report": report, "seconds": time.perf_counter() - start}


def variant(source: Path, calib: Path, cfg: PTQ, out: Path) -> float:
    start = time.perf_counter()
    model = load_onnx(source)
    qmodel, _ = quantize_onnx(model, cfg, read_npz(calib, model))
    save_onnx(qmodel, out)
    return time.perf_counter() - start


def torch_ptq_top1(threads: int) -> dict:
    """The PyTorch int8 path with the same config (fake-quant model, evaluated in torch)."""
    try:
        import deepshrink.compress.quant.ptq  # noqa: F401  (registers PTQ)
        from deepshrink.core.methods import Context, apply_method
        from deepshrink.evaluate import evaluate_accuracy

        torch.set_num_threads(threads)
        data = load_data("fashion-mnist")
        start = time.perf_counter()
        qmodel = apply_method(create_model("resnet20", pretrained=True), PTQ(weight_bits=7), Context(data, progress=False))
        return {
            "top1": evaluate_accuracy(qmodel, data.test).top1,
            "seconds": time.perf_counter() - start,
            "config": PTQ(weight_bits=7).to_dict(),
        }
    except Exception as exc:  # the PyTorch path is another issue's work: report, do not fail the ONNX benchmark
        return {"top1": None, "error": f"{type(exc).__name__}: {exc}"}


# -- latency ------------------------------------------------------------------------------------
def _session(path: Path, threads: int, profile_dir: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency(paths: dict[str, Path], threads: int, batch: int, runs: int) -> dict[str, dict]:
    """Median/p90 ms per model over ``runs`` runs each, the models taking turns run by run so that
    load changes on a shared machine hit all alike; ``paired_speedup`` is the median over time slots
    of fp32 ms / this model's ms in the same slot."""
    sessions = {name: _session(path, threads) for name, path in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, *SHAPE)).astype(np.float32)
    for sess in sessions.values():
        for _ in range(10):
            sess.run(None, {"input": x})
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, {"input": x})
            times[name].append(1000 * (time.perf_counter() - start))
    return {
        name: {
            "median_ms": statistics.median(t),
            "p90_ms": sorted(t)[int(0.9 * len(t))],
            "paired_speedup": statistics.median(f / m for f, m in zip(times["fp32"], t, strict=True)),
            "runs": len(t),
            "batch": batch,
            "threads": threads,
        }
        for name, t in times.items()
    }


def op_profile(path: Path, threads: int, batch: int = 64, runs: int = 20) -> dict[str, float]:
    """ms per run by op type, from ONNX Runtime's profiler (kernel time only)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(path, threads, tmp)
        x = np.random.default_rng(0).standard_normal((batch, *SHAPE)).astype(np.float32)
        for _ in range(5):
            sess.run(None, {"input": x})
        sess.end_profiling()
        sess = _session(path, threads, tmp)
        for _ in range(runs):
            sess.run(None, {"input": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


# -- the run ---------------------------------------------------------------------------------------
COLUMNS = [
    Column("model", lambda r: r["method"]),
    Column("Top-1 %", lambda r: r["top1"], "{:.2f}"),
    Column("ONNX KiB", lambda r: r["onnx_bytes"] / 1024, "{:,.0f}"),
    Column("ORT b64 ms", lambda r: r["ort_b64_ms"], "{:.2f}"),
    Column("x fp32 b64", lambda r: r["speedup_b64"], "{:.2f}x"),
    Column("paired b64", lambda r: r["paired_speedup_b64"], "{:.2f}x"),
    Column("b64 1 thread ms", lambda r: r["ort_b64_ms_1thread"], "{:.2f}"),
    Column("x fp32 b64 1 thread", lambda r: r["speedup_b64_1thread"], "{:.2f}x"),
    Column("ORT b1 ms", lambda r: r["ort_b1_ms"], "{:.3f}"),
    Column("x fp32 b1", lambda r: r["speedup_b1"], "{:.2f}x"),
    Column("paired b1", lambda r: r["paired_speedup_b1"], "{:.2f}x"),
    Column(
        "int8 kernels",
        lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r["ort_ops"].items()) if k.startswith("Q") and k != "QuantizeLinear"),
    ),
    Column("quantize s", lambda r: r["quantize_seconds"], "{:.0f}"),
]


def measure_models(models: dict[str, dict], test: Path, threads: int, runs: int) -> list[dict]:
    paths = {name: m["path"] for name, m in models.items()}
    b64 = interleaved_latency(paths, threads, 64, runs)
    b1 = interleaved_latency(paths, threads, 1, 10 * runs)
    # One thread as well: on an oversubscribed shared machine, 2-thread timings also measure the scheduler.
    single = interleaved_latency(paths, 1, 64, runs) if threads != 1 else b64
    data = read_npz(test, load_onnx(paths["fp32"]))
    rows = []
    for name, info in models.items():
        path = info["path"]
        rows.append(
            {
                "method": name,
                "description": info["description"],
                "top1": top1(first_output(load_onnx(path), data, threads), data.labels),
                "onnx_bytes": path.stat().st_size,
                "ort_b64_ms": b64[name]["median_ms"],
                "ort_b64_p90_ms": b64[name]["p90_ms"],
                "ort_b1_ms": b1[name]["median_ms"],
                "ort_b1_p90_ms": b1[name]["p90_ms"],
                "speedup_b64": b64["fp32"]["median_ms"] / b64[name]["median_ms"],
                "speedup_b1": b1["fp32"]["median_ms"] / b1[name]["median_ms"],
                "paired_speedup_b64": b64[name]["paired_speedup"],
                "paired_speedup_b1": b1[name]["paired_speedup"],
                "ort_b64_ms_1thread": single[name]["median_ms"],
                "speedup_b64_1thread": single["fp32"]["median_ms"] / single[name]["median_ms"],
                "latency_runs": {"b64": b64[name]["runs"], "b1": b1[name]["runs"]},
                "ort_ops": dict(optimized_op_counts(onnx.load(str(path)), threads)),
                "quantize_seconds": info.get("seconds"),
            }
        )
    return rows


def build_models(folder: Path, calib: Path, test: Path) -> tuple[dict[str, dict], dict]:
    source = export_onnx(create_model("resnet20", pretrained=True), folder / "resnet20.onnx", SHAPE)
    ours_path, ours_info = ours(source, calib, test, folder)
    models = {
        "fp32": {"path": source, "description": "resnet20 exported to ONNX (opset 17, BN folded by the exporter)"},
        "ours": {
            "path": ours_path,
            "seconds": ours_info["seconds"],
            "description": "deepshrink ONNX-in static int8: weights 7-bit per channel, uint8 MSE activations, bias correction",
        },
    }
    for name, cfg, text in (
        ("ours, 8-bit weights", PTQ(weight_bits=8), "same, 8-bit weights (uint8 x int8 pairs can saturate int16 without VNNI)"),
        ("ours, fp32 stem", PTQ(weight_bits=7, scope=Scope(exclude="stem")), "same, the 1-input-channel stem conv left in fp32"),
    ):
        out = folder / f"{name.replace(', ', '_').replace(' ', '_')}.onnx"
        models[name] = {"path": out, "seconds": variant(source, calib, cfg, out), "description": text}
    for name, reduce_range in (("ORT quantize_static", False), ("ORT quantize_static, reduce_range", True)):
        out = folder / f"ort_{'rr' if reduce_range else 'plain'}.onnx"
        text = "onnxruntime.quantization.quantize_static: QDQ, per channel, uint8 activations, int8 weights, MinMax" + (
            ", reduce_range (7-bit weights)" if reduce_range else ""
        )
        models[name] = {
            "path": out,
            "seconds": ort_quantize_static(source, out, np.load(calib)["x"], reduce_range, preprocess=False),
            "description": text,
        }
    return models, ours_info["report"]


def summarize(rows: list[dict], torch_ptq: dict) -> dict:
    by = {r["method"]: r for r in rows}
    ours_row, fp32 = by["ours"], by["fp32"]
    summary = {
        "fp32_top1": fp32["top1"],
        "ours_top1": ours_row["top1"],
        "pytorch_int8_top1": torch_ptq.get("top1"),
        "ours_vs_pytorch_int8_pp": None if torch_ptq.get("top1") is None else ours_row["top1"] - torch_ptq["top1"],
        "ours_speedup_b64": ours_row["speedup_b64"],
        "ours_speedup_b1": ours_row["speedup_b1"],
        "ours_paired_speedup_b64": ours_row["paired_speedup_b64"],
        "ours_speedup_b64_1thread": ours_row["speedup_b64_1thread"],
        "best_int8_speedup_b64": max(r["speedup_b64"] for r in rows if r["method"] != "fp32"),
    }
    summary["acceptance_top1_within_0.3pp"] = (
        None if summary["ours_vs_pytorch_int8_pp"] is None else abs(summary["ours_vs_pytorch_int8_pp"]) <= 0.3
    )
    summary["acceptance_speedup_b64_1.7x"] = ours_row["speedup_b64"] >= 1.7
    return summary


def _load(env: dict, when: str) -> str:
    return "/".join(f"{v:.1f}" for v in env["load_average_1_5_15min"][when])


def write_results(env: dict, args, rows: list[dict], summary: dict, torch_ptq: dict, profiles: dict, report: dict) -> None:
    s = summary
    torch_text = (
        f"{s['pytorch_int8_top1']:.2f} (ours {s['ours_vs_pytorch_int8_pp']:+.2f}pp)"
        if s["pytorch_int8_top1"] is not None
        else f"not measured ({torch_ptq.get('error', 'skipped')})"
    )
    profile_text = "".join(
        f"| {name} | " + ", ".join(f"{op} {ms:.2f}" for op, ms in ops.items() if ms >= 0.01) + " |\n" for name, ops in profiles.items()
    )
    text = (
        "# ONNX-in static int8 vs ONNX Runtime's quantize_static (resnet20, Fashion-MNIST)\n\n"
        + describe_environment(env, args.threads)
        + f"Calibration: first {CALIB} training images; Top-1 on the 10,000 test images, all in ONNX Runtime.\n"
        f"Latency: {args.runs} runs per model at batch 64 ({10 * args.runs} at batch 1) after warm-up, the models taking turns run by run; "
        "median ms; *paired* = median over time slots of fp32 ms / model ms.\n"
        f"Load average (1/5/15 min) at start {_load(env, 'start')}, at end {_load(env, 'end')}: the machine is shared, so compare within this run.\n"
        "Reproduce: `.venv/bin/python benchmarks/onnx_in_compare.py`\n\n" + markdown_table(rows, COLUMNS) + "\n## Acceptance\n\n"
        f"- Top-1: ours {s['ours_top1']:.2f}, fp32 {s['fp32_top1']:.2f}, PyTorch int8 path {torch_text}: "
        f"{'met' if s['acceptance_top1_within_0.3pp'] else 'not met' if s['acceptance_top1_within_0.3pp'] is False else 'not checked'} (within 0.3pp).\n"
        f"- Speed at batch 64: ours {s['ours_speedup_b64']:.2f}x the fp32 ONNX model at {args.threads} threads "
        f"(paired {s['ours_paired_speedup_b64']:.2f}x; {s['ours_speedup_b64_1thread']:.2f}x at 1 thread): "
        f"{'met' if s['acceptance_speedup_b64_1.7x'] else 'not met'} (>= 1.7x). Best int8 variant: {s['best_int8_speedup_b64']:.2f}x.\n\n"
        "## Where the time goes (ORT profiler, batch 64, ms per run by op)\n\n| model | kernels |\n|---|---|\n"
        + profile_text
        + "\n## Variants\n\n"
        + "".join(f"- **{r['method']}**: {r['description']}\n" for r in rows)
        + f"\nThe ONNX-in run's own report (stages, fidelity vs fp32): cosine mean {report['stages'][-1]['fidelity']['cosine_mean']:.6f}, "
        f"top-1 agreement {report['stages'][-1]['fidelity']['top1_agreement']:.2f}%.\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_in_compare.md").write_text(text)
    payload = {
        "environment": env,
        "threads": args.threads,
        "runs": args.runs,
        "summary": summary,
        "models": rows,
        "pytorch_int8": torch_ptq,
        "ort_profile_b64_ms": profiles,
        "ours_report_stages": report["stages"],
    }
    (RESULTS / "onnx_in_compare.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=150, help="timed runs per model at batch 64 (10x that at batch 1)")
    parser.add_argument("--no-torch-ptq", action="store_true", help="skip the PyTorch int8 path (minutes on 2 cores)")
    parser.add_argument("--workdir", default="runs/benchmark-onnx-in")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    calib, test = write_npz(folder)
    models, report = build_models(folder, calib, test)
    rows = measure_models(models, test, args.threads, args.runs)
    profiles = {name: op_profile(models[name]["path"], args.threads) for name in ("fp32", "ours", "ORT quantize_static")}
    torch_ptq = {"top1": None, "error": "skipped (--no-torch-ptq)"} if args.no_torch_ptq else torch_ptq_top1(args.threads)
    summary = summarize(rows, torch_ptq)
    env = {**environment(), "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()}}
    print_table(rows, COLUMNS, title="resnet20: ONNX-in int8 vs ORT quantize_static")
    print(json.dumps(summary, indent=2))
    write_results(env, args, rows, summary, torch_ptq, profiles, report)


if __name__ == "__main__":
    main()
