"""Baseline of the uncompressed pretrained zoo: accuracy, size, MACs, latency in
PyTorch and ONNX Runtime at batch 1 and 64, peak memory.

    .venv/bin/python benchmarks/zoo_baseline.py [--threads 2] [--repeats 50]

Writes benchmarks/results/zoo_baseline.md and .json, stamped with the machine,
threads and versions. Every number is measured in this run.
"""

import argparse
import json
from pathlib import Path

import torch

from deepshrink.data import load_data
from deepshrink.evaluate import evaluate
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.models import create_model, list_models
from deepshrink.models.weights import read_manifest
from deepshrink.report import markdown_table, print_table, zoo_columns

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = read_manifest()
    data = load_data()
    reports = [
        evaluate(create_model(name, pretrained=True), data.test, name, repeats=args.repeats, threads=args.threads)
        for name in list_models()
        if name in manifest
    ]
    env = environment()
    columns = zoo_columns(manifest)
    print_table(reports, columns, title="zoo baseline")
    RESULTS.mkdir(exist_ok=True)
    header = (
        "# Zoo baseline (uncompressed, Fashion-MNIST test set, 10,000 images)\n\n"
        + describe_environment(env, args.threads)
        + f"Latency: median of {args.repeats} runs after 5 warm-up runs.\n\n"
        "Reproduce: `.venv/bin/python benchmarks/zoo_baseline.py`\n\n"
    )
    (RESULTS / "zoo_baseline.md").write_text(header + markdown_table(reports, columns))
    payload = [{**r.to_dict(), "manifest_top1": manifest[r.name]["test_top1"]} for r in reports]
    (RESULTS / "zoo_baseline.json").write_text(
        json.dumps({"environment": env, "threads": args.threads, "results": payload}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
