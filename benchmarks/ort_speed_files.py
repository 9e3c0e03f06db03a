"""Time ONNX files in ONNX Runtime on this machine: median latency per file, interleaved rounds.

    python benchmarks/ort_speed_files.py fp32.onnx int8.onnx ... [--threads 2 --batch 64] [--json out.json]

Needs only onnxruntime and numpy, so the same files can be timed on another
machine (e.g. a CPU with VNNI) without installing deepshrink. The first file is
the baseline the speedups are against. Prints a Markdown table with the CPU's
int8-relevant flags.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    return f"{model}; " + ", ".join(f for f in INT8_FLAGS if f in flags)


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def interleaved_medians(sessions: dict, batch: np.ndarray, rounds: int, repeats: int) -> dict[str, float]:
    """Median ms per session; sessions alternate round by round so drift hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():  # warm-up
        for _ in range(5):
            s.run(None, {s.get_inputs()[0].name: batch})
    for _ in range(rounds):
        for name, s in sessions.items():
            feed = {s.get_inputs()[0].name: batch}
            for _ in range(repeats):
                start = time.perf_counter()
                s.run(None, feed)
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", default="1,28,28", help="input shape without the batch dimension")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="also write the measurements (one object per file, with the environment) here")
    args = parser.parse_args()
    shape = (args.batch, *(int(d) for d in args.shape.split(",")))
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sessions = {Path(f).name: session(f, args.threads) for f in args.files}
    medians = interleaved_medians(sessions, batch, args.rounds, args.repeats)
    base = medians[Path(args.files[0]).name]
    print(f"{cpu_description()}; onnxruntime {ort.__version__}; {args.threads} threads; batch {args.batch}\n")
    print("| file | median ms | speedup |\n|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.2f} | {base / ms:.2f}x |")
    if args.json:
        environment = {"cpu": cpu_description(), "onnxruntime": ort.__version__, "python": platform.python_version()}
        rows = [
            {"file": name, "median_ms": ms, "speedup": base / ms, "threads": args.threads, "batch": args.batch, "environment": environment}
            for name, ms in medians.items()
        ]
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
