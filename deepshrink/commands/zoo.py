"""``deepshrink models`` (the zoo, optionally measured) and ``deepshrink train`` (train or publish zoo weights)."""

import argparse
import json
import shlex
import sys

import torch

from deepshrink.commands import command
from deepshrink.commands.args import add_data_args, load_data, size_kwargs
from deepshrink.core.errors import DeepShrinkError


def add_commands(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo with accuracy, params and MACs")
    p.add_argument("--evaluate", action="store_true", help="measure every pretrained model on the test set (accuracy, size, MACs, latency)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train a zoo model")
    p.add_argument("model")
    add_data_args(p)
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


@command("train")
def _train(args: argparse.Namespace) -> int:
    from deepshrink.evaluate.accuracy import evaluate_accuracy
    from deepshrink.models import create_model, save_weights
    from deepshrink.models.weights import publish_pretrained
    from deepshrink.train import TrainConfig, train

    if args.publish and (args.train_subset or args.test_subset or args.dataset != "fashion-mnist"):
        raise DeepShrinkError("--publish stores zoo weights, which are trained on the full Fashion-MNIST training set")
    data = load_data(args, seed=args.seed, train_subset=args.train_subset)
    model = create_model(args.model, in_channels=data.input_shape[0], num_classes=data.num_classes, **size_kwargs(args.model, data))
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
