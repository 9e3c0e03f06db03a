"""``deepshrink auto``: accuracy-aware search of per-layer sparsity and k-means bits for a
size (or latency) budget; writes model.dsz, model.onnx, plan.json and a report.

Exit status 0 when the budget is met, 1 when the search ran but could not meet it
(the closest trial is written and the report says what was missed), 2 for bad input
or an out-of-reach target (found before any training).
"""

import argparse
from pathlib import Path

from deepshrink.commands import command
from deepshrink.commands.args import add_data_args, load_data


def add_commands(sub) -> None:
    p = sub.add_parser("auto", help="search per-layer pruning + k-means bits for a size/latency budget within a Top-1 drop")
    p.add_argument("model", help="zoo name or module:function")
    p.add_argument("--max-drop", type=float, default=1.0, help="largest Top-1 drop allowed, percentage points (default 1.0)")
    p.add_argument("--target-size", default=None, help="largest .dsz file: 200KB (1000 bytes), 196KiB (1024), 1.5MB or 150000 (bytes)")
    p.add_argument("--target-latency", default=None, help="largest ONNX Runtime median latency: 5ms, 800us (removes channels)")
    p.add_argument("--latency-batch", type=int, default=1, help="batch size the latency target is for")
    p.add_argument("--epochs", type=int, default=2, help="pruning fine-tune epochs per trial")
    p.add_argument("--share-epochs", type=int, default=1, help="codebook fine-tune epochs per trial")
    p.add_argument("--lr", type=float, default=0.01, help="pruning fine-tune peak learning rate")
    p.add_argument("--max-trials", type=int, default=4, help="fine-tuned trials the search may spend")
    p.add_argument("--sensitivity-samples", type=int, default=512, help="validation images for the per-layer sensitivity")
    p.add_argument("--no-distill", action="store_true", help="fine-tune on labels only, without KD from the original model")
    p.add_argument("--gate", choices=["val", "test"], default="val", help="set the drop is checked on during the search")
    p.add_argument("--train-subset", type=int, default=20000, help="training images for fine-tuning (default 20000)")
    p.add_argument("--weights", default=None, help="safetensors weights (default: the zoo's pretrained)")
    p.add_argument("--out", default=None, help="output folder (default: runs/auto-<model>)")
    add_data_args(p)
    p.add_argument("--no-progress", action="store_true")


def _budget(args: argparse.Namespace) -> tuple[float, int | None, float | None]:
    """Parsed before anything loads, so a bad value fails at once with one line."""
    from deepshrink.pipeline.auto import check_max_drop, parse_latency, parse_size

    max_drop = check_max_drop(args.max_drop)
    target_bytes = parse_size(args.target_size) if args.target_size is not None else None
    target_ms = parse_latency(args.target_latency) if args.target_latency is not None else None
    return max_drop, target_bytes, target_ms


def _options(args: argparse.Namespace):
    from deepshrink.pipeline.auto import AutoOptions

    return AutoOptions(
        epochs=args.epochs,
        share_epochs=args.share_epochs,
        lr=args.lr,
        max_trials=args.max_trials,
        sensitivity_samples=args.sensitivity_samples,
        gate=args.gate,
        latency_batch=args.latency_batch,
        threads=args.threads,
        distill=not args.no_distill,
    )


@command("auto")
def _auto(args: argparse.Namespace) -> int:
    import torch

    from deepshrink.models import architecture_of, resolve_model
    from deepshrink.pipeline.auto import auto_compress

    max_drop, target_bytes, target_ms = _budget(args)
    options = _options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model, args.weights)
    data = load_data(args, train_subset=args.train_subset)
    out = Path(args.out or f"runs/auto-{args.model.replace(':', '_')}")
    result = auto_compress(
        model,
        data,
        max_drop,
        target_bytes,
        target_ms,
        out_dir=out,
        progress=not args.no_progress,
        architecture=architecture_of(args.model),
        options=options,
    )
    _print(result)
    print(f"wrote {', '.join(str(p) for p in result.paths.values())}")
    return 0 if result.met else 1


def _print(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from deepshrink.pipeline.auto import TRIAL_COLUMNS
    from deepshrink.report.tables import print_table

    print_table(result.trials, TRIAL_COLUMNS, title=f"trials (Top-1 on the {result.gate} set)")
    table = Table(title=f"chosen plan: {result.reason}")
    for name in ("layer", "sparsity %", "bits"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for layer, setting in result.plan.items():
        table.add_row(layer, f"{100 * setting['sparsity']:.1f}", str(setting["bits"]) if setting["bits"] != 32 else "fp32")
    Console(width=120).print(table)
    drop = "-" if result.drop is None else f"{result.drop:.2f}"
    top1 = "-" if result.top1 is None else f"{result.top1:.2f}"
    ratio = "-" if result.ratio is None else f"{result.ratio:.1f}x"
    print(
        f"test Top-1 {result.baseline_top1:.2f}% -> {top1}% (drop {drop}), {result.fp32_bytes:,} fp32 bytes -> "
        f"{result.bytes:,} bytes .dsz ({ratio}); {result.reason}"
    )
