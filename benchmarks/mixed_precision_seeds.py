"""Mixed precision at 1/6 of fp32 vs uniform 4-bit QAT on resnet20, over seeds.

    .venv/bin/python benchmarks/mixed_precision_seeds.py --seeds 0,1,2,3,4 --threads 1

One QAT run's Top-1 moves by about 0.1pp with the training seed (shuffling
order), which is the size of the gap between the two methods in
``quant_compare``. So both are trained with the same set-up as there (2 epochs
on 10,000 images, lr 0.002, cosine) once per seed, and the table gives each
seed's ORT int8 Top-1 and the mean and standard deviation. The bit plan does
not depend on the seed (Fisher sensitivity on fixed calibration images), only
the training does. Each finished run is saved, so a stopped run resumes.

The bit allocations are also measured post-training (``train: false`` for
mixed precision; for uniform bits, the calibrated model QAT starts from), at 1/6
of fp32 and at the uniform 2-bit file's size: there the allocation is all that
differs, with no training to even it out.

Writes benchmarks/results/mixed_precision_seeds.{md,json}.
"""

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
from quant_compare import RESULTS, qat_row

from deepshrink.compress.quant import QAT, MixedPrecision
from deepshrink.compress.quant.ptq import calibration_batches
from deepshrink.compress.quant.qat import prepare_qat
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import load_data
from deepshrink.evaluate import evaluate_accuracy
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.models import create_model
from deepshrink.report import Column, markdown_table, print_table
from deepshrink.train import TrainConfig

NAME = "mixed_precision_seeds"
POST_TRAINING_ROWS = 4
SETUP = {"epochs": 2, "lr": 0.002, "train_images": 10000, "schedule": "cosine"}


def configs(seed: int) -> dict[str, object]:
    train = TrainConfig(epochs=SETUP["epochs"], lr=SETUP["lr"], schedule="cosine", weight_decay=0.0, seed=seed)
    return {
        "QAT LSQ w4a8": QAT(weight_bits=4, finetune=train),
        "mixed precision, 1/6 of fp32": MixedPrecision(size_fraction=1 / 6, qat=QAT(finetune=train)),
    }


def post_training_rows(model, data, threads: int) -> list[dict]:
    """Uniform and mixed bits calibrated, not trained: what each bit allocation gives by
    itself, at 4 bits vs 1/6 of fp32 and at 2 bits vs mixed in the same bytes on disk."""
    uniform4, mixed = configs(seed=0).values()
    uniform2 = replace(uniform4, weight_bits=2)
    ctx = Context(data, progress=False)
    batches = calibration_batches(ctx, uniform4.calib_samples)
    rows = []

    def measure(label: str, build) -> dict:
        print(f"== post-training: {label}", flush=True)
        start = time.perf_counter()
        qmodel = build()
        rows.append(
            {
                **qat_row(label, model, qmodel, data, threads, time.perf_counter() - start),
                "method": f"{label.replace('QAT LSQ', 'uniform')}, post-training",
            }
        )
        return rows[-1]

    measure("QAT LSQ w4a8", lambda: prepare_qat(model, uniform4, batches).eval())
    measure("mixed precision, 1/6 of fp32", lambda: apply_method(model, replace(mixed, train=False), ctx))
    w2 = measure("QAT LSQ w2a8", lambda: prepare_qat(model, uniform2, batches).eval())
    same_bytes = replace(mixed, size_fraction=w2["size_fraction"], train=False)
    measure("mixed precision, size of uniform w2", lambda: apply_method(model, same_bytes, ctx))
    return rows


def summary_rows(runs: list[dict], base_top1: float) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        top1 = [r["top1"] for r in mine]
        rows.append(
            {
                "method": method,
                "seeds": len(mine),
                "top1_per_seed": {r["seed"]: r["top1"] for r in mine},
                "top1_mean": statistics.mean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "top1_min": min(top1),
                "top1_max": max(top1),
                "drop_mean_pp": base_top1 - statistics.mean(top1),
                "size_fraction": mine[0]["size_fraction"],
                "packed_bytes": mine[0]["packed_bytes"],
            }
        )
    return rows


SUMMARY_COLUMNS = [
    Column("method", lambda r: r["method"]),
    Column("seeds", lambda r: r["seeds"]),
    Column("Top-1 per seed (ORT int8)", lambda r: ", ".join(f"{v:.2f}" for v in r["top1_per_seed"].values())),
    Column("mean", lambda r: r["top1_mean"], "{:.3f}"),
    Column("std", lambda r: r["top1_std"], "{:.3f}"),
    Column("mean drop pp", lambda r: r["drop_mean_pp"], "{:+.3f}"),
    Column("packed KiB", lambda r: r["packed_bytes"] / 1024, "{:,.1f}"),
    Column("of fp32", lambda r: r["size_fraction"], "{:.3f}"),
]

POST_COLUMNS = [
    Column("method", lambda r: r["method"]),
    Column("Top-1 % (ORT int8)", lambda r: r["top1"], "{:.2f}"),
    Column("drop pp", lambda r: r["top1_drop_pp"], "{:+.2f}"),
    Column("Top-1 % (torch)", lambda r: r["top1_torch"], "{:.2f}"),
    Column("packed KiB", lambda r: r["packed_bytes"] / 1024, "{:,.1f}"),
    Column("of fp32", lambda r: r["size_fraction"], "{:.3f}"),
]


def write(payload: dict) -> None:
    (RESULTS / f"{NAME}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    env = payload["environment"]
    text = (
        "# resnet20: mixed precision at 1/6 of fp32 vs uniform 4-bit, over training seeds\n\n"
        + describe_environment(env, payload["threads"])
        + f"Set-up: {payload['setup']}; fp32 Top-1 {payload['fp32_top1']:.2f}. Top-1 is ONNX Runtime int8 on the 10,000 test images.\n"
        "Reproduce: `.venv/bin/python benchmarks/mixed_precision_seeds.py --seeds "
        f"{','.join(str(s) for s in payload['seeds'])} --threads {payload['threads']}`\n\n"
    )
    text += markdown_table(payload["summary"], SUMMARY_COLUMNS) + "\n"
    if payload.get("post_training"):
        text += (
            "\n## The same bit allocations post-training (calibrated, no QAT)\n\n"
            + markdown_table(payload["post_training"], POST_COLUMNS)
            + "\n"
        )
    (RESULTS / f"{NAME}.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    data = load_data(train_subset=SETUP["train_images"])
    model = create_model("resnet20", pretrained=True)
    path = RESULTS / f"{NAME}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in previous.get("runs", []) if r.get("setup") == SETUP]
    payload = {"environment": environment(), "threads": args.threads, "setup": SETUP, "seeds": seeds}
    payload["fp32_top1"] = evaluate_accuracy(model, data.test).top1
    cached = previous.get("post_training", [])
    payload["post_training"] = cached if len(cached) == POST_TRAINING_ROWS else post_training_rows(model, data, args.threads)
    for row in payload["post_training"]:
        row["top1_drop_pp"] = payload["fp32_top1"] - row["top1"]
    for seed in seeds:
        for label, cfg in configs(seed).items():
            if any(r["seed"] == seed and r["method"] == label for r in runs):
                continue
            print(f"== seed {seed}: {label}", flush=True)
            start = time.perf_counter()
            qmodel = apply_method(model, cfg, Context(data, progress=False))
            row = qat_row(label, model, qmodel, data, args.threads, time.perf_counter() - start)
            runs.append({**row, "seed": seed, "setup": SETUP})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "bit_plan"}), flush=True)
            write({**payload, "runs": runs, "summary": summary_rows(runs, payload["fp32_top1"])})
    runs = [r for r in runs if r["seed"] in seeds]
    payload = {**payload, "runs": runs, "summary": summary_rows(runs, payload["fp32_top1"])}
    print_table(payload["summary"], SUMMARY_COLUMNS, title="resnet20 MP 1/6 vs w4, over seeds")
    write(payload)


if __name__ == "__main__":
    main()
