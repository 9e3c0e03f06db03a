"""Pruning, ours and peers side by side in one run.

    .venv/bin/python benchmarks/prune_compare.py [--threads 2] [--finetune-epochs 6]

* lenet300, unstructured: deepshrink global magnitude pruning with the AGP
  schedule vs torch.nn.utils.prune's global L1 pruning (one-shot), both
  fine-tuned with the same loop and epochs.
* resnet20, structured: deepshrink channel pruning (L1, physical removal,
  fine-tuned) vs Torch-Pruning's MagnitudePruner at the same channel ratio
  (measured after pruning: params, MACs, Top-1, ORT latency). Latencies of the
  unpruned and pruned ONNX models come from this run, on this machine.

Writes benchmarks/results/prune_compare.{md,json}.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.utils.prune as torch_prune
import torch_pruning as tp

from deepshrink.compress.prune import ChannelPrune, MagnitudePrune
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import load_data
from deepshrink.evaluate import count_compute, evaluate_accuracy, measure_size
from deepshrink.evaluate.environment import describe_environment, environment
from deepshrink.evaluate.latency import ort_latency
from deepshrink.export import onnx_bytes, ort_session
from deepshrink.models import create_model
from deepshrink.models.weights import load_weights, save_weights
from deepshrink.report import Column, markdown_table, print_table
from deepshrink.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 28, 28)


def measure(label: str, model: torch.nn.Module, data, threads: int, seconds: float | None = 0.0, latency: bool = True) -> dict:
    model.eval()
    size = measure_size(model)
    compute = count_compute(model, SHAPE)
    row = {
        "method": label,
        "top1": evaluate_accuracy(model, data.test).top1,
        "params": size.params,
        "nonzero_params": size.nonzero_params,
        "sparsity": size.sparsity,
        "macs": compute.macs,
        "effective_macs": compute.effective_macs,
        "disk_bytes": size.disk_bytes,
        "seconds": seconds,
    }
    if latency:
        proto = onnx_bytes(model, SHAPE)
        session = ort_session(proto, threads)
        row["onnx_bytes"] = len(proto)
        row["ort_b1_ms"] = ort_latency(session, SHAPE, 1, repeats=50).median_ms
        row["ort_b64_ms"] = ort_latency(session, SHAPE, 64, repeats=50).median_ms
    return row


def finetune(model, config: TrainConfig, data) -> float:
    start = time.perf_counter()
    Trainer(model, config, data.train, data.val, progress=False).fit()
    return time.perf_counter() - start


def unstructured_lenet300(data, threads: int, epochs: int) -> list[dict]:
    model = create_model("lenet300", pretrained=True)
    ft = TrainConfig(epochs=epochs, lr=0.02, weight_decay=0.0, schedule="cosine")
    rows = [measure("pretrained", model, data, threads)]
    start = time.perf_counter()
    ours = apply_method(
        model, MagnitudePrune(sparsity=0.92, granularity="global", schedule="agp", finetune=ft), Context(data, progress=False)
    )
    rows.append(measure("deepshrink magnitude, global, AGP + fine-tune", ours, data, threads, time.perf_counter() - start))
    peer = copy.deepcopy(model)
    start = time.perf_counter()
    params = [(m, "weight") for m in peer if isinstance(m, torch.nn.Linear)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.92)
    finetune(peer, ft, data)  # torch's masks stay applied through its forward pre-hooks
    for module, name in params:
        torch_prune.remove(module, name)
    rows.append(measure("torch.nn.utils.prune global L1, one-shot + fine-tune", peer, data, threads, time.perf_counter() - start))
    return rows


def structured_resnet20(data, threads: int, epochs: int, ratio: float, round_to: int, reuse: Path | None) -> list[dict]:
    """``reuse``: a fine-tuned pruned checkpoint from an earlier run of this script, re-measured instead of re-trained."""
    model = create_model("resnet20", pretrained=True)
    rows = [measure("unpruned", model, data, threads)]
    start = time.perf_counter()
    ours = apply_method(model, ChannelPrune(ratio=ratio, importance="l1", round_to=round_to))
    prune_seconds = time.perf_counter() - start
    rows.append(measure(f"deepshrink channel L1 {ratio:.0%} round_to {round_to}, before fine-tune", ours, data, threads, prune_seconds))
    if reuse is not None and reuse.exists():
        ours, seconds = load_weights(ours, reuse), None  # fine-tuned in an earlier run: its time is not re-measured
    else:
        seconds = finetune(ours, TrainConfig(epochs=epochs, lr=0.02, augment=True, schedule="cosine"), data)
        if reuse is not None:
            save_weights(ours, reuse)
    total = None if seconds is None else prune_seconds + seconds
    rows.append(measure(f"deepshrink channel L1 {ratio:.0%} round_to {round_to} + {epochs} epochs fine-tune", ours, data, threads, total))
    peer = copy.deepcopy(model)
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        peer,
        torch.zeros(1, *SHAPE),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[peer.fc],
        round_to=round_to,
    )
    pruner.step()
    rows.append(
        measure(
            f"Torch-Pruning MagnitudePruner L1 {ratio:.0%} round_to {round_to}, before fine-tune",
            peer,
            data,
            threads,
            time.perf_counter() - start,
        )
    )
    return rows


COLUMNS = [
    Column("method", lambda r: r["method"]),
    Column("Top-1 %", lambda r: r["top1"], "{:.2f}"),
    Column("params", lambda r: r["params"], "{:,}"),
    Column("zeros %", lambda r: 100 * r["sparsity"], "{:.1f}"),
    Column("MMACs", lambda r: r["macs"] / 1e6, "{:.2f}"),
    Column("effective MMACs", lambda r: r["effective_macs"] / 1e6, "{:.2f}"),
    Column("disk KiB", lambda r: r["disk_bytes"] / 1024, "{:,.0f}"),
    Column("ORT b1 ms", lambda r: r.get("ort_b1_ms"), "{:.3f}"),
    Column("ORT b64 ms", lambda r: r.get("ort_b64_ms"), "{:.2f}"),
    Column("time s", lambda r: r["seconds"], "{:.0f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lenet-epochs", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5)
    # ONNX Runtime's CPU convolutions work on blocks of 8 channels (NCHWc): other counts are padded, so
    # the MACs they save buy no speed. round_to 8 keeps every pruned count on a block boundary.
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument(
        "--checkpoint", default="runs/benchmark-prune/resnet20_channel_r8.safetensors", help="fine-tuned model, reused if present"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data()
    env = environment()
    lenet = unstructured_lenet300(data, args.threads, args.lenet_epochs)
    resnet = structured_resnet20(data, args.threads, args.finetune_epochs, args.ratio, args.round_to, Path(args.checkpoint))
    base, tuned = resnet[0], resnet[2]
    summary = {
        "lenet300_sparsity": lenet[1]["sparsity"],
        "lenet300_top1_drop_pp": lenet[0]["top1"] - lenet[1]["top1"],
        "resnet20_macs_removed": 1 - tuned["macs"] / base["macs"],
        "resnet20_top1_drop_pp": base["top1"] - tuned["top1"],
        "resnet20_ort_b64_speedup": base["ort_b64_ms"] / tuned["ort_b64_ms"],
        "resnet20_ort_b1_speedup": base["ort_b1_ms"] / tuned["ort_b1_ms"],
    }
    for title, rows in (("lenet300: unstructured", lenet), ("resnet20: structured", resnet)):
        print_table(rows, COLUMNS, title=title)
    print(json.dumps(summary, indent=2))
    header = (
        "# Pruning, side by side (Fashion-MNIST test set)\n\n"
        + describe_environment(env, args.threads, extra_versions={"torch-pruning": tp.__version__})
        + "Latency: ONNX Runtime, median of 50 runs after warm-up, both models timed in this run.\n"
        "Reproduce: `.venv/bin/python benchmarks/prune_compare.py`\n\n"
    )
    text = (
        header
        + "## lenet300, unstructured\n\n"
        + markdown_table(lenet, COLUMNS)
        + f"\nSparsity {summary['lenet300_sparsity']:.1%}, Top-1 drop {summary['lenet300_top1_drop_pp']:.2f}pp.\n\n"
        + "## resnet20, structured (channels physically removed)\n\n"
        + markdown_table(resnet, COLUMNS)
        + f"\nMACs removed {summary['resnet20_macs_removed']:.1%}, Top-1 drop {summary['resnet20_top1_drop_pp']:.2f}pp after fine-tuning, "
        f"ORT speedup {summary['resnet20_ort_b64_speedup']:.2f}x at batch 64 ({summary['resnet20_ort_b1_speedup']:.2f}x at batch 1).\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_compare.md").write_text(text)
    payload = {"environment": env, "threads": args.threads, "summary": summary, "lenet300": lenet, "resnet20": resnet}
    (RESULTS / "prune_compare.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
