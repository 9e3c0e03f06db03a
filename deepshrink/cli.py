"""The ``deepshrink`` command. Errors print as one line and exit with status 2."""

import argparse
import importlib
import json
import pkgutil
import shlex
import sys
from collections.abc import Callable

import torch

from deepshrink.core.errors import DeepShrinkError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def add(func):
        COMMANDS[name] = func
        return func

    return add


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist", "cifar10", "npz"])
    p.add_argument("--data-dir", default=None, help="dataset directory (or .npz file); Fashion-MNIST defaults to the Debian package's")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--threads", type=int, default=None, help="torch/ORT intra-op threads (default: torch's)")


# Commands that train or calibrate: each takes --device and, under torchrun, --dist-backend.
DEVICE_COMMANDS = ("train", "compress", "prune", "distill", "decompose", "quantize", "auto", "transformer", "study")


def add_device_args(p: argparse.ArgumentParser) -> None:
    from deepshrink.distributed import BACKENDS, DEVICE_NAMES

    p.add_argument(
        "--device",
        default=None,
        help=f"where training, calibration and validation run: {DEVICE_NAMES} (default: each config's, auto = CUDA when available); files written never depend on it",
    )
    p.add_argument(
        "--dist-backend", default="auto", choices=BACKENDS, help="under torchrun: gloo (CPU) or nccl (GPUs); auto picks by device"
    )


def _load_data(args, **kwargs):
    from deepshrink.data import load_data

    return load_data(args.dataset, args.data_dir, val_size=args.val_size, test_subset=args.test_subset, **kwargs)


def report_header(cfg, data, **identity) -> dict:
    """How every command's report.json starts: what ran (``identity``), its config and the data it was measured on."""
    return {**identity, "config": cfg.to_dict(), "dataset": data.name, "test_images": len(data.test)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepshrink", description="Compress neural networks and measure the result.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model zoo with accuracy, params and MACs")
    p.add_argument("--evaluate", action="store_true", help="measure every pretrained model on the test set (accuracy, size, MACs, latency)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train a zoo model")
    p.add_argument("model")
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["onecycle", "cosine", "constant"], default="onecycle")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", action="store_true", help="random flips and 2-pixel shifts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="checkpoint file; an interrupted run resumes from it")
    p.add_argument("--out", default=None, help="write the trained weights here (.safetensors)")
    p.add_argument("--publish", action="store_true", help="store as the zoo's pretrained weights and update the manifest")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="evaluate a model: accuracy, size, MACs, latency (torch and ONNX Runtime), memory")
    p.add_argument("model", help="zoo name or module:function")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument(
        "--reference", default=None, help="the original model (zoo name or module:function, pretrained): agreement and compression ratio"
    )
    _add_data_args(p)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--layers", action="store_true", help="also print per-layer MACs/FLOPs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("compress", help="run a compression recipe; writes .dsz, ONNX and a per-stage report")
    p.add_argument("model", help="zoo name, module:function, or an .onnx file (compressed without PyTorch source)")
    p.add_argument("--npz", default=None, help="ONNX input: calibration/evaluation inputs (one array per graph input, optional labels y)")
    p.add_argument("--eval-npz", default=None, help="ONNX input: a separate .npz to evaluate on (default: --npz)")
    p.add_argument(
        "--output", default=None, help="ONNX input: the graph output whose fidelity the report leads with (default: the worst one)"
    )
    p.add_argument("--recipe", required=True, help="shipped recipe name (deep-compression) or a YAML file")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe>-<model>); re-running resumes")
    _add_data_args(p)
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and stop")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("prune", help="prune (magnitude, channel or N:M), fine-tune, export; compare before and after")
    p.add_argument("model", help="zoo name or module:function")
    p.add_argument("--method", required=True, choices=["magnitude", "channel", "nm"])
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights (magnitude) or channels (channel) to remove")
    p.add_argument("--granularity", choices=["layer", "global"], default=None, help="magnitude/channel (default: layer)")
    p.add_argument(
        "--importance", choices=["l1", "l2", "bn_scale", "taylor", "hessian", "random"], default=None, help="channel only (default: l1)"
    )
    p.add_argument("--round-to", type=int, default=None, help="channel only: keep channel counts at multiples of K")
    p.add_argument("--nm", default=None, help="nm only: keep N of every M weights (default: 2:4)")
    p.add_argument("--exclude", default=None, help="regex of layer names to leave unpruned")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs after pruning (0: none)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning peak learning rate")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument("--out", default=None, help="output folder (default: runs/prune-<model>-<method>)")
    p.add_argument("--train-subset", type=int, default=None)
    _add_data_args(p)
    p.add_argument("--sensitivity", action="store_true", help="also measure per-layer sensitivity on the validation set (before pruning)")
    p.add_argument("--sensitivity-subset", type=int, default=1000, help="validation images used by --sensitivity")
    p.add_argument("--repeats", type=int, default=20, help="ORT latency runs at batch 64")
    p.add_argument("--no-progress", action="store_true")
    _add_family_commands(sub)
    for name in DEVICE_COMMANDS:
        if name in sub.choices:
            add_device_args(sub.choices[name])
    return parser


def _add_family_commands(sub) -> None:
    """Each module in ``deepshrink/commands/`` adds its own subcommands through
    ``add_commands(sub)`` and registers handlers with ``@command``."""
    import deepshrink.commands as family

    for info in sorted(pkgutil.iter_modules(family.__path__), key=lambda m: m.name):
        importlib.import_module(f"{family.__name__}.{info.name}").add_commands(sub)


@command("models")
def _models(args: argparse.Namespace) -> int:
    from deepshrink.evaluate import count_compute
    from deepshrink.models import create_model, list_models
    from deepshrink.models.weights import read_manifest

    manifest = read_manifest()
    if args.evaluate:
        return _print_zoo_evaluation(args, manifest)
    rows = []
    for name in list_models():
        model = create_model(name)
        entry = manifest.get(name, {})
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "macs": count_compute(model, (1, 28, 28)).macs,
                "test_top1": entry.get("test_top1"),
                "pretrained": bool(entry),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from deepshrink.report import Column, print_table

    print_table(
        rows,
        [
            Column("model", lambda r: r["model"]),
            Column("params", lambda r: r["params"], "{:,}"),
            Column("MMACs (1x28x28)", lambda r: r["macs"] / 1e6, "{:.2f}"),
            Column("pretrained Top-1 % (Fashion-MNIST test)", lambda r: r["test_top1"], "{:.2f}"),
        ],
        title="deepshrink model zoo",
    )
    return 0


def _print_zoo_evaluation(args: argparse.Namespace, manifest: dict) -> int:
    from deepshrink.data import load_data
    from deepshrink.evaluate import evaluate
    from deepshrink.models import create_model, list_models
    from deepshrink.report import print_table, zoo_columns

    data = load_data()
    reports = []
    for name in list_models():
        if name in manifest:
            reports.append(evaluate(create_model(name, pretrained=True), data.test, name, repeats=args.repeats, threads=args.threads))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
        return 0
    print_table(
        reports,
        zoo_columns(manifest),
        title=f"pretrained zoo on Fashion-MNIST test ({len(data.test):,} images), {torch.get_num_threads()} threads",
    )
    return 0


@command("compress")
def _compress(args: argparse.Namespace) -> int:
    from deepshrink.models import architecture_of, list_models, resolve_model
    from deepshrink.pipeline.recipe import load_recipe
    from deepshrink.pipeline.runner import STAGE_COLUMNS, run_recipe
    from deepshrink.report import print_table

    recipe = load_recipe(args.recipe)
    print(f"recipe {recipe.name}:")
    print("\n".join(recipe.plan()))
    if args.dry_run:
        return 0
    if args.model.endswith(".onnx"):
        return _compress_onnx(args, recipe)
    if args.npz or args.eval_npz or args.output:
        raise DeepShrinkError("--npz, --eval-npz and --output are for .onnx models; PyTorch models use --dataset/--data-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model, args.weights)
    data = _load_data(args, train_subset=args.train_subset)
    out = args.out or f"runs/{recipe.name}-{args.model.replace(':', '_')}"
    model_name = args.model if args.model in list_models() else None
    result = run_recipe(model, recipe, data, out, architecture_of(args.model), progress=not args.no_progress, model_name=model_name)
    print_table(result.rows, STAGE_COLUMNS, title=f"{recipe.name} on {args.model} ({len(data.test):,} test images)")
    for path in (result.dsz_path, result.onnx_path):
        if path:
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if result.onnx_max_abs_diff is not None:
        print(f"ONNX Runtime vs torch on the decoded model: max|diff| {result.onnx_max_abs_diff:.2e}")
    print(f"report: {result.out_dir / 'report.md'}")
    return 0


def _compress_onnx(args: argparse.Namespace, recipe) -> int:
    from pathlib import Path

    from deepshrink.onnx_in import compress_onnx

    out = args.out or f"runs/{recipe.name}-{Path(args.model).stem}"
    report = compress_onnx(
        args.model,
        recipe,
        out,
        npz=args.npz,
        progress=not args.no_progress,
        eval_npz=args.eval_npz,
        threads=args.threads,
        output=args.output,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    print(f"report: {Path(out) / 'report.md'}")
    return 0


@command("eval")
def _eval(args: argparse.Namespace) -> int:
    from deepshrink.evaluate import evaluate
    from deepshrink.models import resolve_model
    from deepshrink.models.weights import read_manifest

    data = _load_data(args)
    model = resolve_model(args.model, args.weights)
    reference = resolve_model(args.reference) if args.reference else None
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    report = evaluate(
        model,
        data.test,
        args.model,
        reference=reference,
        batch_sizes=batch_sizes,
        repeats=args.repeats,
        onnx=not args.no_onnx,
        threads=args.threads,
    )
    manifest_top1 = read_manifest().get(args.model, {}).get("test_top1") if args.weights is None else None
    if args.json:
        print(json.dumps({**report.to_dict(layers=args.layers), "manifest_top1": manifest_top1}, indent=2))
        return 0
    _print_eval_report(report, manifest_top1, args.layers)
    return 0


def _print_eval_report(report, manifest_top1: float | None, layers: bool) -> None:
    from deepshrink.report import Column, print_table

    acc, size, compute = report.accuracy, report.size, report.compute
    rows = [
        ("Top-1 / Top-5 %", f"{acc.top1:.2f} / {acc.top5:.2f}  (loss {acc.loss:.4f}, {acc.samples:,} images)"),
        ("manifest Top-1 %", "-" if manifest_top1 is None else f"{manifest_top1:.2f}  (diff {acc.top1 - manifest_top1:+.2f}pp)"),
        ("params (non-zero)", f"{size.params:,} ({size.nonzero_params:,}, sparsity {100 * size.sparsity:.1f}%)"),
        ("weight layers", f"{size.layers}"),
        ("dense fp32 / on disk / ONNX", f"{size.dense_fp32_bytes:,} / {size.disk_bytes:,} / {size.onnx_bytes or 0:,} bytes"),
        ("MACs (effective)", f"{compute.macs:,} ({compute.effective_macs:,})"),
        ("FLOPs: all / conv+linear", f"{compute.flops:,} / {compute.conv_linear_flops:,}"),
        (
            "FlopCounterMode FLOPs",
            f"{report.flop_counter_flops:,} ({'equal' if report.flop_counter_flops == compute.conv_linear_flops else 'DIFFERENT'})",
        ),
    ]
    if report.robustness:
        rows.append(("Top-1 % under input noise", report.robustness.describe()))
    if report.compression_ratio is not None:
        rows.append(("compression vs reference", f"{report.compression_ratio:.2f}x (bytes on disk)"))
    rows += [
        (f"{r.backend} batch {r.batch_size} ms", f"median {r.median_ms:.3f}, p90 {r.p90_ms:.3f} ({r.runs} runs)") for r in report.latency
    ]
    rows += [(f"peak memory {k}", f"{v / 2**20:.1f} MiB") for k, v in report.peak_memory_bytes.items()]
    if report.onnx:
        o = report.onnx
        rows.append(
            ("ORT vs torch", f"max|diff| {o.max_abs_diff:.2e}, top-1 agreement {o.top1_agreement:.2f}%, ORT Top-1 {o.test_top1:.2f}%")
        )
    env = report.environment
    rows.append(
        (
            "machine",
            f"{env['cpu']} ({', '.join(env['cpu_flags'])}), {env['torch_threads']} threads, torch {env['versions']['torch']}, ORT {env['versions']['onnxruntime']}",
        )
    )
    print_table(rows, [Column("metric", lambda r: r[0]), Column("value", lambda r: r[1])], title=f"{report.name}: evaluation")
    if layers:
        print_table(
            [layer for layer in compute.layers if layer.macs or layer.kind == "add"],
            [
                Column("layer", lambda r: r.name),
                Column("type", lambda r: r.kind),
                Column("params", lambda r: r.params, "{:,}"),
                Column("MACs", lambda r: r.macs, "{:,}"),
                Column("effective MACs", lambda r: r.effective_macs, "{:,}"),
                Column("FLOPs", lambda r: r.flops, "{:,}"),
                Column("output", lambda r: "x".join(map(str, r.output_shape))),
            ],
            title="per layer",
        )


@command("train")
def _train(args: argparse.Namespace) -> int:
    from deepshrink.evaluate.accuracy import evaluate_accuracy
    from deepshrink.models import create_model, save_weights
    from deepshrink.models.weights import publish_pretrained
    from deepshrink.train import TrainConfig, train

    if args.publish and (args.train_subset or args.test_subset or args.dataset != "fashion-mnist"):
        raise DeepShrinkError("--publish stores zoo weights, which are trained on the full Fashion-MNIST training set")
    data = _load_data(args, seed=args.seed, train_subset=args.train_subset)
    model = create_model(args.model, in_channels=data.input_shape[0], num_classes=data.num_classes, **_size_kwargs(args.model, data))
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        augment=args.augment,
        seed=args.seed,
        threads=args.threads,
    )
    result = train(model, data.train, config, data.val, checkpoint=args.checkpoint, progress=not args.no_progress)
    test = evaluate_accuracy(model, data.test)
    print(f"{args.model}: test top1 {test.top1:.2f}% top5 {test.top5:.2f}% in {result.wall_time_s:.0f}s")
    if args.out:
        save_weights(model, args.out)
    if args.publish:
        entry = publish_pretrained(
            args.model,
            model,
            {
                "dataset": args.dataset,
                "test_top1": round(test.top1, 2),
                "test_top5": round(test.top5, 2),
                "epochs": args.epochs,
                "seed": args.seed,
                "train_time_s": round(result.wall_time_s, 1),
                "torch": torch.__version__,
                "command": "deepshrink " + shlex.join(sys.argv[1:]),
            },
        )
        print(f"published {entry['file']} (sha256 {entry['sha256'][:12]}...)")
    return 0


PRUNE_LATENCY_BATCH = 64


@command("prune")
def _prune(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from deepshrink.compress.prune import nm_masks
    from deepshrink.core.methods import Context, apply_method
    from deepshrink.evaluate.latency import ort_latency_interleaved
    from deepshrink.models import resolve_model

    cfg = _prune_config(args)  # before any loading: a bad flag fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model, args.weights)
    if args.method == "nm":
        nm_masks(model, cfg.n, cfg.m, cfg.scope)  # a layer M does not divide fails before data loading and fine-tuning
    data = _load_data(args, train_subset=args.train_subset)
    out = Path(args.out or f"runs/prune-{args.model.replace(':', '_')}-{args.method}")
    out.mkdir(parents=True, exist_ok=True)
    files = _prune_sensitivity(model, data, cfg, args, out) if args.sensitivity else {}
    before, onnx_before = _prune_metrics(model, data)
    start = time.perf_counter()
    pruned = apply_method(model, cfg, Context(data, progress=not args.no_progress))
    prune_time = time.perf_counter() - start
    after, _ = _prune_metrics(pruned, data)
    files.update(_prune_write(pruned, cfg, data, out, args))
    session_after, diff = _prune_verify_onnx(pruned, data, files["onnx"], args.threads)
    sessions = {"before": _ort(onnx_before, args.threads), "after": session_after}
    for side, (median, p90) in ort_latency_interleaved(sessions, data.input_shape, PRUNE_LATENCY_BATCH, args.repeats).items():
        (before if side == "before" else after).update(ort_b64_ms=median, ort_b64_p90_ms=p90)
    report = {
        **report_header(cfg, data, model=args.model, method=args.method),
        "before": before,
        "after": after,
        "latency": {
            "backend": "onnxruntime",
            "batch_size": PRUNE_LATENCY_BATCH,
            "repeats": args.repeats,
            "rounds": 3,
            "threads": args.threads,
        },
        "onnx_max_abs_diff": diff,
        "prune_time_s": prune_time,
        "files": files,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_prune_table(report)
    print(f"ONNX Runtime vs torch on the pruned model: max|diff| {diff:.2e}")
    print(f"wrote {', '.join(str(p) for p in files.values())} and {out / 'report.json'}")
    return 0


def _prune_config(args: argparse.Namespace):
    """The method config for the flags; flags that the method ignores are errors, not silently dropped."""
    import re

    from deepshrink.compress.prune import ChannelPrune, MagnitudePrune, NMPrune
    from deepshrink.core.config import Scope
    from deepshrink.train import TrainConfig

    unused = {
        "magnitude": {"--importance": args.importance, "--round-to": args.round_to, "--nm": args.nm},
        "channel": {"--nm": args.nm},
        "nm": {
            "--sparsity": args.sparsity,
            "--granularity": args.granularity,
            "--importance": args.importance,
            "--round-to": args.round_to,
        },
    }[args.method]
    given = [flag for flag, value in unused.items() if value is not None]
    if given:
        raise DeepShrinkError(f"--method {args.method} does not use {', '.join(given)}")
    if args.method != "nm" and args.sparsity is None:
        raise DeepShrinkError(f"--method {args.method} needs --sparsity")
    if args.finetune_epochs < 0:
        raise DeepShrinkError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    finetune = TrainConfig(epochs=args.finetune_epochs, lr=args.lr, threads=args.threads) if args.finetune_epochs else None
    scope = Scope(exclude=args.exclude)
    granularity = args.granularity or "layer"
    if args.method == "magnitude":
        return MagnitudePrune(sparsity=args.sparsity, granularity=granularity, scope=scope, finetune=finetune)
    if args.method == "channel":
        return ChannelPrune(
            ratio=args.sparsity,
            importance=args.importance or "l1",
            granularity=granularity,
            round_to=args.round_to or 1,
            scope=scope,
            finetune=finetune,
        )
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", args.nm or "2:4")
    if not match:
        raise DeepShrinkError(f"--nm must look like N:M (e.g. 2:4), got {args.nm!r}")
    return NMPrune(n=int(match[1]), m=int(match[2]), scope=scope, finetune=finetune)


def _prune_metrics(model, data) -> tuple[dict, bytes]:
    """Accuracy, size and compute of one side of the comparison, plus its ONNX bytes for timing."""
    from torch import nn

    from deepshrink.evaluate import count_compute, evaluate_accuracy, measure_size
    from deepshrink.export import onnx_bytes

    onnx = onnx_bytes(model, data.input_shape)
    acc, size, compute = evaluate_accuracy(model, data.test), measure_size(model, len(onnx)), count_compute(model, data.input_shape)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    metrics = {
        "top1": acc.top1,
        "top5": acc.top5,
        "params": size.params,
        "nonzero_params": size.nonzero_params,
        "weights": total,
        "weight_sparsity": 1.0 - sum(int(torch.count_nonzero(w)) for w in weights) / total if total else 0.0,
        "macs": compute.macs,
        "effective_macs": compute.effective_macs,
        "disk_bytes": size.disk_bytes,
        "onnx_bytes": len(onnx),
    }
    return metrics, onnx


def _prune_write(model, cfg, data, out, args: argparse.Namespace) -> dict[str, str]:
    from deepshrink.export import export_onnx
    from deepshrink.models import architecture_of, save_weights

    metadata = {"architecture": json.dumps(architecture_of(args.model)), "method": args.method, "config": json.dumps(cfg.to_dict())}
    weights = save_weights(model, out / "model.safetensors", metadata)
    onnx = export_onnx(model, out / "model.onnx", data.input_shape)
    return {"weights": str(weights), "onnx": str(onnx)}


def _ort(model, threads: int | None):
    from deepshrink.export import ort_session

    return ort_session(model, threads)


def _prune_verify_onnx(model, data, path: str, threads: int | None):
    """The written ONNX file's session and its max|diff| from torch on a test batch."""
    from deepshrink.export import verify_onnx

    session = _ort(path, threads)
    return session, verify_onnx(model, session, data.test.images[:PRUNE_LATENCY_BATCH])


def _prune_sensitivity(model, data, cfg, args: argparse.Namespace, out) -> dict[str, str]:
    """Per-layer magnitude sensitivity of the unpruned model: JSON (with suggested ratios for magnitude) and PNG."""
    from deepshrink.analysis.sensitivity import layer_sensitivity, layer_sparsities_for_target, plot_sensitivity

    if len(data.val) == 0:
        raise DeepShrinkError("--sensitivity measures on the validation set: use --val-size > 0")
    val = data.val.subset(args.sensitivity_subset)
    result = layer_sensitivity(model, val, scope=cfg.scope)
    payload = result.to_dict()
    if args.method == "magnitude":
        try:
            payload["suggested_layer_sparsity"] = layer_sparsities_for_target(result, cfg.sparsity)
        except DeepShrinkError as exc:  # e.g. a target above the measured levels: the analysis still stands
            payload["suggested_layer_sparsity"] = None
            payload["suggestion_error"] = str(exc)
    (out / "sensitivity.json").write_text(json.dumps(payload, indent=2) + "\n")
    png = plot_sensitivity(result, out / "sensitivity.png", title=f"{args.model}: per-layer sensitivity ({len(val):,} validation images)")
    return {"sensitivity_json": str(out / "sensitivity.json"), "sensitivity_png": str(png)}


def _print_prune_table(report: dict) -> None:
    from deepshrink.report import Column, print_table

    b, a = report["before"], report["after"]

    def ratio(key: str) -> str:
        return f"x{a[key] / b[key]:.3f}" if b[key] else "-"

    rows = [
        ("Top-1 %", f"{b['top1']:.2f}", f"{a['top1']:.2f}", f"{a['top1'] - b['top1']:+.2f}pp"),
        ("params", f"{b['params']:,}", f"{a['params']:,}", ratio("params")),
        ("non-zero params", f"{b['nonzero_params']:,}", f"{a['nonzero_params']:,}", ratio("nonzero_params")),
        ("conv/linear weight sparsity %", f"{100 * b['weight_sparsity']:.2f}", f"{100 * a['weight_sparsity']:.2f}", ""),
        ("MACs (dense)", f"{b['macs']:,}", f"{a['macs']:,}", ratio("macs")),
        ("MACs (effective, zeros skipped)", f"{b['effective_macs']:,}", f"{a['effective_macs']:,}", ratio("effective_macs")),
        ("safetensors bytes", f"{b['disk_bytes']:,}", f"{a['disk_bytes']:,}", ratio("disk_bytes")),
        ("ONNX bytes", f"{b['onnx_bytes']:,}", f"{a['onnx_bytes']:,}", ratio("onnx_bytes")),
        (f"ORT batch {PRUNE_LATENCY_BATCH} ms (median)", f"{b['ort_b64_ms']:.3f}", f"{a['ort_b64_ms']:.3f}", ratio("ort_b64_ms")),
    ]
    print_table(
        rows,
        [
            Column("metric", lambda r: r[0]),
            Column("before", lambda r: r[1]),
            Column("after", lambda r: r[2]),
            Column("change", lambda r: r[3]),
        ],
        title=f"prune {report['model']} ({report['method']}) on {report['dataset']} test ({report['test_images']:,} images)",
    )


def _size_kwargs(name: str, data) -> dict:
    """The MLP/LeNet zoo models need the input side length; the others are size-agnostic."""
    import inspect

    from deepshrink.models import MODELS

    return {"input_size": data.input_shape[-1]} if "input_size" in inspect.signature(MODELS.get(name)).parameters else {}


def main(argv: list[str] | None = None) -> int:
    from deepshrink.distributed import command_context, world_from_env

    args = build_parser().parse_args(argv)
    try:
        with command_context(args):  # --device, torchrun's process group; only rank 0 writes
            return COMMANDS[args.command](args)
    except DeepShrinkError as exc:
        if world_from_env().is_main:  # under torchrun every rank fails alike: one line, not N
            print(f"deepshrink: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
