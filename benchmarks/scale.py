"""Scaling out: fine-tuning throughput with 1 vs 2 data-parallel processes, and the
study grid on the process pool vs a local Ray.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/scale.py

1. Fine-tuning throughput (images/s) of resnet20 and vgg on Fashion-MNIST: one
   process with 1 and with all cores' threads, and ``torchrun``-style 2 processes
   (gloo, 1 thread each, global batch 128 = 2 x 64), each the shared Trainer on the
   CPU. Timed from the end of the first WARMUP steps to the end of the epoch.
2. Quick-study wall time, process pool vs local Ray, on a subset of cells (see
   CELLS): the whole quick grid takes ~6 min per executor on a quiet machine.
3. CUDA rows: measured only where a GPU is lent; otherwise written as not measured.

Writes benchmarks/results/scale.{md,json}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "scale"
MODELS = ("resnet20", "vgg")
TRAIN_IMAGES = 1920  # 15 global batches of 128
REPEATS = 3  # interleaved runs per setting; the table gives the median (the machine is shared)
BATCH = 128
WARMUP = 3  # steps left out of the timing (allocator and thread-pool warm-up)
CELLS = {"models": ("lenet5",), "methods": None}  # None: every study method (9 cells)


# -- one throughput measurement (run as a worker, possibly under torchrun) -------------------


def measure_worker(model_name: str, threads: int, device: str, out: str) -> None:
    from deepshrink.data import load_data
    from deepshrink.distributed import launch
    from deepshrink.models import create_model
    from deepshrink.train import TrainConfig, Trainer, TrainHook

    class Clock(TrainHook):
        def after_step(self, trainer) -> None:
            if trainer.step == WARMUP:
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_epoch_end(self, trainer, metrics) -> None:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds, self.steps = time.perf_counter() - self.start, trainer.step - WARMUP

    torch.set_num_threads(threads)
    data = load_data(train_subset=TRAIN_IMAGES)
    torch.manual_seed(0)
    model = create_model(model_name, pretrained=True)
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=0.01, schedule="cosine", device=device, threads=threads)
    clock = Clock()
    with launch(device) as placement:
        Trainer(model, config, data.train, hooks=[clock], progress=False).fit()
        if placement.world.is_main:
            images = clock.steps * BATCH  # global images (the last batch is full: 1920 = 15 x 128)
            Path(out).write_text(json.dumps({"images_per_s": images / clock.seconds, "seconds": clock.seconds, "images": images}))


def throughput(model: str, processes: int, threads: int, device: str, tmp: Path) -> dict:
    out = tmp / f"{model}-{processes}x{threads}-{device}.json"
    worker = [str(Path(__file__).resolve()), "--worker", model, "--threads", str(threads), "--device", device, "--out", str(out)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *worker]
    else:
        command = [sys.executable, *worker]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return {"model": model, "device": device, "processes": processes, "threads_per_process": threads, **json.loads(out.read_text())}


def median_row(runs: list[dict]) -> dict:
    speeds = sorted(r["images_per_s"] for r in runs)
    return {**runs[0], "images_per_s": statistics.median(speeds), "runs_images_per_s": [r["images_per_s"] for r in runs]}


# -- the study, two executors --------------------------------------------------------------


def study_wall(executor: str, tmp: Path, threads: int) -> dict:
    from deepshrink.pipeline.study import BUDGETS, resolve_methods, run_study

    start = time.perf_counter()
    result = run_study(
        tmp / f"study-{executor}",
        CELLS["models"],
        resolve_methods(CELLS["methods"]),
        BUDGETS["quick"],
        threads=threads,
        progress=False,
        executor=executor,
    )
    wall = time.perf_counter() - start
    rows = {r["method"]: r for r in result.rows}
    return {
        "executor": executor,
        "cells": len(result.rows),
        "workers": result.workers,
        "threads_per_cell": threads,
        "wall_s": wall,
        "ok": sum(r["status"] == "ok" for r in result.rows),
        "top1": {m: r.get("top1") for m, r in rows.items()},
    }


# -- report ----------------------------------------------------------------------------------


def markdown(payload: dict) -> str:
    from deepshrink.evaluate.environment import describe_environment

    lines = ["# Scaling out: data-parallel fine-tuning and the study on Ray", ""]
    shared = payload["shared_machine"]
    lines.append(describe_environment(payload["environment"], "see each row", shared=shared, extra_versions={"ray": payload["ray"]}))
    load = payload.get("load_average")
    if load:
        lines.append(f"Load average (1/5/15 min) when the run started: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.")
    if shared:
        lines.append("The machine was shared with other jobs while this ran: treat the numbers as one noisy measurement.")
    lines += [
        "",
        f"## Fine-tuning throughput (Trainer, {TRAIN_IMAGES:,} Fashion-MNIST images, global batch {BATCH}, 1 epoch, first {WARMUP} steps untimed)",
        "",
        f"Median of {REPEATS} interleaved runs per setting; every run in the last column.",
        "",
        "| model | device | processes x threads | images/s | vs 1 x 1 | vs 1 process, all threads | runs, images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in payload["throughput"]:
        if "images_per_s" not in row:
            lines.append(f"| {row['model']} | {row['device']} | - | {row['note']} | - | - | - |")
            continue
        same = [r for r in payload["throughput"] if r["model"] == row["model"] and r["device"] == "cpu" and r.get("processes") == 1]
        one, full = (next(r for r in same if r["threads_per_process"] == t) for t in (1, max(r["threads_per_process"] for r in same)))
        ratios = " | ".join(f"{row['images_per_s'] / base['images_per_s']:.2f}x" for base in (one, full))
        lines.append(
            f"| {row['model']} | {row['device']} | {row['processes']} x {row['threads_per_process']} | {row['images_per_s']:.1f} | {ratios} | "
            + ", ".join(f"{v:.0f}" for v in row["runs_images_per_s"])
            + " |"
        )
    lines += [
        "",
        "Two processes on two cores replace intra-op threads by data parallelism: each rank computes half",
        "the global batch, then gloo all-reduces the gradients. On one machine that is a test of the",
        "mechanism more than a speed-up: a single process already uses both cores through intra-op",
        "threads (the 'vs 1 process, all threads' column), and DDP adds the all-reduce. Its use is across",
        "GPUs and machines. Under load from other jobs the picture turns around: a multi-threaded process",
        "stalls whenever one of its threads is descheduled, which separate one-thread processes do not.",
        "",
        f"## Study wall time (quick budget, cells: {', '.join(CELLS['models'])} x every study method)",
        "",
        "This runs the lenet5 row of the quick grid (9 cells) with each executor; the whole grid (lenet5 and",
        "resnet20 x 9) took 3.3 min with the process pool in this session's demo run (benchmarks/results/study_quick.md).",
        f"Measured {payload.get('study_measured', 'with the throughput rows')}.",
        "",
        "| executor | cells | ok | workers | threads per cell | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["study"]:
        lines.append(
            f"| {row['executor']} | {row['cells']} | {row['ok']} | {row['workers']} | {row['threads_per_cell']} | {row['wall_s']:.1f} |"
        )
    same = payload["study_same_top1"]
    lines += ["", f"Every cell's Top-1 is the same under both executors: {'yes' if same else 'NO'}."]
    if not same and len(payload["study"]) == 2:
        a, b = (row["top1"] for row in payload["study"])
        differing = ", ".join(f"{m} ({a.get(m)} vs {b.get(m)})" for m in a if a.get(m) != b.get(m))
        lines.append(
            f"Cells that differ (process vs ray): {differing}. A low-rank cell keeps only the factorised layers that "
            "ONNX Runtime times faster, so with two cells timing at once the choice can differ between runs."
        )
    lines.append("")
    lines += ["## CUDA", "", payload["cuda_note"], ""]
    return "\n".join(lines)


def payload_date() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-study", action="store_true")
    parser.add_argument("--shared", action="store_true", help="say in the results that other jobs shared the machine")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite scale.md from scale.json")
    args = parser.parse_args()
    if args.worker:
        measure_worker(args.worker, args.threads, args.device, args.out)
        return
    if args.markdown_only:
        (RESULTS / f"{NAME}.md").write_text(markdown(json.loads((RESULTS / f"{NAME}.json").read_text())))
        return
    import tempfile

    from deepshrink.evaluate.environment import environment

    load_average = os.getloadavg()  # recorded: throughput on 2 cores is only comparable on a quiet machine
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="deepshrink-scale-"))
    settings = [(model, processes, threads) for model in MODELS for processes, threads in ((1, 1), (1, cores), (2, max(1, cores // 2)))]
    runs: dict[tuple, list[dict]] = {s: [] for s in settings}
    for _ in range(REPEATS):  # interleaved, so a burst of load from other jobs hits every setting alike
        for model, processes, threads in settings:
            run = throughput(model, processes, threads, "cpu", tmp)
            runs[(model, processes, threads)].append(run)
            print(f"{model}: {processes} x {threads} threads: {run['images_per_s']:.1f} images/s", flush=True)
    rows = [median_row(r) for r in runs.values()]
    if torch.cuda.is_available():
        for model in MODELS:
            rows.append(median_row([throughput(model, 1, cores, "cuda", tmp) for _ in range(REPEATS)]))
        cuda_note = "CUDA rows measured above; the QAT ONNX Runtime Top-1 check on CUDA is not part of this script yet."
    else:
        for model in MODELS:
            rows.append({"model": model, "device": "cuda", "note": "not measured: no GPU lent"})
        cuda_note = (
            "Not measured: no GPU was lent to this session. The CUDA rows (fine-tuning speed-up over the CPU, "
            "and a QAT run on CUDA whose ONNX Runtime Top-1 matches the CPU run within 0.2pp) wait for a GPU machine."
        )
    if args.skip_study:  # keep the study rows of the last full run (they carry their own date in study_measured)
        previous = json.loads((RESULTS / f"{NAME}.json").read_text()) if (RESULTS / f"{NAME}.json").exists() else {}
        study, study_date = previous.get("study", []), previous.get("study_measured", previous.get("environment", {}).get("date"))
    else:
        study, study_date = [study_wall(executor, tmp, threads=1) for executor in ("process", "ray")], None
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    payload = {
        "environment": environment(),
        "ray": ray_version,
        "shared_machine": args.shared,
        "load_average": load_average,
        "train_images": TRAIN_IMAGES,
        "batch": BATCH,
        "warmup_steps": WARMUP,
        "repeats": REPEATS,
        "throughput": rows,
        "study": study,
        "study_measured": study_date or payload_date(),
        "study_same_top1": len(study) == 2 and study[0]["top1"] == study[1]["top1"],
        "cuda_note": cuda_note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
