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

from deepshrink.commands import command
from deepshrink.commands.args import add_data_args, load_data, print_comparison, report_header, run_folder, set_threads, size_kwargs
from deepshrink.core.errors import InputError
from deepshrink.core.files import write_atomic


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
    add_data_args(p)


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


def _sides(models: dict, data, threads: int | None, repeats: int = 0) -> dict[str, dict]:
    """Each model measured alike (``evaluate.compare.measure``); with ``repeats``, interleaved ORT latency at batch 64 and 1."""
    from deepshrink.evaluate.compare import measure, measure_ort_latency
    from deepshrink.export import onnx_bytes, ort_session

    protos = {name: onnx_bytes(model, data.input_shape) for name, model in models.items()}
    sides = {name: measure(model, data.test, protos[name]) for name, model in models.items()}
    if repeats:
        sessions = {name: ort_session(proto, threads) for name, proto in protos.items()}
        for name, latency in measure_ort_latency(sessions, data.input_shape, (64, 1), repeats).items():
            sides[name].update(latency)
    return sides


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


# -- distill -------------------------------------------------------------------------------
def _distill_config(args: argparse.Namespace):
    from deepshrink.compress.distill import KD, Distill

    kd = KD(temperature=args.temperature, alpha=args.alpha, hints=_pairs(args.hint, "--hint") or None, hint_weight=args.hint_weight)
    return Distill(teacher=args.teacher, kd=kd, train=_train_config(args, args.epochs))


@command("distill")
def _distill(args: argparse.Namespace) -> int:
    from deepshrink.compress.distill import finetune_with_kd
    from deepshrink.evaluate.compare import compare
    from deepshrink.models import create_model, resolve_model

    cfg = _distill_config(args)
    set_threads(args)
    teacher = resolve_model(args.teacher, args.teacher_weights)
    data = load_data(args, seed=args.seed, train_subset=args.train_subset)
    torch.manual_seed(args.seed)
    student = create_model(args.student, in_channels=data.input_shape[0], num_classes=data.num_classes, **size_kwargs(args.student, data))
    start = time.perf_counter()
    kd = (None, None) if args.no_kd else (teacher, cfg.kd)
    finetune_with_kd(student, cfg.train, data, *kd, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    out = Path(run_folder(args, "distill", args.teacher, args.student))
    sides = _sides({"teacher": teacher, "student": student}, data, args.threads)
    label = "student (KD)" if not args.no_kd else "student (labels only)"
    comparison = compare(sides["teacher"], {**sides["student"], "seconds": seconds}, (f"teacher {args.teacher}", f"{label} {args.student}"))
    report = {
        **report_header(cfg, data, teacher_name=args.teacher, student_name=args.student, kd=not args.no_kd),
        "train_images": len(data.train),
        **comparison.to_dict(),
    }
    report["files"] = _write(student, out, data, {"architecture": {"zoo": args.student}, "config": cfg.to_dict()})
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    print_comparison(comparison, f"distill {args.teacher} -> {args.student} ({len(data.test):,} test images)")
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
    from deepshrink.evaluate import evaluate_accuracy
    from deepshrink.evaluate.compare import compare
    from deepshrink.models import architecture_of, resolve_model

    cfg = _decompose_config(args)
    set_threads(args)
    model = resolve_model(args.model, args.weights)
    data = load_data(args, train_subset=args.train_subset)
    start = time.perf_counter()
    decomposed, layers = decompose_required(copy.deepcopy(model), cfg, data.input_shape)
    untuned_top1 = evaluate_accuracy(decomposed, data.test).top1
    if cfg.finetune is not None:
        finetune_with_kd(decomposed, cfg.finetune, data, model if cfg.distill else None, cfg.distill, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    sides = _sides({"original": model, "decomposed": decomposed}, data, args.threads, args.repeats)
    slower = _slower_batches(sides["original"], sides["decomposed"])
    label = "decomposed (SLOWER than the original)" if slower else "decomposed"
    comparison = compare(sides["original"], {**sides["decomposed"], "top1_before_finetune": untuned_top1}, ("original", label))
    out = Path(run_folder(args, "decompose", args.model, args.method))
    report = {
        **report_header(cfg, data, model=args.model, method=args.method),
        **comparison.to_dict(),
        "layers": [asdict(layer) for layer in layers],
        "time_s": seconds,
        "latency": {"backend": "onnxruntime", "batch_sizes": [64, 1], "repeats": args.repeats, "threads": args.threads},
        "slower_than_original": slower,
    }
    report["files"] = _write(decomposed, out, data, {"architecture": architecture_of(args.model), "config": cfg.to_dict()})
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    replaced = sum(layer.replaced for layer in layers)
    print_comparison(comparison, f"decompose {args.model} ({args.method}, {replaced} of {len(layers)} layers)")
    if slower:
        print(f"warning: the decomposed model is slower than the original in ONNX Runtime at batch {', '.join(map(str, slower))}")
    print(f"Top-1 before fine-tuning {untuned_top1:.2f}%; ONNX Runtime vs torch max|diff| {report['files']['onnx_max_abs_diff']:.2e}")
    print(f"wrote {report['files']['weights']}, {report['files']['onnx']} and {out / 'report.json'}")
    return 0
