"""``deepshrink distill`` (teacher -> student) and ``deepshrink decompose`` (low-rank factorisation).

Both build their config from the flags before loading anything, so a bad flag
fails at once, and both write the weights, the ONNX file and a report.json
whose numbers are measured in the run.
"""

import argparse
import json
import re
import time
from pathlib import Path

import torch

from deepshrink.cli import _add_data_args, _load_data, _size_kwargs, command, report_header
from deepshrink.core.errors import InputError


def add_commands(sub) -> None:
    _add_distill(sub.add_parser("distill", help="train a small student from a teacher with knowledge distillation"))
    _add_decompose(sub.add_parser("decompose", help="low-rank factorisation (svd, tucker, cp), fine-tune, export; before and after"))


def _add_training_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (KD steps ~T·alpha harder than CE: BN-free students want less)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["onecycle", "cosine", "constant"], default="onecycle")
    p.add_argument("--augment", action="store_true", help="random flips and 2-pixel shifts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=4.0, help="KD softmax temperature")
    p.add_argument("--alpha", type=float, default=0.9, help="KD weight of the soft targets (1 - alpha: the labels)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--no-progress", action="store_true")
    _add_data_args(p)


def _add_distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="zoo name (pretrained) or module:function")
    p.add_argument("--teacher-weights", default=None, help="safetensors weights for the teacher")
    p.add_argument("--student", required=True, help="zoo name, trained from scratch")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--hint", action="append", default=[], metavar="STUDENT_LAYER=TEACHER_LAYER", help="FitNets hint (repeatable)")
    p.add_argument("--hint-weight", type=float, default=1.0)
    p.add_argument("--no-kd", action="store_true", help="train on the labels only: the baseline to compare with")
    _add_training_args(p, epochs=5, lr=0.05)


def _add_decompose(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name or module:function")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument("--method", required=True, choices=["svd", "tucker", "cp"], help="svd: Linear layers; tucker, cp: kxk Conv2d")
    ranks = p.add_mutually_exclusive_group(required=True)
    ranks.add_argument("--rank", default=None, help="a fixed rank, or 'auto' (VBMF)")
    ranks.add_argument("--energy", type=float, default=None, help="keep this fraction of the squared singular values")
    ranks.add_argument("--compression", type=float, default=None, help="cut each layer's MACs by this factor")
    p.add_argument("--layer-rank", action="append", default=[], metavar="LAYER=RANK", help="fixed rank for one layer (repeatable)")
    p.add_argument("--include", default=None, help="regex of layer names to decompose")
    p.add_argument("--exclude", default=None, help="regex of layer names to leave alone")
    p.add_argument("--round-to", type=int, default=8, help="round ranks down to a multiple of this (ORT convolves 8 channels at a time)")
    p.add_argument("--force", action="store_true", help="factorise every layer that saves MACs, even where ORT runs it slower")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs after factorising (0: none)")
    p.add_argument("--kd", action="store_true", help="fine-tune by distilling from the original model")
    p.add_argument("--repeats", type=int, default=20, help="ORT latency runs per batch size")
    _add_training_args(p, epochs=2, lr=0.01)


def _pairs(values: list[str], flag: str, convert=str) -> dict:
    pairs = {}
    for value in values:
        left, sep, right = value.partition("=")
        if not sep or not left or not right:
            raise InputError(f"{flag} must be NAME=VALUE, got {value!r}")
        try:
            pairs[left] = convert(right)
        except ValueError:
            raise InputError(f"{flag} {value!r}: {right!r} is not a valid {convert.__name__}") from None
    return pairs


def _train_config(args: argparse.Namespace, epochs: int):
    from deepshrink.train import TrainConfig

    return TrainConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        augment=args.augment,
        seed=args.seed,
        threads=args.threads,
    )


def _metrics(model, data, threads: int | None, repeats: int = 0) -> dict:
    """Accuracy, size and compute; with ``repeats``, ORT latency at batch 64 and 1 too."""
    from torch import nn

    from deepshrink.evaluate import count_compute, evaluate_accuracy, measure_size
    from deepshrink.evaluate.latency import ort_latency
    from deepshrink.export import onnx_bytes, ort_session

    acc, compute = evaluate_accuracy(model, data.test), count_compute(model, data.input_shape)
    proto = onnx_bytes(model, data.input_shape)
    row = {
        "top1": acc.top1,
        "top5": acc.top5,
        "params": measure_size(model).params,
        "macs": compute.macs,
        "conv_macs": sum(layer.macs for layer in compute.layers if layer.kind == nn.Conv2d.__name__),
        "onnx_bytes": len(proto),
    }
    if repeats:
        session = ort_session(proto, threads)
        for batch in (64, 1):
            row[f"ort_b{batch}_ms"] = ort_latency(session, data.input_shape, batch, repeats).median_ms
    return row


def _add_latencies(models: dict[str, tuple], data, threads: int | None, repeats: int) -> None:
    """ORT medians at batch 64 and 1 into each model's row, the models timed in alternating rounds
    (a shared machine's drift hits both alike, so their ratio is a fair speedup)."""
    from deepshrink.evaluate.latency import ort_latency_interleaved
    from deepshrink.export import onnx_bytes, ort_session

    sessions = {name: ort_session(onnx_bytes(model, data.input_shape), threads) for name, (model, _) in models.items()}
    for batch in (64, 1):
        times = ort_latency_interleaved(sessions, data.input_shape, batch, repeats)
        for name, (_, row) in models.items():
            row[f"ort_b{batch}_ms"] = times[name][0]


def _slower_batches(before: dict, after: dict) -> list[int]:
    """The batch sizes at which the compressed model's ORT median is above the original's."""
    return [batch for batch in (64, 1) if f"ort_b{batch}_ms" in after and after[f"ort_b{batch}_ms"] > before[f"ort_b{batch}_ms"]]


def _write(model, out: Path, data, metadata: dict) -> dict[str, str]:
    """Weights (safetensors) and ONNX; returns the paths and ORT's max|diff| from torch on a test batch."""
    from deepshrink.export import export_onnx, ort_session, verify_onnx
    from deepshrink.models import save_weights

    out.mkdir(parents=True, exist_ok=True)
    weights = save_weights(model, out / "model.safetensors", {k: json.dumps(v) for k, v in metadata.items()})
    onnx = export_onnx(model, out / "model.onnx", data.input_shape)
    diff = verify_onnx(model, ort_session(onnx, 1), data.test.images[:64])
    return {"weights": str(weights), "onnx": str(onnx), "onnx_max_abs_diff": diff}


def _print_rows(title: str, rows: list[tuple[str, dict]]) -> None:
    from deepshrink.report import Column, print_table

    columns = [
        Column("model", lambda r: r[0]),
        Column("Top-1 %", lambda r: r[1]["top1"], "{:.2f}"),
        Column("params", lambda r: r[1]["params"], "{:,}"),
        Column("MMACs", lambda r: r[1]["macs"] / 1e6, "{:.2f}"),
        Column("conv MMACs", lambda r: r[1]["conv_macs"] / 1e6, "{:.2f}"),
    ]
    if "ort_b64_ms" in rows[0][1]:
        columns += [
            Column("ORT b64 ms", lambda r: r[1].get("ort_b64_ms"), "{:.2f}"),
            Column("ORT b1 ms", lambda r: r[1].get("ort_b1_ms"), "{:.3f}"),
        ]
    print_table(rows, columns, title=title)


# -- distill -------------------------------------------------------------------------------
def _distill_config(args: argparse.Namespace):
    from deepshrink.compress.distill import KD, Distill

    kd = KD(temperature=args.temperature, alpha=args.alpha, hints=_pairs(args.hint, "--hint") or None, hint_weight=args.hint_weight)
    return Distill(teacher=args.teacher, kd=kd, train=_train_config(args, args.epochs))


@command("distill")
def _distill(args: argparse.Namespace) -> int:
    from deepshrink.compress.distill import finetune_with_kd
    from deepshrink.models import create_model, resolve_model

    cfg = _distill_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = resolve_model(args.teacher, args.teacher_weights)
    data = _load_data(args, seed=args.seed, train_subset=args.train_subset)
    torch.manual_seed(args.seed)
    student = create_model(args.student, in_channels=data.input_shape[0], num_classes=data.num_classes, **_size_kwargs(args.student, data))
    start = time.perf_counter()
    kd = (None, None) if args.no_kd else (teacher, cfg.kd)
    finetune_with_kd(student, cfg.train, data, *kd, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    out = Path(args.out or f"runs/distill-{args.teacher.replace(':', '_')}-{args.student}")
    report = {
        **report_header(cfg, data, teacher_name=args.teacher, student_name=args.student, kd=not args.no_kd),
        "train_images": len(data.train),
        "teacher": _metrics(teacher, data, args.threads),
        "student": {**_metrics(student, data, args.threads), "train_time_s": seconds},
    }
    report["files"] = _write(student, out, data, {"architecture": {"zoo": args.student}, "config": cfg.to_dict()})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    label = "student (KD)" if report["kd"] else "student (labels only)"
    _print_rows(
        f"distill {args.teacher} -> {args.student} ({len(data.test):,} test images)",
        [("teacher " + args.teacher, report["teacher"]), (f"{label} {args.student}", report["student"])],
    )
    print(f"trained in {seconds:.0f}s; wrote {report['files']['weights']}, {report['files']['onnx']} and {out / 'report.json'}")
    return 0


# -- decompose -----------------------------------------------------------------------------
def _rank(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    if not re.fullmatch(r"\d+", value):
        raise InputError(f"--rank must be a positive integer or 'auto', got {value!r}")
    return int(value)


def _decompose_config(args: argparse.Namespace):
    from deepshrink.compress.distill import KD
    from deepshrink.compress.lowrank import Decompose
    from deepshrink.core.config import Scope

    if args.epochs < 0:
        raise InputError(f"--epochs must be >= 0, got {args.epochs}")
    if args.kd and args.epochs == 0:
        raise InputError("--kd distills during fine-tuning: set --epochs > 0")
    return Decompose(
        method=args.method,
        rank=_rank(args.rank),
        energy=args.energy,
        compression=args.compression,
        layer_ranks=_pairs(args.layer_rank, "--layer-rank", int) or None,
        round_to=args.round_to,
        latency_check=not args.force,
        scope=Scope(include=args.include, exclude=args.exclude),
        seed=args.seed,
        finetune=_train_config(args, args.epochs) if args.epochs else None,
        distill=KD(temperature=args.temperature, alpha=args.alpha) if args.kd else None,
    )


@command("decompose")
def _decompose(args: argparse.Namespace) -> int:
    import copy
    from dataclasses import asdict

    from deepshrink.compress.distill import finetune_with_kd
    from deepshrink.compress.lowrank import decompose_required
    from deepshrink.models import architecture_of, resolve_model

    cfg = _decompose_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model, args.weights)
    data = _load_data(args, train_subset=args.train_subset)
    before = _metrics(model, data, args.threads)
    start = time.perf_counter()
    decomposed, layers = decompose_required(copy.deepcopy(model), cfg, data.input_shape)
    untuned_top1 = _metrics(decomposed, data, args.threads)["top1"]
    if cfg.finetune is not None:
        finetune_with_kd(decomposed, cfg.finetune, data, model if cfg.distill else None, cfg.distill, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    after = {**_metrics(decomposed, data, args.threads), "top1_before_finetune": untuned_top1}
    if args.repeats:
        _add_latencies({"original": (model, before), "decomposed": (decomposed, after)}, data, args.threads, args.repeats)
    slower = _slower_batches(before, after)
    out = Path(args.out or f"runs/decompose-{args.model.replace(':', '_')}-{args.method}")
    report = {
        **report_header(cfg, data, model=args.model, method=args.method),
        "before": before,
        "after": after,
        "layers": [asdict(layer) for layer in layers],
        "time_s": seconds,
        "latency": {"backend": "onnxruntime", "batch_sizes": [64, 1], "repeats": args.repeats, "threads": args.threads},
        "slower_than_original": slower,
    }
    report["files"] = _write(decomposed, out, data, {"architecture": architecture_of(args.model), "config": cfg.to_dict()})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    replaced = sum(layer.replaced for layer in layers)
    label = "decomposed (SLOWER than the original)" if slower else "decomposed"
    _print_rows(f"decompose {args.model} ({args.method}, {replaced} of {len(layers)} layers)", [("original", before), (label, after)])
    if slower:
        print(f"warning: the decomposed model is slower than the original in ONNX Runtime at batch {', '.join(map(str, slower))}")
    print(f"Top-1 before fine-tuning {untuned_top1:.2f}%; ONNX Runtime vs torch max|diff| {report['files']['onnx_max_abs_diff']:.2e}")
    print(f"wrote {report['files']['weights']}, {report['files']['onnx']} and {out / 'report.json'}")
    return 0
