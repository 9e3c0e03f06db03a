"""The ``deepshrink`` command. Errors print as one line and exit with status 2."""

import argparse
import json
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


def _load_data(args, **kwargs):
    from deepshrink.data import load_data

    return load_data(args.dataset, args.data_dir, val_size=args.val_size, test_subset=args.test_subset, **kwargs)


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
    _add_data_args(p)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--layers", action="store_true", help="also print per-layer MACs/FLOPs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("compress", help="run a compression recipe; writes .dsz, ONNX and a per-stage report")
    p.add_argument("model", help="zoo name or module:function")
    p.add_argument("--recipe", required=True, help="shipped recipe name (deep-compression) or a YAML file")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<recipe>-<model>); re-running resumes")
    _add_data_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and stop")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


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
    from deepshrink.models import architecture_of, resolve_model
    from deepshrink.pipeline.recipe import load_recipe
    from deepshrink.pipeline.runner import STAGE_COLUMNS, run_recipe
    from deepshrink.report import print_table

    recipe = load_recipe(args.recipe)
    print(f"recipe {recipe.name}:")
    print("\n".join(recipe.plan()))
    if args.dry_run:
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model, args.weights)
    data = _load_data(args)
    out = args.out or f"runs/{recipe.name}-{args.model.replace(':', '_')}"
    result = run_recipe(model, recipe, data, out, architecture_of(args.model), progress=not args.no_progress)
    print_table(result.rows, STAGE_COLUMNS, title=f"{recipe.name} on {args.model} ({len(data.test):,} test images)")
    for path in (result.dsz_path, result.onnx_path):
        if path:
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if result.onnx_max_abs_diff is not None:
        print(f"ONNX Runtime vs torch on the decoded model: max|diff| {result.onnx_max_abs_diff:.2e}")
    print(f"report: {result.out_dir / 'report.md'}")
    return 0


@command("eval")
def _eval(args: argparse.Namespace) -> int:
    from deepshrink.evaluate import evaluate
    from deepshrink.models import resolve_model
    from deepshrink.models.weights import read_manifest

    data = _load_data(args)
    model = resolve_model(args.model, args.weights)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    report = evaluate(
        model, data.test, args.model, batch_sizes=batch_sizes, repeats=args.repeats, onnx=not args.no_onnx, threads=args.threads
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


def _size_kwargs(name: str, data) -> dict:
    """The MLP/LeNet zoo models need the input side length; the others are size-agnostic."""
    import inspect

    from deepshrink.models import MODELS

    return {"input_size": data.input_shape[-1]} if "input_size" in inspect.signature(MODELS.get(name)).parameters else {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DeepShrinkError as exc:
        print(f"deepshrink: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
