"""int8 PTQ accuracy, deepshrink vs ONNX Runtime ``quantize_static``, over calibration draws.

    .venv/bin/python benchmarks/ptq_calib_draws.py --draws 5 --threads 1

``quant_compare`` calibrates both tools on the first 512 training images, and
with reduce_range the two end 2-8 test images apart out of 10,000. That is
within what another choice of 512 images moves either tool, so this measures
both tools on several disjoint draws of 512 training images (draw 0 is the
first 512, as in ``quant_compare``; draw k is images 512k..512k+511 of a seeded
permutation of the rest) and gives each draw's ONNX Runtime Top-1 and the mean.
Both settings are run: full 8-bit weights and reduce_range (7-bit weights).
Accuracy only; speed is ``quant_compare``'s and ``ort_speed_files``'s job.

Writes benchmarks/results/ptq_calib_draws.{md,json}.
"""

import argparse
import json
import statistics

import numpy as np
import torch
from quant_compare import PTQ_MODELS, RESULTS, SHAPE, ort_quantize_static_bytes

from deepshrink.compress.quant import PTQ
from deepshrink.compress.quant.onnx_qdq import quantized_onnx_bytes
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import load_data
from deepshrink.evaluate.accuracy import ort_top1
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.export import onnx_bytes, ort_session
from deepshrink.models import create_model
from deepshrink.report import Column, markdown_table, print_table

NAME = "ptq_calib_draws"
CALIB_SAMPLES = 512
DRAW_SEED = 1


def calibration_draws(train_images: torch.Tensor, draws: int) -> list[torch.Tensor]:
    """Disjoint sets of CALIB_SAMPLES images: the first 512, then seeded draws from the rest."""
    first = train_images[:CALIB_SAMPLES]
    rest = train_images[CALIB_SAMPLES:]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(DRAW_SEED))
    return [first] + [rest[order[k * CALIB_SAMPLES : (k + 1) * CALIB_SAMPLES]] for k in range(draws - 1)]


def ours(model, calib: torch.Tensor, reduce_range: bool) -> bytes:
    batches = list(calib.split(128))
    qmodel = apply_method(model, PTQ(calib_samples=len(calib), reduce_range=reduce_range), Context(progress=False, calib=batches))
    return quantized_onnx_bytes(qmodel, SHAPE)


def model_rows(name: str, data, draws: list[torch.Tensor], threads: int) -> list[dict]:
    model = create_model(name, pretrained=True).eval()
    fp32 = onnx_bytes(model, SHAPE)
    fp32_top1 = ort_top1(ort_session(fp32, threads), data.test)
    rows = []
    for reduce_range in (False, True):
        setting = "reduce_range" if reduce_range else "full 8-bit"
        for tool in ("deepshrink PTQ", "ORT quantize_static"):
            top1 = []
            for k, calib in enumerate(draws):
                proto = (
                    ours(model, calib, reduce_range)
                    if tool == "deepshrink PTQ"
                    else ort_quantize_static_bytes(fp32, calib.numpy(), reduce_range)
                )
                top1.append(ort_top1(ort_session(proto, threads), data.test))
                print(f"{name} {setting} {tool} draw {k}: {top1[-1]:.2f}", flush=True)
            rows.append(
                {
                    "model": name,
                    "setting": setting,
                    "tool": tool,
                    "fp32_top1": fp32_top1,
                    "top1_per_draw": top1,
                    "top1_mean": statistics.mean(top1),
                    "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                }
            )
        ours_row, peer_row = rows[-2:]
        ours_row["mean_minus_peer_pp"] = ours_row["top1_mean"] - peer_row["top1_mean"]
        ours_row["draws_ahead_or_level"] = int(np.sum(np.array(ours_row["top1_per_draw"]) >= np.array(peer_row["top1_per_draw"])))
    return rows


COLUMNS = [
    Column("model", lambda r: r["model"]),
    Column("setting", lambda r: r["setting"]),
    Column("tool", lambda r: r["tool"]),
    Column("Top-1 per draw (ORT)", lambda r: ", ".join(f"{v:.2f}" for v in r["top1_per_draw"])),
    Column("mean", lambda r: r["top1_mean"], "{:.3f}"),
    Column("std", lambda r: r["top1_std"], "{:.3f}"),
    Column("ours - peer (mean)", lambda r: r.get("mean_minus_peer_pp"), "{:+.3f}"),
    Column("draws ours >= peer", lambda r: r.get("draws_ahead_or_level")),
]


def write(payload: dict) -> None:
    (RESULTS / f"{NAME}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    env = payload["environment"]
    text = (
        "# int8 PTQ over calibration draws: deepshrink vs ONNX Runtime quantize_static\n\n"
        + describe_environment(env, payload["threads"])
        + f"{payload['draws']} disjoint draws of {CALIB_SAMPLES} training images (draw 0: the first {CALIB_SAMPLES}). "
        "Top-1 is ONNX Runtime on the 10,000 test images.\n"
        f"Reproduce: `.venv/bin/python benchmarks/ptq_calib_draws.py --draws {payload['draws']} --models {','.join(payload['models'])}`\n\n"
    )
    (RESULTS / f"{NAME}.md").write_text(text + markdown_table(payload["rows"], COLUMNS) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(PTQ_MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data()
    draws = calibration_draws(data.train.images, args.draws)
    models = args.models.split(",")
    payload = {"environment": environment(), "threads": args.threads, "draws": args.draws, "models": models, "rows": []}
    for name in models:
        payload["rows"] += model_rows(name, data, draws, args.threads)
        write(payload)
    print_table(payload["rows"], COLUMNS, title="int8 PTQ over calibration draws")


if __name__ == "__main__":
    main()
