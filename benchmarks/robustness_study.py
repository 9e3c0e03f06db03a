"""Robustness and stability of every cell of a finished study, measured on the deployed ONNX files.

    .venv/bin/python benchmarks/robustness_study.py --study runs/study-full --threads 2

For each finished cell, its ``model.onnx`` runs in ONNX Runtime on the test set:
Top-1 with Gaussian noise added to the normalised input (the same noisy images
for every cell), the share of images whose class flips under that noise, and
the share of clean images classified as the model's own fp32 baseline cell does.

Writes benchmarks/results/robustness.{md,json}.
"""

import argparse
import json
from pathlib import Path

from deepshrink.data import load_data
from deepshrink.evaluate.accuracy import ort_predict, predictions
from deepshrink.evaluate.environment import environment
from deepshrink.evaluate.robustness import NOISE_SIGMAS, measure_robustness
from deepshrink.export import ort_session
from deepshrink.pipeline.study import STUDY_MODELS, read_cells, resolve_methods
from deepshrink.report import Column, markdown_table, print_table

RESULTS = Path(__file__).parent / "results"
BASELINE = "original fp32"


def latest_finished(rows: list[dict]) -> list[dict]:
    """One row per (model, method): the last one written, if it finished; in the study table's order."""
    latest = {(r["model"], r["method"]): r for r in rows}
    models, methods = list(STUDY_MODELS), list(resolve_methods(None))

    def place(row: dict) -> tuple[int, int]:
        return (
            models.index(row["model"]) if row["model"] in models else len(models),
            methods.index(row["method"]) if row["method"] in methods else len(methods),
        )

    return sorted((r for r in latest.values() if r.get("status") == "ok"), key=place)


def measure(cells: list[dict], test, threads: int) -> list[dict]:
    baselines = {r["model"]: r for r in cells if r["method"] == BASELINE}
    reference = {
        model: predictions(ort_predict(ort_session(Path(row["run_dir"]) / "model.onnx", threads)), test) for model, row in baselines.items()
    }
    out = []
    for row in cells:
        print(f"== {row['model']} {row['method']}", flush=True)
        session = ort_session(Path(row["run_dir"]) / "model.onnx", threads)
        report = measure_robustness(ort_predict(session), test, reference.get(row["model"]))
        out.append(
            {
                "model": row["model"],
                "method": row["method"],
                "top1_ort": row.get("top1_ort"),
                "bytes": row.get("bytes"),
                "sigmas": list(report.sigmas),
                "noisy_top1": list(report.noisy_top1),
                "flip_rate": list(report.flip_rate),
                "agreement_with_fp32": report.agreement,
                "test_images": report.samples,
            }
        )
    return out


def columns() -> list[Column]:
    cols = [
        Column("model", lambda r: r["model"]),
        Column("method", lambda r: r["method"]),
        Column("Top-1 % (ORT)", lambda r: r["top1_ort"], "{:.2f}"),
        Column("agrees with fp32 %", lambda r: r["agreement_with_fp32"], "{:.2f}"),
    ]
    for i, sigma in enumerate(NOISE_SIGMAS):
        cols.append(Column(f"Top-1 % noise {sigma}", lambda r, i=i: r["noisy_top1"][i], "{:.2f}"))
    for i, sigma in enumerate(NOISE_SIGMAS):
        cols.append(Column(f"flipped % noise {sigma}", lambda r, i=i: r["flip_rate"][i], "{:.1f}"))
    return cols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("runs/study-full"), help="a study folder with cells.jsonl and its runs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cells = latest_finished(read_cells(args.study / "cells.jsonl"))
    if not cells:
        raise SystemExit(f"error: no finished cells in {args.study / 'cells.jsonl'}")
    test = load_data().test
    rows = measure(cells, test, args.threads)
    write_reports(rows, {**environment(), "ort_threads": args.threads}, args.study)
    print_table(rows, columns(), title="robustness of the study's models")


def write_reports(rows: list[dict], env: dict, study: Path) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "robustness.json").write_text(
        json.dumps({"environment": env, "study": str(study), "noise_sigmas": list(NOISE_SIGMAS), "rows": rows}, indent=2) + "\n"
    )
    header = (
        "# Robustness and stability of the study's compressed models\n\n"
        f"Fashion-MNIST test set ({rows[0]['test_images']:,} images); each cell's deployed `model.onnx` in ONNX Runtime "
        f"({env['ort_threads']} threads). Noise: Gaussian, added to the normalised input (pixel std 1), one seeded draw shared by "
        "every cell. Flipped: images whose class changes when the noise is added. Agreement: clean test images classified "
        "as the same model's fp32 baseline cell does.\n\n"
        f"Machine: {env['cpu']} ({', '.join(env['cpu_flags'])}); onnxruntime {env['versions']['onnxruntime']}; {env['date']}.\n"
        f"Reproduce: `.venv/bin/python benchmarks/robustness_study.py --study {study}`\n\n"
    )
    (RESULTS / "robustness.md").write_text(header + markdown_table(rows, columns()) + "\n")


if __name__ == "__main__":
    main()
