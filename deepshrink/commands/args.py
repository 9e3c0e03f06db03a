"""Arguments and helpers every command family shares: data flags, the report
header, the before/after table."""

import argparse
import inspect

import torch


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--dataset, --data-dir, --val-size, --test-subset and --threads."""
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist", "cifar10", "npz"])
    p.add_argument("--data-dir", default=None, help="dataset directory (or .npz file); Fashion-MNIST defaults to the Debian package's")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--threads", type=int, default=None, help="torch/ORT intra-op threads (default: torch's)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dist-backend, for the commands that train or calibrate."""
    from deepshrink.distributed import BACKENDS, DEVICE_NAMES

    p.add_argument(
        "--device",
        default=None,
        help=f"where training, calibration and validation run: {DEVICE_NAMES} (default: each config's, auto = CUDA when available); files written never depend on it",
    )
    p.add_argument(
        "--dist-backend", default="auto", choices=BACKENDS, help="under torchrun: gloo (CPU) or nccl (GPUs); auto picks by device"
    )


def load_data(args: argparse.Namespace, **kwargs):
    """The data the flags of ``add_data_args`` name; ``kwargs`` add e.g. ``train_subset`` or ``seed``."""
    import deepshrink.data

    return deepshrink.data.load_data(args.dataset, args.data_dir, val_size=args.val_size, test_subset=args.test_subset, **kwargs)


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def report_header(cfg, data, **identity) -> dict:
    """How every command's report.json starts: what ran (``identity``), its config and the data it was measured on."""
    return {**identity, "config": cfg.to_dict(), "dataset": data.name, "test_images": len(data.test)}


def size_kwargs(name: str, data) -> dict:
    """The MLP/LeNet zoo models need the input side length; the others are size-agnostic."""
    from deepshrink.models import MODELS

    return {"input_size": data.input_shape[-1]} if "input_size" in inspect.signature(MODELS.get(name)).parameters else {}


def run_folder(args: argparse.Namespace, *parts: str) -> str:
    """``--out``, or runs/<parts joined by '-'> with ':' of a module:function model made path-safe."""
    return args.out or "runs/" + "-".join(p.replace(":", "_") for p in parts)


def print_comparison(comparison, title: str) -> None:
    """The before/after table of an ``evaluate.compare`` record: one row per measurement."""
    from deepshrink.report import Column, print_table

    before, after = comparison.labels
    print_table(
        comparison.rows(),
        [
            Column("metric", lambda r: r[0]),
            Column(before, lambda r: r[1]),
            Column(after, lambda r: r[2]),
            Column("change", lambda r: r[3]),
        ],
        title=title,
    )
